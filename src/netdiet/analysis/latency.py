"""Timing with warm-up, median and p95, and the thread count noted.

Wall-clock times on a shared machine are noisy: medians and p95 over `repeats` runs are reported, never a
single run, and every result names the number of intra-op threads it ran with.
"""
from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from netdiet.analysis.step import as_tuple, default_loss, model_device, normalise_optimizer, step_optimizer
from netdiet.errors import NetdietError


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of already sorted values."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_callable(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 10,
                  sync: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run `fn` warmup times untimed, then `repeats` times timed; milliseconds per call.

    Returns {"median_ms", "p95_ms", "mean_ms", "min_ms", "max_ms", "stdev_ms", "warmup", "repeats", "threads"}.
    `sync` (e.g. torch.cuda.synchronize) is called after each call so asynchronous work is inside the timing.
    """
    if warmup < 0 or repeats < 1:
        raise NetdietError(f"warmup must be >= 0 and repeats >= 1, got {warmup} and {repeats}")
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1e3)
    ordered = sorted(times)
    return {
        "median_ms": statistics.median(ordered), "p95_ms": _percentile(ordered, 0.95),
        "mean_ms": statistics.fmean(ordered), "min_ms": ordered[0], "max_ms": ordered[-1],
        "stdev_ms": statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
        "warmup": warmup, "repeats": repeats, "threads": torch.get_num_threads(),
    }


@dataclass
class LatencyResult:
    forward_ms_median: float
    forward_ms_p95: float
    train_step_ms_median: float | None
    train_step_ms_p95: float | None
    threads: int
    batch_size: int | None
    throughput_samples_per_s: float | None        # inference: batch / forward median
    warmup: int
    repeats: int
    train_throughput_samples_per_s: float | None = None   # training: batch / train-step median
    optimizer: str | None = None
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)


def measure_latency(model: nn.Module, inputs: Any, *, train: bool = True, optimizer: str = "adam", warmup: int = 3,
                    repeats: int = 10, loss_fn: Callable[[Any], torch.Tensor] | None = None) -> LatencyResult:
    """Forward latency (eval mode, no grad) and, with train=True, training-step latency on a copy of the model.

    A training step is netdiet's trainer step: zero_grad -> forward -> loss -> backward -> optimizer.step.
    The caller's model is not changed (the training steps run on a deep copy).
    """

    x = as_tuple(inputs)
    device = model_device(model)
    if device.type == "meta":
        raise NetdietError("the model is on the meta device, so it cannot be timed; give a real model")
    opt_name = normalise_optimizer(optimizer)
    loss_fn = loss_fn or default_loss
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    batch = int(x[0].shape[0]) if x[0].dim() else None

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            fwd = time_callable(lambda: model(*x), warmup=warmup, repeats=repeats, sync=sync)
    except NetdietError:
        raise
    except Exception as exc:
        raise NetdietError(f"timing the forward failed ({type(exc).__name__}: {exc}); check the inputs fit the model") from None
    finally:
        model.train(was_training)

    step = None
    if train:
        net = copy.deepcopy(model)
        net.train()
        opt = step_optimizer(opt_name, [p for p in net.parameters() if p.requires_grad])

        def train_step() -> None:
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(*x))
            loss.backward()
            if opt is not None:
                opt.step()

        try:
            step = time_callable(train_step, warmup=max(warmup, 1), repeats=repeats, sync=sync)
        except NetdietError:
            raise
        except Exception as exc:
            raise NetdietError(f"timing the training step failed ({type(exc).__name__}: {exc}); "
                               "check the inputs fit the model") from None

    def per_s(ms: float | None) -> float | None:
        return batch / (ms / 1e3) if (batch and ms) else None

    return LatencyResult(
        forward_ms_median=fwd["median_ms"], forward_ms_p95=fwd["p95_ms"],
        train_step_ms_median=step["median_ms"] if step else None, train_step_ms_p95=step["p95_ms"] if step else None,
        threads=torch.get_num_threads(), batch_size=batch, throughput_samples_per_s=per_s(fwd["median_ms"]),
        warmup=warmup, repeats=repeats, train_throughput_samples_per_s=per_s(step["median_ms"]) if step else None,
        optimizer=opt_name if train else None, device=device.type,
    )


def preprocessing_cost(x: torch.Tensor, *, warmup: int = 2, repeats: int = 7) -> list[dict[str, Any]]:
    """Measured cost of common preprocessing on a (N, C, ...) float tensor, per sample.

    Rows: standardise-fit (per-channel mean and std over the set), standardise-apply ((x - mean) / std),
    flatten (a view when contiguous, so ~0), to-CSR (building sparse rows). FLOPs per sample are counted from
    the formula: fit = 4 per element (mean: 1 add; variance: subtract, square, add), apply = 2 per element.
    All are O(N) in the number of samples.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise NetdietError("preprocessing cost needs a float tensor (N, C, ...) of samples")
    n = int(x.shape[0])
    per_sample = x[0].numel()
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True).clamp_min(1e-12)

    def fit() -> None:
        x.mean(dim=dims)
        x.std(dim=dims)

    rows = []
    for name, fn, flops in (
        ("standardise: fit", fit, 4 * per_sample),
        ("standardise: apply", lambda: (x - mean) / std, 2 * per_sample),
        ("flatten", lambda: x.reshape(n, -1), 0),
        ("to CSR", lambda: x.reshape(n, -1).to_sparse_csr(), 0),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            t = time_callable(fn, warmup=warmup, repeats=repeats)
        rows.append({"step": name, "ns_per_sample": t["median_ms"] * 1e6 / n, "flops_per_sample": int(flops),
                     "total_ms": t["median_ms"], "p95_ms": t["p95_ms"], "samples": n, "threads": t["threads"]})
    return rows
