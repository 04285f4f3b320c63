"""Stage checkpoints of a compression recipe, so `netdiet compress --out M.ndz --resume` continues after the last
finished stage instead of redoing the recipe (baseline training included).

While a recipe runs into `--out M.ndz`, the folder `M.ndz.partial/` holds:

    baseline/   the dense baseline's training checkpoints (netdiet.training.checkpoint), so a kill mid-baseline
                resumes mid-baseline
    stages/     after the baseline and after every stage, one checkpoint in the same format (checkpoint.json +
                safetensors, written atomically, the JSON last as the commit point, nothing pickled): `epoch` is
                the number of finished stages (0: the baseline only), `history` their results, the model's weights,
                and three named parts -- `teacher` (the baseline the stages distil from), `state` (the
                CompressionState: spec, structure edits, encodings, masks, stage records, the int8 ONNX graph)
                and `run` (the baseline's figures, which modules were in training mode, numpy's RNG)

The folder is removed once the final archive is written. On resume, the checkpoint is read like any other
untrusted file: the training checkpoint's schema first, then every part here field by field, the model it describes
rebuilt through the archive's guarded builder (meta device first, budgeted), and its fingerprint (model, recipe,
seed, data, starting weights) must equal this run's.
"""
from __future__ import annotations

import copy
import hashlib
import numbers
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from netdiet.compression import archive
from netdiet.compression.base import CompressionState, Encoding
from netdiet.errors import NetdietError
from netdiet.training.checkpoint import (
    Checkpoint,
    capture_rng,
    fingerprint_difference,
    has_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)

_ENC_TENSORS = ("q", "scale", "zero_point", "codebook", "indices")
_ENC_DTYPES = ("float32", "float16", "bfloat16")


def partial_dir(out: str | os.PathLike) -> Path:
    """The folder next to the archive that holds an unfinished run's checkpoints."""
    return Path(f"{os.fspath(out)}.partial")


