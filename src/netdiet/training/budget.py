"""`--memory-budget`: pick the largest batch (then activation recompute, then bf16 autocast) whose *predicted*
training peak fits, then check the choice against the *measured* peak of real training steps.

Predicted: `netdiet.analysis.memory.estimate_memory` (meta-device simulation) through
`netdiet.analysis.scaling.largest_batch_within` when those engines are installed; otherwise a straight line
`fixed + per_sample * batch` through tracked peaks measured at batch 1 and 2 (said so in the decision).
Measured: live tensor storages tracked over real training steps (steady state: the steps after the first,
when optimizer state exists). The budget covers training memory: weights, gradients, optimizer state,
activations and temporaries; not the Python interpreter, torch's libraries or the dataset.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from netdiet.analysis.memory import estimate_memory
from netdiet.errors import NetdietError
from netdiet.optim import make_optimizer
from netdiet.training.precision import autocast
from netdiet.training.recompute import enable_checkpointing, find_sequential
from netdiet.units import format_bytes, parse_size

# (precision, checkpointing) in the order the picker escalates
OPTIONS = (("fp32", False), ("fp32", True), ("bf16", True))


# ---------------------------------------------------------------- measuring: live tensor storages
class LiveStorageTracker(TorchDispatchMode):
    """Bytes of distinct live tensor storages, polled after every op; `peak` is the maximum seen.

    Storages that exist on entry (weights, optimizer state, the batch) are registered with `track`. A storage is
    counted once however many views share it, and leaves the count when its last reference dies.
    """

    def __init__(self) -> None:
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef
        self._ref = StorageWeakRef
        self.live: dict[int, tuple[object, int]] = {}
        self.current = 0
        self.peak = 0

    def track(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        ref = self._ref(st)
        if ref.cdata in self.live:
            return
        self.live[ref.cdata] = (ref, st.nbytes())
        self.current += st.nbytes()
        self.peak = max(self.peak, self.current)

    def purge(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def reset_peak(self) -> None:
        self.purge()
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.purge()
        for t in torch.utils._pytree.tree_leaves(out):
            self.track(t)
        return out


def measure_training_peak(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, optimizer: str = "adam",
                          precision: str = "fp32", checkpointing: bool = False, steps: int = 3) -> int:
    """Steady-state peak of live tensor bytes over real training steps 2..steps on a copy of `model`."""
    net = copy.deepcopy(model)
    net.train()
    if checkpointing:
        enable_checkpointing(net)
    opt = make_optimizer(optimizer, net.parameters(), 1e-3)
    tracker = LiveStorageTracker()
    for t in list(net.parameters()) + list(net.buffers()) + [x, y]:
        tracker.track(t)
    device = torch.device("cpu")
    peak = 0
    with tracker:
        for i in range(max(2, steps)):
            if i == 1:
                tracker.reset_peak()          # from here on optimizer state exists: the steady state
            with autocast(precision, device):
                loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
            if i >= 1:
                peak = max(peak, tracker.peak)
    return peak


def measure_activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, precision: str = "fp32",
                             checkpointing: bool = False) -> int:
    """Bytes kept alive for backward at the end of a real forward (live storages after forward minus before)."""
    net = copy.deepcopy(model)
    net.train()
    if checkpointing:
        enable_checkpointing(net)
    tracker = LiveStorageTracker()
    for t in list(net.parameters()) + list(net.buffers()) + [x, y]:
        tracker.track(t)
    before = tracker.current
    with tracker:
        with autocast(precision, torch.device("cpu")):
            loss = F.cross_entropy(net(x), y)
        tracker.purge()
        kept = tracker.current - before
    loss.backward()
    return kept


# ---------------------------------------------------------------- predicting
def _batch(x: torch.Tensor, y: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of b samples in its own storage (a slice would keep the whole dataset's storage alive in the count)."""
    if b <= len(x):
        return x[:b].clone(), y[:b].clone()
    reps = -(-b // len(x))
    return x.repeat((reps,) + (1,) * (x.dim() - 1))[:b].clone(), y.repeat(reps)[:b].clone()


def _predictor(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: str, precision: str, checkpointing: bool):
    """A function batch -> predicted peak bytes, and the method's name."""
    cache: dict[int, int] = {}
    def predict(b: int) -> int:
        if b not in cache:
            inp = torch.empty((b,) + tuple(x.shape[1:]), device="meta")
            cache[b] = int(estimate_memory(model, inp, optimizer=optimizer, dtype=None, amp=precision == "bf16",
                                           checkpointing=checkpointing).peak_estimated)
        return cache[b]
    try:
        predict(1)
        return predict, "netdiet.analysis.memory.estimate_memory (meta-device simulation)"
    except Exception:  # noqa: BLE001 - the estimator cannot simulate this case: use the measured line below
        pass
    p1 = measure_training_peak(model, *_batch(x, y, 1), optimizer=optimizer, precision=precision, checkpointing=checkpointing)
    p2 = measure_training_peak(model, *_batch(x, y, 2), optimizer=optimizer, precision=precision, checkpointing=checkpointing)
    per_sample, fixed = max(0, p2 - p1), p1 - max(0, p2 - p1)
    return (lambda b: fixed + per_sample * b), "line through tracked peaks measured at batch 1 and 2"


def _largest(predict, budget: int, cap: int) -> int:
    """The largest b in [1, cap] with predict(b) <= budget (peaks grow with b), 0 if none."""
    if predict(1) > budget:
        return 0
    if predict(cap) <= budget:
        return cap
    lo, hi = 1, cap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if predict(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class BudgetDecision:
    budget: int
    requested_batch: int
    batch_size: int
    checkpointing: bool
    precision: str
    predicted_peak: int
    measured_peak: int
    prediction_method: str
    measurement_method: str = "live tensor storages over training steps 2-3 (steady state)"
    candidates: list[dict] = field(default_factory=list)
    adjustments: list[dict] = field(default_factory=list)
    explanation: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def choose_for_budget(model: nn.Module, sample_shape: tuple[int, ...], budget: str | int, *, optimizer: str,
                      batch_size: int, x_sample: torch.Tensor, y_sample: torch.Tensor) -> BudgetDecision:
    """The configuration for `budget` (see the module docstring); NetdietError if even batch 1 cannot fit."""
    budget = parse_size(budget)
    if budget <= 0:
        raise NetdietError("--memory-budget must be positive, e.g. 512MiB")
    x, y = x_sample[:max(1, min(len(x_sample), batch_size))], y_sample[:max(1, min(len(y_sample), batch_size))]
    options = OPTIONS if find_sequential(model) is not None else (("fp32", False), ("bf16", False))
    candidates, chosen = [], None
    for precision, ckpt in options:
        predict, method = _predictor(model, x, y, optimizer, precision, ckpt)
        b = _largest(predict, budget, batch_size)
        candidates.append({"precision": precision, "checkpointing": ckpt, "largest_batch": b,
                           "predicted_peak_at_1": predict(1), "predicted_peak": predict(b) if b else None, "method": method})
        # an escalation (recompute costs a forward, bf16 costs precision) must buy >= 10 % more batch, or reach the request
        prev = chosen[0]["largest_batch"] if chosen else 0
        if chosen is None or b >= batch_size or (b > prev and b >= prev * 1.1):
            chosen = (candidates[-1], predict, method)
        if b >= batch_size:
            break
    best, predict, method = chosen
    if best["largest_batch"] == 0:
        need = min(c["predicted_peak_at_1"] for c in candidates)
        raise NetdietError(f"memory budget {format_bytes(budget)} is too small for batch 1 even with "
                           f"{'checkpointing and ' if options is OPTIONS else ''}bf16: "
                           f"training needs at least {format_bytes(need)} ({need} bytes); raise --memory-budget")
    b, precision, ckpt = best["largest_batch"], best["precision"], best["checkpointing"]
    measured = measure_training_peak(model, *_batch(x, y, b), optimizer=optimizer, precision=precision, checkpointing=ckpt)
    adjustments = []
    while measured > budget:
        if b == 1:
            raise NetdietError(f"memory budget {format_bytes(budget)} is too small: batch 1 measured {format_bytes(measured)} "
                               f"({measured} bytes) with {precision}{' and checkpointing' if ckpt else ''}; raise --memory-budget")
        nb = max(1, min(b - 1, int(b * budget / measured)))
        adjustments.append({"batch": b, "measured_peak": measured, "next_batch": nb})
        b = nb
        measured = measure_training_peak(model, *_batch(x, y, b), optimizer=optimizer, precision=precision, checkpointing=ckpt)
    steps = ["fp32 weights"] + (["activation checkpointing"] if ckpt else []) + (["bf16 autocast"] if precision == "bf16" else [])
    why = (f"batch {b} is the requested batch" if b >= batch_size else
           f"batch {b} is the largest that fits (requested {batch_size})")
    explanation = (f"memory budget {format_bytes(budget)}: chose batch {b} with {' + '.join(steps)}; {why}; "
                   f"predicted peak {format_bytes(predict(b))}, measured {format_bytes(measured)} on the first steps"
                   + (f"; stepped the batch down {len(adjustments)}x because the measured peak exceeded the budget" if adjustments else ""))
    return BudgetDecision(budget, batch_size, b, ckpt, precision, int(predict(b)), int(measured), method,
                          candidates=candidates, adjustments=adjustments, explanation=explanation)
