"""Timing that holds: warm-up, then repeats until the median is known to +-10 %, with the threads used named.

Wall-clock times on a shared machine are noisy, so a single median is not a figure. Every timing here repeats
until the distribution-free 95 % confidence interval of the median (order statistics of the binomial, no
assumption about the shape of the noise) lies within +-`target` (10 %) of the median, or until `time_limit_s`
has passed; a timing whose interval is still wider is marked `"stable": false`, and nothing downstream makes a
headline of it. Two timings meant to be compared (PyTorch vs ONNX Runtime) are measured interleaved, A B A B,
so a burst of load on the machine falls on both, and their ratio (`ratio_of`) exists only when both are stable.

Timings run on a fixed number of intra-op threads: `--threads N` when a command was given it, otherwise
DEFAULT_TIMING_THREADS (1: the count every machine has, and the steadiest on a shared one). Every result names
the count it ran with.
"""
from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from netdiet.analysis.step import as_tuple, default_loss, model_device, normalise_optimizer, step_optimizer
from netdiet.errors import NetdietError

TARGET = 0.10                 # stable: the 95 % interval of the median within +-10 % of it
CONFIDENCE = 0.95
DEFAULT_TIME_LIMIT_S = 1.0    # per timing (a pair counts as one): the longest a noisy timing is repeated
DEFAULT_TIMING_THREADS = 1
MAX_REPEATS = 20_000          # a nanosecond callable stops here rather than filling memory with samples
_EXACT_UP_TO = 1000           # the binomial sum is exact up to this many samples, normal-approximated above

_timing_threads: list[int] = []   # the --threads of the running command (innermost last); see timing_threads_of


@contextlib.contextmanager
def timing_threads_of(threads: int | None) -> Iterator[None]:
    """Within the block, timings run on `threads` (a command's --threads); None keeps DEFAULT_TIMING_THREADS."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise NetdietError(f"--threads {threads} must be at least 1")
    _timing_threads.append(int(threads))
    try:
        yield
    finally:
        _timing_threads.pop()


def timing_threads() -> int:
    """The intra-op thread count timings use now."""
    return _timing_threads[-1] if _timing_threads else DEFAULT_TIMING_THREADS


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of already sorted values."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def median_ci_ranks(n: int, confidence: float = CONFIDENCE) -> tuple[int, int] | None:
    """0-based ranks (lo, hi) of the sorted sample whose values bound the median with at least `confidence`.

    The number B of samples below the true median is Binomial(n, 1/2); x_(j) (0-based) lies above the median
    exactly when B <= j, so [x_(j), x_(n-1-j)] covers it with probability 1 - 2 P(B <= j). The largest j keeping
    that at or above `confidence` is taken (exact binomial sums up to 1000 samples, the normal approximation
    with continuity correction above). None when n is too small for any interval (n < 6 at 95 %).
    """
    tail = (1.0 - confidence) / 2.0
    if n > _EXACT_UP_TO:
        z = statistics.NormalDist().inv_cdf(1.0 - tail)
        j = int(math.floor((n - 1) / 2.0 - z * math.sqrt(n) / 2.0))
        return (j, n - 1 - j) if j >= 0 else None
    total, term, cum, j = 2 ** n, 1, 0, -1
    for k in range(n // 2 + 1):          # cum = sum_{i<=k} C(n, i); keep the largest k with cum / 2^n <= tail
        cum += term
        if cum > tail * total:
            break
        j = k
        term = term * (n - k) // (k + 1)
    return (j, n - 1 - j) if j >= 0 else None


def summarise(times_ms: list[float], *, target: float = TARGET) -> dict[str, Any]:
    """Median, p95, spread and the 95 % interval of the median of timed samples (milliseconds).

    `ci_rel` is the interval's larger half-width over the median; `stable` is ci_rel <= target."""
    ordered = sorted(times_ms)
    n = len(ordered)
    median = statistics.median(ordered)
    ranks = median_ci_ranks(n)
    lo, hi = (ordered[ranks[0]], ordered[ranks[1]]) if ranks else (None, None)
    rel = max(median - lo, hi - median) / median if ranks and median > 0 else None
    return {
        "median_ms": median, "p95_ms": _percentile(ordered, 0.95), "mean_ms": statistics.fmean(ordered),
        "min_ms": ordered[0], "max_ms": ordered[-1], "stdev_ms": statistics.stdev(ordered) if n > 1 else 0.0,
        "ci_low_ms": lo, "ci_high_ms": hi, "ci_rel": rel, "stable": rel is not None and rel <= target, "repeats": n,
    }


