"""The dispatch-level counter: runs a model under a TorchDispatchMode and attributes every aten op's cost
(from `ops.py`) to the module tree and to operators, forward and backward.

How attribution works:
- Forward: module forward pre/post hooks keep a stack of running modules; an op belongs to the innermost one.
- Backward: autograd nodes are numbered in creation order; each module call records the range of numbers handed
  out while it ran, and during backward `torch._C._current_autograd_node()` names the node being run, so its ops go
  to the innermost module call whose range holds that node's number (see `_Counter`).
- Costs are recorded at the innermost module and summed into every ancestor by name, so each ModuleCost is
  inclusive and the root "" holds the model's totals.
- The loss reduction of a training count runs outside the model: it is the pseudo module "<loss>" (depth 0,
  beside the root), so totals = root + "<loss>".
- On the meta device PyTorch has no fused attention kernel and would decompose SDPA into the math path; where the
  CPU takes its flash kernel (PyTorch's own chooser says, cpu_attention.py) the counter routes the call to the
  flash operator (it has meta support), so meta and CPU counts agree.
  Function modes are not active inside backward, where torch.utils.checkpoint recomputes a checkpointed forward,
  so the counter re-enters the routing around every module call made during backward (see `_Counter._pre`).
- A CPU model is counted on a meta copy unless the forward needs its real tensors (meta_guard.py); views and
  metadata ops are tallied by count only; a training pass can keep its forward per group so that passes.py
  derives the eval-mode forward from it (`_Tally`, `count_pass(watched=...)`, `count_module_calls`).
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from netdiet.analysis import cpu_attention
from netdiet.analysis.meta_guard import CPU_PATHS, RealTensorsNeeded, check_call, meta_values, on_meta_copy
from netdiet.analysis.meta_memo import MetaMemo
from netdiet.analysis.meta_values import NOT_HANDLED, MetaValues

# re-exported: the rest of netdiet imports LOSS, ModuleCost, OpCounts and the optimizer table from here
from netdiet.analysis.opcounts import (  # noqa: F401
    LOSS,
    OP_KEYS,
    OPTIMIZER_FLOPS_PER_PARAM,
    ModuleCost,
    OpCounts,
    build_counts,
    optimizer_step_flops,
)
from netdiet.analysis.ops import OpCost, is_free, op_cost
from netdiet.errors import NetdietError
from netdiet.models.inputs import bind_inputs, structured_forward


class _Tally:
    """Self costs per module name, per operator, and the uncounted calls.

    Forward calls are also kept per group: the loss, each watched module (see count_training_pass) and "" for
    the rest of the model (`forward_rows`, `forward_uncounted`), with the order in which each (group, operator)
    first ran (`first_seen`), so an eval-mode forward can be assembled from a training pass whose watched
    modules' calls are recounted (passes.py)."""

    def __init__(self, watched: frozenset[str] | None = None) -> None:
        self.self_cost: dict[str, list[int]] = {}       # name -> [macs, flops, bmacs, bflops]
        self.operators: dict[str, dict[str, int]] = {}
        self.uncounted: dict[str, int] = {}
        self.split = watched is not None                # keep the forward per group (a training pass to derive from)
        self.watched = watched or frozenset()
        self.forward_rows: dict[str, dict[str, dict[str, int]]] = {}
        self.forward_uncounted: dict[str, dict[str, int]] = {}
        self.first_seen: dict[tuple[str, str], int] = {}   # (group, op) -> index of the forward call it first ran in
        self.n_forward = 0

    def _forward_row(self, owner: str, op: str) -> dict[str, int]:
        self.n_forward += 1
        group = owner if owner == LOSS or owner in self.watched else ""
        rows = self.forward_rows.get(group)
        if rows is None:
            rows = self.forward_rows[group] = {}
        row = rows.get(op)
        if row is None:
            row = rows[op] = dict.fromkeys(OP_KEYS, 0)
            self.first_seen[(group, op)] = self.n_forward
        return row

    def count_view(self, owner: str, op: str, backward: bool) -> None:
        """A call that costs nothing and moves no bytes (a view, a metadata query): its count only."""
        row = self.operators.get(op)
        if row is None:
            row = self.operators[op] = dict.fromkeys(OP_KEYS, 0)
        if backward:
            row["backward_count"] += 1
        else:
            row["count"] += 1
            if self.split:
                self._forward_row(owner, op)["count"] += 1

    def add(self, owner: str, op: str, cost: OpCost | None, backward: bool) -> None:
        if cost is None:
            self.uncounted[op] = self.uncounted.get(op, 0) + 1
            if self.split and not backward:
                self.n_forward += 1
                group = owner if owner == LOSS or owner in self.watched else ""
                book = self.forward_uncounted.setdefault(group, {})
                book[op] = book.get(op, 0) + 1
            return
        row = self.operators.get(op)
        if row is None:
            row = self.operators[op] = dict.fromkeys(OP_KEYS, 0)
        pre = "backward_" if backward else ""
        row[pre + "count"] += 1
        row[pre + "macs"] += cost.macs
        row[pre + "flops"] += cost.flops
        row["bytes_read"] += cost.bytes_read
        row["bytes_written"] += cost.bytes_written
        acc = self.self_cost.get(owner)
        if acc is None:
            acc = self.self_cost[owner] = [0, 0, 0, 0]
        i = 2 if backward else 0
        acc[i] += cost.macs
        acc[i + 1] += cost.flops
        if self.split and not backward:
            fwd = self._forward_row(owner, op)
            fwd["count"] += 1
            fwd["macs"] += cost.macs
            fwd["flops"] += cost.flops
            fwd["bytes_read"] += cost.bytes_read
            fwd["bytes_written"] += cost.bytes_written


