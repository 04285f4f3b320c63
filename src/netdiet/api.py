"""The public Python API. Every CLI command is a thin layer over a function here.

Sections are owned by the capability that produces them; each returns a result object with `to_dict()`.
"""
from __future__ import annotations

from typing import Any

__all__ = ["list_models", "create_model", "get_dataset", "load_model"]


# ==================================================================== models and data
def list_models() -> list[dict[str, Any]]:
    """One row per zoo model: name, parameters, default input, description."""
    import torch
    from netdiet.models import create_model as _create, list_models as _list
    rows = []
    for entry in _list():
        with torch.device("meta"):  # counting parameters needs no memory
            model = _create(entry.name)
        rows.append({"name": entry.name, "params": sum(p.numel() for p in model.parameters()),
                     "input": list(entry.input_shape), "input_dtype": str(entry.input_dtype).replace("torch.", ""),
                     "task": entry.task, "description": entry.description})
    return rows


def create_model(spec: str, **kwargs: Any):
    """A model from a zoo name, `package.module:callable` or `path/file.py:callable`."""
    from netdiet.models import create_model as _create
    return _create(spec, **kwargs)


def get_dataset(name: str = "mnist5k", data_dir: str | None = None, seed: int = 0):
    from netdiet.data import get_dataset as _get
    return _get(name, data_dir=data_dir, seed=seed)


def load_model(spec: str, weights: str | None = None, **kwargs: Any):
    """Build `spec` and, if given, load safetensors weights (never a pickle)."""
    from netdiet.fileio import load_state_dict
    from netdiet.errors import NetdietError
    model = create_model(spec, **kwargs)
    if weights:
        state = load_state_dict(weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise NetdietError(f"{weights} does not fit model '{spec}': missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}; "
                               "give the weights of this model (and the same --model-kw)")
    return model


# ==================================================================== profile

# ==================================================================== compress / evaluate

# ==================================================================== train / sweep

# ==================================================================== continual

# ==================================================================== report / demo
