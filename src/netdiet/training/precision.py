"""Mixed precision: bf16 autocast on CPU, fp16 autocast + gradient scaling on CUDA.

Weights, gradients and optimizer state stay fp32 ("master weights"); only the forward's matmuls/convs and the
activations they save run in the low-precision dtype.
"""
from __future__ import annotations

import contextlib

import torch

from netdiet.errors import NetdietError

PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise NetdietError(f"unknown device '{name}'; choose cpu, cuda or auto")
    if name == "cuda" and not torch.cuda.is_available():
        raise NetdietError("--device cuda asked for but no CUDA device is available; use --device cpu")
    return torch.device(name)


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise NetdietError(f"unknown precision '{precision}'; choose one of: {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise NetdietError("fp16 autocast needs a CUDA device (its gradient scaling is a GPU feature); use --precision bf16 on CPU")


def autocast(precision: str, device: torch.device):
    """The forward-pass context for `precision` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device):
    """A GradScaler for fp16 on CUDA (small fp16 gradients underflow without it); None otherwise."""
    if precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None
