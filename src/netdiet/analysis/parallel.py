"""Per-rank memory and collectives of a training step laid out over N devices (DDP, FSDP2, ZeRO 1-3, tensor
parallel), composed from the same meta-device simulation the single-device estimate uses.

How the per-rank figures are made (docs/distributed.md has the sources):

* The single-device step is simulated once at the per-rank micro-batch (global batch / dp). Its MemoryEstimate
  gives the model states (weights, gradients, optimizer state), the activations and the peak of each phase of
  the steady-state step (forward, backward, optimizer), and what was alive at the overall peak.
* The model states are then laid out per parameter as the strategy lays them out: FSDP2 shards every parameter
  on dim 0 into `ceil(d0 / N)` rows (torch.chunk; the shard is pre-padded to that size on every rank), ZeRO-1
  divides the optimizer state, ZeRO-2 the gradients too, ZeRO-3 = FSDP2. The figures are rank 0's, the largest
  (rank 0 always holds a full chunk).
* Each phase's peak is rebuilt: the phase's single-device peak, minus the model states as one device holds them
  in that phase, plus the model states as this rank holds them, plus the communication buffers alive in that
  phase. The per-rank peak is the largest phase, so a buffer that only lives in backward is never added to a
  forward-phase peak:
    - forward: no gradients exist (zero_grad sets them to None); FSDP2 holds the root's unsharded parameters
      (the root is not resharded after forward) and one block's unsharded parameters.
    - backward: the gradients alive at the single-device backward peak (all of them when that peak's contents
      are unknown) are sharded; FSDP2 holds the block being differentiated, the next one prefetched (explicit
      backward prefetch) and the block's unsharded gradients before their reduce-scatter; DDP holds its buckets.
    - optimizer: all gradients exist (sharded or not); FSDP2 has resharded everything.
* DDP's reducer keeps flat bucket copies of the gradients (gradient_as_bucket_view=False, the default) for the
  life of the module: bucket bytes = all trainable gradient bytes, in every phase.
* Collectives are the bytes each rank sends per step with ring algorithms: all-reduce 2(N-1)/N x message,
  all-gather and reduce-scatter (N-1)/N x the full (gathered / unreduced) message. `messages` holds the logical
  message sizes per step; per_module the message bytes per FSDP unit (the root is "(root)").

Tensor parallel (`tp`, or `--tp T` inside a data-parallel strategy) takes the per-rank model from
netdiet.analysis.tensor_parallel.split; `--device` adds the step-time projection of netdiet.analysis.roofline.
Both are looked up when used, so the section works before those modules exist.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from netdiet.analysis import devices, roofline, tensor_parallel
from netdiet.analysis.scaling import with_batch
from netdiet.analysis.step import parse_dtype
from netdiet.errors import NetdietError

STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3", "tp")
ROOT = "(root)"
# DeepSpeed's stage 1/2 gradient reduction bucket: reduce_bucket_size = 5e8 elements (its documented default)
ZERO_REDUCE_BUCKET_ELEMENTS = 500_000_000
# what each strategy shards: (optimizer state, gradients, parameters)
SHARDS = {"ddp": (False, False, False), "zero1": (True, False, False), "zero2": (True, True, False),
          "zero3": (True, True, True), "fsdp": (True, True, True), "tp": (False, False, False)}


@dataclass(frozen=True)
class Layout:
    strategy: str
    world_size: int
    tp: int = 1
    device: str | None = None

    @property
    def dp(self) -> int:
        return self.world_size // self.tp


def parse_layout(strategy: str | None, world_size: int | None, tp: int | None, device: str | None) -> Layout | None:
    """The checked layout, or None for a single-device profile. Bad input raises NetdietError (one line)."""
    if strategy is None:
        given = [flag for flag, v in (("--world-size", world_size), ("--tp", tp), ("--device", device)) if v is not None]
        if given:
            raise NetdietError(f"{', '.join(given)} describe a parallel layout; add --parallel {'|'.join(STRATEGIES)}")
        return None
    key = str(strategy).lower()
    if key not in STRATEGIES:
        raise NetdietError(f"unknown --parallel '{strategy}'; choose one of: {', '.join(STRATEGIES)}")
    if world_size is None or int(world_size) < 1:
        raise NetdietError(f"--parallel {key} needs --world-size N (N >= 1), got {world_size}")
    world = int(world_size)
    if tp is not None and int(tp) < 1:
        raise NetdietError(f"--tp must be 1 or more, got {tp}")
    degree = int(tp) if tp is not None else (world if key == "tp" else 1)
    if world % degree:
        raise NetdietError(f"--world-size {world} is not divisible by --tp {degree}; give a world size that is a "
                           f"multiple of {degree} (e.g. {degree * max(1, round(world / degree))})")
    return Layout(key, world, degree, device)


# ------------------------------------------------------------------ the units FSDP2 wraps
def fsdp_units(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules `fully_shard` is applied to, innermost first, the root last: each repeated block — the children
    with parameters of the first nn.Sequential / nn.ModuleList (breadth first, the root included) that has two or
    more of them — and the root, which owns every parameter no block holds. The measured run wraps the same."""
    queue: list[tuple[str, nn.Module]] = [("", net)]
    while queue:
        name, mod = queue.pop(0)
        if isinstance(mod, (nn.Sequential, nn.ModuleList)):
            kids = [(f"{name}.{n}" if name else n, c) for n, c in mod.named_children()
                    if any(True for _ in c.parameters())]
            if len(kids) >= 2:
                return kids + [("", net)]
        queue.extend((f"{name}.{n}" if name else n, c) for n, c in mod.named_children())
    return [("", net)]


