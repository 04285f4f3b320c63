"""When a meta copy can stand in for a real CPU model in a count, and what sends the count back to the real tensors.

counter.count_ops counts a meta copy of a CPU model (`on_meta_copy`): every formula reads shapes only, so the
counts are the same without running a kernel, except where the meta device does otherwise than the CPU:
- calls whose CPU path differs (CPU_PATHS, checked by the counter's function mode, and an attention the CPU flash
  op would not take);
- calls the CPU kernel refuses and the meta kernel accepts (`check_call`, checked per dispatched op): matrix
  products and convolutions on mixed dtypes, embedding ids outside the table (read from the real inputs);
- a forward that reads values (.item(), data-dependent shapes) or an op without a meta kernel, which raise.
Each raises on the copy, and the real tensors are counted instead (with their own error, if any).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netdiet.analysis.meta_values import MetaValues
from netdiet.analysis.step import meta_copy


class RealTensorsNeeded(RuntimeError):
    """A count on a meta copy of a real model met a call whose CPU path is not its meta path: count for real."""


# Calls whose CPU kernel differs from what the meta device runs in their place, so a meta copy would count other
# operators than the real model: the recurrent layers (the CPU precomputes the input projection of every step,
# LSTM runs as mkldnn_rnn_layer) and multi-head attention (the CPU's fused fast paths; its attention is not
# routed), and the fused linear + cross-entropy (its chunking and accumulation dtype are chosen by device type).
# On a meta copy of a real model they send the count back to the real tensors.
CPU_PATHS = frozenset(f for f in (torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu, F.multi_head_attention_forward,
                                  getattr(torch, "_native_multi_head_attention", None),
                                  getattr(torch, "_transformer_encoder_layer_fwd", None),
                                  getattr(F, "linear_cross_entropy", None)) if f is not None)


# Matrix products and convolutions take one dtype on the CPU ("mat1 and mat2 must have the same dtype", "Input type
# and weight type should be the same") while their meta kernels accept any mix: on a meta copy such a call goes to
# the real tensors, whose kernel says what is wrong.
_SAME_DTYPE = frozenset(id(getattr(torch.ops.aten, n)) for n in (
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "addr", "convolution", "_convolution",
    "convolution_backward", "_scaled_dot_product_flash_attention_for_cpu"))

# An embedding's CPU kernel refuses ids outside its table, which the meta kernel cannot see: a meta copy checks the
# real input tensors it stands for (REAL_INPUTS: id of a meta input or buffer -> the real one, set while a copy
# counts; meta_values seeds the copy's real twins from it).
_EMBEDDING = id(torch.ops.aten.embedding)
REAL_INPUTS: dict[int, torch.Tensor] = {}


def meta_values(model: nn.Module, args: tuple) -> MetaValues:
    """Real twins for a count on meta (meta_values.py), seeded with the real inputs and buffers that `model` (a
    meta copy made by on_meta_copy) and `args` stand for, and with the known values of meta inputs netdiet made."""
    values = MetaValues()
    for t in args:   # the real input it stands for, else itself (a meta input netdiet made: models.inputs.KNOWN)
        if isinstance(t, torch.Tensor):
            values.seed_input(t, REAL_INPUTS.get(id(t), t))
    if REAL_INPUTS:
        for b in model.buffers():
            real = REAL_INPUTS.get(id(b))
            if real is not None:
                values.seed(b, real)
    return values


def _ids_fit(ids: Any, rows: int) -> bool:
    if not isinstance(ids, torch.Tensor):
        return True
    real = REAL_INPUTS.get(id(ids))
    if real is None and ids._base is not None:   # a view of an input (ids.view(-1, T)): check the whole input
        real = REAL_INPUTS.get(id(ids._base))
    if real is None or real.numel() == 0 or real.is_floating_point():
        return True
    return bool(real.min() >= 0 and real.max() < rows)


def check_call(func: Any, args: tuple) -> None:
    """RealTensorsNeeded when the CPU kernel would refuse a call its meta kernel runs."""
    packet = id(func.overloadpacket)
    if packet in _SAME_DTYPE and len({a.dtype for a in args if isinstance(a, torch.Tensor)}) > 1:
        raise RealTensorsNeeded(f"{func} on mixed dtypes: the CPU kernel refuses them, the meta one does not")
    if packet == _EMBEDDING and len(args) > 1 and not _ids_fit(args[1], args[0].shape[0]):
        raise RealTensorsNeeded("token ids outside the embedding: the CPU kernel refuses them")


# why the last meta copy gave up (one line), for the profile's `counting.fallback`; None while a copy stands
FALLBACK: list[str | None] = [None]


def _reason(exc: BaseException) -> str:
    """The first line of the innermost error of a failed meta-copy count (what the meta device could not do):
    the chain is walked through suppressed contexts too, past count_pass's one-line wrapper."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {first[:200]}"


def on_meta_copy(model: nn.Module, args: tuple, run: Any, enabled: bool = True) -> Any:
    """`run(model, args, strict)` on a meta copy of a CPU model and its inputs (strict=True: see
    counter._MetaAttentionMode and check_call), else, or when that fails, `run(model, args, False)` on the real ones.

    Counting needs shapes only, and every formula reads only shapes, so the copy counts what the real model would
    without running a kernel; a forward that reads tensor values, an op without a meta kernel, or a call whose
    CPU path differs (CPU_PATHS, an attention the flash op cannot stand in for) raises on the copy, and the
    real count (with its own error, if any) stands."""
    tensors = list(model.parameters()) + list(model.buffers()) + [a for a in args if isinstance(a, torch.Tensor)]
    FALLBACK[0] = None
    if enabled and tensors and all(t.device.type == "cpu" for t in tensors):
        try:
            copy = meta_copy(model)
            meta_args = tuple(torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
                              .requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
        except Exception:   # not deep-copyable: count the model itself
            copy = None
        if copy is not None:
            REAL_INPUTS.update({id(m): a for m, a in zip(meta_args, args) if isinstance(a, torch.Tensor)})
            real_buffers = dict(model.named_buffers())
            copy_buffers = [(b, real_buffers[n]) for n, b in copy.named_buffers() if n in real_buffers]
            REAL_INPUTS.update({id(b): r for b, r in copy_buffers})
            try:
                with warnings.catch_warnings(record=True) as caught:   # shown only if the copy's count stands
                    warnings.simplefilter("always")
                    result = run(copy, meta_args, True)
            except Exception as exc:   # noqa: BLE001 - any failure on the copy: the real count decides
                FALLBACK[0] = _reason(exc)
            else:
                for w in caught:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
                return result
            finally:
                for m in list(meta_args) + [b for b, _ in copy_buffers]:
                    REAL_INPUTS.pop(id(m), None)
    return run(model, args, False)
