"""Tensor parallelism (Megatron-style) laid over a model: what each of `tp` ranks holds, and what they exchange.

The layout is the one torch.distributed.tensor.parallel's ColwiseParallel / RowwiseParallel give a transformer
block, Megatron-LM's (Shoeybi et al. 2019): in each attention and MLP *region* the input projections (QKV,
MLP-up/gate) are column-parallel (weight and bias split along the output features: each rank computes its heads /
its slice of the hidden width) and the output projection (attention-out, MLP-down) is row-parallel (weight split
along the input features; its bias is replicated, added after the all-reduce). Token embedding and LM head are
vocab-parallel (embedding rows and head output features split; the cross-entropy runs on the sharded logits, as
`loss_parallel` does) unless `vocab_parallel=False`, which replicates them. Everything else (norms, position
embeddings, the residual stream) is replicated.

Regions are found by the names frameworks use: the zoo transformer (`qkv`/`proj`, an `nn.Sequential` Linear-act-
Linear MLP), Llama-style (`q_proj k_proj v_proj`/`o_proj`, `gate_proj up_proj`/`down_proj`), GPT-2 (`c_attn`/`c_proj`,
`c_fc`/`c_proj`, transformers' Conv1D with its transposed weight), torchtitan (`wq wk wv`/`wo`, `w1 w3`/`w2`) and
`nn.MultiheadAttention` (in-projection column-, out_proj row-parallel).

Per rank (the largest rank where a dimension does not divide: DTensor shards like torch.chunk):
  * parameters: sharded bytes (column-/row-parallel weights, vocab-parallel tables) and replicated bytes;
  * activations, from the single-device estimate's `module_activations` (what each module saved for backward):
    what a column-parallel projection saves is its input, which every rank holds whole (replicated); what the
    region saves between its input and output projections (attention core, activation function, the row-parallel
    projection's input) is split by tp; a dropout on the region's output (GPT-2's resid_dropout), and every module
    outside regions, are replicated; with vocab-parallel the loss's log-softmax (tokens x vocab) is split. Not
    modelled: RoPE's cos/sin tables saved inside attention are counted as split (2 x seq x head_dim, once a model);
  * all-reduce messages per step (logical sizes, tokens x width x activation bytes): forward one per region (the
    row-parallel output) and one for the vocab-parallel embedding, plus loss_parallel's three per-token fp32
    reductions (max, sum of exp, target logit); backward one per region (the gradient of the region input) and one
    for the LM head input. This is Megatron's count with a fused QKV (torch's ColwiseParallel on separate q/k/v_proj
    without a PrepareModuleInput at the region would all-reduce each projection's input gradient separately;
    measure_split lifts the region input to one replicated DTensor, replicate_region_inputs, so it counts the same).

`measure_split` is the check: the zoo transformer parallelized by torch's own `parallelize_module` over gloo on
this machine, each rank's parameter bytes, saved-activation bytes, all-reduce messages and allocator peak measured.
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netdiet.analysis.measurement import measure_memory
from netdiet.analysis.step import default_loss, storage_key
from netdiet.errors import NetdietError
from netdiet.launch import run_ranks
from netdiet.models.inputs import integer_range
from netdiet.models.registry import create_model

OUTSIDE = "(outside the model)"   # memory.py's name for what the loss (outside every module) saved
_ELEM = {"fp32": 4, "bf16": 2, "fp16": 2}

# (column-parallel projection names, the row-parallel one): a module with all of the first among its children and
# the second is a region. Alternatives of the same region kind are listed separately.
REGION_PATTERNS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("qkv",), "proj"),                                   # netdiet zoo attention
    (("q_proj", "k_proj", "v_proj"), "o_proj"),           # Llama, Mistral, Qwen, ...
    (("q_proj", "k_proj", "v_proj"), "out_proj"),         # OPT, BART, CLIP
    (("qkv_proj",), "o_proj"),                            # Phi-3
    (("gate_proj", "up_proj"), "down_proj"),              # Llama MLP
    (("up_proj",), "down_proj"),
    (("c_attn",), "c_proj"),                              # GPT-2 attention (Conv1D)
    (("c_fc",), "c_proj"),                                # GPT-2 MLP (Conv1D)
    (("wq", "wk", "wv"), "wo"),                           # torchtitan
    (("w1", "w3"), "w2"),
)


@dataclass
class Region:
    name: str                  # the module holding the projections ("" for the root)
    cols: list[str]            # full names of the column-parallel projections
    row: str                   # full name of the row-parallel projection
    width_in: int              # features entering the region (the column-parallel input)
    width_out: int             # features leaving it (the row-parallel output)
    after: list[str] = field(default_factory=list)   # dropouts on the region's output (replicated)
    mha: bool = False          # nn.MultiheadAttention: projections are its own parameters


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_conv1d(mod: nn.Module) -> bool:
    """transformers' Conv1D: a Linear whose weight is stored (in, out)."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "weight") and mod.weight.dim() == 2


