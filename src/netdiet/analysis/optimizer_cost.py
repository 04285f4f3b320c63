"""The optimizer's memory priced from its definition: the state tensors it keeps per parameter and the transient
tensors of its step, so the estimate (memory.py) simulates one forward and backward and no optimizer step.

Priced: torch.optim.SGD (plain, momentum, dampening, nesterov, weight decay), Adam and AdamW (weight decay coupled
or decoupled, amsgrad) in torch's single-tensor implementation — the one torch runs on CPU and meta tensors
(foreach and fused are chosen only for CUDA-class devices; `price_step` returns None for those, for several
parameter groups, maximize, capturable, differentiable, complex or sparse parameters, and the caller simulates
the real step instead). With P_i the bytes of parameter i (in its dtype; state and temporaries are made like
the parameter or its gradient), in the order the optimizer walks them:

  state      SGD with momentum: momentum_buffer (P_i). Adam/AdamW: exp_avg, exp_avg_sq (P_i each), `step`, a 0-dim
             tensor on the CPU in torch's scalar dtype (float32; float64 when that is the default dtype), and
             max_exp_avg_sq (P_i) with amsgrad.
  steady step (torch/optim/adam.py `_single_tensor_adam`): `denom = (exp_avg_sq.sqrt() / c).add_(eps)` holds sqrt
             and the quotient at once (2 P_i), while the previous parameter's denom is still bound to the name
             (P_{i-1}) until the assignment ends; coupled weight decay adds `grad.add(param)` (P_i), alive until the
             next parameter; decoupled decay and every moment update are in place. Peak above the step's start:
             max_i(P_{i-1} + 2 P_i [+ P_i]).
             (torch/optim/sgd.py `_single_tensor_sgd`): everything in place but coupled decay's `grad.add(param)`
             (P_i, freed when `grad` is rebound) and nesterov's `grad.add(buf)` (P_i, alive until the next
             parameter): max_i of what is alive at once.
  first step Adam creates every state tensor before the first update (`_init_group`), so its peak is the state
             plus the steady step's; SGD clones each momentum buffer from the gradient inside the loop, so its
             peak is max_i(buffers made so far + that parameter's temporaries).

tests/test_memory_speed.py checks every figure against the real step run under the storage tracker.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepCost:
    implementation: str       # what was priced, e.g. "torch.optim.Adam, single-tensor"
    state: int                # bytes of state the optimizer keeps (all parameters)
    state_tensors: tuple[str, ...]   # the state tensors per parameter
    transient: int            # steady-state step: peak bytes above what is alive when the step starts
    first_step_extra: int     # first step (no state yet): peak bytes above what is alive when it starts


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _single_tensor(opt: torch.optim.Optimizer, params: list[torch.Tensor], need_grads: bool = True) -> dict | None:
    """The one parameter group's settings when torch runs the single-tensor step on `params`; else None."""
    if len(opt.param_groups) != 1:
        return None
    group = opt.param_groups[0]
    if group.get("foreach") or group.get("fused") or group.get("capturable") or group.get("differentiable") \
            or group.get("maximize") or isinstance(group.get("lr"), torch.Tensor) \
            or any(isinstance(b, torch.Tensor) for b in group.get("betas", ())):
        return None
    for p in params:
        if p.device.type not in ("cpu", "meta") or p.is_complex():
            return None
        if need_grads and (p.grad is None or p.grad.layout != torch.strided):
            return None
    return group


def price_step(opt: torch.optim.Optimizer | None, params_with_grad: list[torch.Tensor]) -> StepCost | None:
    """The state and step transients of `opt` updating `params_with_grad` (the parameters whose .grad is set, in
    the optimizer's order); None when this implementation is not priced (simulate the step instead)."""
    if opt is None:
        return StepCost("no optimizer", 0, (), 0, 0)
    group = _single_tensor(opt, params_with_grad)
    if group is None:
        return None
    sizes = [_nbytes(p) for p in params_with_grad]
    decay = float(group["weight_decay"]) != 0.0
    if type(opt) in (torch.optim.Adam, torch.optim.AdamW):
        coupled = decay and not group.get("decoupled_weight_decay", type(opt) is torch.optim.AdamW)
        names = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        step_bytes = torch.empty((), dtype=torch.float64 if torch.get_default_dtype() == torch.float64
                                 else torch.float32, device="meta").element_size()
        state = sum((len(names) - 1) * n + step_bytes for n in sizes)
        transient = max((prev + (3 if coupled else 2) * n for prev, n in zip([0] + sizes, sizes)), default=0)
        impl = f"torch.optim.{type(opt).__name__}, single-tensor"
        return StepCost(impl, state, names, transient, state + transient)
    if type(opt) is torch.optim.SGD:
        momentum, nesterov = float(group["momentum"]) != 0.0, bool(group["nesterov"])
        # coupled decay's grad.add(param) and nesterov's grad.add(buf) are the only tensors a step makes
        transient = max(((decay + nesterov) * n for n in sizes), default=0)
        state = sum(sizes) if momentum else 0
        first, made = 0, 0
        for n in sizes:
            made += n if momentum else 0          # the momentum buffer, cloned from the gradient
            first = max(first, made + (decay + nesterov) * n)
        return StepCost("torch.optim.SGD, single-tensor", state, ("momentum_buffer",) if momentum else (),
                        transient, first)
    return None


def priceable(opt: torch.optim.Optimizer | None) -> bool:
    """Whether price_step can price `opt` (before any gradient exists: its settings and parameters' devices)."""
    if opt is None:
        return True
    params = [p for g in opt.param_groups for p in g["params"]]
    return type(opt) in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW) and \
        _single_tensor(opt, params, need_grads=False) is not None


# stand-ins in a tracker snapshot (uid -> bytes) for what the priced step would have allocated
STATE_UID, STEP_TEMPORARIES_UID = -2, -3


def steady_state(peaks: dict[str, int], cost: StepCost, snapshot: dict[int, int] | None, snapshot_total: int,
                 live_at_step: dict[int, int]) -> tuple[dict[str, int], int, dict[int, int] | None, int]:
    """Step 1's phase peaks (forward, backward; the optimizer phase did nothing) -> the steady state's.

    Returns (phase peaks, first-step peak, snapshot at the steady peak, its total). Forward and backward never
    touch the optimizer state, so the steady step's are step 1's plus the state; its optimizer phase is what was
    alive when the step started (`live_at_step`, also step 1's) plus the state and the step's transients.
    Where the optimizer phase does not top the others (ties go to the earlier phase, as the tracker's snapshot
    keeps the first time a high is reached), the snapshot is step 1's plus the state.
    """
    start = sum(live_at_step.values())
    steady = {"forward": peaks["forward"] + cost.state, "backward": peaks["backward"] + cost.state,
              "optimizer": start + cost.state + cost.transient}
    first = max(peaks["forward"], peaks["backward"], start + cost.first_step_extra)
    if steady["optimizer"] > max(steady["forward"], steady["backward"]):
        snap = {**live_at_step, STATE_UID: cost.state, STEP_TEMPORARIES_UID: cost.transient}
        return steady, first, snap, steady["optimizer"]
    if snapshot is None:
        return steady, first, None, -1
    return steady, first, {**snapshot, STATE_UID: cost.state}, snapshot_total + cost.state
