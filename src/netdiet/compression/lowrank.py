"""Low-rank factorisation: a weight W (out x in) becomes two thinner layers through its truncated SVD.

    W ~= U_r S_r V_r^T  =  (U_r S_r^1/2) (S_r^1/2 V_r^T)        params: out*in  ->  r*(out + in)

Linear(in, out)           -> Sequential(Linear(in, r, bias=False), Linear(r, out))
Conv2d(cin, cout, k x k)  -> Sequential(Conv2d(cin, r, k x k, same stride/padding/dilation, bias=False), Conv2d(r, cout, 1))
(the conv weight is read as a cout x (cin*k*k) matrix). Grouped convolutions are left alone.

Rank per layer, one of:
  energy=e        smallest r keeping a fraction e of the squared singular values (sum s_i^2, i < r) / (sum s_i^2)
  param_ratio=p   one energy threshold for all layers, found by bisection, so the factorised layers together keep
                  at most p of their original parameters (layers where r*(out+in) >= out*in stay dense)
  rank=r          the same rank everywhere (capped at min(out, in))
A layer is only factorised when that saves parameters. The edit is recorded as {"op": "lowrank", "layers": [...]}
so the archive rebuilds the shapes from the factory's model; then the model is fine-tuned if the stage asks.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from netdiet.compression.base import (CompressionState, StageContext, Technique, get_submodule, register_structure_op,
                                   register_technique, set_submodule)
from netdiet.compression.finetune import finetune
from netdiet.errors import NetdietError


def _is_candidate(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return True
    return isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.padding_mode == "zeros"


def _as_matrix(mod: nn.Module) -> torch.Tensor:
    w = mod.weight.detach()
    return w.reshape(w.shape[0], -1)


def _singular_values(mod: nn.Module) -> torch.Tensor:
    return torch.linalg.svdvals(_as_matrix(mod).double())


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest r with sum(s[:r]^2) >= energy * sum(s^2) (at least 1)."""
    e = s.double() ** 2
    total = e.sum().item()
    if total <= 0:
        return 1
    cum = torch.cumsum(e, 0) / total
    # tolerance: energy=1.0 must give the full rank even with rounding in the cumulative sum
    return int(min(len(s), max(1, int((cum < energy - 1e-12).sum().item()) + 1)))


def _factor_params(out_f: int, in_f: int, r: int) -> int:
    return r * (out_f + in_f)


def _build_factored(mod: nn.Module, rank: int) -> nn.Sequential:
    """Empty factorised layers with the right shapes (weights are filled by the caller or by the archive)."""
    has_bias = mod.bias is not None
    if isinstance(mod, nn.Linear):
        first = nn.Linear(mod.in_features, rank, bias=False)
        second = nn.Linear(rank, mod.out_features, bias=has_bias)
    else:
        first = nn.Conv2d(mod.in_channels, rank, mod.kernel_size, mod.stride, mod.padding, mod.dilation, bias=False)
        second = nn.Conv2d(rank, mod.out_channels, 1, bias=has_bias)
    w = mod.weight
    return nn.Sequential(first, second).to(device=w.device, dtype=w.dtype)


@torch.no_grad()
def factorise(mod: nn.Module, rank: int) -> nn.Sequential:
    """The rank-`rank` SVD factorisation of a Linear or Conv2d as two layers computing U_r S_r V_r^T x + b."""
    w = mod.weight.detach()
    u, s, vh = torch.linalg.svd(_as_matrix(mod).double(), full_matrices=False)
    root = s[:rank].sqrt()
    a = (root[:, None] * vh[:rank])              # r x in
    b = (u[:, :rank] * root[None, :])            # out x r
    seq = _build_factored(mod, rank)
    seq[0].weight.copy_(a.reshape(seq[0].weight.shape).to(w.dtype))
    seq[1].weight.copy_(b.reshape(seq[1].weight.shape).to(w.dtype))
    if mod.bias is not None:
        seq[1].bias.copy_(mod.bias.detach())
    seq.train(mod.training)
    return seq


@register_structure_op("lowrank")
def replay_lowrank(model: nn.Module, edit: dict) -> nn.Module:
    """Rebuild the factorised shapes recorded by `LowRank.apply` (values come from the archive)."""
    layers = edit.get("layers")
    if not isinstance(layers, list):
        raise NetdietError("lowrank edit in archive has no layer list; the file is damaged or from another tool")
    for item in layers:
        try:
            name, rank = str(item["name"]), int(item["rank"])
            mod = get_submodule(model, name)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise NetdietError(f"lowrank edit {item!r} does not fit this model; rebuild with the same model and --model-kw") from None
        if not _is_candidate(mod) or rank < 1 or rank > min(_as_matrix(mod).shape):
            raise NetdietError(f"lowrank edit for '{name}' (rank {rank}) does not fit layer {type(mod).__name__}; "
                               "rebuild with the same model and --model-kw")
        model = set_submodule(model, name, _build_factored(mod, rank))
    return model


