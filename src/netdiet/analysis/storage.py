"""Dense vs sparse bytes of weights and of data: what CSR or a bitmask would save.

Layouts (b = bytes per value of the tensor's dtype, nnz = non-zero count):
- dense:   numel * b
- CSR:     of the 2-D view (rows = first dimension, cols = the rest; a vector is one row, a scalar 1x1):
           nnz values (nnz * b) + nnz column indices + (rows + 1) row pointers. Column indices are int32 when
           cols <= 2**31 - 1, else int64; row pointers are int32 when nnz <= 2**31 - 1, else int64 (scipy's rule).
- bitmask: one bit per element, ceil(numel / 8) bytes, plus the nnz values (nnz * b).
`best` names the smallest of the three (dense on ties).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from netdiet.analysis.latency import preprocessing_cost
from netdiet.data import get_dataset
from netdiet.environment import environment
from netdiet.errors import NetdietError

_INT32_MAX = 2**31 - 1


def _view_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def storage_bytes(numel: int, nonzero: int, shape: tuple[int, ...], value_bytes: int) -> dict[str, Any]:
    """The three layouts' bytes from counts alone (used for tensors and for whole datasets)."""
    rows, cols = _view_2d(tuple(shape))
    index_bytes = 4 if cols <= _INT32_MAX else 8
    ptr_bytes = 4 if nonzero <= _INT32_MAX else 8
    dense = numel * value_bytes
    csr = nonzero * value_bytes + nonzero * index_bytes + (rows + 1) * ptr_bytes
    bitmask = (numel + 7) // 8 + nonzero * value_bytes
    sizes = {"dense": dense, "csr": csr, "bitmask": bitmask}
    best = min(sizes, key=lambda k: (sizes[k], k != "dense"))
    return {
        "numel": int(numel), "nonzero": int(nonzero),
        "density": (nonzero / numel) if numel else 0.0,
        "dense_bytes": int(dense), "csr_bytes": int(csr), "bitmask_bytes": int(bitmask), "best": best,
        "best_bytes": int(sizes[best]),
    }


def tensor_storage(t: torch.Tensor) -> dict[str, Any]:
    """Dense / CSR / bitmask bytes of one tensor (see the module docstring for the layouts)."""
    if not isinstance(t, torch.Tensor):
        raise NetdietError(f"tensor_storage needs a torch.Tensor, got {type(t).__name__}")
    if t.device.type == "meta":
        raise NetdietError("a meta tensor has no values, so its sparsity is unknown; give real weights")
    if t.is_sparse or t.layout != torch.strided:
        t = t.to_dense()
    nonzero = int(torch.count_nonzero(t.detach()).item())
    out = storage_bytes(t.numel(), nonzero, tuple(t.shape), t.element_size())
    out["shape"] = list(t.shape)
    out["dtype"] = str(t.dtype).replace("torch.", "")
    return out


