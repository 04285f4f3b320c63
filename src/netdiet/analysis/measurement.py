"""Measured training and inference peaks on real tensors, the check on every estimate.

The measurement runs the step of step.py on a real copy of the model and reads the allocator: on CPU the
profiler's memory events (every allocation and free of the c10 CPU allocator, `profile_memory=True`), on CUDA the
caching allocator's `max_memory_allocated`. It shares no bookkeeping with the meta-device estimate (memory.py), so
comparing the two is a real check.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable

import torch
from torch import nn

from netdiet.analysis.memory import MemoryEstimate, apply_checkpointing
from netdiet.analysis.step import (as_tuple, cast_input, default_loss, model_device, normalise_optimizer, parse_dtype,
                                   real_autocast, real_copy, step_optimizer, train_step, unique_storage_bytes)
from netdiet.errors import NetdietError



def measure_memory(model: nn.Module, inputs: Any, *, optimizer: str = "adam", steps: int = 3,
                   dtype: str | torch.dtype | None = None, amp: bool = False, checkpointing: bool = False,
                   loss_fn: Callable[[Any], torch.Tensor] | None = None, estimate: MemoryEstimate | None = None) -> dict:
    """Run `steps` real trainer steps on a copy of the model and report the steady-state peak (steps 2+).

    Given `estimate` (from estimate_memory), its `peak_measured` is filled in too.

    Peaks are the model's own bytes (weights, buffers, the input batch) plus everything the allocator hands
    out during the step. CPU: the profiler's allocator events; CUDA: torch.cuda.max_memory_allocated.
    """
    opt_name = normalise_optimizer(optimizer)
    dt = parse_dtype(dtype)
    inputs = as_tuple(inputs)
    loss_fn = loss_fn or default_loss
    if steps < 2:
        raise NetdietError(f"steps must be 2 or more (step 1 creates the optimizer state), got {steps}")
    device = model_device(model)
    if device.type == "meta":
        raise NetdietError("the model is on the meta device, so nothing can be measured; give a real model")
    net = real_copy(model, dt)
    if checkpointing:
        apply_checkpointing(net)
    x = tuple(cast_input(t, dt, device) for t in inputs)
    params = list(dict.fromkeys(net.parameters()))
    base, _ = unique_storage_bytes(params + list(dict.fromkeys(net.buffers())) + list(x))
    trainable = [p for p in params if p.requires_grad]
    opt = step_optimizer(opt_name, trainable)
    amp_ctx = lambda: real_autocast(amp, device)  # noqa: E731
    try:
        if device.type == "cuda":
            result = _measure_cuda(net, x, opt, amp_ctx, loss_fn, steps, base)
        else:
            result = _measure_cpu(net, x, opt, amp_ctx, loss_fn, steps, base)
        if estimate is not None:
            estimate.peak_measured = result["peak_measured"]
        return result
    except NetdietError:
        raise
    except Exception as exc:
        raise NetdietError(f"running a real training step failed ({type(exc).__name__}: {exc}); "
                           "check the inputs fit the model") from None


def _measure_cuda(net, x, opt, amp_ctx, loss_fn, steps, base) -> dict:
    torch.cuda.synchronize()
    peaks = []
    for step in range(steps):
        torch.cuda.reset_peak_memory_stats()
        train_step(net, x, opt, amp_ctx, loss_fn, lambda _p: None)
        torch.cuda.synchronize()
        peaks.append(int(torch.cuda.max_memory_allocated()))
    net.eval()
    for p in net.parameters():
        p.grad = None
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), amp_ctx():
        out = net(*x)
    torch.cuda.synchronize()
    inference = int(torch.cuda.max_memory_allocated())
    del out
    return {"peak_measured": max(peaks[1:]), "inference_peak_measured": inference, "step_peaks": peaks,
            "method": "torch.cuda.max_memory_allocated (caching allocator; includes every CUDA tensor of the process)",
            "device": "cuda"}


def _allocator_events(prof, collectives: bool = False,
                      orphan_spans: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """(time, +bytes / -bytes) of every CPU allocation made inside the profiling session and of its free.

    Frees of blocks allocated before the session (e.g. garbage of earlier work collected now) are left out:
    their allocation is not in the session, so counting their free would lower the running total.

    The profiler sees allocator calls only on the threads it follows. A block whose last reference dies on a
    thread it does not follow (a gloo worker finishing a collective) has no free event: when its address is handed
    out again, it was freed before that. With `collectives`, a block allocated inside a collective (a c10d:: or
    gloo: op: the backend's flat copies) that has no free event is taken as freed when that op ends. With
    `orphan_spans` (the caller freed everything it made before the session ended), any other block still unfreed
    at the end is taken as freed at the end of the span it was allocated in.
    """
    from torch._C._profiler import _EventType

    raw: list[tuple[int, int, int]] = []
    scope_end: dict[int, int] = {}   # index in raw -> end of the enclosing collective op
    stack = [(node, None) for node in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        node, coll_end = stack.pop()
        if node.tag == _EventType.Allocation:
            ef = node.extra_fields
            if ef.device.type == "cpu":
                if coll_end is not None and ef.alloc_size > 0:
                    scope_end[len(raw)] = coll_end
                raw.append((node.start_time_ns, ef.ptr, ef.alloc_size))
        elif collectives and coll_end is None and node.name.startswith(("c10d::", "gloo:")):
            coll_end = node.end_time_ns
        stack.extend((child, coll_end) for child in node.children)
    if scope_end or orphan_spans:
        unfreed: dict[int, int] = {}   # address -> index of its allocation not yet freed
        orphans = []
        for i in sorted(range(len(raw)), key=lambda k: raw[k][0]):
            ptr, n = raw[i][1], raw[i][2]
            if n > 0:
                if ptr in unfreed:
                    orphans.append(unfreed[ptr])
                unfreed[ptr] = i
            else:
                unfreed.pop(ptr, None)
        leftover = list(unfreed.values())
        closing = [(scope_end[i], raw[i][1], -raw[i][2]) for i in orphans + leftover if i in scope_end]
        for i in leftover:
            span = next((sp for sp in orphan_spans or () if sp[0] <= raw[i][0] <= sp[1]), None)
            if i not in scope_end and span is not None:
                closing.append((span[1], raw[i][1], -raw[i][2]))
        raw += closing
    raw.sort(key=lambda ev: ev[0])
    live: dict[int, int] = {}
    events = []
    for t, ptr, n in raw:
        if n > 0:
            if ptr in live:   # reused: its free happened where the profiler does not look
                events.append((t, -live.pop(ptr)))
            live[ptr] = n
            events.append((t, n))
        elif ptr in live:
            events.append((t, -live.pop(ptr)))
    return events


def _annotations(prof, prefix: str) -> dict[str, tuple[int, int]]:
    out = {}
    for e in prof.profiler.kineto_results.events():
        name = e.name()
        if name.startswith(prefix):
            out[name[len(prefix):]] = (e.start_ns(), e.start_ns() + e.duration_ns())
    return out


def _peak_in(events: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """(peak of the running allocation total inside [start, end], total at start)."""
    running, at_start, peak = 0, None, None
    for t, n in events:
        if t > end:
            break
        if t >= start and at_start is None:
            at_start = running
            peak = running
        running += n
        if t >= start and running > peak:
            peak = running
    if at_start is None:
        at_start = peak = running
    return peak, at_start


@contextlib.contextmanager
def _native_stderr_silenced():
    """The profiler's native code prints start/stop lines straight to fd 2; keep them off the user's terminal."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _measure_cpu(net, x, opt, amp_ctx, loss_fn, steps, base) -> dict:
    import gc

    from torch.profiler import ProfilerActivity, profile, record_function

    gc.collect()  # garbage of earlier work must not be freed inside the measured steps
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for step in range(steps):
            with record_function(f"netdiet_step_{step}"):
                train_step(net, x, opt, amp_ctx, loss_fn, lambda _p: None)
        net.eval()
        for p in net.parameters():
            p.grad = None
        with record_function("netdiet_step_inference"):
            with torch.no_grad(), amp_ctx():
                out = net(*x)
            del out
    events = _allocator_events(prof)
    spans = _annotations(prof, "netdiet_step_")
    step_peaks = []
    for step in range(steps):
        start, end = spans[str(step)]
        peak, _ = _peak_in(events, start, end)
        step_peaks.append(base + peak)
    start, end = spans["inference"]
    inf_peak, at_start = _peak_in(events, start, end)
    return {"peak_measured": max(step_peaks[1:]), "inference_peak_measured": base + inf_peak - at_start,
            "step_peaks": step_peaks, "baseline": base,
            "method": "torch.profiler CPU allocator events (profile_memory=True) over real steps, "
                      "plus the weights, buffers and inputs allocated before them",
            "device": "cpu"}


@contextlib.contextmanager
def cpu_allocation_peak():
    """Measure a block of real work: yields a dict whose "peak" is, on exit, the highest running total of CPU
    bytes allocated inside the block (bytes it frees again lower the total; frees of older blocks are left out).
    The profiler's allocator events, as `measure_memory` reads them; the training loop measures one step with it."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    out: dict[str, int] = {}
    gc.collect()  # garbage of earlier work must not be freed inside the measured block
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield out
    events = _allocator_events(prof)
    peak, _ = _peak_in(events, 0, events[-1][0] if events else 0)
    out["peak"] = peak
    out["live"] = sum(n for _, n in events)    # allocated inside the block and still held at its end


def cpu_region_peaks(run: Callable[[Callable[[str], Any]], None], collectives: bool = False,
                     close_in: tuple[str, ...] = ()) -> dict[str, int]:
    """Run `run(region)` under the profiler's CPU allocator events; every `with region(name):` block gets the peak
    of the running allocation total inside it, counted from the session's start (so what `run` builds inside the
    session — a model copy, its wrappers — is in the total; allocations made before the session, and their frees,
    are not). With `collectives`, a collective's temporaries freed on a backend thread count as freed when the
    collective ends (see _allocator_events); with `close_in` (region names; `run` must free all it made before it
    returns), a block never freed is taken as freed at the end of the named region it was allocated in. Used by
    the per-rank measurement of parallel_measure.py."""
    import gc

    from torch.profiler import ProfilerActivity, profile, record_function

    prefix = "netdiet_region_"
    gc.collect()  # garbage of earlier work must not be freed inside the session
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run(lambda name: record_function(prefix + name))
    spans = _annotations(prof, prefix)
    events = _allocator_events(prof, collectives, [spans[name] for name in close_in if name in spans])
    return {name: _peak_in(events, start, end)[0] for name, (start, end) in spans.items()}