def _features(mod: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a Linear-like projection, else None."""
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    if _is_conv1d(mod):
        return int(mod.weight.shape[0]), int(mod.weight.shape[1])
    return None


def _sequential_mlp(prefix: str, mod: nn.Module) -> Region | None:
    """nn.Sequential(Linear(d, f), parameter-free modules..., Linear(f, d)): an MLP region."""
    if not isinstance(mod, nn.Sequential) or len(mod) < 3:
        return None
    kids = list(mod.named_children())
    (n0, first), (n1, last) = kids[0], kids[-1]
    middle = [m for _, m in kids[1:-1]]
    if not (isinstance(first, nn.Linear) and isinstance(last, nn.Linear)):
        return None
    if any(isinstance(m, nn.Linear) or any(True for _ in m.parameters()) for m in middle):
        return None
    if first.out_features != last.in_features or first.in_features != last.out_features:
        return None
    return Region(prefix, [_join(prefix, n0)], _join(prefix, n1), first.in_features, last.out_features)


def find_regions(net: nn.Module, mods: dict[str, nn.Module] | None = None) -> list[Region]:
    """Every attention / MLP region of `net` that tensor parallelism splits, in module order (`mods`:
    dict(net.named_modules()) when the caller has it)."""
    regions: list[Region] = []
    for prefix, mod in (mods if mods is not None else dict(net.named_modules())).items():
        if isinstance(mod, nn.MultiheadAttention):
            regions.append(Region(prefix, [prefix], _join(prefix, "out_proj"), mod.embed_dim, mod.embed_dim, mha=True))
            continue
        seq = _sequential_mlp(prefix, mod)
        if seq is not None:
            regions.append(seq)
            continue
        kids = dict(mod.named_children())
        for cols, row in REGION_PATTERNS:
            if row in kids and all(c in kids for c in cols):
                feats = [_features(kids[c]) for c in cols] + [_features(kids[row])]
                if any(f is None for f in feats):
                    continue
                # modules are registered in any order (Llama's act_fn after down_proj, yet it runs before): only a
                # dropout registered after the output projection and not on the attention probabilities (GPT-2's
                # resid_dropout, mlp.dropout) is taken to run on the all-reduced output
                order = list(kids)
                after = [n for n in order[order.index(row) + 1:]
                         if isinstance(kids[n], nn.Dropout) and "attn" not in n]
                regions.append(Region(prefix, [_join(prefix, c) for c in cols], _join(prefix, row),
                                      feats[0][0], feats[-1][1], after=[_join(prefix, n) for n in after]))
                break
    return regions


def _config(net: nn.Module) -> Any:
    cfg = getattr(net, "config", None)
    return cfg if cfg is not None and hasattr(cfg, "to_dict") else None


def tp_heads(net: nn.Module, mods: dict[str, nn.Module] | None = None) -> tuple[int, int] | None:
    """(attention heads, KV heads) that a tensor-parallel degree must divide, or None without attention.

    From a transformers config (num_attention_heads, num_key_value_heads), nn.MultiheadAttention and the zoo
    transformer's attention (`heads` beside a `qkv` projection). Several attention modules: the greatest common
    divisor of their counts (every one must split)."""
    cfg = _config(net)
    if cfg is not None and getattr(cfg, "num_attention_heads", None):
        heads = int(cfg.num_attention_heads)
        kv = getattr(cfg, "num_key_value_heads", None)
        return heads, int(kv) if kv else heads
    heads = kv = 0
    for mod in (mods if mods is not None else dict(net.named_modules())).values():
        if isinstance(mod, nn.MultiheadAttention):
            h = g = int(mod.num_heads)
        elif isinstance(getattr(mod, "heads", None), int) and isinstance(getattr(mod, "qkv", None), nn.Module):
            h = g = int(mod.heads)
        else:
            continue
        heads, kv = math.gcd(heads, h), math.gcd(kv, g)
    return (heads, kv) if heads else None


def check_tp(net: nn.Module, tp: Any, mods: dict[str, nn.Module] | None = None) -> tuple[int, int] | None:
    """Refuse (one line) a degree that is not a positive integer or does not divide the heads and KV heads."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise NetdietError(f"--tp must be a positive integer, got {tp!r}")
    heads = tp_heads(net, mods)
    if heads is None or tp == 1:
        return heads
    h, kv = heads
    if h % tp or kv % tp:
        ok = [d for d in range(1, math.gcd(h, kv) + 1) if h % d == 0 and kv % d == 0]
        raise NetdietError(f"--tp {tp} does not divide the model's {h} attention heads and {kv} KV heads; "
                           f"choose one of: {', '.join(map(str, ok))}")
    return heads


def _vocab_modules(net: nn.Module, regions: list[Region],
                   mods: dict[str, nn.Module]) -> tuple[str | None, str | None, int]:
    """(token embedding name, LM head name, vocab): the largest nn.Embedding and a Linear outside the regions whose
    output features equal its rows (or that shares its weight)."""
    in_region = {n for r in regions for n in r.cols + [r.row]}
    embeds = [(n, m) for n, m in mods.items() if isinstance(m, nn.Embedding)]
    if not embeds:
        return None, None, 0
    heads = [(n, m) for n, m in mods.items() if isinstance(m, nn.Linear) and n not in in_region]
    for emb_name, emb in embeds:   # the embedding an output Linear shares its weight with or matches in rows
        for n, m in heads:
            if m.weight is emb.weight or m.out_features == emb.num_embeddings:
                return emb_name, n, emb.num_embeddings
    getter = getattr(net, "get_input_embeddings", None)
    emb = getter() if callable(getter) else None
    if not isinstance(emb, nn.Embedding):
        emb = max((m for _, m in embeds), key=lambda m: m.num_embeddings)
    return next(n for n, m in embeds if m is emb), None, emb.num_embeddings


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _elem(estimate: Any, tensor: torch.Tensor) -> int:
    """Bytes per element of a parameter as the estimate holds it (its dtype applies to floating tensors)."""
    if tensor.is_floating_point() and estimate is not None and getattr(estimate, "dtype", None) in _ELEM:
        return _ELEM[estimate.dtype]
    return tensor.element_size()


def _act_elem(estimate: Any) -> int:
    """Bytes per element of the activations the all-reduces carry (bf16 under amp)."""
    if estimate is None:
        return 4
    return 2 if getattr(estimate, "amp", False) else _ELEM.get(getattr(estimate, "dtype", "fp32"), 4)


def _param_rules(mods: dict[str, nn.Module], regions: list[Region], emb: str | None, head: str | None,
                 vocab_parallel: bool) -> dict[int, tuple[str, str, int | None]]:
    """id(parameter) -> (owning module, rule, the dimension split or None for replicated)."""
    rules: dict[int, tuple[str, str, int | None]] = {}

    def put(owner: str, p: Any, rule: str, dim: int | None) -> None:
        if isinstance(p, nn.Parameter) and id(p) not in rules:
            rules[id(p)] = (owner, rule, dim)

    for r in regions:
        if r.mha:
            m = mods[r.name]
            for pname in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
                put(r.name, getattr(m, pname, None), "colwise", 0)
            for pname in ("bias_k", "bias_v"):
                put(r.name, getattr(m, pname, None), "colwise", 2)
            put(r.row, m.out_proj.weight, "rowwise", 1)
            put(r.row, m.out_proj.bias, "rowwise-bias", None)
            continue
        for c in r.cols:
            conv = _is_conv1d(mods[c])
            put(c, mods[c].weight, "colwise", 1 if conv else 0)
            put(c, getattr(mods[c], "bias", None), "colwise", 0)
        conv = _is_conv1d(mods[r.row])
        put(r.row, mods[r.row].weight, "rowwise", 0 if conv else 1)
        put(r.row, getattr(mods[r.row], "bias", None), "rowwise-bias", None)
    if vocab_parallel:
        for name in (emb, head):
            if name is not None:
                put(name, mods[name].weight, "vocab", 0)
                put(name, getattr(mods[name], "bias", None), "vocab", 0)
    return rules


def _activation_rules(mods: dict[str, nn.Module], regions: list[Region], head: str | None) -> dict[str, str]:
    """Module name -> "sharded" | "replicated" | "colwise" (input replicated, autocast weight copy split) | "mha"
    for what the module saved for backward (see the docstring). `mods` is dict(net.named_modules())."""
    rules: dict[str, str] = {}
    for r in regions:
        for n, _ in mods[r.name].named_modules(prefix=r.name):
            rules[n] = "sharded"
        for c in r.cols + r.after:
            for n, _ in mods[c].named_modules(prefix=c):
                rules[n] = "replicated"
        for c in r.cols:
            rules[c] = "colwise"
        if r.mha:
            rules[r.name] = "mha"
    if head is not None:
        rules[head] = "colwise"
    return rules


def _weight_cast(mod: nn.Module | None, estimate: Any) -> int:
    """Bytes of the bf16 copy of a projection's fp32 weight that autocast saves for backward (0 without amp)."""
    w = getattr(mod, "weight", None)
    if not getattr(estimate, "amp", False) or not isinstance(w, torch.Tensor) or _elem(estimate, w) != 4:
        return 0
    return w.numel() * 2


def _tokens_from(estimate: Any, regions: list[Region], mods: dict[str, nn.Module], head: str | None,
                 vocab: int) -> int | None:
    """Tokens (batch x sequence) of the estimate's step: from what a row-parallel projection saved (its input),
    else (checkpointing keeps only block inputs) the default loss's saved log-softmax, int64 targets and fp32 weight
    (tokens x (vocab x bytes + 8) + 4) or a checkpointed block's input (tokens x width)."""
    acts = getattr(estimate, "module_activations", None) or {}
    elem = _act_elem(estimate)
    candidates = [(acts.get(r.row, 0) - _weight_cast(mods.get(r.row), estimate), feats[0] * elem)
                  for r in regions if (feats := _features(mods[r.row]) if r.row in mods else None)]
    if head is not None and vocab:
        loss_elem = 4 if getattr(estimate, "amp", False) else elem
        candidates.append((acts.get(OUTSIDE, 0) - 4, vocab * loss_elem + 8))
    width = regions[0].width_in if regions else 0
    stream = _ELEM.get(getattr(estimate, "dtype", "fp32"), 4)   # the residual stream keeps the model's dtype
    candidates += [(acts.get(b, 0), width * stream) for b in getattr(estimate, "checkpointed_blocks", None) or []]
    for n, per_token in candidates:
        if n > 0 and per_token and n % per_token == 0:
            return n // per_token
    return None


def split(net: nn.Module, tp: int, estimate: Any, *, tokens: int | None = None, vocab_parallel: bool = True) -> dict:
    """What each of `tp` tensor-parallel ranks holds and the all-reduces they exchange per training step.

    `estimate` is the single-device MemoryEstimate (memory.estimate_memory) at the per-rank micro-batch: its
    dtype / amp set the bytes per element, its `module_activations` are split by the rules above. `tokens` (batch x
    sequence of that step) sizes the all-reduce messages; without it, it is read from what a row-parallel
    projection saved. Cheap: no simulation, one walk over the modules."""
    mods = dict(net.named_modules())
    heads = check_tp(net, tp, mods)
    regions = find_regions(net, mods)
    if tp > 1 and not regions:
        raise NetdietError(f"{type(net).__name__} has no attention or MLP projections netdiet can split "
                           "(qkv/proj, q_proj..o_proj, gate/up/down_proj, c_attn/c_fc/c_proj, nn.MultiheadAttention, "
                           "Linear-act-Linear); use --tp 1")
    emb, head, vocab = _vocab_modules(net, regions, mods)
    vocab_parallel = bool(vocab_parallel and (emb is not None or head is not None))
    notes: list[str] = []

    # ---------------------------------------------------------------- parameters
    rules = _param_rules(mods, regions, emb, head, vocab_parallel)
    owned: dict[int, tuple[str, nn.Parameter]] = {}   # each parameter once (tied ones), under its first module
    for n, m in mods.items():
        for p in m.parameters(recurse=False):
            owned.setdefault(id(p), (n, p))
    per_module: dict[str, dict[str, Any]] = {}
    sharded = replicated = 0
    for pid, (owner_of, p) in owned.items():
        owner, rule, dim = rules.get(pid, (owner_of, "replicated", None))
        elem = _elem(estimate, p)
        if dim is None or tp == 1 or p.dim() <= dim:
            n_s, n_r = 0, p.numel() * elem
        else:
            size = int(p.shape[dim])
            n_s, n_r = _ceil_div(size, tp) * (p.numel() // max(size, 1)) * elem, 0
            if size % tp:
                notes.append(f"{owner}: dimension {size} does not divide by tp={tp}; the largest rank holds "
                             f"{_ceil_div(size, tp)} (Megatron pads the vocabulary to a multiple of 128 x tp)")
        entry = per_module.setdefault(owner, {"rule": rule, "sharded_params": 0, "replicated_params": 0})
        if rule != "replicated" and entry["rule"] in ("replicated", "rowwise-bias"):
            entry["rule"] = rule
        entry["sharded_params"] += n_s
        entry["replicated_params"] += n_r
        sharded += n_s
        replicated += n_r

    # ---------------------------------------------------------------- activations and messages
    elem = _act_elem(estimate)
    if tokens is None and estimate is not None:
        tokens = _tokens_from(estimate, regions, mods, head, vocab)
    act_rules = _activation_rules(mods, regions, head if vocab_parallel else None)
    acts = dict(getattr(estimate, "module_activations", None) or {})
    act_sharded = act_replicated = 0
    for name, n in acts.items():
        rule = act_rules.get(name, "replicated")
        if name == OUTSIDE and vocab_parallel and head is not None and tokens:
            loss_elem = 4 if getattr(estimate, "amp", False) else elem   # autocast runs the loss in fp32
            split_part = min(n, tokens * vocab * loss_elem)   # log_softmax's output over the vocab-parallel logits
            s, rep = _ceil_div(split_part, tp), n - split_part
        elif rule == "colwise":   # its input whole on every rank, autocast's copy of its weight shard split
            cast = min(n, _weight_cast(mods.get(name), estimate))
            s, rep = _ceil_div(cast, tp), n - cast
        elif rule == "mha" and tokens:   # the in-projection's saved input (the query) is replicated
            rep = min(n, tokens * mods[name].embed_dim * elem)
            s = _ceil_div(n - rep, tp)
        elif rule in ("sharded", "mha"):
            s, rep = _ceil_div(n, tp), 0
        else:
            s, rep = 0, n
        act_sharded += s
        act_replicated += rep
        entry = per_module.setdefault(name, {"rule": "replicated", "sharded_params": 0, "replicated_params": 0})
        entry["activations"] = s + rep

    messages: list[dict[str, Any]] = []
    if tp > 1:
        if tokens is None:
            raise NetdietError("cannot size the tensor-parallel all-reduces: the estimate records no row-parallel "
                               "input (checkpointing?); pass tokens= (batch x sequence of the per-rank step)")
        for r in regions:
            messages.append({"module": r.row, "phase": "forward", "bytes": tokens * r.width_out * elem})
            messages.append({"module": r.name, "phase": "backward", "bytes": tokens * r.width_in * elem})
        if vocab_parallel and emb is not None:
            messages.append({"module": emb, "phase": "forward",
                             "bytes": tokens * mods[emb].embedding_dim * elem})
        if vocab_parallel and head is not None:
            width = mods[head].in_features
            messages.append({"module": head, "phase": "backward", "bytes": tokens * width * elem})
            for what in ("max", "sum of exp", "target logit"):   # loss_parallel's per-token fp32 reductions
                messages.append({"module": OUTSIDE, "phase": "forward", "bytes": tokens * 4,
                                 "what": f"loss_parallel: {what} per token"})
        for m in messages:
            entry = per_module.setdefault(m["module"], {"rule": "replicated", "sharded_params": 0,
                                                        "replicated_params": 0})
            entry["all_reduce"] = entry.get("all_reduce", 0) + m["bytes"]
    total = sum(m["bytes"] for m in messages)
    logits = (tokens or 0) * vocab * elem if head is not None else 0
    if not vocab_parallel and (emb is not None or head is not None):
        notes.append("token embedding and LM head replicated (vocab_parallel=False)")
    if regions and tp > 1:
        notes.append("one all-reduce per region each way (Megatron's count with a fused QKV / gate-up projection)")
    return {
        "tp": tp, "heads": list(heads or []) or None, "regions": len(regions),
        "vocab_parallel": vocab_parallel, "tokens": tokens, "activation_bytes_per_element": elem,
        "sharded_params": sharded, "replicated_params": replicated, "params_per_rank": sharded + replicated,
        "activations_sharded": act_sharded, "activations_replicated": act_replicated,
        "activations_per_rank": act_sharded + act_replicated,
        "all_reduce_bytes_per_step": total,
        "all_reduce_forward": sum(m["bytes"] for m in messages if m["phase"] == "forward"),
        "all_reduce_backward": sum(m["bytes"] for m in messages if m["phase"] == "backward"),
        "all_reduce_count": len(messages),
        "all_reduce_sent_per_rank": _ceil_div(2 * (tp - 1) * total, tp),   # ring all-reduce: 2 (tp-1)/tp x message
        # one logits-sized tensor (the head's output; its gradient and the loss's log-softmax are as large): split
        # by tp under vocab-parallel, which the step's transients at the loss scale with
        "logits_bytes": logits, "logits_bytes_per_rank": _ceil_div(logits, tp) if vocab_parallel else logits,
        "messages": messages, "per_module": per_module, "notes": list(dict.fromkeys(notes)),
    }


# ------------------------------------------------------------------ the check: torch's own tensor parallelism
def torch_plan(net: nn.Module, *, vocab_parallel: bool = True) -> dict[str, Any]:
    """The parallelize_module plan of the layout above: ColwiseParallel / RowwiseParallel per region projection,
    the token embedding RowwiseParallel over its rows (vocab), the LM head ColwiseParallel with sharded logits (the
    loss then runs under loss_parallel)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    mods = dict(net.named_modules())
    regions = find_regions(net, mods)
    if any(r.mha for r in regions):
        raise NetdietError("torch's parallelize_module cannot split nn.MultiheadAttention; the estimate covers it, "
                           "the measured check does not")
    plan: dict[str, Any] = {}
    for r in regions:
        for c in r.cols:
            plan[c] = ColwiseParallel()
        plan[r.row] = RowwiseParallel()
    emb, head, _ = _vocab_modules(net, regions, mods)
    if vocab_parallel and emb is not None:
        plan[emb] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if vocab_parallel and head is not None:
        plan[head] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    return plan


def _zoo_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The zoo attention on a rank's heads: the local QKV output is [q | k | v] of this rank's heads (see
    prepare_zoo_attention), so it is chunked in three and viewed with as many heads as it holds."""
    b, t, _ = x.shape
    head_dim = self.proj.in_features // self.heads
    q, k, v = (z.view(b, t, -1, head_dim).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.proj(y.transpose(1, 2).reshape(b, t, -1))


def prepare_zoo_attention(net: nn.Module, tp: int) -> None:
    """Lay the zoo transformer's fused QKV out per rank, as Megatron does: rows reordered to [q_0 k_0 v_0 | q_1 k_1
    v_1 | ...] so that the contiguous row shard of rank r is the queries, keys and values of its heads, and the
    forward made shard-aware. The unsharded model computes exactly what it computed before."""
    for mod in net.modules():
        if not (isinstance(getattr(mod, "qkv", None), nn.Linear) and isinstance(getattr(mod, "heads", None), int)):
            continue
        d = mod.qkv.in_features
        part = d // tp
        order = torch.cat([torch.arange(r * part, (r + 1) * part) + j * d for r in range(tp) for j in range(3)])
        with torch.no_grad():
            mod.qkv.weight.copy_(mod.qkv.weight[order])
            if mod.qkv.bias is not None:
                mod.qkv.bias.copy_(mod.qkv.bias[order])
        mod.forward = types.MethodType(_zoo_attention_forward, mod)


class _Collectives(torch.utils._python_dispatch.TorchDispatchMode):
    """Every collective a rank issues, with its message bytes: DTensor ops are let through first (NotImplemented)
    so that they desugar into the functional collectives this mode then sees."""

    KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.log: list[dict[str, Any]] = []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types_):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        name = str(getattr(func, "_overloadpacket", func))
        kind = next((k for k in self.KINDS if k in name), None)
        if kind is not None and isinstance(args[0], torch.Tensor):
            self.log.append({"kind": kind, "phase": self.phase, "bytes": args[0].numel() * args[0].element_size()})
        return out


def _saved_activation_bytes(run, exclude: set[int]) -> tuple[Any, int]:
    """run() under saved-tensor hooks: the bytes of the distinct local storages autograd kept (beyond `exclude`)."""
    from torch.distributed.tensor import DTensor

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            local = t.to_local() if isinstance(t, DTensor) else t
        key = storage_key(local)
        if key is not None and key[0] not in exclude:
            saved[key[0]] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(saved.values())


def replicate_region_inputs(net: nn.Module, mesh: Any) -> None:
    """Make each region with several column-parallel projections (q/k/v, gate/up) take its input as one replicated
    DTensor, so the projections' input gradients add up as one partial sum and are all-reduced once at the region
    (Megatron's count; without it each projection's ColwiseParallel all-reduces its own). PrepareModuleInput does
    this for a fixed call signature; the hook takes the hidden states positionally or as `hidden_states=`."""
    from torch.distributed.tensor import DTensor, Replicate

    def lift(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) and t.is_floating_point():
            return DTensor.from_local(t, mesh, [Replicate()], run_check=False)
        return t

    def hook(_mod, args, kwargs):
        if args:
            return (lift(args[0]),) + tuple(args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": lift(kwargs["hidden_states"])}
        return None

    mods = dict(net.named_modules())
    for r in find_regions(net):
        if len(r.cols) > 1 and not r.mha:
            mods[r.name].register_forward_pre_hook(hook, with_kwargs=True)


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _measure_rank(rank: int, world: int, spec: str, model_kw: dict, batch: int, seq: int | None, seed: int,
                  optimizer: str) -> dict:
    """One rank of measure_split (runs in a gloo process of launch.run_ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

    torch.manual_seed(seed)
    net = create_model(spec, **model_kw)
    length = int(seq or getattr(net, "seq_len", 0) or 64)
    x = torch.randint(0, integer_range(net) or 2, (batch, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference = _logits(net(x))
    prepare_zoo_attention(net, world)
    mesh = init_device_mesh("cpu", (world,))
    replicate_region_inputs(net, mesh)
    parallelize_module(net, mesh, torch_plan(net))
    with torch.no_grad():
        out = _logits(net(x))
        full = out.full_tensor() if isinstance(out, DTensor) else out
    max_diff = float((full - reference).abs().max())
    del out, full, reference

    params = list(dict.fromkeys(net.parameters()))
    locals_ = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    param_keys = {storage_key(t)[0] for t in locals_} | {storage_key(x)[0]}
    param_bytes = sum(t.numel() * t.element_size() for t in locals_)

    comms = _Collectives()
    with loss_parallel():
        _, activations = _saved_activation_bytes(lambda: default_loss(net(x)), param_keys)
        with comms:
            loss = default_loss(net(x))
            comms.phase = "backward"
            loss.backward()
        del loss
        for p in net.parameters():
            p.grad = None
        measured = measure_memory(net, x, optimizer=optimizer)
    # measure_memory's baseline counts DTensor parameters at their global size; a rank holds its local shards
    peak = measured["peak_measured"] - measured["baseline"] + param_bytes + x.numel() * x.element_size()
    return {"rank": rank, "param_bytes": param_bytes, "activations": activations, "peak_measured": int(peak),
            "collectives": comms.log, "max_abs_diff_vs_unsharded": max_diff, "input_shape": [batch, length]}


def measure_split(spec: str = "transformer", model_kw: dict | None = None, batch: int = 2, tp: int = 2, *,
                  seq: int | None = None, seed: int = 0, optimizer: str = "adam") -> dict:
    """`spec` (a zoo name or hf:FOLDER, built with `model_kw`; token ids batch x seq, seq defaulting to the zoo
    model's seq_len, else 64) parallelized by torch.distributed.tensor.parallel on `tp` gloo processes here, each
    rank measured: local parameter bytes, the bytes autograd saved in one forward + loss (loss_parallel), the
    collectives of one forward + backward, the allocator peak of real training steps (measurement.measure_memory),
    and the output's largest difference from the unsharded model."""
    kw = dict(model_kw or {})
    ranks = run_ranks(_measure_rank, (spec, kw, int(batch), seq, int(seed), optimizer), tp)
    return {"tp": tp, "spec": spec, "model_kw": kw, "batch": batch, "ranks": ranks,
            "method": "torch.distributed.tensor.parallel.parallelize_module over gloo (CPU); saved-tensor hooks on "
                      "local shards; a dispatch mode under DTensor for the collectives; profiler allocator events"}
