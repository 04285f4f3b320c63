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
- On the meta device PyTorch has no fused attention kernel and would decompose SDPA into the full (non-causal)
  math path; the counter routes it to the CPU flash operator (it has meta support) so meta and CPU counts agree.
  Function modes are not active inside backward, where torch.utils.checkpoint recomputes a checkpointed forward,
  so the counter re-enters the routing around every module call made during backward (see `_Counter._pre`).
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from netdiet.analysis.ops import OpCost, op_cost
from netdiet.errors import NetdietError
from netdiet.models.inputs import bind_inputs, structured_forward

LOSS = "<loss>"

# Per-element FLOPs of one optimizer step, derived from PyTorch's single-tensor update code with netdiet's
# defaults (optim.make_optimizer: weight_decay 0 except AdamW 0.01) and the pointwise formulas of ops.py:
#   sgd:      p -= lr·g                                  add_(alpha)            2
#   momentum: b = μ·b + g; p -= lr·b                     mul_ 1, add_ 1, add_(alpha) 2     4
#   adam:     m.lerp_(g, 1−β1) 3; v.mul_(β2) 1 .addcmul_(g, g, 1−β2) 3; denom = sqrt(v)/bc2 + eps 3;
#             p.addcdiv_(m, denom, −step) 3                                   13
#   adamw:    adam + decoupled decay p.mul_(1 − lr·wd) 1                      14
# (momentum's very first step copies g into the buffer instead: 2; the table gives the steady state.)
OPTIMIZER_FLOPS_PER_PARAM = {"none": 0, "sgd": 2, "momentum": 4, "adam": 13, "adamw": 14}


def optimizer_step_flops(optimizer: str, n_params: int) -> int:
    """FLOPs of one optimizer step over n_params parameter elements."""
    key = str(optimizer).lower()
    if key not in OPTIMIZER_FLOPS_PER_PARAM:
        raise NetdietError(f"unknown optimizer '{optimizer}'; choose one of: {', '.join(OPTIMIZER_FLOPS_PER_PARAM)}")
    if n_params < 0:
        raise NetdietError(f"parameter count {n_params} is negative")
    return OPTIMIZER_FLOPS_PER_PARAM[key] * int(n_params)


@dataclass
class ModuleCost:
    name: str
    type: str
    depth: int
    params: int
    param_bytes: int
    macs: int
    flops: int
    backward_macs: int
    backward_flops: int
    output_shape: list | None


@dataclass
class OpCounts:
    modules: list[ModuleCost]
    operators: dict[str, dict]
    uncounted: dict[str, int]
    macs: int
    flops: int
    backward_macs: int
    backward_flops: int
    optimizer: str
    optimizer_flops: int
    train_flops: int
    train: bool = False
    bytes_read: int = 0
    bytes_written: int = 0
    notes: list[str] = field(default_factory=list)

    def module(self, name: str) -> ModuleCost:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "schema": "netdiet.opcounts/1",
            "train": self.train,
            "macs": self.macs, "flops": self.flops,
            "backward_macs": self.backward_macs, "backward_flops": self.backward_flops,
            "optimizer": self.optimizer, "optimizer_flops": self.optimizer_flops, "train_flops": self.train_flops,
            "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
            "modules": [asdict(m) for m in self.modules],
            "operators": {k: dict(v) for k, v in self.operators.items()},
            "uncounted": dict(self.uncounted),
            "notes": list(self.notes),
        }


_OP_KEYS = ("count", "macs", "flops", "backward_count", "backward_macs", "backward_flops", "bytes_read", "bytes_written")


class _Tally:
    """Self costs per module name, per operator, and the uncounted calls."""

    def __init__(self) -> None:
        self.self_cost: dict[str, list[int]] = {}       # name -> [macs, flops, bmacs, bflops]
        self.operators: dict[str, dict[str, int]] = {}
        self.uncounted: dict[str, int] = {}

    def add(self, owner: str, op: str, cost: OpCost | None, backward: bool) -> None:
        if cost is None:
            self.uncounted[op] = self.uncounted.get(op, 0) + 1
            return
        row = self.operators.setdefault(op, {k: 0 for k in _OP_KEYS})
        pre = "backward_" if backward else ""
        row[pre + "count"] += 1
        row[pre + "macs"] += cost.macs
        row[pre + "flops"] += cost.flops
        row["bytes_read"] += cost.bytes_read
        row["bytes_written"] += cost.bytes_written
        acc = self.self_cost.setdefault(owner, [0, 0, 0, 0])
        i = 2 if backward else 0
        acc[i] += cost.macs
        acc[i + 1] += cost.flops


