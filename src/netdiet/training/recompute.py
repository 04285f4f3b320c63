"""Activation checkpointing ("recompute") for sequential blocks.

The model's top-level `nn.Sequential` (the model itself, or its largest Sequential child such as a ResNet's
`layers` or a transformer's `blocks`) is split into segments; each segment keeps only its input for backward and
runs its forward again during backward. Memory of the activations inside a segment is traded for one extra
forward of that segment. The forward is patched on the instance, so parameter names and state_dict keys do
not change (checkpoints and safetensors files stay interchangeable with and without it).

Caveat: BatchNorm layers inside a segment update their running statistics a second time during recompute.
"""
from __future__ import annotations

import math
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from netdiet.errors import NetdietError


def find_sequential(model: nn.Module) -> tuple[str, nn.Sequential] | None:
    """The Sequential whose children are checkpointed: the model itself, else the largest Sequential child."""
    if isinstance(model, nn.Sequential):
        return "", model
    best: tuple[str, nn.Sequential] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Sequential) and len(mod) >= 2:
            if best is None or sum(p.numel() for p in mod.parameters()) > sum(p.numel() for p in best[1].parameters()):
                best = (name, mod)
    return best


def _segments(n_children: int, segments: int) -> list[tuple[int, int]]:
    k = segments if segments > 0 else max(1, round(math.sqrt(n_children)))
    k = min(k, n_children)
    bounds = [round(i * n_children / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k) if bounds[i + 1] > bounds[i]]


def enable_checkpointing(model: nn.Module, segments: int = 0) -> dict:
    """Patch the model's sequential part to recompute activations; returns what was done."""
    found = find_sequential(model)
    if found is None:
        raise NetdietError("--checkpointing needs a model with an nn.Sequential of blocks; this model has none (train without it)")
    name, seq = found
    children = list(seq)
    plan = _segments(len(children), segments)

    def forward(self: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():        # eval / no_grad: nothing to save, run plainly
            for m in children:
                x = m(x)
            return x
        for start, stop in plan:
            x = checkpoint(_run_range, children, start, stop, x, use_reentrant=False)
        return x

    seq.forward = types.MethodType(forward, seq)
    return {"module": name or "<model>", "children": len(children), "segments": [list(s) for s in plan]}


def disable_checkpointing(model: nn.Module) -> None:
    found = find_sequential(model)
    if found is not None and "forward" in vars(found[1]):
        del found[1].forward


def _run_range(children: list[nn.Module], start: int, stop: int, x: torch.Tensor) -> torch.Tensor:
    for m in children[start:stop]:
        x = m(x)
    return x
