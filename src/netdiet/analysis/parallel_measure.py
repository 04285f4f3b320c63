"""The measured check on the per-rank estimate: the real layout run on this machine (world_size gloo processes).

Every rank builds its own copy of the model inside a profiler session (measurement.cpu_region_peaks: the CPU
allocator's events), wraps it as the strategy does — DistributedDataParallel, or FSDP2's `fully_shard` on each
unit of parallel.fsdp_units (the repeated blocks, then the root; reshard_after_forward=True) — builds the
optimizer over the wrapped parameters and runs `steps` real training steps of step.py at the per-rank micro-batch.
A rank's peak is the largest running total of a steady-state step (steps 2+), counted from the start of the
session, so the sharded parameters, DDP's buckets and FSDP's all-gather buffers are all in it.

The collectives each rank issues are counted on the way out (a DDP communication hook that all-reduces each
bucket as the default hook does; for FSDP2 wrappers of torch.distributed's all_gather_single /
reduce_scatter_single), as the independent check on the estimate's message sizes.
"""
from __future__ import annotations

import gc
from typing import Any

import torch
from torch import nn

from netdiet.analysis.measurement import cpu_region_peaks
from netdiet.analysis.parallel import Layout, fsdp_units
from netdiet.analysis.step import (
    as_tuple,
    cast_input,
    default_loss,
    normalise_optimizer,
    parse_dtype,
    real_autocast,
    real_copy,
    step_optimizer,
    train_step,
)
from netdiet.errors import NetdietError
from netdiet.launch import run_ranks

MEASURABLE = ("ddp", "fsdp", "zero3")


def measure_layout(layout: Layout, net: nn.Module, x_micro: Any, *, mem_kw: dict, steps: int = 3,
                   sessions: int = 3) -> dict[str, Any]:
    """Run the layout for real: world_size gloo processes, each at the micro-batch `x_micro`. Returns every rank's
    peak (`peaks`), its per-step peaks, and the collective message bytes it issued per steady-state step.

    Each rank runs `sessions` independent sessions (a fresh model copy each) and keeps the smallest: the profiler
    misses a free now and then (see measurement._allocator_events), and gloo's worker thread sometimes drops its
    reference to a collective's tensor only after the main thread has moved on, holding one unit's flat buffer a
    little longer (real, but a race); both only ever add."""
    if layout.strategy not in MEASURABLE:
        raise NetdietError(f"--measure runs ddp and fsdp (zero3) layouts with PyTorch's own engine; "
                           f"'{layout.strategy}' is estimated only (drop --measure)")
    if layout.tp > 1:
        raise NetdietError("--measure does not run tensor parallel layouts (no TP engine here); drop --measure or --tp")
    if steps < 2:
        raise NetdietError(f"steps must be 2 or more (step 1 creates the optimizer state), got {steps}")
    if any(p.device.type != "cpu" for p in net.parameters()):
        raise NetdietError("--measure with --parallel runs gloo processes on the CPU; give a real CPU model")
    x = tuple(t.detach().cpu() for t in as_tuple(x_micro))
    opts = {"optimizer": normalise_optimizer(mem_kw.get("optimizer", "adam")), "dtype": mem_kw.get("dtype"),
            "amp": bool(mem_kw.get("amp")), "checkpointing": bool(mem_kw.get("checkpointing"))}
    if opts["checkpointing"]:
        raise NetdietError("--measure with --parallel does not run --checkpointing yet; drop one of them")
    # fork: the ranks inherit the model as the profile holds it (an hf: model's forward is a closure that
    # rebuilds its keyword inputs from the flat tensors, which pickling for spawn cannot carry)
    results = run_ranks(_rank_step, (layout.strategy, net, x, opts, steps, max(1, int(sessions))), layout.world_size,
                        start_method="fork")
    return {"strategy": layout.strategy, "world_size": layout.world_size, "steps": steps,
            "peaks": [r["peak"] for r in results], "step_peaks": [r["step_peaks"] for r in results],
            "collectives": [r["collectives"] for r in results],
            "phase_peaks": [r["phase_peaks"] for r in results],
            "session_peaks": [r["session_peaks"] for r in results],
            "method": "each rank: torch.profiler CPU allocator events (profile_memory=True) from before its model copy "
                      "is built to the end of its steps; peak of steps 2+"}


