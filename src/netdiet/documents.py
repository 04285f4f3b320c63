"""The result documents netdiet writes with --json, read back (by `netdiet report`, the demo) through one validating
reader: `read_result(path)`.

Reading is bounded (fileio.read_json: at most MAX_JSON_BYTES, MAX_JSON_DEPTH deep, strict JSON with finite numbers)
and checked in two steps:
- the document itself: an object whose `schema` is `netdiet.<kind>/<version>` for a kind and version this netdiet
  knows (anything else is one NetdietError, exit 2);
- its fields, against SCHEMAS[kind]: every field a reader uses, with the JSON type it must have when present
  (`null` or absent is always allowed: older documents lack newer keys). `field_problems(doc)` lists what does not
  fit, so a renderer can skip the part of the page that needs a wrong-typed field and say why, instead of failing.

A schema is a nested description: a type name ("number", "integer", "string", "boolean", "object", "list",
"any"), `Obj({field: schema})` for an object with known fields, `Rows({field: schema})` for a list of such
objects, `ListOf(schema)` for a list whose items share a schema, and `MapOf(schema)` for an object whose values do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netdiet.errors import NetdietError
from netdiet.fileio import read_json

MAX_PROBLEMS = 20      # field problems listed per document (the first is what a renderer shows)


@dataclass(frozen=True)
class Obj:
    fields: dict


@dataclass(frozen=True)
class Rows:
    fields: dict


@dataclass(frozen=True)
class ListOf:
    item: Any


@dataclass(frozen=True)
class MapOf:
    value: Any


NUM, INT, STR, BOOL, OBJ, LIST, ANY = "number", "integer", "string", "boolean", "object", "list", "any"
NUMBERS = ListOf(NUM)
MODEL = Obj({"spec": STR, "kwargs": OBJ, "class": STR})
LATENCY = MapOf(NUM)            # {pytorch, onnxruntime}: milliseconds
_MEMORY_PARTS = ("weights", "buffers", "gradients", "optimizer_state", "activations", "temporaries", "peak_estimated",
                 "inference_peak", "peak_measured", "inference_peak_measured")

SCHEMAS: dict[str, dict[str, Any]] = {
    "profile": {
        "model": MODEL, "inputs": Rows({"name": STR, "shape": ListOf(INT), "dtype": STR}),
        "totals": Obj({k: NUM for k in ("params", "trainable_params", "param_bytes", "buffer_bytes", "macs",
                                                       "flops", "train_forward_flops", "backward_macs", "backward_flops",
                                                       "optimizer_flops", "train_flops")}),
        "memory": Obj({"batch_size": INT, "optimizer": STR, **{k: NUM for k in _MEMORY_PARTS},
                       "peak_breakdown": MapOf(NUM)}),
        "modules": Rows({"name": STR, "type": STR, "depth": INT, "params": NUM, "param_bytes": NUM, "macs": NUM, "flops": NUM,
                         "activation_bytes": NUM, "backward_flops": NUM}),
        "operators": MapOf(Obj({k: NUM for k in ("count", "macs", "flops", "backward_count", "backward_macs",
                                                 "backward_flops", "bytes_read", "bytes_written")})),
        "uncounted": MapOf(NUM),
        "scaling": Obj({"variable": STR, "budget_bytes": NUM, "fit": OBJ,
                        "points": Rows({"batch_size": ANY, "peak_breakdown": MapOf(NUM), "peak_fitted": NUM,
                                        "peak_measured": NUM, **{k: NUM for k in _MEMORY_PARTS}})}),
    },
    "compress": {
        "model": MODEL, "data": STR, "seed": INT, "recipe": Obj({"name": STR, "description": STR, "stages": LIST}),
        "baseline": Obj({"accuracy": NUM, "bytes_on_disk": NUM, "macs": NUM, "params": NUM, "nonzero_params": NUM,
                         "latency_ms": LATENCY}),
        "stages": Rows({"name": STR, "technique": STR, "options": OBJ, "accuracy": NUM, "bytes_on_disk": NUM, "ratio": NUM,
                        "macs": NUM, "params": NUM, "nonzero_params": NUM, "latency_ms": LATENCY, "runtime": STR,
                        "report": OBJ}),
        "pareto": ListOf(STR), "archive": Obj({"path": STR, "bytes": NUM, "ratio": NUM, "dense_fp32_bytes": NUM}),
    },
    "evaluate": {
        "source": STR, "model": ANY, "dataset": ANY, "samples": INT, "runtime": STR,
        **{k: NUM for k in ("accuracy", "accuracy_pytorch", "accuracy_onnxruntime", "bytes_on_disk", "dense_fp32_bytes",
                            "ratio", "params", "nonzero_params", "sparsity", "macs")},
        "latency_ms": LATENCY, "tensors": Rows({}), "warnings": ListOf(STR),
    },
    "train": {
        "model": MODEL, "config": OBJ, "params": NUM, "world_size": INT, "steps": INT, "seconds": NUM, "test_acc": NUM,
        "peak_memory_bytes": NUM,
        "history": Rows({"epoch": INT, "loss": NUM, "train_acc": NUM, "val_acc": NUM, "val_loss": NUM, "seconds": NUM,
                         "lr": NUM, "steps": INT}),
    },
    "sweep": {
        "model": MODEL, "knob": STR, "k": INT, "chosen_index": INT,
        "points": Rows({"value": ANY, "params": NUM, "flops": NUM, "train_error": NUM, "val_error": NUM}),
    },
    "continual": {
        "setting": STR, "budget": NUM, "model": ANY,
        "strategies": Rows({"name": STR, "status": STR, "message": STR, "average_accuracy": NUM, "bwt": NUM,
                            "forgetting": NUM, "fwt": NUM, "accuracy_matrix": ListOf(ListOf(NUM)),
                            "bytes_per_task": NUMBERS}),
    },
    "data": {"name": STR},
    "models": {"models": Rows({"name": STR, "params": NUM, "input": LIST, "description": STR})},
    "demo": {"headlines": Rows({"label": STR, "value": ANY, "unit": STR, "source": STR})},
    "datasets": {}, "recipes": {}, "report": {"out": STR, "bytes": NUM, "sources": Rows({"path": STR, "schema": STR})},
    "plan": {
        "model": MODEL, "global_batch": INT, "seq_len": INT, "samples_unit": STR,
        "devices": Obj({"count": INT, "name": STR, "device": Obj({"memory_bytes": NUM, "name": STR})}),
        "ranked": Rows({"rank": INT, "layout": STR, "strategy": STR, "tp": INT, "dp": INT, "micro_batch": INT,
                        "accumulation": INT, "checkpointing": BOOL, "peak": NUM, "step_time_s": NUM,
                        "throughput": NUM, "throughput_unit": STR, "mfu": NUM, "per_rank": MapOf(NUM),
                        "at_peak": MapOf(NUM)}),
        "infeasible": Rows({"layout": STR, "why": STR, "over_by": NUM}),
        "unavailable": Rows({"layout": STR, "checkpointing": BOOL, "why": STR}),
        "simulation": Obj({"distinct": INT, "method": STR}), "notes": ListOf(STR), "seconds": NUM,
    },
    "train-ensemble": {
        "model": MODEL, "k": INT, "mode": STR, "combine": STR,
        "members": Rows({"index": INT, "seed": INT, "test_acc": NUM, "epochs": INT, "seconds": NUM}),
        "accuracy": Obj({"members": NUMBERS, "members_mean": NUM, "mean": NUM, "vote": NUM, "combined": NUM}),
        "cost": Obj({"single": MapOf(NUM), "ensemble": MapOf(NUM)}),
        "training": Obj({"seconds": NUM, "flops": NUM, "seconds_per_member": NUMBERS}),
        "latency": Obj({"batch": INT}),
    },
}
VERSIONS: dict[str, set[int]] = {kind: {1} for kind in SCHEMAS}


def known_list() -> str:
    return ", ".join(f"{k}/{max(v)}" for k, v in sorted(VERSIONS.items()))


def kind_of(doc: dict) -> str:
    """'profile' for a document whose schema is netdiet.profile/1 (read_result has checked it)."""
    return doc["schema"][len("netdiet."):].partition("/")[0]


def read_result(path: str | os.PathLike) -> dict:
    """A netdiet result document, read within the limits and checked to be an object with a known schema;
    one NetdietError (exit 2) otherwise. Its fields are checked by field_problems."""
    path = Path(path)
    if not path.is_file():
        raise NetdietError(f"result file {path} does not exist; give JSON files written with --json")
    hint = "give a file written by a netdiet command with --json"
    doc = read_json(path, hint=hint)
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if not isinstance(schema, str) or not schema.startswith("netdiet.") or "/" not in schema:
        raise NetdietError(f"{path} is not a netdiet result (no 'schema': 'netdiet.<command>/<version>'); {hint}")
    kind, _, version = schema[len("netdiet."):].partition("/")
    if kind not in VERSIONS or not version.isdigit() or len(version) > 6 or int(version) not in VERSIONS[kind]:
        raise NetdietError(f"{path} has schema {schema[:80]!r}, which this netdiet ({known_list()}) cannot read; "
                           "upgrade netdiet or regenerate the result")
    return doc


def field_problems(doc: dict, kind: str | None = None) -> list[str]:
    """What in `doc` does not fit its kind's schema, as "'stages[2].accuracy' is a string, not a number" (at most
    MAX_PROBLEMS, in document order); [] when everything fits."""
    problems: list[str] = []
    for key, spec in SCHEMAS.get(kind or kind_of(doc), {}).items():
        _check(doc.get(key), spec, key, problems)
        if len(problems) >= MAX_PROBLEMS:
            break
    return problems[:MAX_PROBLEMS]


def describe(value: Any) -> str:
    """A JSON value's type in words, for a note: 'a string', 'a number (5)', 'null'..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({str(value)[:20]})"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


