"""Weight sharing (Deep Compression, section 3): k-means on each layer's weights, 2**bits shared values per layer.

Each clustered weight becomes an index into a per-layer codebook; the archive stores the indices at `bits` bits
and the codebook as floats. Only surviving weights are clustered: when a layer has pruned weights (a mask in
`state.masks`, or exact zeros), codebook entry 0 is pinned to 0.0 and holds them, and the other 2**bits - 1
entries are fitted to the survivors, so the layer still has at most 2**bits distinct values and zeros stay zero.

Initialisation `linear` spaces the centroids evenly between the smallest and largest surviving weight (the
paper's best: it keeps the rare large weights that matter), `kmeans++` samples them by squared distance.
Fine-tuning trains the centroids: the gradients of all weights sharing a centroid are summed (the paper's
"grouped by colour and summed") and the centroids take an optimizer step; indices never change.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from netdiet.compression.base import (
    CompressionState,
    Encoding,
    StageContext,
    Technique,
    check_name_patterns,
    prunable_parameters,
    register_technique,
    select_by_patterns,
)
from netdiet.compression.prune import MaskHold
from netdiet.errors import NetdietError
from netdiet.optim import make_optimizer
from netdiet.training.loop import Callback, TrainConfig, fit

INITS = ("linear", "kmeans++")


# ------------------------------------------------------------------ 1-D k-means
def _assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each value (1-D: a binary search over the midpoints)."""
    order = torch.argsort(centroids)
    sorted_c = centroids[order]
    mids = (sorted_c[1:] + sorted_c[:-1]) / 2
    return order[torch.searchsorted(mids, values.contiguous())]


def init_centroids(values: torch.Tensor, k: int, method: str, generator: torch.Generator) -> torch.Tensor:
    lo, hi = values.min(), values.max()
    if method == "linear":
        return torch.linspace(float(lo), float(hi), k, dtype=values.dtype)
    # kmeans++: the first centroid uniformly, each next one with probability proportional to D(x)^2
    centroids = values[torch.randint(len(values), (1,), generator=generator)]
    d2 = (values - centroids[0]).pow(2)
    for _ in range(1, k):
        if float(d2.sum()) == 0.0:  # fewer distinct values than centroids
            centroids = torch.cat([centroids, centroids[-1:]])
            continue
        pick = torch.multinomial(d2, 1, generator=generator)
        centroids = torch.cat([centroids, values[pick]])
        d2 = torch.minimum(d2, (values - values[pick]).pow(2))
    return centroids