@register_technique
class LowRank(Technique):
    name = "lowrank"
    defaults: dict[str, Any] = {"energy": None, "param_ratio": None, "rank": None, "layers": None, "include_conv": True}

    def validate(self) -> None:
        o = self.options
        chosen = [k for k in ("energy", "param_ratio", "rank") if o[k] is not None]
        if len(chosen) > 1:
            raise NetdietError(f"lowrank takes one of energy, param_ratio or rank, got {', '.join(chosen)}; keep one")
        if not chosen:
            o["energy"] = 0.9
        if o["energy"] is not None and not (isinstance(o["energy"], (int, float)) and 0 < o["energy"] <= 1):
            raise NetdietError(f"lowrank energy {o['energy']!r} is outside (0, 1]; give the fraction of spectral energy to keep, e.g. 0.9")
        if o["param_ratio"] is not None and not (isinstance(o["param_ratio"], (int, float)) and 0 < o["param_ratio"] < 1):
            raise NetdietError(f"lowrank param_ratio {o['param_ratio']!r} is outside (0, 1); give the fraction of parameters to keep, e.g. 0.3")
        if o["rank"] is not None and not (isinstance(o["rank"], int) and not isinstance(o["rank"], bool) and o["rank"] >= 1):
            raise NetdietError(f"lowrank rank {o['rank']!r} is not a positive integer; give e.g. rank: 16")
        if o["layers"] is not None and (not isinstance(o["layers"], list) or not all(isinstance(n, str) for n in o["layers"])):
            raise NetdietError("lowrank layers must be a list of module names, e.g. ['1', '3']; `netdiet profile` lists them")

    # -------------------------------------------------------------- rank choice
    def _candidates(self, model: nn.Module) -> dict[str, nn.Module]:
        wanted = self.options["layers"]
        found = {n: m for n, m in model.named_modules() if _is_candidate(m)
                 and (self.options["include_conv"] or isinstance(m, nn.Linear))}
        if wanted is None:
            return found
        missing = [n for n in wanted if n not in found]
        if missing:
            raise NetdietError(f"lowrank layers {missing} are not Linear/Conv2d layers of this model; choose from {sorted(found)}")
        return {n: found[n] for n in wanted}

    def choose_ranks(self, model: nn.Module) -> dict[str, int | None]:
        """Layer name -> rank, or None where factorising would not save parameters."""
        cands = self._candidates(model)
        svals = {n: _singular_values(m) for n, m in cands.items()}
        shapes = {n: tuple(_as_matrix(m).shape) for n, m in cands.items()}

        def ranks_at(energy: float) -> dict[str, int | None]:
            out: dict[str, int | None] = {}
            for n, s in svals.items():
                r = rank_for_energy(s, energy)
                out[n] = r if _factor_params(*shapes[n], r) < shapes[n][0] * shapes[n][1] else None
            return out

        o = self.options
        if o["rank"] is not None:
            out = {}
            for n, (m_out, m_in) in shapes.items():
                r = min(o["rank"], m_out, m_in)
                out[n] = r if _factor_params(m_out, m_in, r) < m_out * m_in else None
            return out
        if o["energy"] is not None:
            return ranks_at(float(o["energy"]))

        # param_ratio: the highest common energy whose ranks fit the parameter budget
        budget = o["param_ratio"] * sum(a * b for a, b in shapes.values())

        def cost(ranks: dict[str, int | None]) -> int:
            return sum(shapes[n][0] * shapes[n][1] if r is None else _factor_params(*shapes[n], r) for n, r in ranks.items())

        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if cost(ranks_at(mid)) <= budget:
                lo = mid
            else:
                hi = mid
        best = ranks_at(lo)
        if cost(best) > budget:
            raise NetdietError(f"lowrank param_ratio {o['param_ratio']} cannot be met even at rank 1; raise param_ratio")
        return best

    # -------------------------------------------------------------- apply
    def apply(self, model: nn.Module, state: CompressionState, ctx: StageContext) -> nn.Module:
        ranks = self.choose_ranks(model)
        cands = self._candidates(model)
        params_before = sum(p.numel() for p in model.parameters())
        layers_report: dict[str, dict] = {}
        edit_layers: list[dict] = []
        for name, rank in ranks.items():
            mod = cands[name]
            out_f, in_f = _as_matrix(mod).shape
            s = _singular_values(mod)
            entry = {"type": type(mod).__name__, "matrix": [int(out_f), int(in_f)], "full_rank": int(min(out_f, in_f)),
                     "params_before": int(out_f * in_f)}
            if rank is None:
                entry.update(rank=None, params_after=int(out_f * in_f), energy_retained=1.0)
            else:
                e = (s ** 2)
                entry.update(rank=int(rank), params_after=int(_factor_params(out_f, in_f, rank)),
                             energy_retained=float(e[:rank].sum() / e.sum()) if e.sum() > 0 else 1.0)
                model = set_submodule(model, name, factorise(mod, rank))
                edit_layers.append({"name": name, "kind": type(mod).__name__.lower(), "rank": int(rank)})
                prefix = f"{name}." if name else ""
                for p in ("weight", "bias"):  # these parameters no longer exist under their old names
                    state.masks.pop(prefix + p, None)
                    state.encodings.pop(prefix + p, None)
            layers_report[name] = entry
        if edit_layers:
            state.structure.append({"op": "lowrank", "layers": edit_layers})
        history = finetune(model, state, ctx, description="lowrank fine-tune")
        params_after = sum(p.numel() for p in model.parameters())
        self._report = {
            "rank_rule": next(k for k in ("energy", "param_ratio", "rank") if self.options[k] is not None),
            "layers": layers_report,
            "factorised": [e["name"] for e in edit_layers],
            "params_before": int(params_before), "params_after": int(params_after),
            "param_reduction": (params_before / params_after) if params_after else None,
            "finetune": history.history if history else [],
        }
        return model
