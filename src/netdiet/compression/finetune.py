"""Fine-tuning inside a compression stage: the one trainer, with the masks of earlier stages held.

Low-rank and distillation both train after they change the model; if an earlier stage pruned weights, those
weights must stay zero, so the keep-masks in `state.masks` are held by prune's `MaskHold` (gradients of pruned
weights zeroed before each optimizer step, weights re-zeroed after it).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from netdiet.compression.base import CompressionState, StageContext
from netdiet.compression.prune import MaskHold
from netdiet.errors import NetdietError
from netdiet.training.loop import Callback, TrainResult, fit


def live_masks(model: nn.Module, state: CompressionState) -> dict[str, torch.Tensor]:
    """Masks whose parameter still exists in `model` with the same shape (a later edit may have replaced it)."""
    params = dict(model.named_parameters())
    return {n: m for n, m in state.masks.items() if n in params and tuple(params[n].shape) == tuple(m.shape)}


def finetune(model: nn.Module, state: CompressionState, ctx: StageContext, *, description: str,
             extra_callbacks: list[Callback] | None = None,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy) -> TrainResult | None:
    """Train `model` in place with ctx.finetune on ctx.data's train split; None when no fine-tuning was asked."""
    cfg = ctx.finetune
    if cfg is None or cfg.epochs <= 0:
        return None
    if ctx.data is None:
        raise NetdietError(f"{description} asks for fine-tuning but no data was given; pass --data or set finetune epochs to 0")
    from dataclasses import replace
    cfg = replace(cfg, description=description, seed=ctx.seed)
    callbacks = list(extra_callbacks or [])
    masks = live_masks(model, state)
    if masks:
        with torch.no_grad():  # start from the masked weights, not just after the first step
            params = dict(model.named_parameters())
            for n, m in masks.items():
                params[n].mul_(m.to(params[n].dtype))
        callbacks.append(MaskHold(masks))
    return fit(model, ctx.data.x_train, ctx.data.y_train, cfg, callbacks=callbacks, loss_fn=loss_fn)
