"""`netdiet plan`: which layout trains a model fastest on N named devices, and why the others do not fit.

The sweep: data-parallel strategies (ddp, zero1, zero2, zero3, fsdp) x tensor-parallel degrees that divide the
attention and KV heads and fit in a node (pure tp when one node holds every device) x micro-batches dividing the
per-rank batch (gradient accumulation makes up the rest) x activation checkpointing off/on. Each distinct
(micro-batch, checkpointing) is simulated once on the meta device (memory.estimate_memory; nothing allocated,
so a 70B model costs no RAM); each layout's per-rank figures come from parallel.per_rank (cheap: no simulation)
and its step time from roofline.project_step. A layout is feasible when its per-rank peak fits the device memory.

Repeated layers (layer-scaled simulation). A stack of L identical blocks (analysis.blocks.repeated_blocks: same
structure, configuration and parameter shapes, children 0..L-1 of one container) makes every figure of the step
an affine function of L: each block adds the same weights, gradients, state, saved activations and operator
work, and each phase's peak the same bytes — once the stack is deep enough for the peak to sit at the same place:
with checkpointing at micro-batch 2, the backward peaks of a d_model-1024 bf16 stack are 780.2, 856.8, 952.9 and
1049.0 MiB at 2, 3, 4 and 5 blocks: the first step is not the later ones. So every (micro-batch, checkpointing)
is simulated with 2 and 3 blocks, extrapolated to 4 and checked against a 4-block simulation; when they differ,
3 and 4 blocks are extrapolated and checked against 5; when that differs too, the full model is simulated. Per
phase, then the peak is the largest phase. tests/test_plan.py checks the extrapolation equal to the full
simulation, field by field, byte for byte, including the case where 2 and 3 blocks are not yet affine.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from netdiet.analysis import parallel, roofline, tensor_parallel
from netdiet.analysis.blocks import module_signature, repeated_blocks
from netdiet.analysis.counter import OpCounts, count_ops
from netdiet.analysis.devices import Device, parse_devices
from netdiet.analysis.memory import MemoryEstimate, estimate_memory
from netdiet.analysis.profile import normalise_dtype, prepare_call, resolve_model
from netdiet.analysis.scaling import with_batch
from netdiet.analysis.step import normalise_optimizer
from netdiet.errors import NetdietError
from netdiet.models import structured_forward
from netdiet.units import format_bytes

DP_STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp")
MIN_STACK = 5            # layer-scaled simulation pays off from this many identical blocks
_INT_FIELDS = ("weights", "buffers", "gradients", "optimizer_state", "activations", "temporaries", "peak_estimated",
               "inference_peak", "inputs", "first_step_peak", "checkpointing_saved", "recompute_flops")
_COUNT_FIELDS = ("macs", "flops", "backward_macs", "backward_flops", "optimizer_flops", "train_flops", "bytes_read",
                 "bytes_written")


# ------------------------------------------------------------------ repeated layers
@dataclass(frozen=True)
class Stack:
    """`length` identical blocks, the children of the container at `prefix` (names prefix.0 .. prefix.L-1)."""
    prefix: str
    length: int


def find_stack(net: nn.Module) -> Stack | None:
    """The longest run of identical blocks that are all the children of one nn.Sequential / nn.ModuleList:
    equal module signatures (blocks.repeated_blocks), or equal up to the layer index a block keeps for its KV
    cache (transformers' `layer_idx`) when the model's config gives every layer the same type."""
    modules = dict(net.named_modules())
    groups = [names for names in repeated_blocks(net)]
    layer_types = getattr(getattr(net, "config", None), "layer_types", None)
    if not layer_types or len(set(map(str, layer_types))) == 1:
        groups += [[f"{n}.{i}" if n else str(i) for i in range(len(m))] for n, m in modules.items()
                   if isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) >= 2 and _same_but_index(list(m))]
    best = None
    for names in groups:
        prefix = names[0].rpartition(".")[0]
        container = modules.get(prefix)
        if not isinstance(container, (nn.Sequential, nn.ModuleList)):
            continue
        if names != [f"{prefix}.{i}" if prefix else str(i) for i in range(len(container))]:
            continue
        if best is None or len(names) > best.length:
            best = Stack(prefix, len(names))
    return best


INDEX_ATTRS = ("layer_idx", "layer_id", "layer_number")


def _same_but_index(blocks: list[nn.Module]) -> bool:
    """Every block has the signature of the first once their layer-index attributes are set aside."""
    saved = [(m, k, m.__dict__[k]) for b in blocks for m in b.modules() for k in INDEX_ATTRS if k in m.__dict__]
    if not saved:
        return False          # nothing set aside: repeated_blocks has already decided
    try:
        for m, k, _ in saved:
            m.__dict__[k] = None
        first = module_signature(blocks[0])
        return first is not None and all(module_signature(b) == first for b in blocks[1:])
    finally:
        for m, k, v in saved:
            m.__dict__[k] = v


@contextlib.contextmanager
def truncated(net: nn.Module, stack: Stack, k: int):
    """`net` with only the first k blocks of its stack, for the duration (the container is put back after)."""
    parent_name, _, attr = stack.prefix.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    full = getattr(parent, attr)
    shorter = type(full)(*list(full)[:k]) if isinstance(full, nn.Sequential) else nn.ModuleList(list(full)[:k])
    parent._modules[attr] = shorter
    try:
        yield net
    finally:
        parent._modules[attr] = full


def _affine(a: Any, b: Any, steps: int) -> Any:
    """b + steps * (b - a), for numbers and (nested) dicts of numbers: the value `steps` blocks past b."""
    if isinstance(a, dict) or isinstance(b, dict):
        a, b = a or {}, b or {}
        return {k: _affine(a.get(k, 0), b.get(k, 0), steps) for k in {**a, **b}}
    if a is None or b is None:
        return b
    return type(b)(b + steps * (b - a))


def _block_of(name: str, prefix: str) -> tuple[int, str] | None:
    head = prefix + "." if prefix else ""
    if not name.startswith(head):
        return None
    index, _, rest = name[len(head):].partition(".")
    return (int(index), rest) if index.isdigit() else None


def _scaled_modules(ea: dict, eb: dict, stack: Stack, base: int = 2) -> dict[str, int]:
    """Per-module activation bytes at L blocks, from the (base + 1)-block simulation `eb`: its block 0 as there, its
    block 1 for every middle block, its last block for the last; modules outside the stack extrapolated from `ea`
    (base blocks) and `eb`."""
    L, out, last = stack.length, {}, base
    outside_a = {k: v for k, v in ea.items() if _block_of(k, stack.prefix) is None}
    outside_b = {k: v for k, v in eb.items() if _block_of(k, stack.prefix) is None}
    out.update(_affine(outside_a, outside_b, L - base - 1))
    head = stack.prefix + "." if stack.prefix else ""
    for name, value in eb.items():
        where = _block_of(name, stack.prefix)
        if where is None:
            continue
        j, rest = where
        targets = [0] if j == 0 else ([L - 1] if j == last else (range(1, L - 1) if j == 1 else []))
        for i in targets:
            out[f"{head}{i}" + (f".{rest}" if rest else "")] = value
    return out


def scale_estimate(e2: MemoryEstimate, e3: MemoryEstimate, stack: Stack, base: int = 2) -> MemoryEstimate:
    """The estimate at stack.length blocks from those at `base` (e2) and base + 1 (e3) blocks (see the module
    docstring)."""
    steps = stack.length - base - 1
    fields = {f: _affine(getattr(e2, f), getattr(e3, f), steps) for f in _INT_FIELDS}
    phases = _affine(e2.phase_peaks, e3.phase_peaks, steps)
    if phases:
        fields["peak_estimated"] = max(phases.values())
    head = stack.prefix + "." if stack.prefix else ""
    blocks = [b for b in e3.checkpointed_blocks if _block_of(b, stack.prefix) is None] + \
        ([f"{head}{i}" for i in range(stack.length)] if any(_block_of(b, stack.prefix) for b in
                                                              e3.checkpointed_blocks) else [])
    return dataclasses.replace(
        e3, **fields, phase_peaks=phases, peak_phase=max(phases, key=phases.get) if phases else e3.peak_phase,
        peak_breakdown=_affine(e2.peak_breakdown, e3.peak_breakdown, steps),
        module_activations=_scaled_modules(e2.module_activations, e3.module_activations, stack, base),
        checkpointed_blocks=blocks,
        method=e3.method + f"; layer-scaled: {stack.length} blocks of '{stack.prefix}' extrapolated from {base} "
                           f"and {base + 1}")


def scale_counts(c2: OpCounts, c3: OpCounts, stack: Stack) -> OpCounts:
    """The training OpCounts at stack.length blocks from those at 2 and 3 (per operator and in total; the module
    list keeps the root only, with its parameters extrapolated)."""
    steps = stack.length - 3
    root = next(m for m in c3.modules if m.name == "")
    root2 = next(m for m in c2.modules if m.name == "")
    scaled_root = dataclasses.replace(root, **{f: _affine(getattr(root2, f), getattr(root, f), steps) for f in
                                               ("params", "param_bytes", "macs", "flops", "backward_macs",
                                                "backward_flops")})
    return dataclasses.replace(
        c3, modules=[scaled_root], operators=_affine(c2.operators, c3.operators, steps),
        uncounted=_affine(c2.uncounted, c3.uncounted, steps),
        **{f: _affine(getattr(c2, f), getattr(c3, f), steps) for f in _COUNT_FIELDS})


def _same(a: Any, b: Any, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if getattr(a, n) != getattr(b, n)]


# ------------------------------------------------------------------ the simulations, cached
class Simulator:
    """Memory estimates per (micro-batch, checkpointing) and counts per micro-batch, each made once."""

    def __init__(self, net: nn.Module, inputs_at: Callable[[int], tuple], mem_kw: dict, optimizer: str,
                 layered: bool = True) -> None:
        self.net, self.inputs_at, self.mem_kw, self.optimizer = net, inputs_at, mem_kw, optimizer
        stack = find_stack(net) if layered else None
        self.stack = stack if stack is not None and stack.length >= MIN_STACK else None
        self.estimates: dict[tuple[int, bool], MemoryEstimate] = {}
        self.counts: dict[int, OpCounts] = {}
        self.checked: dict[bool, bool] = {}     # checkpointing -> every deeper-stack check agreed
        self.bases: dict[tuple[int, bool], int] = {}   # (micro-batch, checkpointing) -> blocks extrapolated from
        self._runs: dict[tuple[int | None, int, bool], MemoryEstimate] = {}   # (blocks, micro-batch, ckpt)
        self.notes: list[str] = []
        self.simulations = 0

    def _estimate_with(self, k: int | None, mb: int, ckpt: bool) -> MemoryEstimate:
        key = (k, mb, ckpt)
        if key not in self._runs:
            self.simulations += 1
            ctx = truncated(self.net, self.stack, k) if k else contextlib.nullcontext(self.net)
            with ctx as net:
                self._runs[key] = estimate_memory(net, self.inputs_at(mb), **{**self.mem_kw, "checkpointing": ckpt})
        return self._runs[key]

    def estimate(self, mb: int, ckpt: bool) -> MemoryEstimate:
        key = (mb, ckpt)
        if key not in self.estimates:
            self.estimates[key] = self._layered(mb, ckpt) if self.stack else self._estimate_with(None, mb, ckpt)
        return self.estimates[key]

    def _layered(self, mb: int, ckpt: bool) -> MemoryEstimate:
        """Extrapolated from `base` and base + 1 blocks once a simulation of base + 2 agrees (base 2, then 3);
        else the full model. Checked at every (micro-batch, checkpointing): the regime can change with either."""
        fields = _INT_FIELDS + ("phase_peaks",)
        tried = []
        for base in (2, 3):
            if base + 2 >= self.stack.length:
                break
            ea, eb, ec = (self._estimate_with(k, mb, ckpt) for k in (base, base + 1, base + 2))
            wrong = _same(scale_estimate(ea, eb, Stack(self.stack.prefix, base + 2), base), ec, fields)
            if not wrong:
                self.checked[ckpt] = self.checked.get(ckpt, True)
                self.bases[(mb, ckpt)] = base
                return scale_estimate(ea, eb, self.stack, base)
            tried.append(f"{base}+{base + 1} -> {base + 2} blocks: {', '.join(wrong)}")
        self.checked[ckpt] = False
        self.notes.append(f"layer-scaled simulation disagreed with the deeper one at micro-batch {mb}, checkpointing "
                          f"{'on' if ckpt else 'off'} ({'; '.join(tried) or 'stack too short'}): the full model was "
                          "simulated instead")
        return self._estimate_with(None, mb, ckpt)

    def count(self, mb: int) -> OpCounts:
        if mb not in self.counts:
            if self.stack:
                c2, c3 = (self._count_with(k, mb) for k in (2, 3))
                self.counts[mb] = scale_counts(c2, c3, self.stack)
            else:
                self.counts[mb] = self._count_with(None, mb)
        return self.counts[mb]

    def _count_with(self, k: int | None, mb: int) -> OpCounts:
        ctx = truncated(self.net, self.stack, k) if k else contextlib.nullcontext(self.net)
        with ctx as net:
            return count_ops(net, self.inputs_at(mb), train=True, optimizer=self.optimizer)


# ------------------------------------------------------------------ the sweep
@dataclass
class PlanResult:
    doc: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.doc


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def micro_batches(per_rank_batch: int, given: list[int] | None) -> list[int]:
    """Micro-batches for a per-rank batch: the given ones that divide it, else its power-of-two divisors and itself."""
    if given:
        return [m for m in given if per_rank_batch % m == 0]
    return sorted({d for d in _divisors(per_rank_batch) if d & (d - 1) == 0} | {per_rank_batch})


def tp_degrees(net: nn.Module, world: int, device: Device) -> list[int]:
    """1 and every degree up to a node's devices that divides the world size, the heads and the KV heads."""
    heads = tensor_parallel.tp_heads(net)
    if heads is None:
        return [1]
    h, kv = heads
    return [t for t in range(1, min(world, device.devices_per_node) + 1)
            if world % t == 0 and h % t == 0 and kv % t == 0 and (t == 1 or tensor_parallel.find_regions(net))]


def layouts(world: int, tps: list[int], strategies: tuple[str, ...] = DP_STRATEGIES) -> list[parallel.Layout]:
    out = []
    for tp in tps:
        dp = world // tp
        if dp == 1:
            out.append(parallel.Layout("tp" if tp > 1 else "ddp", world, tp))
        else:
            out.extend(parallel.Layout(s, world, tp) for s in strategies)
    return out


def layout_name(strategy: str, tp: int, dp: int) -> str:
    if strategy == "tp":
        return f"tp {tp}"
    return f"{strategy} x{dp}" + (f" · tp {tp}" if tp > 1 else "")


def plan(model: nn.Module | str, devices: str = "64xh100-sxm", *, global_batch: int | None = None,
         seq_len: int | None = None, model_kw: dict | None = None, optimizer: str = "adam", dtype: str = "bf16",
         amp: bool = False, micro_batch: list[int] | None = None, checkpointing: tuple[bool, ...] = (False, True),
         strategies: tuple[str, ...] | None = None, layered: bool = True,
         log: Callable[[str], None] | None = None) -> PlanResult:
    """Rank the layouts of `model` on `devices` ('64xh100'): see the module docstring. Bad input: NetdietError."""
    t0 = time.perf_counter()
    world, device = parse_devices(devices)
    optimizer = normalise_optimizer(optimizer)
    if global_batch is not None and (isinstance(global_batch, bool) or int(global_batch) < 1):
        raise NetdietError(f"--global-batch must be a positive integer, got {global_batch}")
    strategies = tuple(strategies or DP_STRATEGIES)
    if micro_batch is not None and (not micro_batch or any(isinstance(m, bool) or int(m) < 1 for m in micro_batch)):
        raise NetdietError(f"micro-batches must be positive integers, got {micro_batch}; e.g. --micro-batch 1,2,4")
    dtype = normalise_dtype(dtype) or "fp32"
    unknown = [s for s in strategies if s not in DP_STRATEGIES]
    if unknown:
        raise NetdietError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(DP_STRATEGIES)}")
    batch = int(global_batch) if global_batch is not None else world
    net, info = resolve_model(model, model_kw, seed=0, before_real=lambda _m: False)
    spec = info.get("spec")
    inputs, hf_len = None, None
    if seq_len is not None:
        if int(seq_len) < 1:
            raise NetdietError(f"--seq-len must be a positive integer, got {seq_len}")
        if isinstance(spec, str) and spec.startswith("hf:"):
            hf_len = int(seq_len)
        else:
            inputs = (1, int(seq_len))
    device_of = torch.device("meta") if any(p.device.type == "meta" for p in net.parameters()) else torch.device("cpu")
    call = prepare_call(inputs, spec, model_kw, 1, device_of, 0, model=net, seq_len=hf_len)
    mem_kw = dict(optimizer=optimizer, dtype=dtype, amp=amp)
    compute_dtype = "bf16" if amp else dtype
    device.peak(compute_dtype)           # a device without this dtype's figure is refused before the sweep

    with contextlib.ExitStack() as stack:
        x1 = stack.enter_context(structured_forward(net, call.args, call.kwargs))
        unit, tokens = parallel.samples_unit(x1)
        if seq_len is not None and unit != "tokens":
            raise NetdietError(f"--seq-len sets the length of a language model's token ids (batch x tokens); "
                               f"{spec or info.get('class')} does not take token ids: drop --seq-len")
        cache: dict[int, tuple] = {}

        def inputs_at(mb: int) -> tuple:
            if mb not in cache:
                cache[mb] = with_batch(x1, mb)
            return cache[mb]

        sim = Simulator(net, inputs_at, mem_kw, optimizer, layered=layered)
        tps = tp_degrees(net, world, device)
        candidates = layouts(world, tps, tuple(strategies))
        dps = sorted({lay.dp for lay in candidates})
        if all(batch % dp for dp in dps):
            step = math.lcm(*dps) if len(dps) < 6 else max(dps)
            raise NetdietError(f"global batch {batch} is not divisible by any data-parallel degree of the layouts "
                               f"on {world} devices ({', '.join(map(str, dps))}); use a multiple of one, "
                               f"e.g. --global-batch {step * max(1, round(batch / step))}")
        ckpts = _checkpoint_settings(sim, checkpointing)
        rows, skipped = [], []
        unavailable: dict[tuple[str, bool], str] = {}
        for lay in candidates:
            if batch % lay.dp:
                skipped.append({"layout": layout_name(lay.strategy, lay.tp, lay.dp), "strategy": lay.strategy,
                                "tp": lay.tp, "dp": lay.dp,
                                "why": f"global batch {batch} is not divisible by dp {lay.dp}"})
                continue
            per = batch // lay.dp
            for mb in micro_batches(per, micro_batch):
                for ckpt in ckpts:
                    if log and (mb, ckpt) not in sim.estimates:
                        log(f"simulating micro-batch {mb}{' with checkpointing' if ckpt else ''} on the meta device")
                    est = sim.estimate(mb, ckpt)
                    try:
                        rows.append(_row(lay, mb, per // mb, ckpt, est, sim, device, compute_dtype, unit, tokens,
                                         inputs_at(mb), mem_kw))
                    except NetdietError as exc:    # a figure this layout needs cannot be made: said, not hidden
                        unavailable.setdefault((layout_name(lay.strategy, lay.tp, lay.dp), ckpt), str(exc))
    feasible = sorted((r for r in rows if r["fits"]), key=lambda r: (-r["throughput"], r["peak"]))
    for i, r in enumerate(feasible, 1):
        r["rank"] = i
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["layout"], []).append(r)
    infeasible = []
    for name, group in groups.items():
        if not any(r["fits"] for r in group):
            best = min(group, key=lambda r: r["peak"])
            infeasible.append({"layout": name, "strategy": best["strategy"], "tp": best["tp"], "dp": best["dp"],
                               "smallest_peak": best["peak"], "over_by": best["peak"] - device.memory_bytes,
                               "micro_batch": best["micro_batch"], "checkpointing": best["checkpointing"],
                               "why": f"smallest per-rank peak {format_bytes(best['peak'])} (micro-batch "
                                      f"{best['micro_batch']}{', checkpointing' if best['checkpointing'] else ''}) "
                                      f"exceeds {format_bytes(device.memory_bytes)} by "
                                      f"{format_bytes(best['peak'] - device.memory_bytes)}"})
    infeasible += skipped
    if not rows:
        raise NetdietError(next(iter(unavailable.values())) if unavailable else
                           f"no --micro-batch {','.join(map(str, micro_batch or []))} divides a per-rank batch of "
                           f"global batch {batch} over the data-parallel degrees {', '.join(map(str, dps))}; "
                           "give micro-batches that divide it")
    if not feasible:
        best = min(rows, key=lambda r: r["peak"])
        raise NetdietError(
            f"no layout of {info.get('spec') or info.get('class')} fits {world}x {device.name} "
            f"({format_bytes(device.memory_bytes)} each): the smallest per-rank peak is {format_bytes(best['peak'])} "
            f"({best['layout']}, micro-batch {best['micro_batch']}{', checkpointing' if best['checkpointing'] else ''})"
            f", {format_bytes(best['peak'] - device.memory_bytes)} over; use more devices, a device with more "
            "memory, or a smaller batch or sequence"
            + (f" ({len(unavailable)} layout variants could not be projected: {next(iter(unavailable.values()))})"
               if unavailable else ""))
    stack_info = sim.stack
    doc = {
        "schema": "netdiet.plan/1",
        "model": {"spec": info.get("spec"), "kwargs": info.get("kwargs", {}), "class": info.get("class"),
                  "params": sum(p.numel() for p in net.parameters()), "built_on": info.get("built_on")},
        "devices": {"count": world, "name": device.name, "device": device.to_dict()},
        "global_batch": batch, "seq_len": tokens, "samples_unit": unit, "optimizer": optimizer, "dtype": dtype,
        "amp": amp, "compute_dtype": compute_dtype,
        "tp_degrees": tps, "checkpointing": list(ckpts),
        "ranked": feasible, "infeasible": infeasible,
        "unavailable": [{"layout": name, "checkpointing": ckpt, "why": why} for (name, ckpt), why in unavailable.items()],
        "simulation": {"distinct": len(sim.estimates), "runs": sim.simulations,
                       "method": (f"layer-scaled: {stack_info.length} identical blocks of '{stack_info.prefix}' "
                                  "simulated with 2 and 3 blocks (3 and 4 where 2 is not yet affine), checked "
                                  "against one block more at every micro-batch" if stack_info
                                  else "full meta-device simulation"),
                       "checked": {("on" if k else "off"): v for k, v in sim.checked.items()},
                       "extrapolated_from": {f"mb{mb}{' ckpt' if ck else ''}": base
                                             for (mb, ck), base in sorted(sim.bases.items())}},
        "notes": sim.notes + [
            "per-rank figures: netdiet.analysis.parallel.per_rank; step time: netdiet.analysis.roofline (a roofline "
            "per operator, ring collectives, the overlap each row names); a projection, not a measurement"],
        "seconds": time.perf_counter() - t0,
    }
    return PlanResult(doc)


