"""The training loop, readable top to bottom.

Techniques that need to act inside the loop (pruning masks, cluster-gradient gathering, distillation
losses, regularisers, early stopping) do it through a `Callback`, never by copying the loop.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from netdiet.errors import NetdietError

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"          # sgd | momentum | adam | adamw
    weight_decay: float = 0.0
    momentum: float = 0.9
    seed: int = 0
    progress: bool = True
    description: str = "train"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)   # one dict per epoch
    steps: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"history": self.history, "steps": self.steps, "seconds": self.seconds}


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


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
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


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits for all of x, in eval mode (the model's mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    outs = [model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(outs)


def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    if len(y) == 0:
        return float("nan")
    return (predict(model, x, batch_size).argmax(1) == y).float().mean().item()


def fit(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, config: TrainConfig | None = None, *,
        x_val: torch.Tensor | None = None, y_val: torch.Tensor | None = None,
        callbacks: list[Callback] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        optimizer: torch.optim.Optimizer | None = None) -> TrainResult:
    """Train `model` in place on in-memory tensors; returns the per-epoch history."""
    cfg = config or TrainConfig()
    callbacks = callbacks or []
    if len(x_train) == 0:
        raise NetdietError("no training samples; check the dataset or the task split")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = optimizer or make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum)
    for cb in callbacks:
        cb.on_train_begin(model, opt)

    result, step, t_start = TrainResult(), 0, time.perf_counter()
    n = len(x_train)
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    progress = _progress(cfg.progress, cfg.epochs * steps_per_epoch, cfg.description)
    for epoch in range(cfg.epochs):
        model.train()
        t0, loss_sum, correct = time.perf_counter(), 0.0, 0
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x, y = x_train[idx], y_train[idx]
            logits = model(x)
            loss = loss_fn(logits, y)
            for cb in callbacks:
                extra = cb.extra_loss(model, x, y, logits)
                if extra is not None:
                    loss = loss + extra
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for cb in callbacks:
                cb.before_step(model, step)
            opt.step()
            step += 1
            for cb in callbacks:
                cb.after_step(model, step)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            progress.advance()
        seconds = time.perf_counter() - t0
        metrics = {"epoch": epoch + 1, "loss": loss_sum / n, "train_acc": correct / n, "seconds": seconds,
                   "samples_per_s": n / seconds if seconds > 0 else None}
        if x_val is not None and y_val is not None:
            metrics["val_acc"] = evaluate_accuracy(model, x_val, y_val)
        result.history.append(metrics)
        if any(cb.on_epoch_end(model, epoch, metrics) for cb in callbacks):
            break
    progress.close()
    for cb in callbacks:
        cb.on_train_end(model)
    result.steps, result.seconds = step, time.perf_counter() - t_start
    return result


class _progress:
    """A rich progress bar when asked for and stderr is a terminal; silent otherwise."""

    def __init__(self, enabled: bool, total: int, description: str) -> None:
        self._bar = None
        if enabled and total > 0:
            from netdiet.report.progress import progress_bar
            self._bar = progress_bar(total, description)

    def advance(self) -> None:
        if self._bar:
            self._bar.advance()

    def close(self) -> None:
        if self._bar:
            self._bar.close()
