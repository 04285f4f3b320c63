"""Repeated blocks: when two modules of a model are the same computation, so that one can stand for the other.

`block_signature(module, args, kwargs)` is a hashable key that is equal for two calls exactly when the module
trees have the same structure and configuration and the inputs have the same shapes, strides, dtypes, devices and
requires-grad flags (non-tensor arguments by value). What enters the key, per submodule (in registration order):
its class, its training flag, its `extra_repr()` (torch's layers put their configuration there: stride, padding,
eps...), its parameters and buffers (name, shape, dtype, device, requires_grad) and every other attribute of its
instance dict: numbers, strings, dtypes and tuples of them by value, tensors by shape/dtype/device, any other
object (a shared config, a function, an instance-level `forward` override) by identity. A signature is only
meaningful while those objects are alive (within one call of the caller).

Left out on purpose: hooks (a profiler puts its own closures on every module, so they would make every block
unique) and parameter identity (two blocks may share a weight). Global state a forward may read cannot be
guarded. A module or argument the key cannot describe gives None: never reuse what has no signature.

`repeated_blocks(model)` groups the composite submodules (those with children) whose module part of the
signature is equal, top-most only (a repeat inside a repeated block is implied by it).

The memory estimate reuses work at the operator level instead (meta_memo.py): a module-level stand-in would have
to reproduce autograd's gradient accumulation and free order across the block's boundary to keep every peak
exact. The signature is for callers whose figures add up per block (operation counts).
"""
from __future__ import annotations

import enum
from typing import Any, Hashable

import torch
from torch import nn

# what every nn.Module keeps in its instance dict (parameters, buffers, children, hooks): not configuration
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"_parameters", "_buffers", "_modules"}
_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.memory_format,
            torch.layout, enum.Enum)


def _value_key(v: Any, depth: int = 0) -> Hashable:
    """A hashable description of an attribute or argument; objects it cannot describe by value go by identity."""
    if isinstance(v, _SCALARS):
        return (type(v).__name__, v)
    if isinstance(v, torch.Tensor):
        return _tensor_key(v)
    if depth < 4 and isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_value_key(x, depth + 1) for x in v))
    if depth < 4 and isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return ("dict", tuple((k, _value_key(v[k], depth + 1)) for k in sorted(v)))
    return ("id", id(v))


def _tensor_key(t: torch.Tensor) -> Hashable:
    if t.layout != torch.strided:
        return ("tensor", str(t.layout), tuple(t.shape), t.dtype, t.device.type, t.requires_grad)
    return ("tensor", tuple(t.shape), tuple(t.stride()), t.dtype, t.device.type, t.requires_grad)


def module_signature(module: nn.Module) -> Hashable | None:
    """The module part of block_signature: structure and configuration of the whole subtree (None: no key)."""
    parts = []
    try:
        for name, mod in module.named_modules(remove_duplicate=False):
            attrs = tuple((k, _value_key(v)) for k, v in mod.__dict__.items() if k not in _MODULE_INTERNALS)
            params = tuple((k, None if p is None else _tensor_key(p)) for k, p in mod._parameters.items())
            buffers = tuple((k, None if b is None else _tensor_key(b)) for k, b in mod._buffers.items())
            parts.append((name, type(mod).__module__, type(mod).__qualname__, mod.training, mod.extra_repr(),
                          params, buffers, attrs))
    except Exception:   # a module whose extra_repr or attributes cannot be read has no key
        return None
    return tuple(parts)


def block_signature(module: nn.Module, args: tuple = (), kwargs: dict | None = None) -> Hashable | None:
    """Equal for two calls exactly when `module(*args, **kwargs)` is the same computation (see the module doc)."""
    mod = module_signature(module)
    if mod is None:
        return None
    inputs = _value_key(tuple(args)), _value_key(dict(kwargs or {}))
    if any(_has_identity(k) for k in inputs):   # an argument described only by identity: nothing to compare
        return None
    return mod, inputs


def _has_identity(key: Hashable) -> bool:
    if isinstance(key, tuple):
        if len(key) == 2 and key[0] == "id":
            return True
        return any(_has_identity(k) for k in key)
    return False


def repeated_blocks(model: nn.Module) -> list[list[str]]:
    """Groups (2+ names, in model order) of composite submodules with equal module signatures, top-most only."""
    groups: dict[Hashable, list[str]] = {}
    for name, mod in model.named_modules():
        if not name or not any(True for _ in mod.children()):
            continue
        sig = module_signature(mod)
        if sig is not None:
            groups.setdefault(sig, []).append(name)
    repeated = [names for names in groups.values() if len(names) > 1]
    covered = {n for names in repeated for n in names}

    def inside_another(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in covered for i in range(1, len(parts)))

    out = [[n for n in names if not inside_another(n)] for names in repeated]
    return sorted((g for g in out if len(g) > 1), key=lambda g: list(dict(model.named_modules())).index(g[0]))
