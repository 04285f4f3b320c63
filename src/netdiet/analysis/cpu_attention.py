"""scaled_dot_product_attention on the meta device as the CPU runs it, for the counter and the memory estimate.

On meta, F.scaled_dot_product_attention always takes the math path (it materialises the T x T scores). On the
CPU, PyTorch picks its flash kernel when the call qualifies (4-D inputs, no dropout, equal head dims, a mask of a
shape it takes that needs no gradient, a supported dtype, the user's backend switches): that kernel saves only the
output and the log-sum-exp. Which backend the CPU takes is asked of PyTorch itself (`torch._fused_sdp_choice`)
on CPU stand-ins of the same shapes, dtypes and flags (an expanded row each: nothing of the size is allocated),
so the rule is PyTorch's own, not a copy of it that could drift.

- flash: the boolean mask is converted as the CPU does it first (two scalar tensors and a `where`, to 0 / -inf in
  the query's dtype), then the flash op runs (it has a meta kernel);
- math: the meta device's own math path is the CPU's, operator for operator (tests/test_counter_speed.py checks
  it with dropout, masks and grouped-query attention, forward and backward);
- None from `cpu_backend`: a call PyTorch's chooser refuses (it raises at the real call too): left to the caller.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import _disable_current_modes

FLASH, MATH = "flash", "math"
_BACKENDS = {0: MATH, 1: FLASH}


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor of t's shape, dtype and requires_grad whose last dimension has stride 1 (what the chooser
    reads), built from one row."""
    row = torch.empty(t.shape[-1] if t.dim() else 1, dtype=t.dtype)
    if t.requires_grad and t.dtype.is_floating_point:
        row.requires_grad_(True)
    return row.expand(t.shape) if t.dim() else row.reshape(())


def cpu_backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False) -> str | None:
    """The backend the CPU takes for this call: FLASH, MATH, or None when the chooser refuses the call."""
    tensors = (query, key, value) + ((attn_mask,) if attn_mask is not None else ())
    if not all(isinstance(t, torch.Tensor) and t.layout == torch.strided for t in tensors):
        return None
    try:
        with _disable_current_modes(), torch.enable_grad():
            q, k, v = (_stand_in(t) for t in (query, key, value))
            m = _stand_in(attn_mask) if attn_mask is not None else None
            kw = {"enable_gqa": True} if enable_gqa else {}   # the argument is torch 2.5's; older ones lack it
            choice = torch._fused_sdp_choice(q, k, v, m, float(dropout_p), bool(is_causal), scale=scale, **kw)
    except (RuntimeError, TypeError, ValueError):
        return None
    return _BACKENDS.get(int(choice))


def on_meta(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False) -> tuple[str | None, torch.Tensor | None]:
    """(the CPU's backend, the attention as the CPU's flash kernel computes it on these meta tensors): the output
    is None where the CPU takes the math path (the meta device's own call is then the same) or the chooser
    refuses the call (backend None), and (None, None) for tensors not on meta."""
    if not all(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in (query, key, value)):
        return None, None
    backend = cpu_backend(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if backend != FLASH:
        return backend, None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        zero = torch.scalar_tensor(0.0, dtype=query.dtype, device=attn_mask.device)
        minus_inf = torch.scalar_tensor(float("-inf"), dtype=query.dtype, device=attn_mask.device)
        attn_mask = torch.where(attn_mask, zero, minus_inf)
    kw = {"attn_mask": attn_mask} if attn_mask is not None else {}
    if scale is not None:
        kw["scale"] = scale
    return FLASH, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, float(dropout_p),
                                                                             bool(is_causal), **kw)[0]