# meta kernels run once per distinct call (many of torch's are Python: elementwise type promotion, batch norm,
# convolution); a count reads only the outputs' metadata, which the memo reproduces exactly (meta_memo.py)
_META_MEMO = MetaMemo()


class _CountMode(TorchDispatchMode):
    """Counts every dispatched op; on meta, through the memo and with real twins for value questions
    (meta_values.py: `values`, seeded with the real inputs and buffers a meta copy stands for)."""

    def __init__(self, counter: "_Counter", memo: MetaMemo | None = None, values: MetaValues | None = None) -> None:
        super().__init__()
        self.counter = counter
        self.memo = memo
        self.values = values

    def _run(self, func, args: tuple, kwargs: dict) -> Any:
        return func(*args, **kwargs) if self.memo is None else self.memo(func, args, kwargs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.counter.strict:
            check_call(func, args)
        out = self._run(func, args, kwargs) if self.values is None else self.values(func, args, kwargs, self._run)
        self.counter.record(func, args, kwargs, out)
        return out


_DETACH = (torch.Tensor.detach, torch.detach)
# Not operators of the model: torch.tensor(data) marks the fresh CPU tensor it built with aten.lift_fresh (no work,
# no new storage), and builds a meta tensor without dispatching anything; left out so a count does not depend on
# the device it ran on (transformers' KV cache makes two per layer in an eval forward).
NOT_COUNTED = frozenset({"aten.lift_fresh"})


class _MetaAttentionMode(TorchFunctionMode):
    """On meta tensors, run F.scaled_dot_product_attention as the CPU runs it (see module docstring).

    `strict` (a meta copy of a real CPU model): raise RealTensorsNeeded at an attention call the CPU's chooser
    refuses (the real call says why), and at the calls of CPU_PATHS. With a `counter`, the forward's own detach calls are tallied
    (Tensor.detach, torch.detach): in a training pass autograd dispatches aten.detach too, to save an output
    for backward, and an eval-mode forward derived from the pass keeps only the forward's own (passes.py)."""

    def __init__(self, strict: bool = False, counter: "_Counter | None" = None,
                 values: MetaValues | None = None) -> None:
        super().__init__()
        self.strict = strict
        self.counter = counter
        self.values = values   # the count's real twins: tolist() and torch.tensor on meta use them

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.values is not None:   # tolist() and torch.tensor(device="meta") dispatch no operator
            answer = self.values.function(func, args, kwargs)
            if answer is not NOT_HANDLED:
                return answer
        if func in _DETACH and self.counter is not None:
            self.counter.own_detach()
        if func is F.scaled_dot_product_attention:
            backend, rerouted = cpu_attention.on_meta(*args, **kwargs)
            if rerouted is not None:
                return rerouted
            if backend is None and self.strict:
                raise RealTensorsNeeded("an attention call PyTorch's CPU backend chooser refuses")
        elif self.strict and func in CPU_PATHS:
            raise RealTensorsNeeded(f"{getattr(func, '__name__', func)} runs another path on the CPU")
        return func(*args, **kwargs)


# Attributing ops to modules reads two private autograd APIs (present in torch 2.3 - 2.14): the number the next autograd
# node will get, and the node being run. A torch without them is one line naming its version, not a crash.
_next_sequence_nr = getattr(getattr(torch._C, "_autograd", None), "_get_sequence_nr", None)
TESTED_TORCH = "2.13 - 2.14"


def check_autograd_api() -> None:
    """NetdietError when this torch lacks the autograd internals the counter attributes ops with."""
    missing = [name for name, ok in (("torch._C._autograd._get_sequence_nr", _next_sequence_nr is not None),
                                     ("torch._C._current_autograd_node", hasattr(torch._C, "_current_autograd_node")))
               if not ok]
    if missing:
        raise NetdietError(f"torch {torch.__version__} lacks {', '.join(missing)}, which netdiet's counter uses to "
                           f"attribute ops to modules (tested on torch {TESTED_TORCH}); install torch==2.13.0, the "
                           "version in requirements/lock.txt")


class _Counter:
    """Owns the hooks and the tally. Attribution:

    forward  - a stack of running modules (global pre/post forward hooks); an op belongs to the innermost one.
    backward - every autograd node carries the sequence number it was created with, and numbers only grow. Each
               module call records the interval of numbers handed out while it ran (a nested, laminar family), so
               the node being run in backward (`torch._C._current_autograd_node()`) belongs to the innermost call
               whose interval holds its number. Inputs' producers (older numbers) stay with the caller however the
               inputs were passed, in-place ops inside a module stay inside it, and nothing needs the module's
               inputs or outputs to require grad.
    """

    def __init__(self, model: nn.Module, meta_routing: bool = False, strict: bool = False,
                 watched: frozenset[str] | None = None) -> None:
        self.tally = _Tally(watched)
        # meta attention routing re-entered around module calls made inside backward (checkpoint recomputes):
        # function modes entered around the step are not active there; (module, mode) pairs, innermost last
        self.meta_routing = meta_routing
        self.strict = strict
        self.watched = watched or frozenset()
        self.calls: list[WatchedCall] = []   # the forward calls of watched modules, in order
        self.own_detaches: dict[str, list[int]] = {}   # group -> [detach calls of the forward itself, first index]
        self.kinds: dict[int, tuple[str, bool]] = {}   # id(func) -> (operator name, costs nothing: a view or metadata)
        self.rerouted: list[tuple[nn.Module, _MetaAttentionMode]] = []
        self.names: dict[int, str] = {}
        for name, mod in model.named_modules(remove_duplicate=True):
            self.names.setdefault(id(mod), name)
        self.stack: list[str] = []          # running module names (forward)
        self.open: list[int] = []           # their interval indices
        self.starts: list[int] = []         # interval i = [starts[i], ends[i]) of sequence numbers, owner names[i]
        self.ends: list[int | None] = []
        self.owners: list[str] = []
        self.parents: list[int] = []
        self.outside = ""                   # owner of forward ops outside any module: "" then LOSS
        self.owner_of_seq: dict[int, str] = {}
        self.fill_from = _next_sequence_nr()
        self.output_shapes: dict[str, list | None] = {}
        self.formula_errors: dict[str, str] = {}
        # global hooks, filtered by the name map: per-module hooks would switch off fast paths that refuse to run
        # with hooks attached (nn.TransformerEncoderLayer), so the count would describe a path that never runs
        self.handles: list = [register_module_forward_pre_hook(self._pre),
                              register_module_forward_hook(self._post, always_call=True)]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        while self.rerouted:   # a recompute that raised before its module's post hook
            self.rerouted.pop()[1].__exit__(None, None, None)

    # ---- attribution
    def _add_interval(self, start: int, end: int | None, owner: str, parent: int) -> int:
        self.starts.append(start)
        self.ends.append(end)
        self.owners.append(owner)
        self.parents.append(parent)
        self.owner_of_seq.clear()
        return len(self.starts) - 1

    def open_interval(self, owner: str) -> int:
        self.fill_from = _next_sequence_nr()
        self.open.append(self._add_interval(self.fill_from, None, owner, self.open[-1] if self.open else -1))
        return self.open[-1]

    def close_interval(self) -> None:
        if self.open:
            self.fill_from = _next_sequence_nr()
            self.ends[self.open.pop()] = self.fill_from
            self.owner_of_seq.clear()

    def _fill_backward(self, owner: str) -> None:
        """Nodes created during backward outside any module call (e.g. a checkpointed function's own ops being
        recomputed) belong to the module whose node was running when they were made."""
        now = _next_sequence_nr()
        if now > self.fill_from:
            self._add_interval(self.fill_from, now, owner, -1)
            self.fill_from = now

    def _owner_of(self, seq: int) -> str:
        owner = self.owner_of_seq.get(seq)
        if owner is None:
            owner = ""
            i = bisect_right(self.starts, seq) - 1
            while i >= 0:
                end = self.ends[i]
                if end is None or seq < end:
                    owner = self.owners[i]
                    break
                i = self.parents[i]
            self.owner_of_seq[seq] = owner
        return owner

    def _pre(self, mod: nn.Module, args: tuple) -> None:
        if (self.meta_routing and torch._C._current_graph_task_id() != -1
                and not any(isinstance(m, _MetaAttentionMode) for m in _get_current_function_mode_stack())):
            mode = _MetaAttentionMode(self.strict)
            mode.__enter__()
            self.rerouted.append((mod, mode))
        name = self.names.get(id(mod))
        if name is None:
            return
        if name in self.watched and torch._C._current_graph_task_id() == -1:
            self.calls.append(WatchedCall(name, self.tally.n_forward, tuple(
                (tuple(a.shape), tuple(a.stride()), a.dtype, a.device, a.requires_grad) if isinstance(a, torch.Tensor)
                else None for a in args)))
        self.stack.append(name)
        self.open_interval(name)

    def _post(self, mod: nn.Module, args: tuple, output: Any) -> None:
        if self.rerouted and self.rerouted[-1][0] is mod:
            self.rerouted.pop()[1].__exit__(None, None, None)
        name = self.names.get(id(mod))
        if name is None:
            return
        if name not in self.output_shapes:
            leaves, _ = tree_flatten(output)
            first = next((t for t in leaves if isinstance(t, torch.Tensor)), None)
            self.output_shapes[name] = [int(d) for d in first.shape] if first is not None else None
        if self.stack and self.stack[-1] == name:
            self.stack.pop()
            self.close_interval()

    def own_detach(self) -> None:
        """A detach called by the forward itself (see _MetaAttentionMode): per group, with the forward call index
        its aten.detach will get."""
        if torch._C._current_graph_task_id() == -1:
            owner = self.stack[-1] if self.stack else self.outside
            group = owner if owner == LOSS or owner in self.watched else ""
            book = self.own_detaches.setdefault(group, [0, self.tally.n_forward + 1])
            book[0] += 1

    def record(self, func, args, kwargs, out) -> None:
        backward = torch._C._current_graph_task_id() != -1
        kind = self.kinds.get(id(func))   # by id: OpOverload's __hash__ is Python; torch keeps overloads alive
        if kind is None:
            kind = self.kinds[id(func)] = (str(func.overloadpacket), is_free(func))
        if kind[0] in NOT_COUNTED:
            return
        if kind[1]:   # a view or metadata op: its count only, no owner to find (unless backward must fill one)
            if not backward:
                self.tally.count_view(self.stack[-1] if self.stack else self.outside, kind[0], False)
                return
            if self.open or _next_sequence_nr() <= self.fill_from:
                self.tally.count_view("", kind[0], True)
                return
        if backward:
            node = torch._C._current_autograd_node()
            owner = self._owner_of(node._sequence_nr()) if node is not None else ""
            if not self.open:
                self._fill_backward(owner)
        else:
            owner = self.stack[-1] if self.stack else self.outside
        op = kind[0]
        try:
            cost = op_cost(func, args, kwargs, out)
        except Exception as exc:  # a formula that cannot read this call: report it, never guess
            cost = None
            self.formula_errors.setdefault(op, f"{type(exc).__name__}: {exc}")
        self.tally.add(owner, op, cost, backward)


def _as_tuple(inputs: Any) -> tuple:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (list, tuple)):
        return tuple(inputs)
    raise NetdietError(f"inputs must be a tensor, a tuple of tensors or a dict of named tensors, got {type(inputs).__name__}")