class _Recorder:
    """Collective message bytes per step, by kind."""

    def __init__(self) -> None:
        self.step = -1
        self.per_step: list[dict[str, int]] = []

    def start_step(self) -> None:
        self.step += 1
        self.per_step.append({"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0})

    def add(self, kind: str, nbytes: int) -> None:
        if self.per_step:
            self.per_step[-1][kind] += int(nbytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _ddp_hook(recorder: _Recorder):
    import torch.distributed as dist

    def hook(_state, bucket):
        buf = bucket.buffer()
        recorder.add("all_reduce", _nbytes(buf))
        buf.div_(dist.get_world_size())
        fut = dist.all_reduce(buf, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    return hook


_PATCHED: list[_Recorder] = []   # the recorder torch.distributed's wrapped collectives report to (one per process)


def _count_fsdp_collectives(recorder: _Recorder) -> None:
    import torch.distributed as dist

    if _PATCHED:
        _PATCHED[0] = recorder
        return
    _PATCHED.append(recorder)
    gather, scatter = dist.all_gather_single, dist.reduce_scatter_single

    def all_gather_single(output, input, *a, **k):  # noqa: A002 - torch's parameter name
        _PATCHED[0].add("all_gather", _nbytes(output))
        return gather(output, input, *a, **k)

    def reduce_scatter_single(output, input, *a, **k):  # noqa: A002
        _PATCHED[0].add("reduce_scatter", _nbytes(input))
        return scatter(output, input, *a, **k)

    dist.all_gather_single, dist.reduce_scatter_single = all_gather_single, reduce_scatter_single


def _wrap(strategy: str, model: nn.Module, recorder: _Recorder) -> nn.Module:
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)
        ddp.register_comm_hook(None, _ddp_hook(recorder))
        return ddp
    from torch.distributed.fsdp import fully_shard

    _count_fsdp_collectives(recorder)
    for name, mod in fsdp_units(model):
        fully_shard(mod)   # innermost first; the root (name "") last
    return model


def _rank_step(rank: int, world: int, strategy: str, net: nn.Module, x: tuple, opts: dict, steps: int,
               sessions: int) -> dict:
    torch.manual_seed(rank)
    dt = parse_dtype(opts["dtype"])
    recorder = _Recorder()

    def run(region) -> None:
        model = real_copy(net, dt)
        inputs = tuple(cast_input(t, dt, "cpu").clone() for t in x)
        wrapped = _wrap(strategy, model, recorder)
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        opt = step_optimizer(opts["optimizer"], trainable)
        amp_ctx = lambda: real_autocast(opts["amp"], torch.device("cpu"))  # noqa: E731
        for step in range(steps):
            recorder.start_step()
            open_phase: list = []

            def marks(phase: str, _step: int = step) -> None:
                if open_phase:
                    open_phase.pop().__exit__(None, None, None)
                if phase != "end":
                    ctx = region(f"{_step}:{phase}")
                    ctx.__enter__()
                    open_phase.append(ctx)
            with region(str(step)):
                train_step(wrapped, inputs, opt, amp_ctx, default_loss, marks)
        del wrapped, model, opt, inputs, trainable
        gc.collect()   # everything this session made is freed inside it: what stays unfreed is a missed free

    runs = []
    for _ in range(sessions):
        recorder.per_step.clear()
        peaks = cpu_region_peaks(run, collectives=True, close_in=tuple(str(s) for s in range(steps)))
        runs.append(peaks)
    # a free the profiler missed only ever adds to a running total, so the smallest session is the truest
    peaks = min(runs, key=lambda p: max(p[str(s)] for s in range(1, steps)))
    step_peaks = [int(peaks[str(s)]) for s in range(steps)]
    phase_peaks = {ph: max(int(peaks.get(f"{s}:{ph}", 0)) for s in range(1, steps))
                   for ph in ("forward", "backward", "optimizer")}
    steady = recorder.per_step[1:]
    collectives = {k: max(s[k] for s in steady) for k in steady[0]} if steady else {}
    return {"peak": max(step_peaks[1:]), "step_peaks": step_peaks, "collectives": collectives, "rank": rank,
            "phase_peaks": phase_peaks, "session_peaks": [int(max(p[str(s)] for s in range(1, steps))) for p in runs]}
