"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

Layout inside the checkpoint folder:
    epoch-0003.safetensors   model.*, optim.<param index>.<name>, rng.torch, rng.cuda.<i>, cb.<callback>.<name>
    checkpoint.json          schema netdiet.checkpoint/1: epoch, step, history, optimizer index (which entries are
                             tensors, the scalars, param_groups), callback scalars, the run's fingerprint

The JSON is written last and names its tensor file, so it is the commit point: a run killed while writing leaves
the previous checkpoint.json pointing at the previous, complete tensor file. Older tensor files are removed only
after the new JSON is in place.
"""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from netdiet.checks import json_finite
from netdiet.errors import NetdietError
from netdiet.fileio import atomic_write_json, load_state_dict, read_json, save_state_dict

SCHEMA = "netdiet.checkpoint/1"
INDEX = "checkpoint.json"


@dataclass
class Checkpoint:
    epoch: int                      # epochs completed
    step: int                       # optimizer steps completed
    history: list[dict]
    fingerprint: dict
    model: dict[str, torch.Tensor]
    optimizer: dict
    rng: dict[str, torch.Tensor]
    callbacks: dict[str, tuple[dict, dict[str, torch.Tensor]]] = field(default_factory=dict)
    scaler: dict | None = None
    batch: int = 0                  # batches of epoch `epoch` (0-based) already done: a mid-epoch checkpoint
    partial: dict | None = None     # that epoch's running sums so far: loss_sum, correct, count, seconds, waited


def _flatten_optimizer(state: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    index, tensors = {}, {}
    for pid, entries in state["state"].items():
        index[str(pid)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value
                index[str(pid)][name] = {"tensor": True}
            else:
                index[str(pid)][name] = {"value": value}
    return {"state": index, "param_groups": state["param_groups"]}, tensors


def _unflatten_optimizer(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state = {}
    for pid, entries in meta["state"].items():
        state[int(pid)] = {name: tensors[f"optim.{pid}.{name}"] if e.get("tensor") else e["value"] for name, e in entries.items()}
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_checkpoint(folder: str | os.PathLike, ck: Checkpoint) -> Path:
    folder = Path(folder)
    opt_meta, opt_tensors = _flatten_optimizer(ck.optimizer)
    tensors = {f"model.{k}": v for k, v in ck.model.items()}
    tensors.update(opt_tensors)
    tensors.update({f"rng.{k}": v for k, v in ck.rng.items()})
    cb_meta = {}
    for name, (scalars, cb_tensors) in ck.callbacks.items():
        cb_meta[name] = scalars
        tensors.update({f"cb.{name}.{k}": v for k, v in cb_tensors.items()})
    tensor_file = f"epoch-{ck.epoch:04d}.safetensors" if not ck.batch else f"epoch-{ck.epoch:04d}-step-{ck.step:08d}.safetensors"
    replaces = (folder / tensor_file).exists()
    save_state_dict(folder / tensor_file, tensors)
    try:     # NaN/inf (a diverging validation loss, say) is written as null: strict JSON, so the commit always lands
        atomic_write_json(folder / INDEX, json_finite({
            "schema": SCHEMA, "tensors": tensor_file, "epoch": ck.epoch, "step": ck.step, "history": ck.history,
            "fingerprint": ck.fingerprint, "optimizer": opt_meta, "callbacks": cb_meta, "scaler": ck.scaler,
            **({"batch": ck.batch, "partial": ck.partial} if ck.batch else {}),
        }))
    except BaseException:
        if not replaces:                       # no orphan tensor file next to the previous, still valid, checkpoint
            (folder / tensor_file).unlink(missing_ok=True)
        raise
    for old in folder.glob("epoch-*.safetensors"):
        if old.name != tensor_file:
            old.unlink(missing_ok=True)
    for stale in folder.glob(".*.tmp"):        # half-written temp files of a run killed while saving
        stale.unlink(missing_ok=True)
    return folder / INDEX


def has_checkpoint(folder: str | os.PathLike) -> bool:
    return (Path(folder) / INDEX).is_file()


def load_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    folder = Path(folder)
    meta = read_json(folder / INDEX)
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise NetdietError(f"{folder / INDEX} is not a netdiet training checkpoint (schema {SCHEMA}); give the --out folder of a netdiet train run")
    check_index(meta, folder / INDEX)
    tensors = load_state_dict(folder / meta["tensors"])
    check_tensors(meta, tensors, folder / INDEX)
    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    callbacks = {name: (scalars, part(f"cb.{name}.")) for name, scalars in (meta.get("callbacks") or {}).items()}
    return Checkpoint(meta["epoch"], meta["step"], meta["history"], meta["fingerprint"], part("model."),
                      _unflatten_optimizer(meta["optimizer"], tensors), part("rng."), callbacks, meta.get("scaler"),
                      meta.get("batch", 0), meta.get("partial"))


# ---------------------------------------------------------------- the schema of checkpoint.json
def _bad(path: Path, field: str, what: str) -> NetdietError:
    return NetdietError(f"{path} is damaged: '{field}' {what}; restore the folder from a backup, or train afresh into a new --out")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_index(meta: dict, path: Path) -> None:
    """checkpoint.json against its schema: required keys, types and ranges (NetdietError naming the file and field)."""
    for key in ("tensors", "epoch", "step", "history", "fingerprint", "optimizer"):
        if key not in meta:
            raise _bad(path, key, "is missing")
    name = meta["tensors"]
    if not isinstance(name, str) or not name.endswith(".safetensors") or Path(name).name != name or name.startswith("."):
        raise _bad(path, "tensors", f"must name a .safetensors file in the checkpoint folder, got {name!r}")
    try:
        present = len(name.encode()) <= 255 and (path.parent / name).is_file()
    except (OSError, ValueError):   # a name the file system refuses (too long, a NUL byte): not a file of the folder
        present = False
    if not present:
        raise _bad(path, "tensors", f"names {name[:80]!r}, which is not in {path.parent}")
    for key in ("epoch", "step"):
        if not _is_int(meta[key]) or meta[key] < 0:
            raise _bad(path, key, f"must be an integer >= 0, got {meta[key]!r}")
    history = meta["history"]
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise _bad(path, "history", "must be a list of per-epoch records")
    if len(history) > meta["epoch"]:
        raise _bad(path, "history", f"holds {len(history)} epoch records but 'epoch' says only {meta['epoch']} were completed")
    if not isinstance(meta["fingerprint"], dict):
        raise _bad(path, "fingerprint", f"must be a mapping of run settings, got {type(meta['fingerprint']).__name__}")
    opt = meta["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise _bad(path, "optimizer", "must be a mapping with 'state' (a mapping) and 'param_groups' (a list)")
    for pid, entries in opt["state"].items():
        if not str(pid).isdigit() or not isinstance(entries, dict):
            raise _bad(path, f"optimizer.state.{pid}", "must be a parameter index with a mapping of its state")
        for entry_name, e in entries.items():
            if not isinstance(e, dict) or not (e.get("tensor") is True or "value" in e):
                raise _bad(path, f"optimizer.state.{pid}.{entry_name}", 'must be {"tensor": true} or {"value": ...}')
    for i, g in enumerate(opt["param_groups"]):
        if not isinstance(g, dict) or not isinstance(g.get("params"), list) or not all(_is_int(p) for p in g["params"]):
            raise _bad(path, f"optimizer.param_groups.{i}", "must be a mapping whose 'params' is a list of parameter indices")
        lr = g.get("lr")
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr == lr or lr < 0:
            raise _bad(path, f"optimizer.param_groups.{i}.lr", f"must be a number >= 0, got {lr!r}")
    callbacks = meta.get("callbacks")
    if callbacks is not None and (not isinstance(callbacks, dict) or not all(isinstance(v, dict) for v in callbacks.values())):
        raise _bad(path, "callbacks", "must be a mapping of callback name to its scalars")
    batch = meta.get("batch", 0)
    if not _is_int(batch) or batch < 0:
        raise _bad(path, "batch", f"must be an integer >= 0 (batches done in the current epoch), got {batch!r}")
    partial = meta.get("partial")
    keys = ("loss_sum", "correct", "count", "seconds", "waited")
    if batch and (not isinstance(partial, dict) or not all(isinstance(partial.get(k), (int, float))
                                                           and not isinstance(partial.get(k), bool) for k in keys)):
        raise _bad(path, "partial", f"must hold the epoch's running {', '.join(keys)} for a mid-epoch checkpoint")
    if meta.get("scaler") is not None and not isinstance(meta["scaler"], dict):
        raise _bad(path, "scaler", f"must be null or the gradient scaler's state, got {meta['scaler']!r}")


def check_tensors(meta: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The tensor file holds what checkpoint.json points to: the RNG state and every optimizer tensor."""
    rng = tensors.get("rng.torch")
    if rng is None or rng.dtype != torch.uint8 or rng.dim() != 1:
        raise _bad(path, "tensors", f"file {meta['tensors']} lacks the random-number state (rng.torch)")
    for pid, entries in meta["optimizer"]["state"].items():
        for entry_name, e in entries.items():
            if e.get("tensor") is True and f"optim.{pid}.{entry_name}" not in tensors:
                raise _bad(path, f"optimizer.state.{pid}.{entry_name}", f"points to a tensor missing from {meta['tensors']}")
    if not any(k.startswith("model.") for k in tensors):
        raise _bad(path, "tensors", f"file {meta['tensors']} holds no model weights")