def _effective_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of each weight as the model uses it, each tensor once.

    torch.nn.utils.prune keeps `weight_orig` (a parameter) and `weight_mask` (a buffer) and recomputes
    `weight = weight_orig * weight_mask`; the pruned tensor is what the model holds, so it is the one reported.
    """
    rows: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        buffers = dict(mod.named_buffers(recurse=False))
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            tensor = p
            if pname.endswith("_orig") and f"{pname[:-5]}_mask" in buffers:
                base = pname[:-5]
                effective = getattr(mod, base, None)
                if isinstance(effective, torch.Tensor):
                    tensor = effective
                    full = f"{mod_name}.{base}" if mod_name else base
            if id(p) in seen:
                continue
            seen.add(id(p))
            rows.append((full, tensor))
    return rows


def weight_storage(model: nn.Module) -> dict[str, Any]:
    """Per-parameter sparsity and dense / CSR / bitmask bytes, with totals.

    Totals: `dense_bytes`, `csr_bytes`, `bitmask_bytes` store every tensor in that one layout;
    `best_bytes` lets each tensor pick its own smallest layout.
    """
    if not isinstance(model, nn.Module):
        raise NetdietError(f"weight_storage needs a torch.nn.Module, got {type(model).__name__}")
    rows = []
    totals = {"numel": 0, "nonzero": 0, "dense_bytes": 0, "csr_bytes": 0, "bitmask_bytes": 0, "best_bytes": 0}
    for name, t in _effective_parameters(model):
        row = tensor_storage(t)
        row["name"] = name
        row["sparsity"] = 1.0 - row["density"] if row["numel"] else 0.0
        rows.append(row)
        for k in totals:
            totals[k] += row[k]
    totals["density"] = totals["nonzero"] / totals["numel"] if totals["numel"] else 0.0
    totals["sparsity"] = 1.0 - totals["density"] if totals["numel"] else 0.0
    layouts = {"dense": totals["dense_bytes"], "csr": totals["csr_bytes"], "bitmask": totals["bitmask_bytes"]}
    totals["best_single_layout"] = min(layouts, key=lambda k: (layouts[k], k != "dense"))
    return {"parameters": rows, "totals": totals}


def dataset_storage(x: torch.Tensor) -> dict[str, Any]:
    """Dense / CSR / bitmask bytes of a dataset tensor, as a (samples, features) matrix."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise NetdietError("dataset_storage needs a tensor with a sample dimension, e.g. (N, 1, 28, 28)")
    flat = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(-1, 1)
    out = tensor_storage(flat)
    out["shape"] = list(x.shape)
    out["samples"] = int(x.shape[0])
    out["features"] = int(flat.shape[1])
    out["dense_bytes_per_sample"] = out["dense_bytes"] / max(1, out["samples"])
    out["csr_bytes_per_sample"] = out["csr_bytes"] / max(1, out["samples"])
    return out


# ------------------------------------------------------------------ the `netdiet data` result
def data_report(name: str, *, data_dir: str | None = None, seed: int = 0, samples: int = 5,
                repeats: int = 7) -> dict[str, Any]:
    """Everything `netdiet data NAME` shows: sizes, shapes, classes, a few samples, dense vs CSR bytes and
    the measured per-sample cost of preprocessing. A JSON-ready dict with schema netdiet.data/1."""

    if samples < 0:
        raise NetdietError(f"samples must be 0 or more, got {samples}")
    ds = get_dataset(name, data_dir=data_dir, seed=seed)
    splits = {}
    for split, (x, y) in (("train", (ds.x_train, ds.y_train)), ("test", (ds.x_test, ds.y_test))):
        counts = torch.bincount(y, minlength=ds.num_classes).tolist() if len(y) else [0] * ds.num_classes
        splits[split] = {"samples": int(len(y)), "class_counts": counts, "storage": dataset_storage(x) if len(x) else None}
    rows = []
    for i in range(min(samples, len(ds.y_train))):
        xi, yi = ds.x_train[i], int(ds.y_train[i])
        rows.append({"split": "train", "index": i, "label": yi,
                     "class": ds.classes[yi] if yi < len(ds.classes) else str(yi),
                     "min": float(xi.min()), "max": float(xi.max()), "mean": float(xi.mean()),
                     "density": float((xi != 0).float().mean())})
    preview = None
    x0 = ds.x_train[0] if len(ds.x_train) else None
    if x0 is not None and x0.dim() == 3 and x0.shape[1] <= 32 and x0.shape[2] <= 32:
        # the first training image (channel mean), values as stored: what the model sees
        preview = {"index": 0, "label": int(ds.y_train[0]),
                   "pixels": [[round(float(v), 3) for v in row] for row in x0.float().mean(0)]}
    return {
        "schema": "netdiet.data/1",
        "summary": ds.summary(),
        "preview": preview,
        "description": ds.description,
        "splits": splits,
        "samples": rows,
        "preprocessing": preprocessing_cost(ds.x_train, repeats=repeats) if len(ds.x_train) else [],
        "environment": environment(),
    }