def _loss_of(output: Any, loss: str) -> torch.Tensor | None:
    """The scalar loss over all floating outputs that need a gradient; None when none does (nothing to train)."""
    leaves, _ = tree_flatten(output)
    floats = [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not floats:
        return None
    parts = [t.float().mean() if loss == "mean" else t.float().sum() for t in floats]
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


@dataclass
class WatchedCall:
    """One forward call of a watched module: its name, how many forward calls ran before it, and per positional
    argument (shape, stride, dtype, device, requires_grad), or None for a non-tensor argument."""

    name: str
    position: int
    args: tuple


@dataclass
class Pass:
    """A count with what it saw besides the totals: the tally (per group, see _Tally), the output shapes and
    the watched modules' calls. Made by count_pass, read by passes.py."""

    counts: OpCounts | None
    tally: Any
    output_shapes: dict[str, list | None]
    calls: list[WatchedCall]
    formula_errors: dict[str, str]
    own_detaches: dict[str, list[int]] | None = None   # None: not tallied (the pass ran without the function mode)


def count_ops(model: nn.Module, inputs: tuple | torch.Tensor, *, train: bool = False, optimizer: str = "adam",
              loss: str = "auto", meta: bool = True) -> OpCounts:
    """Count MACs/FLOPs of one forward (train=False, eval mode, no grad) or one training step (train=True:
    train mode, forward, scalar loss, backward and the optimizer step by formula), per module and operator.

    Works on real tensors and on the meta device. The model's mode, buffers (BatchNorm running stats),
    gradients and the global RNG are left as they were. `inputs` is a tensor, a tuple of tensors (positional),
    or a dict of tensors: keyword arguments of forward (or its one dict argument, see models.inputs.bind_inputs).

    A model and inputs on the CPU are counted on a meta copy (no kernel runs; the counts are the same, see
    on_meta_copy) unless `meta` is False or the forward needs the real tensors.
    """
    if not isinstance(model, nn.Module):
        raise NetdietError(f"count_ops needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(inputs, dict):
        if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs.values()):
            raise NetdietError("a dict of inputs must map forward's argument names to tensors, e.g. "
                               "{'input_ids': ids, 'attention_mask': mask}")
        call_args, call_kwargs = bind_inputs(model, [], dict(inputs))
        with structured_forward(model, call_args, call_kwargs) as flat:
            return count_ops(model, flat, train=train, optimizer=optimizer, loss=loss, meta=meta)
    args = _as_tuple(inputs)
    opt_key = check_count_args(optimizer, loss)
    return on_meta_copy(model, args, lambda m, a, strict: count_pass(m, a, train, opt_key, loss, strict).counts,
                        enabled=meta)


def check_count_args(optimizer: str, loss: str) -> str:
    """The optimizer's key; NetdietError for an unknown loss or optimizer or a torch the counter cannot read."""
    if loss not in ("auto", "sum", "mean"):
        raise NetdietError(f"unknown loss '{loss}'; choose auto (sum of outputs), sum or mean")
    opt_key = str(optimizer).lower()
    optimizer_step_flops(opt_key, 0)  # validates the name
    check_autograd_api()
    return opt_key


def count_module_calls(model: nn.Module, calls: list[tuple[str, nn.Module, tuple]], strict: bool = False) -> list[Any]:
    """Each (name, module of `model`, positional args) called alone in eval mode under no_grad and counted, in
    one session: one tally per call (its ops owned by `name`; see passes.derive_inference). Each module's mode
    and buffers are left as they were; an error propagates."""
    tensors = [a for _, _, args in calls for a in args if isinstance(a, torch.Tensor)]
    on_meta = any(t.device.type == "meta" for t in tensors)
    counter = _Counter(model, meta_routing=on_meta, strict=strict)
    tallies = []
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            values = meta_values(model, ()) if on_meta else None   # before the modes: seeding clones tensors
            meta_mode = _MetaAttentionMode(strict, values=values) if on_meta else None
            if meta_mode is not None:
                meta_mode.__enter__()
            try:
                with _CountMode(counter, _META_MEMO if on_meta else None, values):
                    for _, mod, args in calls:
                        modes = [(m, m.training) for m in mod.modules()]
                        saved = {n: b.detach().clone() for n, b in mod.named_buffers() if b.device.type != "meta"}
                        counter.tally = _Tally()
                        try:
                            mod.train(False)
                            mod(*args)
                        finally:
                            for m, mode in modes:
                                m.training = mode
                            for n, b in mod.named_buffers():
                                if n in saved:
                                    b.copy_(saved[n])
                        if counter.formula_errors:
                            raise NetdietError(f"a formula could not read a recounted call of '{counter.names.get(id(mod))}'")
                        tallies.append(counter.tally)
            finally:
                if meta_mode is not None:
                    meta_mode.__exit__(None, None, None)
    finally:
        counter.close()
    return tallies


def count_pass(model: nn.Module, args: tuple, train: bool, opt_key: str, loss: str, strict: bool = False,
               watched: frozenset[str] | None = None, build: bool = True) -> Pass:
    """One counted forward (train=False) or training step, on `model` as given (see count_ops); without
    `build`, the tally only (Pass.counts is None)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    on_meta = any(t.device.type == "meta" for t in list(model.parameters()) + [a for a in args if isinstance(a, torch.Tensor)])
    modes = [(m, m.training) for m in model.modules()]   # restored one by one: mixed modes are kept
    saved_buffers = {n: b.detach().clone() for n, b in model.named_buffers() if b.device.type != "meta"}
    counter = _Counter(model, meta_routing=on_meta, strict=strict, watched=watched)
    notes: list[str] = []
    saved_grads: dict = {}
    try:
        cuda = [t.device.index or 0 for t in list(model.parameters()) + [a for a in args if isinstance(a, torch.Tensor)]
                if t.device.type == "cuda"] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=sorted(set(cuda))):
            model.train(train)
            values = meta_values(model, args) if on_meta else None   # before the modes: seeding clones tensors
            meta_mode = (_MetaAttentionMode(strict, counter if watched is not None else None, values) if on_meta
                         else None)
            if meta_mode is not None:
                meta_mode.__enter__()
            try:
                with _CountMode(counter, _META_MEMO if on_meta else None, values):
                    if not train:
                        with torch.no_grad():
                            model(*args)
                    else:
                        with torch.enable_grad():
                            output = model(*args)
                            counter.outside = LOSS
                            counter.open_interval(LOSS)
                            total = _loss_of(output, loss)
                            counter.close_interval()
                            if total is None:
                                notes.append("no output depends on a trainable parameter: nothing to back-propagate, "
                                             "backward counts are 0")
                            elif trainable:
                                # .backward (not autograd.grad) so reentrant checkpointing works too; the
                                # caller's .grad values are put back below
                                leaves = [a for a in args if isinstance(a, torch.Tensor) and a.is_leaf and a.requires_grad]
                                saved_grads = {p: p.grad for p in list(model.parameters()) + leaves}
                                for p in saved_grads:
                                    p.grad = None
                                total.backward()
                            del output, total
            finally:
                if meta_mode is not None:
                    meta_mode.__exit__(None, None, None)
    except (NetdietError, RealTensorsNeeded):
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise NetdietError(f"running the model on the given inputs failed: {type(exc).__name__}: {first}; "
                           "check the input shape and dtype") from None
    finally:
        counter.close()
        for m, mode in modes:
            m.training = mode
        for p, g in saved_grads.items():
            p.grad = g
        if saved_buffers:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    if n in saved_buffers:
                        b.copy_(saved_buffers[n])
    tally = counter.tally
    counts = None if not build else build_counts(model, tally.self_cost, tally.operators, tally.uncounted, counter.output_shapes,
                          counter.formula_errors, train, opt_key, sum(p.numel() for p in trainable), notes)
    return Pass(counts, tally, counter.output_shapes, counter.calls, counter.formula_errors,
                counter.own_detaches if on_meta and watched is not None else None)
