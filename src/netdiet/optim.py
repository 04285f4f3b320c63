"""The optimizers netdiet trains with and prices: one constructor with netdiet's defaults, used by the trainer,
the memory simulation and the latency and budget measurements alike (so all of them run the same update)."""
from __future__ import annotations

from typing import Iterable

import torch

from netdiet.errors import NetdietError

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """sgd, momentum (SGD with momentum 0.9), adam, adamw (weight decay 0.01 unless given) over the trainable
    parameters."""
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay or 0.01)
    raise NetdietError(f"unknown optimizer '{name}'; choose one of: {', '.join(OPTIMIZERS)}")
