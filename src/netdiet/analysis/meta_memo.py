"""Meta kernels run once per distinct call: the memory estimate's (memory.py) dispatch-level cache.

On the meta device an operator's result is its outputs' metadata (shape, strides, dtype) and nothing else, and
it is a function of the call: the operator and its arguments' metadata (tensors: shape, strides, storage offset,
dtype; everything else by value). Many of torch's meta kernels are Python (refs, prims, decompositions: batch
norm, convolution and its backward, the elementwise type-promotion machinery), and a model repeats the same calls
(the blocks of a stage, the layers of a transformer, the training forward after the inference one), so
`MetaMemo` runs a kernel the first time a call is seen and afterwards makes fresh outputs of the recorded
metadata with `torch.empty_strided`: the same storages (one new storage per output, of the same bytes) in the
same order, so every count the storage tracker keeps (peaks, snapshots, saved tensors) is the same as running it.

Only calls it can answer that way are cached: operators whose schema neither mutates an argument nor returns an
alias (views, in-place and out= ops run as they are: their meta kernels are C++ and cheap), that return tensors
only, whose tensor arguments are all strided meta tensors and the rest plain values, and whose recorded outputs
are plain, fresh, offset-0 tensors whose storage is exactly what empty_strided makes. Ops tagged as having
data-dependent outputs never are. The key holds the default dtype too.
"""
from __future__ import annotations

from typing import Any, Hashable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

_VALUES = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
_PLAIN = (torch.Tensor, nn.Parameter)
_NO = object()   # a call (or an operator) that is never cached
_DATA_TAGS = {getattr(torch.Tag, n) for n in ("dynamic_output_shape", "data_dependent_output") if hasattr(torch.Tag, n)}


def _arg_key(v: Any) -> Hashable:
    if isinstance(v, torch.Tensor):
        if type(v) not in _PLAIN or v.device.type != "meta" or v.layout != torch.strided:
            return _NO
        return (v.shape, v.stride(), v.storage_offset(), v.dtype)
    if isinstance(v, _VALUES):
        return (type(v), v)
    if isinstance(v, (list, tuple)):
        if all(type(x) is int for x in v):   # sizes, strides, dims: the common case
            return (type(v), tuple(v))
        keys = tuple(_arg_key(x) for x in v)
        return _NO if any(k is _NO for k in keys) else (type(v), keys)
    return _NO


def _functional(func) -> bool:
    """The operator returns only fresh tensors and mutates nothing (by its schema and tags)."""
    schema = getattr(func, "_schema", None)
    if schema is None or not schema.returns or _DATA_TAGS.intersection(getattr(func, "tags", ())):
        return False
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return False
    return all(r.alias_info is None and str(r.type) in ("Tensor", "Tensor?") for r in schema.returns)


def _storage_bytes(shape, stride, itemsize: int) -> int:
    if any(n == 0 for n in shape):
        return 0
    return (1 + sum((n - 1) * s for n, s in zip(shape, stride))) * itemsize


def _record(out: Any, args: tuple, kwargs: dict) -> Any:
    """(is a tuple, the outputs' metadata), or _NO when fresh outputs could not stand in for them."""
    outs = out if isinstance(out, tuple) else (out,)
    inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
    seen, spec = set(), []
    for t in outs:
        if t is None:
            spec.append(None)
            continue
        if type(t) is not torch.Tensor or t.device.type != "meta" or t.layout != torch.strided \
                or t.storage_offset() != 0:
            return _NO
        s = t.untyped_storage()
        if s._cdata in inputs or s._cdata in seen \
                or s.nbytes() != _storage_bytes(t.shape, t.stride(), t.element_size()):
            return _NO
        seen.add(s._cdata)
        spec.append((tuple(t.shape), t.stride(), t.dtype))
    return isinstance(out, tuple), tuple(spec)


def _make(record: tuple) -> Any:
    many, spec = record
    outs = tuple(None if s is None else torch.empty_strided(s[0], s[1], dtype=s[2], device="meta") for s in spec)
    return outs if many else outs[0]


class MetaMemo:
    """`memo(func, args, kwargs)` is `func(*args, **kwargs)` for meta tensors, each distinct call run once."""

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        # by id: OpOverload's __hash__ is Python, and torch keeps every overload alive for the process
        self.ops: dict[int, bool] = {}        # id(operator) -> cacheable by its schema
        self.results: dict[Hashable, Any] = {}
        self.hits = 0
        self.misses = 0

    def __call__(self, func, args: tuple, kwargs: dict) -> Any:
        ok = self.ops.get(id(func))
        if ok is None:
            ok = self.ops[id(func)] = _functional(func)
        if not ok:
            return func(*args, **kwargs)
        key = (id(func), torch.get_default_dtype(), _arg_key(args), _arg_key(tuple(kwargs.items())) if kwargs else ())
        if key[2] is _NO or key[3] is _NO:
            return func(*args, **kwargs)
        spec = self.results.get(key)
        if spec is _NO:
            return func(*args, **kwargs)
        if spec is not None:
            self.hits += 1
            return _make(spec)
        out = func(*args, **kwargs)
        self.misses += 1
        if len(self.results) >= self.limit:   # a bound on what a long session keeps
            self.results.clear()
        self.results[key] = _record(out, args, kwargs)
        return out