def unit_params(net: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """(unit name, its parameters) per FSDP unit: each parameter belongs to the innermost unit holding it (a
    parameter shared between units goes to the first that holds it, as fully_shard assigns it)."""
    units = fsdp_units(net)
    seen: set[int] = set()
    out = []
    for name, mod in units:
        params = []
        for p in mod.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        out.append((name or ROOT, params))
    return out


def _elt(p: torch.Tensor, dtype: torch.dtype | None) -> int:
    if dtype is not None and p.is_floating_point():
        return torch.empty((), dtype=dtype).element_size()
    return p.element_size()


def shard_numel(shape: torch.Size | tuple[int, ...], n: int) -> int:
    """Elements of rank 0's (padded) FSDP2 shard of a parameter: dim 0 chunked into ceil(d0 / n) rows (torch.chunk),
    every shard padded to that size. A 0-dim parameter is not split."""
    if len(shape) == 0:
        return 1
    return math.ceil(shape[0] / n) * math.prod(shape[1:])


def _state_per_param(optimizer: str, numel: int, elt: int) -> int:
    """Optimizer state bytes of one parameter tensor of `numel` elements (torch.optim, single-tensor path)."""
    if optimizer in ("adam", "adamw"):
        return 2 * numel * elt + 4          # exp_avg, exp_avg_sq, and a float32 `step` scalar
    if optimizer == "momentum":
        return numel * elt                  # momentum_buffer
    return 0


@dataclass
class _UnitBytes:
    name: str
    full: int = 0           # parameter bytes of the unit, unsharded
    padded: int = 0         # rank 0's padded shard x N (the all-gather output / unsharded storage)
    shard: int = 0          # rank 0's padded shard
    grad_full: int = 0      # trainable parameters only
    grad_padded: int = 0
    grad_shard: int = 0
    state_full: int = 0
    state_shard: int = 0


def _units(net: nn.Module, n: int, optimizer: str, dtype: torch.dtype | None) -> list[_UnitBytes]:
    out = []
    for name, params in unit_params(net):
        u = _UnitBytes(name)
        for p in params:
            elt = _elt(p, dtype)
            full, sh = p.numel() * elt, shard_numel(p.shape, n) * elt
            u.full += full
            u.shard += sh
            u.padded += sh * n
            if p.requires_grad:
                u.grad_full += full
                u.grad_shard += sh
                u.grad_padded += sh * n
                u.state_full += _state_per_param(optimizer, p.numel(), elt)
                u.state_shard += _state_per_param(optimizer, shard_numel(p.shape, n), elt)
        out.append(u)
    return out


def _ring(kind: str, message: int, n: int) -> int:
    """Bytes one rank sends for a ring collective of `message` bytes over n ranks."""
    if n <= 1:
        return 0
    if kind == "all_reduce":
        return (2 * (n - 1) * message) // n
    return ((n - 1) * message) // n


# ------------------------------------------------------------------ per rank
def per_rank(layout: Layout, net: nn.Module, x_micro: tuple, *, mem_kw: dict, estimate: Any,
             checkpointing: bool = False) -> dict[str, Any]:
    """The `distributed` section for one layout, from the single-device MemoryEstimate `estimate` at the per-rank
    micro-batch `x_micro` (the caller simulates it). Cheap: no simulation here. Bytes are rank 0's (the largest)."""
    n, tp = layout.dp, layout.tp
    optimizer = str(mem_kw.get("optimizer", "adam"))
    dtype = parse_dtype(mem_kw.get("dtype"))
    shard_state, shard_grad, shard_param = SHARDS[layout.strategy]
    notes: list[str] = []

    units = _units(net, n, optimizer, dtype)
    W, G, S = int(estimate.weights), int(estimate.gradients), int(estimate.optimizer_state)
    counted_w = sum(u.full for u in units)
    counted_s = sum(u.state_full for u in units)
    # scale factors when our per-parameter count and the simulation disagree (tied weights, exotic optimizers)
    state_scale = S / counted_s if counted_s and counted_s != S else 1.0
    if counted_s and counted_s != S:
        notes.append(f"optimizer state per parameter ({counted_s} B counted) differs from the simulation ({S} B); "
                     "its shards are scaled to the simulation's total")
    if counted_w != W:
        notes.append(f"parameter bytes by unit ({counted_w} B) differ from the simulated weights ({W} B)")

    # tensor parallel: the local model each tp rank holds (scaled per unit), and its activations
    tp_split, tp_all_reduce, tp_scale = None, 0, 1.0
    if tp > 1 or layout.strategy == "tp":
        tp_split = tensor_parallel.split(net, tp, estimate)
        local = int(tp_split["sharded_params"]) + int(tp_split["replicated_params"])
        scale = tp_scale = local / W if W else 1.0
        for u in units:
            for f in ("full", "padded", "shard", "grad_full", "grad_padded", "grad_shard"):
                setattr(u, f, int(getattr(u, f) * scale))
            u.state_full, u.state_shard = int(u.state_full * scale), int(u.state_shard * scale)
        tp_all_reduce = int(tp_split["all_reduce_bytes_per_step"])
        notes.extend(tp_split.get("notes", []))
        notes.append(f"tensor parallel degree {tp}: parameters, gradients and state scaled to each tp rank's "
                     f"{local} B of parameters (netdiet.analysis.tensor_parallel.split)")

    full_w = sum(u.full for u in units)
    full_g = sum(u.grad_full for u in units)
    full_s = int(sum(u.state_full for u in units) * state_scale)
    w_rank = sum(u.shard for u in units) if shard_param else full_w
    g_rank = sum(u.grad_shard for u in units) if shard_grad else full_g
    s_rank = int(sum(u.state_shard for u in units) * state_scale) if shard_state else full_s
    if n == 1:
        w_rank, g_rank, s_rank = full_w, full_g, full_s

    phases = dict(estimate.phase_peaks or {})
    peak = int(estimate.peak_estimated)
    pf, pb, po = (int(phases.get(k, peak)) for k in ("forward", "backward", "optimizer"))
    bd = estimate.peak_breakdown or {}
    if estimate.peak_phase == "backward" and bd:
        g_at_b = int(bd.get("gradients", G))
    else:
        g_at_b = G
        notes.append("the gradients alive at the single-device backward peak are not recorded (its peak is in "
                     f"{estimate.peak_phase or 'an unknown phase'}); all of them are assumed there (an upper bound)")
    outputs = int(bd.get("outputs", 0))
    acts = int(estimate.activations)
    act_cut = acts - int(tp_split["activations_per_rank"]) if tp_split is not None else 0
    fixed = int(estimate.buffers) + int(estimate.inputs)
    # the optimizer's own temporaries (single-tensor Adam: sqrt and div of one parameter at a time) shrink with
    # the largest parameter each rank updates
    temps_o = max(0, po - W - S - G - fixed - outputs)
    if shard_state and n > 1:
        temps_o = int(temps_o * _largest_shard_ratio(net, n))
    rest_f = pf - W - S - act_cut       # forward: no gradients exist yet (zero_grad set them to None)
    rest_b = pb - W - S - g_at_b - act_cut

    buffers: dict[str, int] = {}
    if n > 1 and layout.strategy in ("ddp", "tp"):
        buffers["gradient_buckets"] = full_g   # DDP's reducer: flat copies of every gradient, alive in every phase
    if layout.strategy in ("zero1", "zero2") and n > 1:
        # DeepSpeed stage 1/2: gradients are reduced through one flat bucket of reduce_bucket_size elements
        elt = _elt(next((p for p in net.parameters() if p.is_floating_point()), torch.empty(())), dtype)
        buffers["reduce_bucket"] = min(full_g, ZERO_REDUCE_BUCKET_ELEMENTS * elt)
    always = buffers.get("gradient_buckets", 0)
    # the gradients alive at the backward peak, on this rank: a tp rank holds its tp share of each, a sharded
    # gradient its dp share
    g_at_rank = g_at_b * tp_scale
    phase_rank = {
        "forward": rest_f + w_rank + s_rank + always,
        "backward": rest_b + w_rank + s_rank + g_at_rank * (g_rank / full_g if full_g else 0) + always
        + buffers.get("reduce_bucket", 0),
        "optimizer": fixed + outputs + w_rank + s_rank + g_rank + temps_o + always,
    }
    phase_buffers = {k: always + (buffers.get("reduce_bucket", 0) if k == "backward" else 0) for k in phase_rank}
    if shard_param and n > 1:
        # under tp the walk sees each tp rank's share: its modules' split activations and gradients
        walked = estimate if tp_split is None else SimpleNamespace(module_activations={
            m: int(e["activations"]) for m, e in tp_split["per_module"].items() if "activations" in e})
        fsdp = _fsdp_timeline(units, net, walked, base=fixed + w_rank + s_rank, outputs=outputs,
                              copies=0 if layout.device not in (None, "cpu") else 1,
                              single=(phase_rank["forward"], rest_b + w_rank + s_rank, int(g_at_rank),
                                      int(G * tp_scale)))
        for k in ("forward", "backward"):
            phase_rank[k], phase_buffers[k] = fsdp[k]
        buffers.update(fsdp["buffers"])
    phase_rank = {k: int(v) for k, v in phase_rank.items()}
    peak_phase = max(phase_rank, key=lambda k: phase_rank[k])
    comm_buffers = int(phase_buffers[peak_phase])
    g_held = {"forward": 0, "backward": int(g_at_rank * (g_rank / full_g)) if full_g else 0, "optimizer": g_rank}
    temporaries = (phase_rank[peak_phase] - w_rank - s_rank - comm_buffers - (acts - act_cut) - fixed
                   - g_held[peak_phase])

    collectives = _collectives(layout, units, n, tp, tp_all_reduce, shard_param, shard_state)
    if layout.strategy in ("zero1", "zero2", "zero3"):
        notes.append(f"{layout.strategy} = DeepSpeed ZeRO stage {layout.strategy[-1]}: "
                     + {"zero1": "optimizer state partitioned", "zero2": "optimizer state and gradients partitioned",
                        "zero3": "parameters, gradients and optimizer state partitioned (modelled as FSDP2)"}
                     [layout.strategy])
    return {
        "strategy": layout.strategy, "world_size": layout.world_size, "tp": tp, "dp": n,
        "micro_batch": int(x_micro[0].shape[0]) if x_micro and x_micro[0].dim() else 1,
        "checkpointing": bool(checkpointing),
        "per_rank": {
            "weights": int(w_rank), "gradients": int(g_rank), "optimizer_state": int(s_rank),
            "activations": int(acts - act_cut), "communication_buffers": int(comm_buffers),
            "temporaries": int(max(0, temporaries)), "peak_estimated": int(phase_rank[peak_phase]),
        },
        "peak_phase": peak_phase,
        "phase_peaks": {k: int(v) for k, v in phase_rank.items()},
        "buffers": {k: int(v) for k, v in buffers.items()},
        "single_device": {"weights": W, "gradients": G, "optimizer_state": S, "activations": acts,
                          "communication_buffers": 0, "temporaries": int(estimate.temporaries), "peak_estimated": peak},
        "collectives": collectives,
        "notes": notes,
    }


def _largest_shard_ratio(net: nn.Module, n: int) -> float:
    """Largest trainable parameter shard / largest trainable parameter (elements)."""
    sizes = [(p.numel(), shard_numel(p.shape, n)) for p in net.parameters() if p.requires_grad]
    if not sizes:
        return 1.0
    return max(s for _, s in sizes) / max(f for f, _ in sizes)


def _acts_before(net: nn.Module, module_acts: dict[str, int]) -> dict[str, int]:
    """Unit name -> activation bytes saved by the modules defined before it (definition order stands in for the
    forward order), i.e. what is still saved when that unit runs (forward) or finishes (backward)."""
    order = {name: i for i, (name, _) in enumerate(net.named_modules())}
    out = {}
    for name, _ in fsdp_units(net):
        at = order.get(name, 0)
        out[name or ROOT] = 0 if not name else sum(
            v for m, v in module_acts.items() if m in order and order[m] < at and not _inside(m, name))
    return out


def _inside(module: str, unit: str) -> bool:
    return module == unit or module.startswith(unit + ".")


def _root_tail_gradients(net: nn.Module, n_units: int, rg: int, root: _UnitBytes) -> int:
    """Unsharded gradient bytes of the root's parameters used after the first block (final norm, LM head, a tied
    embedding): they exist while the blocks differentiate; the rest (input embeddings) only at the very end."""
    if n_units < 2 or not rg:
        return rg
    units = fsdp_units(net)
    first = units[0][0]
    order = {name: i for i, (name, _) in enumerate(net.named_modules())}
    start = order.get(first, 0)
    in_blocks = {id(p) for name, mod in units[:-1] for p in mod.parameters()}
    last_use: dict[int, int] = {}
    for name, mod in net.named_modules():
        for p in mod.parameters(recurse=False):
            last_use[id(p)] = max(last_use.get(id(p), -1), order[name])
    tail = [p for p in dict.fromkeys(net.parameters()) if id(p) not in in_blocks and p.requires_grad
            and last_use.get(id(p), -1) > start]
    full = sum(p.numel() for p in dict.fromkeys(net.parameters()) if id(p) not in in_blocks and p.requires_grad)
    return int(rg * sum(p.numel() for p in tail) / full) if full else 0


def _single_backward(single: tuple[int, int, int, int], rev: list[_UnitBytes], root: _UnitBytes, r: int,
                     rg_tail: int) -> tuple[int, int]:
    """The single-device backward peak moment on one FSDP2 rank: (bytes, of which buffers). `single` = (forward
    peak, backward peak without gradients and with sharded states, gradients alive at that peak, all gradients).
    The gradients alive there tell how far backward had come: the root's tail gradients appear first, then each
    block's, last to first. Blocks whose gradients are complete are reduced (sharded; the last one's reduce-scatter
    input is still held); the block in progress is unsharded, its neighbour prefetched, its gradients so far
    unsharded. Before any gradient only the root's unsharded parameters are added; after the last, nothing."""
    _, rest, g_at, g_all = single
    if g_at <= 0:
        return rest + r, r
    if g_at >= g_all:
        shards = sum(u.grad_shard for u in rev) + root.grad_shard
        return rest + shards, 0
    left = g_at - min(g_at, rg_tail)
    grads, held = min(g_at, rg_tail), r
    for j, u in enumerate(rev):
        if left >= u.grad_full:
            left -= u.grad_full
            grads += u.grad_shard
            continue
        last_done = rev[j - 1].grad_padded if j else 0
        nxt = rev[j + 1].padded if j + 1 < len(rev) else 0
        held += last_done + u.padded + nxt
        grads += left
        break
    return rest + grads + held, held


def _fsdp_timeline(units: list[_UnitBytes], net: nn.Module, estimate: Any, *, base: int, outputs: int, copies: int,
                   single: tuple[int, int, int, int]) -> dict[str, Any]:
    """FSDP2's forward and backward peaks on one rank, walking its units in execution order.

    Forward: the root unshards first and keeps its parameters to the end of backward; each block's all-gather
    output stays alive until the next unit's copy-out (torch's implicit-prefetch overlap), so unsharding unit u
    holds the previous unit's flat output, u's flat output and u's unsharded parameters (or, inside gloo, a flat
    copy of the same size). Backward (reverse order): unit u's pre-backward prefetches the next unit's all-gather;
    at u's post-backward its parameters are resharded, a flat reduce-scatter input is filled from its unsharded
    gradients (then freed), the reduce-scatter output (the sharded gradient) is allocated and gloo clones the
    input (`copies`); the root's gradients stay unsharded until the root reduces last. Each candidate moment adds
    the sharded states (`base`), the step's outputs, the activations still saved there and the sharded gradients
    already reduced; `single` describes the single-device forward / backward peaks (see _single_backward)."""
    blocks = [u for u in units if u.name != ROOT]
    root = next((u for u in units if u.name == ROOT), _UnitBytes(ROOT))
    before = _acts_before(net, dict(estimate.module_activations or {}))
    r, rg = root.padded, root.grad_padded
    rg_tail = _root_tail_gradients(net, len(units), rg, root)
    big = max((u.padded for u in blocks), default=0)
    # forward: the end (only the root unsharded) or the unshard of each unit
    fwd = [(single[0] + r, r)]
    order = [root] + blocks
    for i, u in enumerate(order):
        prev = order[i - 1].padded if i else 0
        held = (r if u is not root else 0) + prev + 2 * u.padded
        fwd.append((base + before.get(u.name, 0) + held, held))
    # backward: the single-device peak moment (before any gradient: the root's parameters are unsharded; amid
    # the gradients: a block, its prefetched neighbour and their unsharded gradients too; after the last
    # gradient: everything is sharded again), then each unit's compute and reduce-scatter
    big_grad = max((u.grad_padded for u in blocks), default=0)
    rev = blocks[::-1]
    bwd = [_single_backward(single, rev, root, r, rg_tail)]
    done = 0
    for j, u in enumerate(rev):
        nxt = rev[j + 1].padded if j + 1 < len(rev) else 0
        own = sum(v for m, v in (estimate.module_activations or {}).items() if _inside(m, u.name))
        live = base + outputs + before.get(u.name, 0) + done
        # u's pre-backward: u unsharded, its saved activations all alive, the next unit's all-gather issued
        # (its flat output, and gloo's flat copy while it runs)
        prefetch = r + rg_tail + u.padded + nxt * (1 + copies)
        bwd.append((live + own + prefetch, prefetch))
        # while u differentiates, its saved activations are freed as its gradients appear
        held = r + rg_tail + nxt + u.padded + max(u.grad_padded, own)
        bwd.append((live + held, held))
        reduce = r + rg_tail + nxt + u.grad_padded + max(u.grad_padded, u.grad_shard + copies * u.grad_padded)
        bwd.append((live + reduce, reduce))
        done += u.grad_shard
    if rg:
        reduce = rg + max(rg, root.grad_shard + copies * rg)
        bwd.append((base + outputs + done + reduce, reduce))
    f = max(fwd, key=lambda c: c[0])
    b = max(bwd, key=lambda c: c[0])
    return {"forward": f, "backward": b,
            "buffers": {"root_unsharded": r, "largest_block_unsharded": big,
                        "largest_block_gradients": big_grad,
                        "collective_copies": copies}}


def _collectives(layout: Layout, units: list[_UnitBytes], n: int, tp: int, tp_all_reduce: int, shard_param: bool,
                 shard_state: bool) -> dict[str, Any]:
    messages = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0}
    per_module: dict[str, dict[str, int]] = {}

    def add(unit: str, kind: str, nbytes: int) -> None:
        if nbytes:
            messages[kind] += nbytes
            per_module.setdefault(unit, {}).setdefault(kind, 0)
            per_module[unit][kind] += nbytes

    if n > 1:
        for u in units:
            if layout.strategy in ("ddp", "tp"):
                add(u.name, "all_reduce", u.grad_full)
            elif shard_param:
                add(u.name, "all_gather", u.padded)                 # forward
                if u.name != ROOT:
                    add(u.name, "all_gather", u.padded)             # backward (resharded after forward)
                add(u.name, "reduce_scatter", u.grad_padded)
            elif shard_state:                                       # zero1 / zero2
                add(u.name, "reduce_scatter", u.grad_full)
                add(u.name, "all_gather", u.grad_full)              # the updated parameters after the step
    sent = {k: _ring(k, v, n) for k, v in messages.items()}
    if tp > 1 and tp_all_reduce:
        messages["all_reduce"] += tp_all_reduce
        sent["all_reduce"] += _ring("all_reduce", tp_all_reduce, tp)
        per_module.setdefault("(tensor parallel)", {})["all_reduce"] = tp_all_reduce
    return {**sent, "messages": messages, "per_module": per_module,
            "algorithm": "ring: all-reduce sends 2(N-1)/N x message, all-gather / reduce-scatter (N-1)/N x message"}