def _checkpoint_settings(sim: Simulator, wanted: tuple[bool, ...]) -> tuple[bool, ...]:
    """The checkpointing settings to sweep; `on` is dropped (with a note) for a model it does not apply to."""
    out = []
    for ckpt in dict.fromkeys(bool(c) for c in wanted):
        if ckpt:
            try:
                sim.estimate(1, True)
            except NetdietError as exc:
                sim.notes.append(f"checkpointing left out: {exc}")
                continue
        out.append(ckpt)
    if not out:
        raise NetdietError("no checkpointing setting left to plan with; allow checkpointing off")
    return tuple(out)


def _row(lay: parallel.Layout, mb: int, accumulation: int, ckpt: bool, est: MemoryEstimate, sim: Simulator,
         device: Device, dtype: str, unit: str, tokens: int | None, x_mb: tuple, mem_kw: dict) -> dict[str, Any]:
    section = parallel.per_rank(lay, sim.net, x_mb, mem_kw={**mem_kw, "checkpointing": ckpt}, estimate=est,
                                checkpointing=ckpt)
    counts = sim.count(mb)
    proj = roofline.project_step(counts, section, device, dtype=dtype, micro_batch=mb, counts_batch=mb,
                                 samples_unit=unit, tokens_per_sample=tokens, accumulation=accumulation,
                                 recompute_flops=est.recompute_flops if ckpt else None,
                                 params=_root_params(counts))
    peak = int(section["per_rank"]["peak_estimated"])
    return {
        "layout": layout_name(lay.strategy, lay.tp, lay.dp), "strategy": lay.strategy, "tp": lay.tp, "dp": lay.dp,
        "micro_batch": mb, "accumulation": accumulation, "checkpointing": ckpt,
        "per_rank": dict(section["per_rank"]), "at_peak": alive_at_peak(section), "peak": peak,
        "fits": peak <= device.memory_bytes,
        "headroom": device.memory_bytes - peak, "peak_phase": section.get("peak_phase"),
        "collectives": {k: section["collectives"].get(k) for k in ("all_reduce", "all_gather", "reduce_scatter")},
        "step_time_s": proj["step_time_s"], "throughput": proj["tokens_or_samples_per_s"],
        "throughput_unit": proj["throughput_unit"], "mfu": proj["mfu"], "mfu_counted": proj["mfu_counted"],
        "projection": proj,
    }


