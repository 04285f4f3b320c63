"""One training step as netdiet runs it, shared by the meta-device estimate (memory.py), the measurement on real
tensors (measurement.py) and the latency timing (latency.py): input and dtype normalisation, the loss, the
optimizer, autocast, real copies of the model, and the step itself in the trainer's order:
zero_grad(set_to_none) -> forward -> loss -> backward -> optimizer.step.
"""
from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from netdiet.errors import NetdietError
from netdiet.optim import OPTIMIZERS as TRAIN_OPTIMIZERS
from netdiet.optim import make_optimizer

OPTIMIZERS = TRAIN_OPTIMIZERS + ("none",)   # "none": price or time the step without an optimizer
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
STEP_ORDER = "zero_grad(set_to_none) -> forward -> loss -> backward -> optimizer.step"


# ------------------------------------------------------------------ input normalisation
def normalise_optimizer(name: str | None) -> str:
    """One of OPTIMIZERS, lower-cased; None means "none" (the step without an optimizer)."""
    key = "none" if name is None else str(name).lower()
    if key not in OPTIMIZERS:
        raise NetdietError(f"unknown optimizer '{name}'; choose one of: {', '.join(OPTIMIZERS)}")
    return key


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None (keep the model's dtype), or fp32 / bf16 / fp16 (also their long names or a torch.dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in DTYPE_NAMES:
            raise NetdietError(f"dtype {dtype} is not a training dtype; choose fp32, bf16 or fp16")
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in DTYPES:
        raise NetdietError(f"unknown dtype '{dtype}'; choose fp32, bf16 or fp16")
    return DTYPES[key]


def dtype_label(model: nn.Module, dtype: torch.dtype | None) -> str:
    if dtype is not None:
        return DTYPE_NAMES[dtype]
    for p in model.parameters():
        if p.is_floating_point():
            return DTYPE_NAMES.get(p.dtype, str(p.dtype).replace("torch.", ""))
    return "fp32"


def as_tuple(inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs)
    raise NetdietError("inputs must be a tensor or a tuple of tensors, e.g. torch.randn(8, 1, 28, 28)")


def batch_size_of(inputs: tuple[torch.Tensor, ...]) -> int | None:
    return int(inputs[0].shape[0]) if inputs[0].dim() > 0 else None


def cast_input(x: torch.Tensor, dtype: torch.dtype | None, device: str | torch.device) -> torch.Tensor:
    target = dtype if (dtype is not None and x.is_floating_point()) else x.dtype
    if torch.device(device).type == "meta":
        return torch.empty(x.shape, dtype=target, device="meta")
    return x.detach().to(device=device, dtype=target)


def step_optimizer(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer | None:
    """The trainer's optimizer (optim.make_optimizer) for a priced or timed step; None for "none" or no parameters."""
    if name == "none" or not params:
        return None
    return make_optimizer(name, params, lr=1e-3)


def default_loss(output: Any) -> torch.Tensor:
    """The loss used for a training step when none is given.

    Logits (N, C) or (N, T, C): cross-entropy against class 0 (targets are made inside the step, so they
    are counted). Anything else (detector maps, embeddings): the mean of squares, summed over outputs.
    """
    if isinstance(output, dict):
        output = tuple(output.values())
    if isinstance(output, (tuple, list)):
        parts = [default_loss(o) for o in output if isinstance(o, torch.Tensor) and o.is_floating_point()]
        if not parts:
            raise NetdietError("the model returned no floating-point tensor to build a loss from; pass loss_fn")
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        raise NetdietError("the model output is not a floating-point tensor; pass loss_fn")
    if output.dim() in (2, 3):
        logits = output.reshape(-1, output.shape[-1])
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=output.device)
        return F.cross_entropy(logits, target)
    return output.pow(2).mean()


def real_autocast(amp: bool, device: torch.device):
    """Real autocast for measured runs (bf16 on CPU and CUDA)."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast("cuda" if device.type == "cuda" else "cpu", dtype=torch.bfloat16)


def real_copy(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    try:
        m = copy.deepcopy(model)
    except Exception as exc:
        raise NetdietError(f"cannot copy the model to measure it ({type(exc).__name__}: {exc}); "
                           "the model must be deep-copyable") from None
    if dtype is not None:
        m = m.to(dtype)
    return m


def meta_copy(model: nn.Module, dtype: torch.dtype | None = None, purpose: str = "to the meta device") -> nn.Module:
    """A deep copy of `model` on the meta device, made without allocating its weights (parameters and buffers
    are replaced by meta tensors of their shape, and of `dtype` when given and floating; sharing is kept).
    `purpose` completes the one-line error for a model that cannot be copied ("cannot copy the model <purpose>")."""
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in memo:
            dt = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
            empty = torch.empty(t.shape, dtype=dt, device="meta")
            memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    try:
        return _deepcopy_module(model, memo)
    except Exception as exc:
        raise NetdietError(f"cannot copy the model {purpose} ({type(exc).__name__}: {exc}); "
                           "the model must be deep-copyable") from None


_PLAIN_VALUES = (bool, int, float, str, type(None))


def _deepcopy_module(mod: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """copy.deepcopy(mod, memo), done directly for modules that copy the default way (nn.Module's __getstate__,
    no __deepcopy__ or __reduce__ of their own; the state goes through the class's __setstate__ as deepcopy does):
    children recursively, parameters and buffers from `memo`, empty hook dicts and plain values made directly,
    every other attribute by copy.deepcopy with the same memo (so sharing is kept as deepcopy keeps it). Any other
    module: copy.deepcopy itself."""
    hit = memo.get(id(mod))
    if hit is not None:
        return hit
    cls = type(mod)
    if (cls.__getstate__ is not nn.Module.__getstate__ or cls.__reduce_ex__ is not object.__reduce_ex__ or cls.__reduce__ is not object.__reduce__
            or hasattr(cls, "__deepcopy__") or any("__slots__" in c.__dict__ for c in cls.__mro__)):
        return copy.deepcopy(mod, memo)
    new = cls.__new__(cls)
    memo[id(mod)] = new
    state: dict[str, Any] = {}
    for key, value in mod.__dict__.items():
        kind = type(value)
        if key == "_modules" and kind is dict:
            state[key] = {n: None if c is None else _deepcopy_module(c, memo) for n, c in value.items()}
        elif key in ("_parameters", "_buffers") and kind is dict and all(id(t) in memo for t in value.values()
                                                                          if t is not None):
            state[key] = {n: None if t is None else memo[id(t)] for n, t in value.items()}
        elif kind in (dict, OrderedDict, set) and not value:
            state[key] = kind()
        elif kind in _PLAIN_VALUES:
            state[key] = value
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__setstate__(state)
    return new


def model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def train_step(model, inputs, opt, amp_ctx_factory, loss_fn, marks: Callable[[str], None],
                on_output: Callable[[Any, Any], None] | None = None):
    """One trainer step; `marks(phase)` is called at each phase boundary, `on_output(output, loss)` once both
    exist. Returns nothing (all freed). Like the trainer, the output and the loss stay alive to the end."""
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    else:
        for p in model.parameters():
            p.grad = None
    marks("forward")
    with amp_ctx_factory():
        out = model(*inputs)
        loss = loss_fn(out)
    if on_output is not None:
        on_output(out, loss)
    marks("backward")
    if loss.requires_grad:  # a fully frozen model has nothing to differentiate
        loss.backward()
    marks("optimizer")
    if opt is not None:
        opt.step()
    marks("end")
    del out, loss


# ------------------------------------------------------------------ storages (views share their base's)
def storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse / nested tensors have no single storage
        return None
    return s._cdata, s.nbytes()


def unique_storage_bytes(tensors: Iterable[torch.Tensor], exclude: set[int] | None = None) -> tuple[int, set[int]]:
    total, seen = 0, set(exclude or ())
    keys: set[int] = set()
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        k = storage_key(t)
        if k is None or k[0] in seen:
            continue
        seen.add(k[0])
        keys.add(k[0])
        total += k[1]
    return total, keys