def time_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int = 3, repeats: int = 10,
                     time_limit_s: float = DEFAULT_TIME_LIMIT_S, target: float = TARGET, threads: int | None = None,
                     sync: Callable[[], None] | None = None, max_repeats: int = MAX_REPEATS) -> dict[str, dict[str, Any]]:
    """Time each callable of `fns` in rounds, one call of each per round in the given order (A B A B ...).

    Every callable runs `warmup` times untimed, then at least `repeats` timed rounds; rounds go on until every
    median's 95 % interval is within +-`target` or `time_limit_s` (seconds, counted from the first timed round)
    has passed or `max_repeats` rounds were run. On `threads` intra-op threads (default: timing_threads()).
    Returns, per name, summarise()'s figures plus warmup, threads, seconds, time_limit_s and target.
    `sync` (e.g. torch.cuda.synchronize) is called after each call so asynchronous work is inside the timing.
    """
    if warmup < 0 or repeats < 1:
        raise NetdietError(f"warmup must be >= 0 and repeats >= 1, got {warmup} and {repeats}")
    if not (time_limit_s >= 0) or not (0 < target < 1):
        raise NetdietError(f"time_limit_s must be >= 0 and target in (0, 1), got {time_limit_s} and {target}")
    threads = timing_threads() if threads is None else int(threads)
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    with torch_threads(threads):
        for _ in range(warmup):
            for k in names:
                fns[k]()
        if sync:
            sync()
        start = time.perf_counter()
        goal = repeats
        while True:
            while len(times[names[0]]) < goal:
                for k in names:
                    t0 = time.perf_counter()
                    fns[k]()
                    if sync:
                        sync()
                    times[k].append((time.perf_counter() - t0) * 1e3)
            done = len(times[names[0]])
            stats = {k: summarise(times[k], target=target) for k in names}
            elapsed = time.perf_counter() - start
            if all(s["stable"] for s in stats.values()) or elapsed >= time_limit_s or done >= max_repeats:
                break
            # the next check after about a quarter more rounds (at least 5), not past the time limit
            per_round = elapsed / done
            room = int((time_limit_s - elapsed) / per_round) if per_round > 0 else max_repeats
            goal = done + max(1, min(max(5, done // 4), room, max_repeats - done))
    for s in stats.values():
        s.update(warmup=warmup, threads=threads, seconds=round(elapsed, 4), time_limit_s=time_limit_s, target=target)
    return stats


def time_callable(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 10, sync: Callable[[], None] | None = None,
                  time_limit_s: float = DEFAULT_TIME_LIMIT_S, target: float = TARGET,
                  threads: int | None = None) -> dict[str, Any]:
    """One callable timed as time_interleaved times many: milliseconds per call, with its interval and stability.

    Returns {"median_ms", "p95_ms", "mean_ms", "min_ms", "max_ms", "stdev_ms", "ci_low_ms", "ci_high_ms",
    "ci_rel", "stable", "warmup", "repeats", "threads", "seconds", "time_limit_s", "target"}."""
    return time_interleaved({"fn": fn}, warmup=warmup, repeats=repeats, sync=sync, time_limit_s=time_limit_s,
                            target=target, threads=threads)["fn"]


def ratio_of(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """a's median over b's (e.g. PyTorch time / ONNX Runtime time = ORT's speed-up), from two timings.

    `value` is None unless both timings are stable: a ratio of a noisy figure is no figure. `low`/`high` bound it
    with the two medians' intervals (a's low over b's high, a's high over b's low)."""
    both = bool(a.get("stable")) and bool(b.get("stable"))
    med = a["median_ms"] / b["median_ms"] if b.get("median_ms") else None
    lo = a["ci_low_ms"] / b["ci_high_ms"] if a.get("ci_low_ms") is not None and b.get("ci_high_ms") else None
    hi = a["ci_high_ms"] / b["ci_low_ms"] if a.get("ci_high_ms") is not None and b.get("ci_low_ms") else None
    return {"value": med if both else None, "median_ratio": med, "low": lo, "high": hi, "stable": both,
            "threads": a.get("threads")}


@dataclass
class LatencyResult:
    forward_ms_median: float
    forward_ms_p95: float
    train_step_ms_median: float | None
    train_step_ms_p95: float | None
    threads: int                                  # intra-op threads the timings ran on
    batch_size: int | None
    throughput_samples_per_s: float | None        # inference: batch / forward median
    warmup: int
    repeats: int                                  # the fewest timed runs asked for; more run until stable
    train_throughput_samples_per_s: float | None = None   # training: batch / train-step median
    optimizer: str | None = None
    device: str = "cpu"
    forward_ms_ci: list[float] | None = None      # the 95 % interval of the forward median
    forward_stable: bool = False                  # that interval within +-target of the median
    forward_repeats: int = 0
    train_step_ms_ci: list[float] | None = None
    train_step_stable: bool | None = None
    train_step_repeats: int = 0
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    target: float = TARGET

    def to_dict(self) -> dict:
        return asdict(self)


def _ci(stats: dict[str, Any]) -> list[float] | None:
    return None if stats["ci_low_ms"] is None else [stats["ci_low_ms"], stats["ci_high_ms"]]


def measure_latency(model: nn.Module, inputs: Any, *, train: bool = True, optimizer: str = "adam", warmup: int = 3,
                    repeats: int = 10, loss_fn: Callable[[Any], torch.Tensor] | None = None,
                    time_limit_s: float = DEFAULT_TIME_LIMIT_S, threads: int | None = None) -> LatencyResult:
    """Forward latency (eval mode, no grad) and, with train=True, training-step latency on a copy of the model,
    each repeated until stable or `time_limit_s` (time_callable), on `threads` (default timing_threads()).

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
    threads = timing_threads() if threads is None else threads
    timing = dict(warmup=warmup, repeats=repeats, sync=sync, time_limit_s=time_limit_s, threads=threads)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            fwd = time_callable(lambda: model(*x), **timing)
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
            step = time_callable(train_step, **{**timing, "warmup": max(warmup, 1)})
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
        threads=threads, batch_size=batch, throughput_samples_per_s=per_s(fwd["median_ms"]),
        warmup=warmup, repeats=repeats, train_throughput_samples_per_s=per_s(step["median_ms"]) if step else None,
        optimizer=opt_name if train else None, device=device.type,
        forward_ms_ci=_ci(fwd), forward_stable=fwd["stable"], forward_repeats=fwd["repeats"],
        train_step_ms_ci=_ci(step) if step else None, train_step_stable=step["stable"] if step else None,
        train_step_repeats=step["repeats"] if step else 0, time_limit_s=time_limit_s, target=TARGET,
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
                     "total_ms": t["median_ms"], "p95_ms": t["p95_ms"], "ci_ms": _ci(t), "stable": t["stable"],
                     "samples": n, "threads": t["threads"]})
    return rows
