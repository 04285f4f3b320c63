"""How cost grows with batch size and with data: sweeps, least-squares fits, the largest batch for a budget,
and dataset x epochs totals.

Memory is modelled as `fixed + per_sample * batch` (weights, gradients and optimizer state do not grow with
the batch; activations and temporaries do) and FLOPs as `a * batch + b`. Each fit reports R^2 so a user sees
when the straight line is a poor description (e.g. an allocator that rounds up, or attention's seq^2 term
when the sequence, not the batch, grows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from netdiet.analysis.counter import count_ops
from netdiet.analysis.measurement import measure_memory
from netdiet.analysis.memory import estimate_memory
from netdiet.analysis.ram import available_ram
from netdiet.errors import NetdietError
from netdiet.models.inputs import KNOWN, VALUES_LIMIT, remember
from netdiet.units import format_bytes, parse_size

# The largest batch `largest_batch_within` will consider: beyond it the answer is "the budget is not the limit".
MAX_BATCH = 1 << 24


# ------------------------------------------------------------------ least squares
@dataclass
class LinearFit:
    """y = slope * x + intercept, fitted by least squares over `n` points."""

    slope: float
    intercept: float
    r2: float | None
    n: int

    def predict(self, x: float) -> float:
        return self.intercept + self.slope * x

    def to_dict(self) -> dict:
        return {"slope": self.slope, "intercept": self.intercept, "r2": self.r2, "n": self.n}


def linear_fit(xs: Sequence[float], ys: Sequence[float], *, through_origin: bool = False) -> LinearFit:
    """Ordinary least squares of ys on xs. R^2 is None when ys do not vary (nothing to explain)."""
    if len(xs) != len(ys):
        raise ValueError("xs and ys differ in length")
    n = len(xs)
    if n == 0:
        raise NetdietError("a fit needs at least one point; give --batch-sizes with two or more sizes")
    xs = [float(x) for x in xs]
    ys = [float(y) for y in ys]
    mean_y = sum(ys) / n
    if through_origin:
        sxx = sum(x * x for x in xs)
        slope = sum(x * y for x, y in zip(xs, ys)) / sxx if sxx else 0.0
        intercept = 0.0
    elif n == 1 or len(set(xs)) == 1:
        # one distinct x: a line through the origin and the mean is the only honest choice
        slope = mean_y / xs[0] if xs[0] else 0.0
        intercept = 0.0
    else:
        mean_x = sum(xs) / n
        sxx = sum((x - mean_x) ** 2 for x in xs)
        sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
        slope = sxy / sxx
        intercept = mean_y - slope * mean_x
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys))
    r2 = None if ss_tot == 0 else 1.0 - ss_res / ss_tot
    return LinearFit(slope, intercept, r2, n)


# ------------------------------------------------------------------ batch sweeps
@dataclass
class ScalingPoint:
    batch_size: int
    peak_estimated: int
    inference_peak: int
    activations: int
    macs: int | None = None
    flops: int | None = None
    train_flops: int | None = None
    peak_measured: int | None = None
    inference_peak_measured: int | None = None
    # the estimate's parts at this batch, and the fitted line's value here (for plots beside the points)
    weights: int | None = None
    gradients: int | None = None
    optimizer_state: int | None = None
    temporaries: int | None = None
    peak_fitted: int | None = None
    # what is alive at the moment of the estimated peak (sums to peak_estimated; activations here are the
    # saved tensors still alive then, which during backward is fewer than all saved at the end of forward)
    peak_breakdown: dict[str, int] | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ScalingResult:
    """Points of a batch sweep and the fitted terms (see module docstring)."""

    points: list[ScalingPoint] = field(default_factory=list)
    fit: dict[str, Any] = field(default_factory=dict)
    budget_bytes: int | None = None

    def refit(self) -> None:
        """Fit the points and record the fitted training peak at each batch."""
        self.fit = fit_points(self.points)
        mem = self.fit["memory_estimated"]
        for p in self.points:
            p.peak_fitted = int(mem["fixed"] + mem["per_sample"] * p.batch_size)

    def to_dict(self) -> dict:
        return {"variable": "batch_size", "points": [p.to_dict() for p in self.points], "fit": self.fit,
                "budget_bytes": self.budget_bytes}


def fit_points(points: Sequence[ScalingPoint]) -> dict[str, Any]:
    """memory = fixed + per_sample * batch (estimated, and measured when present); flops = per_sample * batch + fixed."""
    xs = [p.batch_size for p in points]
    out: dict[str, Any] = {}

    def memory_fit(ys: list[int]) -> dict:
        f = linear_fit(xs, ys)
        return {"fixed": int(round(f.intercept)), "per_sample": int(round(f.slope)), "r2": f.r2, "n": f.n}

    def flops_fit(ys: list[int]) -> dict:
        f = linear_fit(xs, ys)
        return {"per_sample": f.slope, "fixed": f.intercept, "r2": f.r2, "n": f.n}

    out["memory_estimated"] = memory_fit([p.peak_estimated for p in points])
    # flat copies of the headline terms, for readers that show only scalars
    out["memory_fixed_bytes"] = out["memory_estimated"]["fixed"]
    out["memory_per_sample_bytes"] = out["memory_estimated"]["per_sample"]
    out["memory_r2"] = out["memory_estimated"]["r2"]
    out["inference_memory_estimated"] = memory_fit([p.inference_peak for p in points])
    if all(p.peak_measured is not None for p in points):
        out["memory_measured"] = memory_fit([p.peak_measured for p in points])
    if all(p.flops is not None for p in points):
        out["flops"] = flops_fit([p.flops for p in points])
        out["flops_per_sample"] = out["flops"]["per_sample"]
        out["flops_r2"] = out["flops"]["r2"]
    if all(p.train_flops is not None for p in points):
        out["train_flops"] = flops_fit([p.train_flops for p in points])
    return out


def with_batch(inputs: Sequence[torch.Tensor], batch: int) -> tuple[torch.Tensor, ...]:
    """The same inputs with dim 0 replaced by `batch` (same dtype, device; values repeated along dim 0).

    On the meta device this allocates nothing; on real tensors it repeats the batch-1 rows, which is all a
    memory or FLOP count needs.
    """
    check_batch_fits(inputs, batch)
    out = []
    for t in inputs:
        if t.dim() == 0:
            out.append(t)
            continue
        shape = (batch, *t.shape[1:])
        if t.device.type == "meta":
            meta = torch.empty(shape, dtype=t.dtype, device="meta")
            known = KNOWN.get(t)   # a meta input with known values: the same rows, repeated
            if known is not None and math.prod(shape) <= VALUES_LIMIT:
                reps = math.ceil(batch / known.shape[0])
                remember(meta, known.repeat(reps, *([1] * (known.dim() - 1)))[:batch].contiguous())
            out.append(meta)
        else:
            reps = math.ceil(batch / t.shape[0])
            out.append(t.repeat(reps, *([1] * (t.dim() - 1)))[:batch].contiguous())
    return tuple(out)


def batch_input_bytes(inputs: Sequence[torch.Tensor], batch: int) -> int:
    """Bytes the real (not meta) `inputs` take with dim 0 replaced by `batch`."""
    return sum(batch * math.prod(t.shape[1:]) * t.element_size() for t in inputs
               if t.dim() and t.device.type != "meta")


def check_batch_fits(inputs: Sequence[torch.Tensor], batch: int, *, flag: str = "the batch size") -> None:
    """Refuse (one line) a batch whose real input tensors alone exceed the RAM available, before allocating them.
    Meta tensors need no memory and always pass."""
    need = batch_input_bytes(inputs, int(batch))
    if not need:
        return
    avail = available_ram()
    if avail is not None and need > avail:
        raise NetdietError(f"batch {batch} needs {format_bytes(need)} for its input tensors alone, but only "
                           f"{format_bytes(avail)} of RAM is available; give a smaller {flag}")


def sweep_batch_sizes(model: nn.Module, inputs: Sequence[torch.Tensor], batch_sizes: Sequence[int], *,
                      optimizer: str = "adam", dtype: Any = None, amp: bool = False, checkpointing: bool = False,
                      count_flops: bool = True, measure: bool = False,
                      estimator: Callable[..., Any] | None = None, counter: Callable[..., Any] | None = None,
                      measurer: Callable[..., Any] | None = None,
                      on_point: Callable[[ScalingPoint], None] | None = None) -> ScalingResult:
    """Estimate (and with `measure`, measure) training memory and count FLOPs at each batch size, then fit.

    `inputs` are example inputs at any batch size; dim 0 is replaced by each size in turn. `estimator`,
    `counter` and `measurer` default to netdiet's engines (estimate_memory, count_ops, measure_memory).
    """
    if not batch_sizes:
        raise NetdietError("the batch sweep needs at least one size; give e.g. --batch-sizes 1,8,32")
    if any(int(b) <= 0 for b in batch_sizes):
        raise NetdietError(f"batch sizes must be positive, got {list(batch_sizes)}; give e.g. --batch-sizes 1,8,32")
    estimator = estimator or estimate_memory
    counter = counter or (count_ops if count_flops else None)
    measurer = measurer or (measure_memory if measure else None)
    points = []
    for b in sorted(set(int(b) for b in batch_sizes)):  # every size is checked before any work
        check_batch_fits(inputs, b, flag="batch size in --batch-sizes")
    for b in sorted(set(int(b) for b in batch_sizes)):
        x = with_batch(inputs, b)
        est = estimator(model, x, optimizer=optimizer, dtype=dtype, amp=amp, checkpointing=checkpointing)
        point = ScalingPoint(b, int(est.peak_estimated), int(est.inference_peak), int(est.activations))
        for part in ("weights", "gradients", "optimizer_state", "temporaries"):
            if getattr(est, part, None) is not None:
                setattr(point, part, int(getattr(est, part)))
        if getattr(est, "peak_breakdown", None):
            point.peak_breakdown = {k: int(v) for k, v in est.peak_breakdown.items()}
        if count_flops:
            counts = counter(model, x, train=True, optimizer=optimizer)
            point.macs, point.flops, point.train_flops = int(counts.macs), int(counts.flops), int(counts.train_flops)
        if measure:
            m = measurer(model, x, optimizer=optimizer, dtype=dtype, amp=amp, checkpointing=checkpointing)
            point.peak_measured = _int_or_none(m.get("peak_measured"))
            point.inference_peak_measured = _int_or_none(m.get("inference_peak_measured"))
        points.append(point)
        if on_point:
            on_point(point)
    result = ScalingResult(points)
    result.refit()
    return result


def _int_or_none(v: Any) -> int | None:
    return None if v is None else int(v)


# ------------------------------------------------------------------ the largest batch for a budget
def _as_example_inputs(input_shape_at_batch1: Any, input_dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
    """Meta tensors at batch 1 from a shape, a list of shapes, a tensor or a tuple of tensors."""
    if isinstance(input_shape_at_batch1, torch.Tensor):
        input_shape_at_batch1 = [input_shape_at_batch1]
    items = input_shape_at_batch1
    if isinstance(items, (tuple, list)) and items and all(isinstance(d, int) for d in items):
        items = [items]
    out = []
    for item in items:
        if isinstance(item, torch.Tensor):  # its shape and dtype matter: the search may reach MAX_BATCH
            meta = torch.empty(tuple(item.shape), dtype=item.dtype, device="meta")
            # and the values of small token ids and masks, for a forward that reads them (meta_values.py)
            known = KNOWN.get(item) if item.is_meta else (
                None if item.is_floating_point() else item.detach())
            out.append(meta if known is None else remember(meta, known))
        else:
            out.append(torch.empty(tuple(int(d) for d in item), dtype=input_dtype or torch.float32, device="meta"))
    return tuple(out)


def largest_batch_within(model_factory_or_model: nn.Module | Callable[[], nn.Module], input_shape_at_batch1: Any,
                         dtype: Any, budget_bytes: int, *, optimizer: str = "adam", amp: bool = False,
                         checkpointing: bool = False, input_dtype: torch.dtype | None = None,
                         estimator: Callable[..., Any] | None = None) -> tuple[int, Any]:
    """The largest batch whose estimated training peak fits in `budget_bytes`, and the estimate at that batch.

    `dtype` is the training precision handed to estimate_memory (None/fp32/bf16/fp16). The input is a shape
    at batch 1 (or a list of shapes, or example tensors); `input_dtype` types shapes (default float32; give
    torch.int64 for token ids). Returns (0, estimate at batch 1) when even batch 1 does not fit.

    Method: real estimates at batch 1 and 2 fit fixed + per_sample * batch; each further estimate lands where
    the line through the last two predicts the budget is reached (a secant step), clamped inside the bracket
    [largest batch known to fit, smallest known not to]. Memory is nearly linear in the batch, so this takes
    four to six estimates; the answer is exact for the estimator (peak(b) <= budget < peak(b + 1)), not for
    the line. Each estimate is a meta-device simulation, so nothing is allocated.
    """
    budget = parse_size(budget_bytes)
    model = model_factory_or_model if isinstance(model_factory_or_model, nn.Module) else model_factory_or_model()
    if not isinstance(model, nn.Module):
        raise NetdietError(f"the model factory returned {type(model).__name__}, not a torch.nn.Module")
    estimator = estimator or estimate_memory
    base = _as_example_inputs(input_shape_at_batch1, input_dtype)
    cache: dict[int, Any] = {}

    def peak(b: int) -> int:
        if b not in cache:
            cache[b] = estimator(model, with_batch(base, b), optimizer=optimizer, dtype=dtype, amp=amp,
                                 checkpointing=checkpointing)
        return int(cache[b].peak_estimated)

    if peak(1) > budget:
        return 0, cache[1]
    lo, hi = 1, None                    # peak(lo) <= budget < peak(hi)
    prev, last = 1, 2
    if peak(2) > budget:
        return 1, cache[1]
    lo = 2
    for step in range(100):
        if hi is not None and hi - lo <= 1:
            break
        if lo >= MAX_BATCH:             # the budget does not limit the batch within MAX_BATCH
            return lo, cache[lo]
        slope = (peak(last) - peak(prev)) / (last - prev)
        if slope > 0:
            guess = int(last + (budget - peak(last)) // slope)
        else:
            guess = lo * 2
        upper = (hi - 1) if hi is not None else MAX_BATCH
        guess = max(lo + 1, min(upper, guess))
        if guess in cache or step >= 8:  # the secant stalled or crawls: halve the bracket (or double) instead
            guess = (lo + hi) // 2 if hi is not None else min(MAX_BATCH, lo * 2)
        if peak(guess) <= budget:
            lo = guess
        else:
            hi = guess
        prev, last = last, guess
    return lo, cache[lo]


# ------------------------------------------------------------------ dataset x epochs
@dataclass
class Projection:
    """Training cost of `epochs` passes over `dataset_size` samples."""

    dataset_size: int
    epochs: int
    train_flops_per_sample: float
    total_train_flops: int
    samples_per_second: float | None = None
    projected_seconds: float | None = None
    throughput_source: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def project_training(train_flops: int, batch_size: int, dataset_size: int, epochs: int, *,
                     samples_per_second: float | None = None, throughput_source: str | None = None) -> Projection:
    """total = train_flops / batch_size * dataset_size * epochs; time = samples / measured samples-per-second.

    The per-sample figure comes from one counted training step at `batch_size`; the last partial batch of
    an epoch is counted at the same per-sample cost (FLOPs are linear in batch for every counted op).
    """
    if dataset_size is None or epochs is None:
        raise NetdietError("a training projection needs both --dataset-size and --epochs")
    if int(dataset_size) <= 0 or int(epochs) <= 0:
        raise NetdietError(f"--dataset-size and --epochs must be positive, got {dataset_size} and {epochs}")
    per_sample = train_flops / batch_size
    samples = int(dataset_size) * int(epochs)
    seconds = samples / samples_per_second if samples_per_second else None
    return Projection(int(dataset_size), int(epochs), per_sample, int(round(per_sample * samples)),
                      samples_per_second, seconds, throughput_source if samples_per_second else None)