def alive_at_peak(section: dict) -> dict[str, int]:
    """What one rank holds at its peak, summing to per_rank.peak_estimated: per_rank's parts are each their own
    largest (all gradients, activations at the end of forward), so at the peak's phase the part that is not all
    there is the remainder: the gradients alive at a backward peak, everything beyond the model states at an
    optimizer peak (activations are freed by then), the rest of a forward peak (no gradients yet)."""
    pr = section["per_rank"]
    peak, phase = int(pr["peak_estimated"]), section.get("peak_phase")
    w, s, c = int(pr["weights"]), int(pr["optimizer_state"]), int(pr["communication_buffers"])
    acts, temps, grads = int(pr["activations"]), int(pr["temporaries"]), int(pr["gradients"])
    if phase == "optimizer":
        out = {"weights": w, "optimizer_state": s, "gradients": grads, "communication_buffers": c,
               "temporaries": peak - w - s - grads - c}
    elif phase == "forward":
        out = {"weights": w, "optimizer_state": s, "communication_buffers": c, "activations": acts,
               "temporaries": peak - w - s - c - acts}
    else:
        out = {"weights": w, "optimizer_state": s, "communication_buffers": c, "activations": acts,
               "temporaries": temps, "gradients": peak - w - s - c - acts - temps}
    if min(out.values()) < 0:       # the section's parts do not decompose this way: show them as they are
        out = {k: int(pr[k]) for k in ("weights", "gradients", "optimizer_state", "activations",
                                        "communication_buffers", "temporaries")}
    return out


def _root_params(counts: OpCounts) -> int:
    return int(next((m.params for m in counts.modules if m.name == ""), 0))

