"""One counting pass for both totals a profile reports: the training step's and the inference forward's.

A profile reports the forward of inference (eval mode, no grad) and the training step (train mode). For most
layers the two forwards are the same operators on the same shapes, so the training pass's forward is the
inference forward, except for the layers whose forward depends on `.training`:

- recounted (RECOUNTED): batch norm and instance norm (batch statistics in training, running statistics in
  eval), dropout and RReLU (random masks in training, nothing or a fixed slope in eval). These are leaves that
  take one tensor; the training pass records each call's input (shape, stride, dtype, device), and each call is
  counted again alone in eval mode on an empty tensor of that layout, in the order the forward made it.
- unknown: any module class outside torch.nn's layers and netdiet's zoo (a Hugging Face model branches on
  `self.training` in its own code), and the torch.nn layers with eval-only fast paths or train-only dropout
  inside (MultiheadAttention, the Transformer layers, the recurrent layers, SyncBatchNorm, LinearCrossEntropyLoss,
  which reads the grad mode). With one of them in the model, nothing is derived: the inference forward is counted
  in a pass of its own.

`derive_inference` assembles the inference OpCounts (modules, operators in the order an eval pass would list
them, uncounted, notes) from the training pass and the recounts; tests/test_counter_speed.py checks it equals a
separate eval-mode count for every zoo model, and that a Hugging Face model gets its separate pass.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from netdiet.analysis import meta_guard
from netdiet.analysis.blocks import block_signature
from netdiet.analysis.counter import (
    LOSS,
    OpCounts,
    Pass,
    build_counts,
    check_count_args,
    count_module_calls,
    count_pass,
)
from netdiet.analysis.meta_guard import on_meta_copy

RECOUNTED = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.modules.dropout._DropoutNd,
             nn.RReLU)
# torch.nn layers whose forward reads .training or the grad mode beyond what a recount covers (fast paths,
# dropout inside, gradient-dependent chunking)
UNKNOWN_TORCH = tuple(c for c in (nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
                                  nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.modules.rnn.RNNBase,
                                  nn.SyncBatchNorm, getattr(nn, "LinearCrossEntropyLoss", None)) if c is not None)
KNOWN_PACKAGES = ("torch.nn.modules.", "netdiet.models.")

DERIVED_NOTE = ("inference forward derived from the training pass (eval-mode recount of {n} batch-norm/dropout "
                "call{s}), not counted in a pass of its own")


def count_step(model: nn.Module, args: tuple, optimizer: str = "adam", loss: str = "auto",
               derive: bool = True) -> tuple[OpCounts, OpCounts | None, dict[str, Any]]:
    """(training-step counts, inference counts or None, how): one training pass (on a meta copy when the forward
    allows, see meta_guard.on_meta_copy) and, where exact, the inference forward derived from it; None when the
    inference forward needs a pass of its own (`how["reason"]` says why). Errors as counter.count_ops raises them."""
    opt_key = check_count_args(optimizer, loss)
    watched = recounted_names(model) if derive else frozenset()
    reason = separate_pass_reason(model) if derive else "not asked to derive it"

    def run(m: nn.Module, a: tuple, strict: bool) -> tuple[OpCounts, OpCounts | None, dict[str, Any]]:
        fallback = None if strict else meta_guard.FALLBACK[0]   # why the meta copy gave up, when it did
        trained = count_pass(m, a, True, opt_key, loss, strict, watched=watched)
        inference = derive_inference(m, trained, strict, checked=True) if reason is None else None
        how = {"device": "meta" if strict or next(iter(m.parameters()), torch.empty(0)).device.type == "meta"
               else "real tensors",
               "fallback": fallback,
               "inference_forward": "derived" if inference is not None else "separate pass",
               "recounted_calls": len(trained.calls) if inference is not None else 0,
               "reason": None if inference is not None else (reason or "a recounted call could not be recounted "
                                                                      "alone (an argument that is not one tensor)")}
        if inference is not None:
            n = len(trained.calls)
            inference.notes.insert(0, DERIVED_NOTE.format(n=n, s="" if n == 1 else "s"))
        return trained.counts, inference, how

    return on_meta_copy(model, (args,) if isinstance(args, torch.Tensor) else tuple(args), run)


def _unknown(mod: nn.Module) -> bool:
    cls = type(mod)
    if cls is nn.Module:
        return False
    return isinstance(mod, UNKNOWN_TORCH) or not cls.__module__.startswith(KNOWN_PACKAGES)


def separate_pass_reason(model: nn.Module) -> str | None:
    """Why the inference forward of `model` must be counted in a pass of its own, or None (it is derived)."""
    for name, mod in model.named_modules():
        if _unknown(mod):
            where = f"'{name}' ({type(mod).__name__})" if name else f"the model's class {type(mod).__name__}"
            return f"{where} may behave otherwise in eval mode, so the inference forward is counted in a pass of its own"
    return None


def recounted_names(model: nn.Module) -> frozenset[str]:
    """The modules whose eval-mode calls are counted again (RECOUNTED), by name."""
    names: dict[int, str] = {}
    for name, mod in model.named_modules(remove_duplicate=True):
        names.setdefault(id(mod), name)
    return frozenset(names[id(m)] for m in model.modules() if isinstance(m, RECOUNTED))


def derive_inference(model: nn.Module, trained: Pass, strict: bool = False, checked: bool = False) -> OpCounts | None:
    """The eval-mode forward's OpCounts from a training pass made with watched=recounted_names(model) on this
    `model` (the same object: a meta copy or the real one), or None when it cannot be derived exactly.
    `checked`: separate_pass_reason(model) is already known to be None."""
    if trained.formula_errors or trained.own_detaches is None:
        return None
    if not checked and separate_pass_reason(model) is not None:
        return None
    modules = dict(model.named_modules()) if trained.calls else {}
    tally = trained.tally
    self_cost = {owner: [acc[0], acc[1], 0, 0] for owner, acc in tally.self_cost.items()
                 if owner != LOSS and owner not in tally.watched}
    firsts: dict[str, tuple] = {op: (tally.first_seen[("", op)], 0) for op in tally.forward_rows.get("", {})}
    rows = {op: dict(row) for op, row in tally.forward_rows.get("", {}).items()}
    uncounted = dict(tally.forward_uncounted.get("", {}))
    # autograd's own detaches (saving outputs for backward) are not in an eval forward: keep the forward's own
    detach = rows.pop("aten.detach", None)
    own, first = trained.own_detaches.get("", [0, 0])
    if own:
        if detach is None or detach["count"] < own:
            return None
        rows["aten.detach"] = {**detach, "count": own}
        firsts["aten.detach"] = (first, 0)
    # each distinct call (block_signature: same layer configuration, same input layout) is counted once
    keys, distinct = [], {}
    for call in trained.calls:
        mod = modules.get(call.name)
        if mod is None or len(call.args) != 1 or call.args[0] is None:
            return None
        shape, stride, dtype, device, _ = call.args[0]
        x = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        key = block_signature(mod, (x,))
        key = ("call", len(keys)) if key is None else key
        keys.append(key)
        distinct.setdefault(key, (call.name, mod, (x,)))
    try:
        tallies = dict(zip(distinct, count_module_calls(model, list(distinct.values()), strict)))
    except Exception:   # noqa: BLE001 - a layer that cannot run alone: the inference forward gets its own pass
        return None
    for call, key in zip(trained.calls, keys):
        part, owner = tallies[key], distinct[key][0]
        acc = self_cost.setdefault(call.name, [0, 0, 0, 0])
        got = part.self_cost.get(owner, [0, 0, 0, 0])
        acc[0] += got[0]
        acc[1] += got[1]
        for j, (op, row) in enumerate(part.operators.items()):
            firsts[op] = min(firsts.get(op, (call.position + 0.5, j)), (call.position + 0.5, j))
            into = rows.setdefault(op, dict.fromkeys(row, 0))
            for k, v in row.items():
                into[k] += v
        for op, n in part.uncounted.items():
            uncounted[op] = uncounted.get(op, 0) + n
    ordered = {op: rows[op] for op in sorted(rows, key=lambda op: firsts[op])}
    return build_counts(model, self_cost, ordered, uncounted, trained.output_shapes, {}, False, "none", 0)
