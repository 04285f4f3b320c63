"""Learning-rate schedules as one pure function of the optimizer step.

The schedule keeps no state of its own: the step counter in the checkpoint is all `--resume` needs.
"""
from __future__ import annotations

import math

from netdiet.errors import NetdietError

SCHEDULES = ("constant", "cosine", "step", "linear")


def check_schedule(name: str) -> None:
    if name not in SCHEDULES:
        raise NetdietError(f"unknown LR schedule '{name}'; choose one of: {', '.join(SCHEDULES)}")


def lr_at(step: int, *, base_lr: float, schedule: str, total_steps: int, warmup_steps: int = 0,
          steps_per_epoch: int = 1, step_epochs: int = 0, gamma: float = 0.1, min_lr: float = 0.0) -> float:
    """The LR for optimizer step `step` (0-based).

    warmup: linear from base_lr/(warmup+1) up to base_lr over `warmup_steps` steps, for every schedule;
    constant: base_lr; cosine: base_lr -> min_lr along half a cosine over the steps after warm-up;
    step: base_lr * gamma ** (epoch // step_epochs); linear: base_lr -> min_lr linearly after warm-up.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        every = max(1, step_epochs) * max(1, steps_per_epoch)
        return base_lr * gamma ** (step // every)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return base_lr + (min_lr - base_lr) * progress
    raise NetdietError(f"unknown LR schedule '{schedule}'; choose one of: {', '.join(SCHEDULES)}")