# ------------------------------------------------------------------ the profile hook
def check_model(layout: Layout, net: nn.Module, batch: int) -> None:
    """The checks that need the model and its batch, made before the profile's passes: the data-parallel ranks
    divide the global batch, the tensor-parallel degree divides the heads and KV heads."""
    micro_batch(layout, batch)
    if layout.tp > 1 or layout.strategy == "tp":
        tensor_parallel.check_tp(net, layout.tp)


def micro_batch(layout: Layout, batch: int) -> int:
    """Per-rank micro-batch of a global batch; a batch the data-parallel ranks do not divide is refused."""
    n = layout.dp
    if batch % n:
        up = n * math.ceil(batch / n)
        raise NetdietError(f"global batch {batch} is not divisible by the {n} data-parallel ranks (world size "
                           f"{layout.world_size} / tp {layout.tp}); use --batch-size {up} (or another multiple of {n})")
    return batch // n


def samples_unit(x: tuple) -> tuple[str, int | None]:
    """("tokens", sequence length) for a batch of token ids (batch x sequence, integer), else ("samples", None)."""
    first = x[0] if x else None
    if first is not None and first.dim() == 2 and not first.is_floating_point():
        return "tokens", int(first.shape[1])
    return "samples", None


def analyse(layout: Layout, net: nn.Module, x: tuple, *, counts: Any, estimate: Any, estimate_at: Any,
            mem_kw: dict, measure: bool, unavailable: str | None) -> dict[str, Any]:
    """The `distributed` section of a profile document."""
    batch = int(x[0].shape[0]) if x and x[0].dim() else 1
    mb = micro_batch(layout, batch)
    if unavailable is not None or estimate is None:
        return {"strategy": layout.strategy, "world_size": layout.world_size, "tp": layout.tp, "dp": layout.dp,
                "micro_batch": mb, "unavailable": unavailable or "the single-device memory estimate is unavailable"}
    x_micro = x if mb == batch else with_batch(x, mb)
    est = estimate if mb == batch else estimate_at(net, x_micro, **mem_kw)
    section = per_rank(layout, net, x_micro, mem_kw=mem_kw, estimate=est,
                       checkpointing=bool(mem_kw.get("checkpointing")))
    section["global_batch"] = batch
    if layout.device is not None:
        section.update(_projection(layout, counts, section, mem_kw, mb, x))
    if measure:
        # parallel_measure imports this module (Layout, fsdp_units): looked up here, at the call
        measure_mod = importlib.import_module("netdiet.analysis.parallel_measure")
        section["measured"] = measure_mod.measure_layout(layout, net, x_micro, mem_kw=mem_kw)
        peaks = section["measured"]["peaks"]
        section["per_rank"]["peak_measured"] = int(max(peaks))
        section["per_rank"]["peak_measured_per_rank"] = [int(p) for p in peaks]
    return section


def _projection(layout: Layout, counts: Any, section: dict, mem_kw: dict, mb: int, x: tuple) -> dict[str, Any]:
    device = devices.get_device(layout.device)
    dtype = "bf16" if mem_kw.get("amp") else (mem_kw.get("dtype") or "fp32")
    if counts is None:
        return {"projection_unavailable": "the training step could not be counted"}
    unit, seq_len = samples_unit(x)   # token ids: tokens/s and the 6N-per-token MFU need the sequence length
    return dict(roofline.project_step(counts, section, device, dtype=dtype, micro_batch=mb,
                                      samples_unit=unit, tokens_per_sample=seq_len))