def weights_digest(model: nn.Module) -> str:
    """sha256 of the starting weights: a resumed run must start from the same model."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class StageCheckpoint:
    done: int                    # stages finished (0: only the baseline)
    stages: list[dict]           # their StageResult.to_dict()
    baseline: dict
    model: nn.Module
    teacher: nn.Module
    state: CompressionState


# ------------------------------------------------------------------ writing
def save(folder: Path, *, done: int, fingerprint: dict, baseline: dict, stages: list[dict], model: nn.Module,
         teacher: nn.Module, state: CompressionState) -> None:
    enc_meta, state_tensors = {}, {}
    for name, enc in state.encodings.items():
        fields = [f for f in _ENC_TENSORS if getattr(enc, f) is not None]
        enc_meta[name] = {"kind": enc.kind, "bits": enc.bits, "dtype": enc.dtype, "axis": enc.axis, "tensors": fields}
        state_tensors.update({f"enc.{name}.{f}": getattr(enc, f) for f in fields})
    state_tensors.update({f"mask.{n}": m for n, m in state.masks.items()})
    artifacts = {}
    for name, art in state.artifacts.items():
        artifacts[name] = {k: v for k, v in art.items() if k != "model"}
        state_tensors[f"artifact.{name}"] = torch.frombuffer(bytearray(art["model"]), dtype=torch.uint8)
    state_meta = {"spec": state.spec, "structure": state.structure, "stages": state.stages, "encodings": enc_meta,
                  "masks": sorted(state.masks), "artifacts": artifacts}
    np_state = np.random.get_state()
    run_meta = {"baseline": baseline, "model_training": _training_modules(model),
                "teacher_training": _training_modules(teacher),
                "numpy_rng": {"pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    run_tensors = {"numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    save_checkpoint(folder, Checkpoint(
        epoch=done, step=done, history=stages, fingerprint=fingerprint, model=model.state_dict(),
        optimizer={"state": {}, "param_groups": []}, rng=capture_rng(),
        callbacks={"teacher": ({}, teacher.state_dict()), "state": (state_meta, state_tensors), "run": (run_meta, run_tensors)}))


def _training_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if m.training]


def remove(out: str | os.PathLike) -> None:
    """Drop the checkpoints of a run whose archive is written."""
    shutil.rmtree(partial_dir(out), ignore_errors=True)


# ------------------------------------------------------------------ reading (an untrusted file)
class _Bad(Exception):
    pass


def _need(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise _Bad(f"'{where}' {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def load(folder: Path, *, fingerprint: dict, stages_in_recipe: int, model_spec: str,
         max_memory: int | None = None) -> StageCheckpoint | None:
    """The last finished stage's checkpoint in `folder` (None when there is none yet); one NetdietError naming the
    file and field when it is damaged, or when it belongs to another model, recipe, seed, data or starting weights."""
    if not has_checkpoint(folder):
        return None
    ck = load_checkpoint(folder)
    index = folder / "checkpoint.json"
    key = fingerprint_difference(ck.fingerprint, fingerprint)
    if key is not None:
        raise NetdietError(f"the unfinished compress run in {folder.parent} is incompatible: its {key} differs from this "
                           "run's; resume with the same model, recipe, data, seed and weights, or delete that folder")
    try:
        parts = _check_parts(ck, stages_in_recipe)
    except _Bad as exc:
        raise NetdietError(f"{index} is damaged: {exc}; delete {folder.parent} and run afresh") from None
    state_meta, state_tensors = parts["state"]
    run_meta, run_tensors = parts["run"]
    model = archive.rebuild_model(state_meta["spec"], state_meta["structure"], model_spec=model_spec, max_memory=max_memory,
                                  expect={k: tuple(v.shape) for k, v in ck.model.items()}, source=str(index))
    teacher = archive.rebuild_model(fingerprint["model"], [], model_spec=model_spec, max_memory=max_memory,
                                    expect={k: tuple(v.shape) for k, v in parts["teacher"][1].items()}, source=str(index))
    _load_weights(teacher, parts["teacher"][1], index, "teacher")
    _load_weights(model, ck.model, index, "model")
    _set_modes(model, run_meta["model_training"])
    _set_modes(teacher, run_meta["teacher_training"])
    try:
        state = _state(state_meta, state_tensors, dict(model.named_parameters()))
    except _Bad as exc:
        raise NetdietError(f"{index} is damaged: {exc}; delete {folder.parent} and run afresh") from None
    restore_rng(ck.rng)
    rng = run_meta["numpy_rng"]
    try:
        keys = run_tensors["numpy_keys"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), rng["pos"], rng["has_gauss"], rng["cached_gaussian"]))
    except (KeyError, ValueError, TypeError, OverflowError) as exc:
        raise NetdietError(f"{index} is damaged: numpy's random state does not restore ({type(exc).__name__}); "
                           f"delete {folder.parent} and run afresh") from None
    return StageCheckpoint(done=ck.epoch, stages=list(ck.history), baseline=run_meta["baseline"], model=model,
                           teacher=teacher, state=state)


def _check_parts(ck: Checkpoint, stages_in_recipe: int) -> dict[str, tuple[dict, dict]]:
    _need(ck.epoch <= stages_in_recipe, "epoch", f"says {ck.epoch} stages finished but the recipe has {stages_in_recipe}")
    _need(len(ck.history) == ck.epoch, "history", f"holds {len(ck.history)} stage results for {ck.epoch} finished stages")
    for name in ("teacher", "state", "run"):
        _need(name in ck.callbacks, f"callbacks.{name}", "is missing")
    state_meta, state_tensors = ck.callbacks["state"]
    spec = state_meta.get("spec")
    _need(isinstance(spec, dict) and isinstance(spec.get("spec"), str) and isinstance(spec.get("kwargs") or {}, dict),
          "callbacks.state.spec", "must be {spec: <model>, kwargs: {...}}")
    _need(isinstance(state_meta.get("structure"), list), "callbacks.state.structure", "must be a list of edits")
    _need(isinstance(state_meta.get("stages"), list) and all(isinstance(s, dict) for s in state_meta["stages"]),
          "callbacks.state.stages", "must be a list of stage records")
    encodings = state_meta.get("encodings")
    _need(isinstance(encodings, dict), "callbacks.state.encodings", "must be a mapping")
    for name, e in encodings.items():
        w = f"callbacks.state.encodings.{name[:60]}"
        _need(isinstance(e, dict), w, "must be a mapping")
        _need(e.get("kind") in ("dense", "quant", "cluster"), f"{w}.kind", "must be dense, quant or cluster")
        _need(_is_int(e.get("bits")) and 1 <= e["bits"] <= 32, f"{w}.bits", "must be an integer in 1..32")
        _need(e.get("dtype") in _ENC_DTYPES, f"{w}.dtype", f"must be one of {', '.join(_ENC_DTYPES)}")
        _need(_is_int(e.get("axis")) and 0 <= e["axis"] < 64, f"{w}.axis", "must be an integer in 0..63")
        fields = e.get("tensors")
        _need(isinstance(fields, list) and all(f in _ENC_TENSORS for f in fields), f"{w}.tensors",
              f"must list some of {', '.join(_ENC_TENSORS)}")
        for f in fields:
            _need(f"enc.{name}.{f}" in state_tensors, f"{w}.tensors", f"names {f}, which the tensor file lacks")
    masks = state_meta.get("masks")
    _need(isinstance(masks, list) and all(isinstance(m, str) and f"mask.{m}" in state_tensors for m in masks),
          "callbacks.state.masks", "must list masks the tensor file holds")
    artifacts = state_meta.get("artifacts")
    _need(isinstance(artifacts, dict) and all(isinstance(a, dict) for a in artifacts.values()),
          "callbacks.state.artifacts", "must be a mapping of artefact records")
    for name in artifacts:
        t = state_tensors.get(f"artifact.{name}")
        _need(t is not None and t.dtype == torch.uint8 and t.dim() == 1, f"callbacks.state.artifacts.{name[:40]}",
              "has no byte tensor in the tensor file")
    run_meta, run_tensors = ck.callbacks["run"]
    _need(isinstance(run_meta.get("baseline"), dict), "callbacks.run.baseline", "must be the baseline's figures")
    for key in ("model_training", "teacher_training"):
        _need(isinstance(run_meta.get(key), list) and all(isinstance(m, str) for m in run_meta[key]),
              f"callbacks.run.{key}", "must be a list of module names")
    rng = run_meta.get("numpy_rng")
    _need(isinstance(rng, dict) and _is_int(rng.get("pos")) and _is_int(rng.get("has_gauss")) and _is_num(rng.get("cached_gaussian")),
          "callbacks.run.numpy_rng", "must be {pos, has_gauss, cached_gaussian}")
    keys = run_tensors.get("numpy_keys")
    _need(keys is not None and keys.dtype == torch.int64 and tuple(keys.shape) == (624,) and bool(((keys >= 0) & (keys < 2**32)).all()),
          "callbacks.run.numpy_keys", "must be numpy's 624 Mersenne-Twister words")
    return ck.callbacks


def _load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], index: Path, what: str) -> None:
    own = model.state_dict()
    if set(own) != set(tensors) or any(tuple(own[k].shape) != tuple(tensors[k].shape) for k in own):
        odd = sorted(set(own) ^ set(tensors)) or [k for k in own if tuple(own[k].shape) != tuple(tensors[k].shape)]
        raise NetdietError(f"{index} is damaged: the {what} weights do not fit the model it describes ({odd[0]!r}); "
                           f"delete {index.parent.parent} and run afresh")
    with torch.no_grad():
        for k, ref in own.items():
            ref.copy_(tensors[k].to(ref.dtype))


def _set_modes(model: nn.Module, training: list[str]) -> None:
    on = set(training)
    for name, m in model.named_modules():
        m.training = name in on


def _state(meta: dict, tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> CompressionState:
    encodings = {}
    for name, e in meta["encodings"].items():
        encodings[name] = Encoding(kind=e["kind"], bits=e["bits"], dtype=e["dtype"], axis=e["axis"],
                                   **{f: tensors[f"enc.{name}.{f}"] for f in e["tensors"]})
    masks = {}
    for name in meta["masks"]:
        m = tensors[f"mask.{name}"]
        _need(name not in params or tuple(m.shape) == tuple(params[name].shape), f"callbacks.state.masks.{name[:60]}",
              "does not have its parameter's shape")
        masks[name] = m
    artifacts = {name: {**copy.deepcopy(art), "model": tensors[f"artifact.{name}"].numpy().tobytes()}
                 for name, art in meta["artifacts"].items()}
    return CompressionState(spec=meta["spec"], structure=meta["structure"], encodings=encodings, masks=masks,
                            stages=meta["stages"], artifacts=artifacts)
