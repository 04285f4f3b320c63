"""Real values beside meta tensors: how a meta-device run answers `.item()` on what a forward computes from its
inputs and constants, as a real run would, without running the model's kernels.

A meta tensor has a shape and no data, so a forward that asks a value (transformers' masking code asks whether
the position ids hold one sequence per row, `(packed[:, -1] == 0).all()`, and whether a padding mask is all ones)
stops there. Those values come from small tensors that never touch a weight: the input ids and masks, `arange`
position ids, the model's small buffers. `MetaValues` keeps, for each such meta tensor, its real twin on the CPU,
and runs every operator whose tensor arguments all have one (and factory calls, with no tensor argument) on the
twins too. An operator that reads a value (`_local_scalar_dense`, `equal`), or whose output shape depends on values
(`nonzero`), is then answered from the twins: the value itself, or a meta output of the twin's shape.
`Tensor.tolist()` dispatches no operator: the callers' function modes answer it with `tolist`.

What keeps it exact:
- a twin is the value the real run has: the same operator on the same values (the real inputs and buffers,
  cloned, so nothing of the caller's is written);
- random operators (tagged nondeterministic_seeded) never run on twins: their outputs have none, and an in-place
  one drops the twin of what it writes, as does any write whose other arguments have no twin; a dropped twin takes
  every twin sharing its storage (its views, its base) with it, so no stale value is ever read;
- a tensor of more than LIMIT elements gets no twin (the values a forward branches on are small): a question on
  it stops the meta run as before, and the caller falls back to real tensors.
The twins run inside the caller's dispatch mode, with the modes off, so they are neither counted nor tracked.
`torch.tensor(data, device="meta")` dispatches nothing, so what it makes has no twin (a question on it still stops
the meta run).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

LIMIT = 1 << 20   # elements: the largest tensor that gets a real twin
_META = torch.device("meta")
_CPU = torch.device("cpu")
_SEEDED = getattr(torch.Tag, "nondeterministic_seeded", None)
_VALUE_TAGS = {getattr(torch.Tag, n) for n in ("dynamic_output_shape", "data_dependent_output") if hasattr(torch.Tag, n)}


class _OpInfo:
    __slots__ = ("random", "reads_values", "written")

    def __init__(self, func: Any) -> None:
        tags = set(getattr(func, "tags", ()))
        self.random = _SEEDED in tags
        self.reads_values = bool(_VALUE_TAGS & tags)
        schema = getattr(func, "_schema", None)
        # (position, name) of the arguments the operator writes (in-place and out= ops)
        self.written = tuple((i, a.name) for i, a in enumerate(schema.arguments if schema is not None else ())
                             if a.alias_info is not None and a.alias_info.is_write)


class MetaValues:
    """`values(func, args, kwargs, run)` inside a dispatch mode: `run(func, args, kwargs)` (the meta call), with
    real twins kept and value questions answered (see the module docstring). `seed(meta, real)` gives a meta
    tensor its real values."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self.real: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.ops: dict[int, _OpInfo] = {}
        self.answered = 0   # value questions answered from twins (the profile's `counting` notes read it)

    def seed(self, meta: torch.Tensor, real: torch.Tensor) -> None:
        if (isinstance(meta, torch.Tensor) and isinstance(real, torch.Tensor) and meta.device.type == "meta"
                and real.device.type == "cpu" and real.layout == torch.strided and real.numel() <= self.limit
                and tuple(meta.shape) == tuple(real.shape) and meta.dtype == real.dtype):
            self.real[meta] = real.detach().clone()

    def seed_model(self, meta_model: torch.nn.Module, model: torch.nn.Module) -> None:
        """The buffers of a meta copy get the values of the real model's buffers of the same name."""
        real = dict(model.named_buffers())
        for name, b in meta_model.named_buffers():
            if name in real:
                self.seed(b, real[name])

    def tolist(self, t: Any) -> list | None:
        """`t.tolist()` from its twin (Tensor.tolist reads the data without dispatching an operator, so the
        callers' function modes ask here), or None without one."""
        twin = self.real.get(t) if isinstance(t, torch.Tensor) and t.device.type == "meta" else None
        if twin is None:
            return None
        self.answered += 1
        return twin.tolist()

    # ------------------------------------------------------------------ the dispatch step
    def __call__(self, func: Any, args: tuple, kwargs: dict, run: Callable[[Any, tuple, dict], Any]) -> Any:
        info = self.ops.get(id(func))
        if info is None:
            info = self.ops[id(func)] = _OpInfo(func)
        flat, spec = tree_flatten((args, kwargs))
        real = self.real
        known = True
        for a in flat:
            if isinstance(a, torch.Tensor) and a.device.type == "meta" and a not in real:
                known = False
                break
        if not known or info.random:
            if info.written and real:
                self._drop_written(info, args, kwargs)
            return run(func, args, kwargs)
        real_args, real_kwargs = self._twins(flat, spec)
        if info.reads_values:
            return self._answer(func, real_args, real_kwargs)
        try:
            out = run(func, args, kwargs)
        except NotImplementedError:   # no meta kernel (aten.equal): the twins answer
            return self._answer(func, real_args, real_kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs or any(t.device.type != "meta" or t.numel() > self.limit for t in outs):
            if info.written:
                self._drop_written(info, args, kwargs)
            return out
        try:
            real_out = func(*real_args, **real_kwargs)
        except Exception:   # noqa: BLE001 - the real kernel refuses what the meta one took: no twin, no answer
            if info.written:
                self._drop_written(info, args, kwargs)
            return out
        for m, r in zip(outs, [t for t in tree_flatten(real_out)[0] if isinstance(t, torch.Tensor)]):
            if tuple(m.shape) == tuple(r.shape) and m.dtype == r.dtype:
                real[m] = r
        return out

    def _twins(self, flat: list, spec: Any) -> tuple[tuple, dict]:
        real = self.real
        swapped = [real[a] if isinstance(a, torch.Tensor) and a.device.type == "meta"
                   else _CPU if isinstance(a, torch.device) and a.type == "meta" else a for a in flat]
        return tree_unflatten(swapped, spec)

    def _answer(self, func: Any, real_args: tuple, real_kwargs: dict) -> Any:
        """The real result of a value-reading call: plain values as they are, tensors as meta tensors of the same
        layout, each with its twin."""
        self.answered += 1
        result = func(*real_args, **real_kwargs)
        leaves, spec = tree_flatten(result)
        out = []
        for r in leaves:
            if isinstance(r, torch.Tensor):
                m = torch.empty_strided(r.shape, r.stride(), dtype=r.dtype, device=_META)
                if r.numel() <= self.limit:
                    self.real[m] = r
                out.append(m)
            else:
                out.append(r)
        return tree_unflatten(out, spec)

    def _drop_written(self, info: _OpInfo, args: tuple, kwargs: dict) -> None:
        """Forget the twins of what an operator writes without twins for all it reads, and of every tensor
        sharing their storage."""
        storages = set()
        for i, name in info.written:
            t = args[i] if i < len(args) else kwargs.get(name)
            for w in (t if isinstance(t, (list, tuple)) else (t,)):
                if isinstance(w, torch.Tensor) and w in self.real:
                    storages.add(self.real[w].untyped_storage()._cdata)
        if storages:
            for m in [m for m, r in self.real.items() if r.untyped_storage()._cdata in storages]:
                del self.real[m]
