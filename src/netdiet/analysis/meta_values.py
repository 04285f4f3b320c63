"""Real values beside meta tensors: how a meta-device run answers `.item()` on what a forward computes from its
inputs and constants, as a real run would, without running the model's kernels.

A meta tensor has a shape and no data, so a forward that asks a value (transformers' masking code asks whether
the position ids hold one sequence per row, `(packed[:, -1] == 0).all()`, and whether a padding mask is all ones)
stops there. Those values come from small tensors that never touch a weight: the input ids and masks, `arange`
position ids, the model's small buffers. Inputs netdiet makes on meta itself (default token ids, all-ones masks)
carry their values too (models.inputs.remember, KNOWN). `MetaValues` keeps, for each such meta tensor, its real
twin on the CPU, and runs every operator whose tensor arguments all have one (and factory calls, with no tensor
argument) on the twins too. An operator that reads a value (`_local_scalar_dense`, `equal`), or whose output shape
depends on values (`nonzero`), is then answered from the twins: the value itself, or a meta output of the twin's
shape.
`Tensor.tolist()` dispatches no operator, and `torch.tensor(data, device="meta")` dispatches nothing: the callers'
function modes hand both to `function`.

What keeps it exact:
- a twin is the value the real run has: the same operator on the same values (the real inputs and buffers,
  cloned when an operator first reads them, so nothing of the caller's is written and an unread buffer costs
  nothing);
- random operators (tagged nondeterministic_seeded) never run on twins: their outputs have none, and an in-place
  one drops the twin of what it writes, as does any write whose other arguments have no twin; a dropped twin takes
  every twin sharing its storage (its views, its base) with it, so no stale value is ever read;
- a tensor of more than LIMIT elements gets no twin (the values a forward branches on are small), nor does any
  once a pass has made BUDGET bytes of twins: a question on it stops the meta run as before, and the caller falls
  back to real tensors (under its own RAM guard).
The twins run inside the caller's dispatch mode, with the modes off, so they are neither counted nor tracked.
The common operator (a meta argument with no twin) costs a loop over its top-level arguments and dict lookups.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_unflatten

from netdiet.models.inputs import KNOWN, VALUES_LIMIT, values_fit

LIMIT = VALUES_LIMIT   # elements: the largest tensor that gets a real twin (1 << 20)
BUDGET = 256 << 20   # bytes: all the twins one pass may make (views counted too), so no forward can spend more
_META = torch.device("meta")
_CPU = torch.device("cpu")
_SEEDED = getattr(torch.Tag, "nondeterministic_seeded", None)
_VALUE_TAGS = {getattr(torch.Tag, n) for n in ("dynamic_output_shape", "data_dependent_output")
               if hasattr(torch.Tag, n)}


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


_OPS: dict[int, _OpInfo] = {}   # id(operator) -> its _OpInfo, for the process (torch keeps operators alive)
_TOLIST = torch.Tensor.tolist
_MAKERS = (torch.tensor, torch.as_tensor)
NOT_HANDLED = object()   # MetaValues.function: the call is the function mode's to run


class MetaValues:
    """`values(func, args, kwargs, run)` inside a dispatch mode: `run(func, args, kwargs)` (the meta call), with
    real twins kept and value questions answered (see the module docstring). `seed(meta, real)` gives a meta
    tensor its real values."""

    def __init__(self, limit: int = LIMIT, budget: int = BUDGET) -> None:
        self.limit = limit
        self.budget = budget   # bytes of twins still to be made in this pass
        # id(meta tensor) -> (a weak reference to it, its twin, the twin's storage); plain dict lookups: this runs
        # on every operator
        self.twins: dict[int, tuple[weakref.ref, torch.Tensor, int]] = {}
        # seeds not yet read: id(meta tensor) -> (weak reference, the caller's tensor), cloned into a twin at the
        # first operator that reads them (most buffers, batch-norm statistics, never are)
        self.pending: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        self._seeded_storages: set[int] = set()
        self.answered = 0   # value questions answered from twins

    def twin(self, t: torch.Tensor) -> torch.Tensor | None:
        hit = self.twins.get(id(t))
        if hit is not None and hit[0]() is t:
            return hit[1]
        if self.pending:
            seed = self.pending.pop(id(t), None)
            if seed is not None and seed[0]() is t:
                real = seed[1].detach().clone()
                self._keep(t, real)
                return real
        return None

    def _keep(self, meta: torch.Tensor, real: torch.Tensor) -> None:
        key = id(meta)
        twins = self.twins
        if key not in twins:
            self.budget -= real.numel() * real.element_size()
            if self.budget < 0:
                return

        def gone(ref: weakref.ref, key: int = key) -> None:
            hit = twins.get(key)
            if hit is not None and hit[0] is ref:
                del twins[key]

        twins[key] = (weakref.ref(meta, gone), real, real.untyped_storage()._cdata)

    def seed(self, meta: torch.Tensor, real: torch.Tensor) -> None:
        """Give `meta` the values of `real` (cloned when first read, so the caller's tensor is never written).
        A tensor sharing its storage with one already seeded gets none (two clones could not alias as they do)."""
        if not values_fit(meta, real, self.limit):
            return
        storage = real.untyped_storage()._cdata
        if storage in self._seeded_storages:
            return
        self._seeded_storages.add(storage)
        self.pending[id(meta)] = (weakref.ref(meta), real)

    def seed_input(self, meta: torch.Tensor, given: torch.Tensor) -> None:
        """`meta` stands for the caller's input `given`: its values, or the KNOWN values of a meta input."""
        if isinstance(given, torch.Tensor):
            real = KNOWN.get(given) if given.is_meta else given
            if real is not None:
                self.seed(meta, real)

    def seed_model(self, meta_model: torch.nn.Module, model: torch.nn.Module) -> None:
        """The buffers of a meta copy get the values of the real model's buffers of the same name."""
        real = dict(model.named_buffers())
        for name, b in meta_model.named_buffers():
            if name in real:
                self.seed(b, real[name])

    def function(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """For the callers' function modes: the calls that read or make values without dispatching an operator,
        answered here, or NOT_HANDLED. `t.tolist()` of a tensor with a twin reads the twin; `torch.tensor(data,
        device="meta")` (and `as_tensor`, device given by keyword) makes the tensor on the CPU, gives its meta copy
        that twin, and dispatches aten.lift_fresh on it as the CPU path does (the counter leaves it out; the memory
        tracker sees the new storage as it does on the CPU)."""
        if func is _TOLIST:
            twin = self.twin(args[0]) if args and isinstance(args[0], torch.Tensor) and args[0].is_meta else None
            if twin is None:
                return NOT_HANDLED
            self.answered += 1
            return twin.tolist()
        if func in _MAKERS:
            device = kwargs.get("device")
            if device is None or torch.device(device).type != "meta" or (args and isinstance(args[0], torch.Tensor)):
                return NOT_HANDLED
            try:
                with _disable_current_modes():
                    real = func(*args, **{**kwargs, "device": _CPU}).detach()
                    meta = torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device=_META)
            except Exception:   # noqa: BLE001 - data torch.tensor cannot take on the CPU: the call runs as it is
                return NOT_HANDLED
            if real.numel() > self.limit:
                return NOT_HANDLED
            self._keep(meta, real)
            # what the CPU path dispatches on the fresh tensor: the memory tracker sees its storage as it does there
            meta = torch.ops.aten.lift_fresh(meta)
            if kwargs.get("requires_grad"):
                meta.requires_grad_(True)
            return meta
        return NOT_HANDLED

    # ------------------------------------------------------------------ the dispatch step
    def _info(self, func: Any) -> _OpInfo:
        info = _OPS.get(id(func))
        if info is None:
            info = _OPS[id(func)] = _OpInfo(func)
        return info

    def _untwinned(self, func: Any, args: tuple, kwargs: dict, run: Callable) -> Any:
        if self.twins or self.pending:
            info = self._info(func)
            if info.written:
                self._drop_written(info, args, kwargs)
        return run(func, args, kwargs)

    def __call__(self, func: Any, args: tuple, kwargs: dict, run: Callable[[Any, tuple, dict], Any]) -> Any:
        # the common case first, without flattening: a meta tensor argument with no twin (most of a model's ops)
        flat_args = not kwargs
        for a in args:
            if isinstance(a, torch.Tensor):
                if a.is_meta and self.twin(a) is None:
                    return self._untwinned(func, args, kwargs, run)
            elif isinstance(a, (list, tuple)):
                flat_args = False
        if flat_args:   # positional arguments, none nested (all checked above): swapped without pytree
            real_args, real_kwargs = tuple(self._swap(a) for a in args), {}
        else:
            flat, spec = tree_flatten((args, kwargs))
            for a in flat:
                if isinstance(a, torch.Tensor) and a.is_meta and self.twin(a) is None:
                    return self._untwinned(func, args, kwargs, run)
            real_args, real_kwargs = tree_unflatten([self._swap(a) for a in flat], spec)
        info = self._info(func)
        if info.random:
            return self._untwinned(func, args, kwargs, run)
        if info.reads_values:
            return self._answer(func, real_args, real_kwargs)
        try:
            out = run(func, args, kwargs)
        except NotImplementedError:   # no meta kernel (aten.equal): the twins answer
            return self._answer(func, real_args, real_kwargs)
        outs = (out,) if type(out) is torch.Tensor else [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs or any(not t.is_meta or t.numel() > self.limit for t in outs):
            if info.written:
                self._drop_written(info, args, kwargs)
            return out
        try:
            real_out = func(*real_args, **real_kwargs)
        except Exception:   # noqa: BLE001 - the real kernel refuses what the meta one took: no twin, no answer
            if info.written:
                self._drop_written(info, args, kwargs)
            return out
        reals = (real_out,) if type(real_out) is torch.Tensor else \
            [t for t in tree_flatten(real_out)[0] if isinstance(t, torch.Tensor)]
        for m, r in zip(outs, reals):
            if m.shape == r.shape and m.dtype == r.dtype:
                self._keep(m, r)
        return out

    def _swap(self, a: Any) -> Any:
        """An argument as the real call takes it: a meta tensor's twin, the CPU for the meta device."""
        if isinstance(a, torch.Tensor):
            return self.twin(a) if a.is_meta else a
        if isinstance(a, torch.device) and a.type == "meta":
            return _CPU
        return a

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
                    self._keep(m, r)
                out.append(m)
            else:
                out.append(r)
        return tree_unflatten(out, spec)

    def _drop_written(self, info: _OpInfo, args: tuple, kwargs: dict) -> None:
        """Forget the twins of what an operator writes without twins for all it reads, and of every tensor
        sharing their storage (a seed not yet read is just dropped)."""
        storages = set()
        for i, name in info.written:
            t = args[i] if i < len(args) else kwargs.get(name)
            for w in (t if isinstance(t, (list, tuple)) else (t,)):
                if not isinstance(w, torch.Tensor):
                    continue
                if self.pending.pop(id(w), None) is not None:
                    continue
                hit = self.twins.get(id(w))
                if hit is not None and hit[0]() is w:
                    storages.add(hit[2])
        if storages:
            for key in [k for k, hit in self.twins.items() if hit[2] in storages]:
                del self.twins[key]
