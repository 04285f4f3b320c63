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

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

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
    tensor_file = f"epoch-{ck.epoch:04d}.safetensors"
    save_state_dict(folder / tensor_file, tensors)
    atomic_write_json(folder / INDEX, {
        "schema": SCHEMA, "tensors": tensor_file, "epoch": ck.epoch, "step": ck.step, "history": ck.history,
        "fingerprint": ck.fingerprint, "optimizer": opt_meta, "callbacks": cb_meta, "scaler": ck.scaler,
    })
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
    tensors = load_state_dict(folder / meta["tensors"])
    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    callbacks = {name: (scalars, part(f"cb.{name}.")) for name, scalars in meta.get("callbacks", {}).items()}
    return Checkpoint(meta["epoch"], meta["step"], meta["history"], meta["fingerprint"], part("model."),
                      _unflatten_optimizer(meta["optimizer"], tensors), part("rng."), callbacks, meta.get("scaler"))


def check_compatible(ck: Checkpoint, model: nn.Module, fingerprint: dict, folder: str | os.PathLike) -> None:
    """Refuse (one line) a checkpoint that belongs to another model or another run configuration."""
    theirs, ours = ck.fingerprint, fingerprint
    for key in sorted(set(theirs) | set(ours)):
        if theirs.get(key) != ours.get(key):
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


def capture_rng() -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
