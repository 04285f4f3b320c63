"""How techniques act inside the loop: the `Callback` hooks, and the small features built on them (early
stopping with best-weights restore, the L1/L2 penalty)."""
from __future__ import annotations

import math

import torch
from torch import nn

from netdiet.errors import NetdietError


class Callback:
    """Hooks into `fit`. Every method is optional."""

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...
    def extra_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        return None
    def before_step(self, model: nn.Module, step: int) -> None: ...   # gradients exist, weights not yet updated
    def after_step(self, model: nn.Module, step: int) -> None: ...    # weights updated (re-apply masks here)
    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict) -> bool:  # True stops training
        return False
    def on_train_end(self, model: nn.Module) -> None: ...


_HIGHER_IS_BETTER = {"val_acc": True, "train_acc": True, "val_loss": False, "loss": False}


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved by more than `min_delta` for `patience` epochs; restore the best weights.

    Its state (best value, epochs waited, best weights) goes into training checkpoints, so --resume continues it.
    """

    def __init__(self, patience: int, monitor: str = "val_acc", min_delta: float = 0.0, restore_best: bool = True) -> None:
        if monitor not in _HIGHER_IS_BETTER:
            raise NetdietError(f"cannot monitor '{monitor}' for early stopping; choose one of: {', '.join(_HIGHER_IS_BETTER)}")
        if patience < 1:
            raise NetdietError(f"patience must be at least 1 epoch, got {patience}")
        self.patience, self.monitor, self.min_delta, self.restore_best = patience, monitor, min_delta, restore_best
        self.higher = _HIGHER_IS_BETTER[monitor]
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.waited = 0
        self.stopped_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict) -> bool:
        value = metrics.get(self.monitor)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise NetdietError(f"early stopping monitors '{self.monitor}' but the run has none; give validation data or --monitor loss")
        better = self.best is None or (value > self.best + self.min_delta if self.higher else value < self.best - self.min_delta)
        if better:
            self.best, self.best_epoch, self.waited = value, epoch + 1, 0
            if self.restore_best:
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return False
        self.waited += 1
        if self.waited >= self.patience:
            self.stopped_epoch = epoch + 1
            return True
        return False

    def on_train_end(self, model: nn.Module) -> None:
        if self.restore_best and self.best_state is not None:
            model.load_state_dict(self.best_state)

    def summary(self) -> dict:
        return {"monitor": self.monitor, "patience": self.patience, "best": self.best, "best_epoch": self.best_epoch,
                "stopped_epoch": self.stopped_epoch, "restored_best": bool(self.restore_best and self.best_state is not None)}

    # --- checkpoint support: tensors and scalars kept apart (tensors -> safetensors, scalars -> JSON)
    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        scalars = {"best": self.best, "best_epoch": self.best_epoch, "waited": self.waited}
        return scalars, dict(self.best_state or {})

    def load_state_dict(self, scalars: dict, tensors: dict[str, torch.Tensor]) -> None:
        best, best_epoch, waited = scalars["best"], scalars["best_epoch"], scalars["waited"]
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)   # noqa: E731
        if not (best is None or number(best)) or not (best_epoch is None or isinstance(best_epoch, int)) \
                or not isinstance(waited, int) or isinstance(waited, bool) or waited < 0:
            raise ValueError(f"early_stopping best={best!r}, best_epoch={best_epoch!r}, waited={waited!r}")
        self.best, self.best_epoch, self.waited = best, best_epoch, waited
        self.best_state = dict(tensors) if tensors else None


def penalised_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights L1/L2 act on: parameters with 2+ dimensions (linear/conv weights, embeddings), not biases or norms."""
    return [p for p in model.parameters() if p.requires_grad and p.dim() > 1]


def weight_penalty(weights: list[torch.Tensor], l1: float, l2: float) -> torch.Tensor | None:
    """l1 * sum|w| + l2/2 * sum w^2 over the penalised weights (added to the loss, so it is part of the gradient)."""
    if not weights or (l1 == 0 and l2 == 0):
        return None
    total = weights[0].new_zeros(())
    for w in weights:
        if l1:
            total = total + l1 * w.abs().sum()
        if l2:
            total = total + 0.5 * l2 * w.pow(2).sum()
    return total