class _CountMode(TorchDispatchMode):
    def __init__(self, counter: "_Counter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.counter.record(func, args, kwargs, out)
        return out


class _MetaAttentionMode(TorchFunctionMode):
    """On meta tensors, run F.scaled_dot_product_attention as the CPU flash op (see module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            rerouted = _flash_on_meta(*args, **kwargs)
            if rerouted is not None:
                return rerouted
        return func(*args, **kwargs)


def _flash_on_meta(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) and t.device.type == "meta" and t.dim() == 4 for t in tensors):
        return None
    if attn_mask is not None or dropout_p or not query.dtype.is_floating_point:
        return None
    if value.shape[-1] != query.shape[-1]:
        return None  # the CPU kernel takes the math path there, and the flash op's meta output has q's head size
    if query.shape[1] != key.shape[1] and not (enable_gqa and query.shape[1] % key.shape[1] == 0):
        return None  # grouped-query attention (fewer key/value heads) only when asked for: the CPU kernel takes it
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, bool(is_causal),
                                                                      scale=scale)[0]


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

    def __init__(self, model: nn.Module, meta_routing: bool = False) -> None:
        self.tally = _Tally()
        # meta attention routing re-entered around module calls made inside backward (checkpoint recomputes):
        # function modes entered around the step are not active there; (module, mode) pairs, innermost last
        self.meta_routing = meta_routing
        self.rerouted: list[tuple[nn.Module, _MetaAttentionMode]] = []
        self.names: dict[int, str] = {}
        for name, mod in model.named_modules(remove_duplicate=True):
            self.names.setdefault(id(mod), name)
        self.ancestors: dict[str, tuple[str, ...]] = {}
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
    def _ancestry(self, name: str) -> tuple[str, ...]:
        chain = self.ancestors.get(name)
        if chain is None:
            if name == LOSS:
                chain = (LOSS,)
            else:
                parts = name.split(".") if name else []
                chain = tuple(".".join(parts[:i]) for i in range(len(parts), 0, -1)) + ("",)
            self.ancestors[name] = chain
        return chain

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
            mode = _MetaAttentionMode()
            mode.__enter__()
            self.rerouted.append((mod, mode))
        name = self.names.get(id(mod))
        if name is None:
            return
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

    def record(self, func, args, kwargs, out) -> None:
        backward = torch._C._current_graph_task_id() != -1
        if backward:
            node = torch._C._current_autograd_node()
            owner = self._owner_of(node._sequence_nr()) if node is not None else ""
            if not self.open:
                self._fill_backward(owner)
        else:
            owner = self.stack[-1] if self.stack else self.outside
        op = str(func.overloadpacket)
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


def count_ops(model: nn.Module, inputs: tuple | torch.Tensor, *, train: bool = False, optimizer: str = "adam",
              loss: str = "auto") -> OpCounts:
    """Count MACs/FLOPs of one forward (train=False, eval mode, no grad) or one training step (train=True:
    train mode, forward, scalar loss, backward and the optimizer step by formula), per module and operator.

    Works on real tensors and on the meta device. The model's mode, buffers (BatchNorm running stats),
    gradients and the global RNG are left as they were. `inputs` is a tensor, a tuple of tensors (positional),
    or a dict of tensors: keyword arguments of forward (or its one dict argument, see models.inputs.bind_inputs).
    """
    if not isinstance(model, nn.Module):
        raise NetdietError(f"count_ops needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(inputs, dict):
        if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs.values()):
            raise NetdietError("a dict of inputs must map forward's argument names to tensors, e.g. "
                               "{'input_ids': ids, 'attention_mask': mask}")
        call_args, call_kwargs = bind_inputs(model, [], dict(inputs))
        with structured_forward(model, call_args, call_kwargs) as flat:
            return count_ops(model, flat, train=train, optimizer=optimizer, loss=loss)
    if loss not in ("auto", "sum", "mean"):
        raise NetdietError(f"unknown loss '{loss}'; choose auto (sum of outputs), sum or mean")
    opt_key = str(optimizer).lower()
    optimizer_step_flops(opt_key, 0)  # validates the name
    check_autograd_api()
    args = _as_tuple(inputs)

    trainable = [p for p in model.parameters() if p.requires_grad]
    on_meta = any(t.device.type == "meta" for t in list(model.parameters()) + [a for a in args if isinstance(a, torch.Tensor)])
    modes = [(m, m.training) for m in model.modules()]   # restored one by one: mixed modes are kept
    saved_buffers = {n: b.detach().clone() for n, b in model.named_buffers() if b.device.type != "meta"}
    counter = _Counter(model, meta_routing=on_meta)
    notes: list[str] = []
    saved_grads: dict = {}
    try:
        cuda = [t.device.index or 0 for t in list(model.parameters()) + [a for a in args if isinstance(a, torch.Tensor)]
                if t.device.type == "cuda"] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=sorted(set(cuda))):
            model.train(train)
            meta_mode = _MetaAttentionMode() if on_meta else None
            if meta_mode is not None:
                meta_mode.__enter__()
            try:
                with _CountMode(counter):
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
    except NetdietError:
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

    # inclusive costs: each self cost goes to its module and every ancestor by name
    incl: dict[str, list[int]] = {}
    for owner, acc in counter.tally.self_cost.items():
        for name in counter._ancestry(owner):
            row = incl.setdefault(name, [0, 0, 0, 0])
            for i in range(4):
                row[i] += acc[i]

    modules: list[ModuleCost] = []
    for name, mod in model.named_modules():
        params = list(mod.parameters())
        row = incl.get(name, [0, 0, 0, 0])
        modules.append(ModuleCost(
            name=name, type=type(mod).__name__, depth=0 if not name else name.count(".") + 1,
            params=sum(p.numel() for p in params), param_bytes=sum(p.numel() * p.element_size() for p in params),
            macs=row[0], flops=row[1], backward_macs=row[2], backward_flops=row[3],
            output_shape=counter.output_shapes.get(name)))
    if train:
        row = incl.get(LOSS, [0, 0, 0, 0])
        modules.append(ModuleCost(LOSS, "loss", 0, 0, 0, row[0], row[1], row[2], row[3], []))

    ops = counter.tally.operators
    macs = sum(v["macs"] for v in ops.values())
    flops = sum(v["flops"] for v in ops.values())
    bmacs = sum(v["backward_macs"] for v in ops.values())
    bflops = sum(v["backward_flops"] for v in ops.values())
    n_trainable = sum(p.numel() for p in trainable)
    opt_flops = optimizer_step_flops(opt_key, n_trainable) if train else 0
    if counter.tally.uncounted:
        notes.append(f"{sum(counter.tally.uncounted.values())} calls of {len(counter.tally.uncounted)} operators have "
                     "no formula and are not in the totals: see 'uncounted'")
    for op, err in counter.formula_errors.items():
        notes.append(f"{op}: the formula could not read this call ({err}); counted as uncounted")
    if not train:
        notes.append("inference count: backward, optimizer and train_flops are 0; count with train=True for a step")
    return OpCounts(
        modules=modules,
        operators=dict(sorted(ops.items(), key=lambda kv: -(kv[1]["flops"] + kv[1]["backward_flops"]))),
        uncounted=dict(sorted(counter.tally.uncounted.items())),
        macs=macs, flops=flops, backward_macs=bmacs, backward_flops=bflops,
        optimizer=opt_key if train else "none", optimizer_flops=opt_flops,
        train_flops=(flops + bflops + opt_flops) if train else 0, train=train,
        bytes_read=sum(v["bytes_read"] for v in ops.values()),
        bytes_written=sum(v["bytes_written"] for v in ops.values()),
        notes=notes)