def fingerprint_difference(theirs: dict, ours: dict) -> str | None:
    """The first key (in sorted order) whose value differs between two run fingerprints, or None when they agree."""
    return next((key for key in sorted(set(theirs) | set(ours)) if theirs.get(key) != ours.get(key)), None)


def check_compatible(ck: Checkpoint, model: nn.Module, fingerprint: dict, folder: str | os.PathLike) -> None:
    """Refuse (one line) a checkpoint that belongs to another model or another run configuration."""
    theirs, ours = ck.fingerprint, fingerprint
    key = fingerprint_difference(theirs, ours)
    if key is not None:
        raise NetdietError(f"checkpoint in {folder} is incompatible: {key} was {theirs.get(key)!r}, now {ours.get(key)!r}; "
                           "resume with the same settings or choose a new --out folder")
    own = model.state_dict()
    missing = [k for k in own if k not in ck.model]
    unexpected = [k for k in ck.model if k not in own]
    shapes = [k for k in own if k in ck.model and tuple(own[k].shape) != tuple(ck.model[k].shape)]
    if missing or unexpected or shapes:
        what = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                else f"shape of {shapes[0]} {tuple(ck.model[shapes[0]].shape)} vs {tuple(own[shapes[0]].shape)}")
        raise NetdietError(f"checkpoint in {folder} does not fit this model ({what}); resume with the same model and --model-kw")
    wrong = [k for k in own if ck.model[k].dtype != own[k].dtype]
    if wrong:
        raise NetdietError(f"checkpoint in {folder} is damaged: {wrong[0]} is {ck.model[wrong[0]].dtype}, the model's is "
                           f"{own[wrong[0]].dtype}; restore the folder from a backup, or train afresh into a new --out")


