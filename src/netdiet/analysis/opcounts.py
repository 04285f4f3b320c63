"""What a count is: OpCounts (totals, per module and per operator) and how a tally becomes one (build_counts),
and the optimizer step's FLOPs by formula. The counter (counter.py) and the pass derivation (passes.py) both
build their results here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from netdiet.errors import NetdietError

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


OP_KEYS = ("count", "macs", "flops", "backward_count", "backward_macs", "backward_flops", "bytes_read", "bytes_written")



_ANCESTRY: dict[str, tuple[str, ...]] = {}


def _ancestry(name: str) -> tuple[str, ...]:
    """The module name and every ancestor's, innermost first, ending with the root "" (the loss: itself only)."""
    chain = _ANCESTRY.get(name)
    if chain is None:
        if name == LOSS:
            chain = (LOSS,)
        else:
            parts = name.split(".") if name else []
            chain = tuple(".".join(parts[:i]) for i in range(len(parts), 0, -1)) + ("",)
        if len(_ANCESTRY) < 1 << 16:
            _ANCESTRY[name] = chain
    return chain


def _subtree_parameter_sizes(model: nn.Module) -> dict[int, tuple[int, int]]:
    """id(module) -> (elements, bytes) of the distinct parameters of its subtree, as sum over mod.parameters()
    gives them, for every module at once (one walk, each subtree's parameters collected from its children's)."""
    params: dict[int, dict[int, Any]] = {}

    def collect(mod: nn.Module) -> dict[int, Any]:
        got = params.get(id(mod))
        if got is None:
            got = {id(p): p for p in mod._parameters.values() if p is not None}
            for child in mod._modules.values():
                if child is not None:
                    got.update(collect(child))
            params[id(mod)] = got
        return got

    collect(model)
    return {key: (sum(p.numel() for p in ps.values()), sum(p.numel() * p.element_size() for p in ps.values()))
            for key, ps in params.items()}


def build_counts(model: nn.Module, self_cost: dict[str, list[int]], operators: dict[str, dict], uncounted: dict[str, int],
                 output_shapes: dict[str, list | None], formula_errors: dict[str, str], train: bool, opt_key: str,
                 n_trainable: int, notes: list[str] | None = None) -> OpCounts:
    """The OpCounts of a tally: inclusive module costs (each self cost goes to its module and every ancestor by
    name), operator totals and the notes."""
    incl: dict[str, list[int]] = {}
    for owner, acc in self_cost.items():
        for name in _ancestry(owner):
            row = incl.setdefault(name, [0, 0, 0, 0])
            for i in range(4):
                row[i] += acc[i]

    modules: list[ModuleCost] = []
    sizes = _subtree_parameter_sizes(model)
    for name, mod in model.named_modules():
        n_params, n_bytes = sizes[id(mod)]
        row = incl.get(name, [0, 0, 0, 0])
        modules.append(ModuleCost(
            name=name, type=type(mod).__name__, depth=0 if not name else name.count(".") + 1,
            params=n_params, param_bytes=n_bytes,
            macs=row[0], flops=row[1], backward_macs=row[2], backward_flops=row[3],
            output_shape=output_shapes.get(name)))
    if train:
        row = incl.get(LOSS, [0, 0, 0, 0])
        modules.append(ModuleCost(LOSS, "loss", 0, 0, 0, row[0], row[1], row[2], row[3], []))

    ops = operators
    macs = sum(v["macs"] for v in ops.values())
    flops = sum(v["flops"] for v in ops.values())
    bmacs = sum(v["backward_macs"] for v in ops.values())
    bflops = sum(v["backward_flops"] for v in ops.values())
    opt_flops = optimizer_step_flops(opt_key, n_trainable) if train else 0
    notes = list(notes or [])
    if uncounted:
        notes.append(f"{sum(uncounted.values())} calls of {len(uncounted)} operators have "
                     "no formula and are not in the totals: see 'uncounted'")
    for op, err in formula_errors.items():
        notes.append(f"{op}: the formula could not read this call ({err}); counted as uncounted")
    if not train:
        notes.append("inference count: backward, optimizer and train_flops are 0; count with train=True for a step")
    return OpCounts(
        modules=modules,
        operators=dict(sorted(ops.items(), key=lambda kv: -(kv[1]["flops"] + kv[1]["backward_flops"]))),
        uncounted=dict(sorted(uncounted.items())),
        macs=macs, flops=flops, backward_macs=bmacs, backward_flops=bflops,
        optimizer=opt_key if train else "none", optimizer_flops=opt_flops,
        train_flops=(flops + bflops + opt_flops) if train else 0, train=train,
        bytes_read=sum(v["bytes_read"] for v in ops.values()),
        bytes_written=sum(v["bytes_written"] for v in ops.values()),
        notes=notes)