_FITS = {
    NUM: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
    STR: lambda v: isinstance(v, str),
    BOOL: lambda v: isinstance(v, bool),
    OBJ: lambda v: isinstance(v, dict),
    LIST: lambda v: isinstance(v, list),
    ANY: lambda v: True,
}
_TYPES = {NUM: {int, float, type(None)}, INT: {int, type(None)}, STR: {str, type(None)}, BOOL: {bool, type(None)},
          OBJ: {dict, type(None)}, LIST: {list, type(None)}, ANY: {int, float, str, bool, dict, list, type(None)}}
_NAMES = {NUM: "a number", INT: "an integer", STR: "a string", BOOL: "a boolean", OBJ: "an object", LIST: "a list"}


def _check(value: Any, spec: Any, where: str, problems: list[str]) -> None:
    if value is None or len(problems) >= MAX_PROBLEMS:
        return
    if isinstance(spec, str):
        if not _FITS[spec](value):
            problems.append(f"'{where}' is {describe(value)}, not {_NAMES[spec]}")
        return
    if isinstance(spec, Obj):
        if not isinstance(value, dict):
            problems.append(f"'{where}' is {describe(value)}, not an object")
            return
        for key, sub in spec.fields.items():
            _check(value.get(key), sub, f"{where}.{key}", problems)
        return
    if isinstance(spec, MapOf):
        if not isinstance(value, dict):
            problems.append(f"'{where}' is {describe(value)}, not an object")
            return
        for key, sub in value.items():
            _check(sub, spec.value, f"{where}.{key[:40]}", problems)
            if len(problems) >= MAX_PROBLEMS:
                return
        return
    if not isinstance(value, list):
        problems.append(f"'{where}' is {describe(value)}, not a list")
        return
    item = Obj(spec.fields) if isinstance(spec, Rows) else spec.item
    if isinstance(item, str) and set(map(type, value)) <= _TYPES[item]:
        return                          # a list of plain values (a matrix row): checked in C, not item by item
    for i, v in enumerate(value):
        if isinstance(spec, Rows) and not isinstance(v, dict):
            problems.append(f"'{where}' holds {describe(v)}, not objects")
            return
        _check(v, item, f"{where}[{i}]", problems)
        if len(problems) >= MAX_PROBLEMS:
            return