def optimizer_state_for(opt: torch.optim.Optimizer, ck: Checkpoint, folder: str | os.PathLike) -> dict:
    """The checkpoint's optimizer state, checked against the optimizer this run built, ready for its load_state_dict.

    The hyperparameters (betas, eps, amsgrad, fused, capturable...) are this run's own -- the fingerprint already
    says they were the same -- so a damaged file cannot switch on a code path; the state itself must be what a step
    of this optimizer writes: for every parameter with state, the same entry names as a probe step gives, scalars
    for counters and tensors of the parameter's shape for moments. Anything else is one NetdietError."""
    def bad(what: str) -> NetdietError:
        return NetdietError(f"{Path(folder) / INDEX} is damaged: the optimizer {what}; restore the folder from a backup, "
                            "or train afresh into a new --out")
    ours = opt.state_dict()["param_groups"]
    theirs = ck.optimizer["param_groups"]
    if len(theirs) != len(ours) or any(t.get("params") != o["params"] for t, o in zip(theirs, ours)):
        raise bad(f"parameter groups are not this optimizer's ({len(theirs)} groups, this run has {len(ours)})")
    params = [p for g in opt.param_groups for p in g["params"]]
    probe_param = torch.zeros(1, requires_grad=True)
    probe = type(opt)([probe_param], **{k: v for k, v in opt.param_groups[0].items() if k != "params"})
    probe_param.grad = torch.zeros(1)
    probe.step()
    expected = set(probe.state[probe_param])
    for pid, entries in ck.optimizer["state"].items():
        if not 0 <= pid < len(params):
            raise bad(f"holds state for parameter {pid}, but the model has {len(params)}")
        if set(entries) != expected:
            raise bad(f"state of parameter {pid} is {sorted(entries)}, this optimizer keeps {sorted(expected)}")
        for name, value in entries.items():
            probe_value = probe.state[probe_param][name]
            if not torch.is_tensor(value):
                if value is not None or probe_value is not None:
                    raise bad(f"state {pid}.{name} is {type(value).__name__}, not a tensor")
                continue
            shape = () if probe_value is not None and probe_value.dim() == 0 else tuple(params[pid].shape)
            if tuple(value.shape) != shape or not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                raise bad(f"state {pid}.{name} is {tuple(value.shape)} {value.dtype}, not finite "
                          f"{'a scalar' if not shape else 'of its parameter shape ' + str(shape)}")
    return {"state": ck.optimizer["state"], "param_groups": [dict(o) for o in ours]}


def capture_rng() -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    try:
        torch.set_rng_state(rng["torch"])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise NetdietError(f"the checkpoint's random-number state cannot be restored ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                           "train afresh into a new --out") from None
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