def kmeans_1d(values: torch.Tensor, k: int, method: str = "linear", iterations: int = 30, seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's algorithm on scalars: (centroids (k,), index of each value).

    A centroid left without values (linear init puts some in the gap pruning leaves around zero) is moved to the
    value farthest from its centroid in the cluster with the largest squared error, so the 2**bits shared values
    are all used while there are at least that many distinct weights."""
    values = values.detach().float().flatten().cpu()
    if values.numel() == 0:
        return torch.zeros(k), torch.zeros(0, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    centroids = init_centroids(values, k, method, gen)
    idx = _assign(values, centroids)
    for _ in range(iterations):
        sums = torch.zeros(k, dtype=torch.float64).scatter_add_(0, idx, values.double())
        counts = torch.zeros(k, dtype=torch.float64).scatter_add_(0, idx, torch.ones_like(values, dtype=torch.float64))
        new = torch.where(counts > 0, sums / counts.clamp(min=1), centroids.double()).float()
        if bool((counts == 0).any()):
            new = _reseed_empty(values, idx, new, counts)
        new_idx = _assign(values, new)
        converged = torch.equal(new_idx, idx) and torch.equal(new, centroids)
        centroids, idx = new, new_idx
        if converged:
            break
    return centroids, idx


def _reseed_empty(values: torch.Tensor, idx: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    centroids = centroids.clone()
    err = (values - centroids[idx]).pow(2)
    sse = torch.zeros(len(centroids), dtype=torch.float64).scatter_add_(0, idx, err.double())
    for e in torch.nonzero(counts == 0).flatten().tolist():
        worst = int(torch.argmax(sse))
        if float(sse[worst]) <= 0.0:
            break  # every value already sits on a centroid: fewer distinct values than centroids
        far = torch.where(idx == worst, err, torch.full_like(err, -1.0))
        centroids[e] = values[int(torch.argmax(far))]
        sse[worst] = 0.0  # split each cluster at most once per round
    return centroids


def cluster_weight(weight: torch.Tensor, keep: torch.Tensor, bits: int, method: str, iterations: int, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook of 2**bits floats, indices shaped like weight). Pruned positions index a codebook entry 0 pinned
    to 0.0 whenever the layer has any; survivors use the remaining entries."""
    k = 2 ** bits
    pinned = bool((~keep).any())
    free = k - 1 if pinned else k
    keep = keep.cpu()
    survivors = weight.detach().cpu().flatten()[keep.flatten()]
    centroids, idx = kmeans_1d(survivors, free, method, iterations, seed) if survivors.numel() else (torch.zeros(free), None)
    codebook = torch.cat([torch.zeros(1), centroids]) if pinned else centroids
    indices = torch.zeros(weight.numel(), dtype=torch.long)
    if idx is not None:
        indices[keep.flatten()] = idx + (1 if pinned else 0)
    return codebook.float(), indices.view(weight.shape)


# ------------------------------------------------------------------ centroid fine-tuning
class CentroidTraining(Callback):
    """Trains each layer's codebook instead of its weights: before the optimizer step the weight gradients are
    summed per centroid (into the codebook's gradient) and wiped (the weight does not move on its own); after it the
    codebooks take their own optimizer step and every weight is rewritten as codebook[index]."""

    def __init__(self, layers: dict[str, tuple[torch.Tensor, torch.Tensor, bool]], config: TrainConfig) -> None:
        # layers: name -> (codebook, indices, zero_pinned)
        self.layers = layers
        self.config = config
        self.codebooks = {n: nn.Parameter(cb.clone()) for n, (cb, _, _) in layers.items()}
        self._params: dict[str, torch.nn.Parameter] = {}
        self._opt: torch.optim.Optimizer | None = None

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        params = dict(model.named_parameters())
        self._params = {n: params[n] for n in self.layers}
        self._opt = make_optimizer(self.config.optimizer, self.codebooks.values(), self.config.lr, 0.0, self.config.momentum)
        self._write(model)

    def before_step(self, model: nn.Module, step: int) -> None:
        self._opt.zero_grad(set_to_none=False)
        for name, (_, indices, pinned) in self.layers.items():
            p, cb = self._params[name], self.codebooks[name]
            if p.grad is None:
                continue
            grad = torch.zeros_like(cb).scatter_add_(0, indices.flatten(), p.grad.detach().flatten().to("cpu", cb.dtype))
            if pinned:
                grad[0] = 0.0  # the zero centroid holds pruned weights: it stays exactly 0
            cb.grad = grad
            p.grad = None  # the trainer's optimizer skips parameters without gradients
        self._opt.step()
        for name, (_, _, pinned) in self.layers.items():
            if pinned:
                with torch.no_grad():
                    self.codebooks[name][0] = 0.0

    def after_step(self, model: nn.Module, step: int) -> None:
        self._write(model)

    def on_train_end(self, model: nn.Module) -> None:
        self._write(model)

    @torch.no_grad()
    def _write(self, model: nn.Module) -> None:
        for name, (_, indices, _) in self.layers.items():
            p = self._params[name]
            p.copy_(self.codebooks[name].detach()[indices].to(device=p.device, dtype=p.dtype))

    def result(self) -> dict[str, torch.Tensor]:
        return {n: cb.detach().clone() for n, cb in self.codebooks.items()}


# ------------------------------------------------------------------ the technique
def _is_conv(model: nn.Module, param_name: str) -> bool:
    mod_name = param_name.rpartition(".")[0]
    mod = model.get_submodule(mod_name) if mod_name else model
    return isinstance(mod, nn.modules.conv._ConvNd)


@register_technique
class WeightClustering(Technique):
    """k-means weight sharing per layer with centroid fine-tuning; stores Encoding(kind="cluster")."""

    name = "cluster"
    defaults = {
        "bits": 5,              # 2**bits shared values per layer (Deep Compression: 5 for fully connected layers)
        "conv_bits": None,      # bits for convolution layers (Deep Compression: 8); None = `bits`
        "init": "linear",       # linear | kmeans++
        "iterations": 30,       # Lloyd iterations (stops early when no assignment changes)
        "layers": None,         # glob patterns of parameter names (None: every Linear/Conv/Embedding weight)
        "exclude": [],
    }

    def validate(self) -> None:
        o = self.options
        for key in ("bits", "conv_bits"):
            v = o[key]
            if v is None and key == "conv_bits":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 8:
                raise NetdietError(f"cluster: {key} must be an integer in 1..8, got {v!r}")
        if o["init"] not in INITS:
            raise NetdietError(f"cluster: init must be one of {', '.join(INITS)}, got {o['init']!r}")
        it = o["iterations"]
        if not isinstance(it, int) or isinstance(it, bool) or it < 0:
            raise NetdietError(f"cluster: iterations must be a non-negative integer, got {it!r}")
        check_name_patterns("cluster", o)
        self.codebooks: dict[str, torch.Tensor] = {}
        self.indices: dict[str, torch.Tensor] = {}

    def select(self, model: nn.Module) -> dict[str, torch.nn.Parameter]:
        o = self.options
        return select_by_patterns("cluster", prunable_parameters(model), o["layers"], o["exclude"])

    def bits_for(self, model: nn.Module, name: str) -> int:
        o = self.options
        return int(o["conv_bits"]) if o["conv_bits"] is not None and _is_conv(model, name) else int(o["bits"])

    def apply(self, model: nn.Module, state: CompressionState, ctx: StageContext) -> nn.Module:
        o = self.options
        params = self.select(model)
        layers: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = {}
        bits: dict[str, int] = {}
        for i, (name, p) in enumerate(params.items()):
            mask = state.masks.get(name)
            keep = mask.to(torch.bool) if mask is not None and mask.shape == p.shape else (p.detach() != 0)
            bits[name] = self.bits_for(model, name)
            codebook, indices = cluster_weight(p, keep, bits[name], o["init"], int(o["iterations"]), ctx.seed + i)
            layers[name] = (codebook, indices, bool((~keep).any()))
            with torch.no_grad():
                p.copy_(codebook[indices].to(device=p.device, dtype=p.dtype))

        cfg: TrainConfig | None = ctx.finetune if ctx.finetune is not None and ctx.finetune.epochs > 0 else None
        finetune_result = None
        if cfg is not None:
            if ctx.data is None:
                raise NetdietError("cluster: fine-tuning needs data; pass a dataset or set fine-tune epochs to 0")
            cfg = replace(cfg, seed=ctx.seed, description=f"{cfg.description} (cluster)")
            trainer = CentroidTraining(layers, cfg)
            # masks of weights not clustered here (e.g. biases pruned earlier) are held too
            others = {n: m for n, m in state.masks.items() if n not in layers}
            finetune_result = fit(model, ctx.data.x_train, ctx.data.y_train, cfg, callbacks=[MaskHold(others), trainer])
            trained = trainer.result()
            layers = {n: (trained[n], idx, pinned) for n, (_, idx, pinned) in layers.items()}

        report_layers: dict[str, Any] = {}
        for name, (codebook, indices, pinned) in layers.items():
            idx_dtype = torch.uint8
            self.codebooks[name], self.indices[name] = codebook.clone(), indices.to(idx_dtype)
            state.encodings[name] = Encoding(kind="cluster", bits=bits[name], dtype="float32",
                                             codebook=codebook.clone(), indices=indices.to(idx_dtype))
            w = params[name].detach()
            report_layers[name] = {"bits": bits[name], "params": w.numel(), "codebook_size": codebook.numel(),
                                   "distinct_values": int(torch.unique(w).numel()), "zero_pinned": pinned,
                                   "zeros": int((w == 0).sum())}
        self._report = {"technique": self.name, "init": o["init"], "layers": report_layers,
                        "params_clustered": sum(v["params"] for v in report_layers.values()),
                        "index_bits": sum(v["params"] * v["bits"] for v in report_layers.values()),
                        "finetune": finetune_result.to_dict() if finetune_result is not None else None}
        return model

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"codebook.{n}": cb for n, cb in self.codebooks.items()}
        out.update({f"indices.{n}": idx for n, idx in self.indices.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        codebooks = {k[len("codebook."):]: v.clone() for k, v in state.items() if k.startswith("codebook.")}
        indices = {k[len("indices."):]: v.clone() for k, v in state.items() if k.startswith("indices.")}
        if set(codebooks) != set(indices) or len(codebooks) + len(indices) != len(state):
            raise NetdietError("cluster: its state must hold codebook.<param> and indices.<param> pairs and nothing else")
        self.codebooks, self.indices = codebooks, indices
