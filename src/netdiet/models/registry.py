"""Name -> factory table, plus the loader for a user's `pkg.module:callable` / `file.py:callable` and the hub
specs `hf:NAME_OR_FOLDER` / `timm:NAME` (built by hub.py; `hf:` and `timm:` are reserved prefixes)."""
from __future__ import annotations

import ast
import difflib
import functools
import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from netdiet.errors import NetdietError
from netdiet.models.hub import build_hub, is_hub_spec


@dataclass
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]          # default input, batch dimension first (batch 1)
    input_dtype: torch.dtype = torch.float32
    description: str = ""
    task: str = "classification"          # classification | lm | detection
    input_high: int | None = None         # for integer inputs (token ids): exclusive upper bound
    input_for_kwargs: Callable[[dict], tuple[int, ...]] | None = None  # default input that follows factory kwargs
    input_high_for_kwargs: Callable[[dict], int] | None = None
    # parameters of factory() with its defaults, stored so that listing the zoo builds nothing (tests check
    # every stored count against the built model's, so it cannot go stale)
    params: int | None = None

    def param_count(self) -> int:
        """Parameters of the default model: the stored count, else counted on the meta device (no memory)."""
        if self.params is not None:
            return self.params
        with torch.device("meta"):
            model = create_model(self.name)
        return sum(p.numel() for p in model.parameters())

    def row(self) -> dict[str, Any]:
        """The zoo listing's row (`netdiet models`, api.list_models): name, parameters, default input, description."""
        return {"name": self.name, "params": self.param_count(), "input": list(self.input_shape),
                "input_dtype": str(self.input_dtype).replace("torch.", ""), "task": self.task,
                "description": self.description}


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, input_shape: tuple[int, ...], *, input_dtype: torch.dtype = torch.float32,
                   description: str = "", task: str = "classification", input_high: int | None = None,
                   input_for_kwargs: Callable[[dict], tuple[int, ...]] | None = None,
                   input_high_for_kwargs: Callable[[dict], int] | None = None, params: int | None = None):
    """Decorator: `@register_model("lenet5", (1, 1, 28, 28), params=431_080)` on a factory (`params`: the
    parameter count of the factory's default model)."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelEntry(name, fn, tuple(input_shape), input_dtype, description or (fn.__doc__ or "").strip().split("\n")[0],
                                     task, input_high, input_for_kwargs, input_high_for_kwargs, params)
        return fn

    return wrap


def list_models() -> list[ModelEntry]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise NetdietError(f"unknown model '{name}'; {hint}`netdiet models` lists the zoo, or give package.module:callable, file.py:callable, hf:FOLDER or timm:NAME")
    return _REGISTRY[name]


def parse_model_kw(items: list[str] | None) -> dict[str, Any]:
    """['width=64', 'widths=[300,100]', 'name=foo'] -> {'width': 64, 'widths': [300, 100], 'name': 'foo'}."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise NetdietError(f"--model-kw {item!r} is not key=value; write e.g. --model-kw depth=20")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise NetdietError(f"--model-kw key {key!r} is not a valid argument name")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word is a string
        out[key] = value
    return out


@dataclass
class ModelSpec:
    """How to rebuild a model: recorded in every result and archive (never code, only this text)."""

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"spec": self.spec, "kwargs": dict(self.kwargs)}


def _load_callable(spec: str) -> Callable[..., nn.Module]:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise NetdietError(f"model spec {spec!r} is neither a zoo name nor module:callable; `netdiet models` lists the zoo")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise NetdietError(f"model file {path} does not exist; check the path in {spec!r}")
        mod_name = f"_netdiet_user_{abs(hash(str(path.resolve())))}"
        file_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[mod_name] = module
        try:
            file_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise NetdietError(f"importing {path} failed: {type(exc).__name__}: {exc}; fix that file") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise NetdietError(f"cannot import module '{target}': {type(exc).__name__}: {exc}; check it is installed and on PYTHONPATH") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise NetdietError(f"'{attr}' is not a callable in {target}; name a function or class that returns an nn.Module")
    return fn


def resolve(spec: str) -> tuple[Callable[..., nn.Module], ModelEntry | None]:
    if is_hub_spec(spec):
        return functools.partial(build_hub, spec), None
    if ":" in spec or spec.endswith(".py"):
        return _load_callable(spec), None
    entry = get_entry(spec)
    return entry.factory, entry


def create_model(spec: str, **kwargs: Any) -> nn.Module:
    """Build a model from a zoo name or a user's callable; factory errors become one-line bad-input errors."""
    factory, _ = resolve(spec)
    try:
        model = factory(**kwargs)
    except NetdietError:
        raise
    except TypeError as exc:
        raise NetdietError(f"model '{spec}' rejected its arguments: {exc}; check --model-kw") from None
    except Exception as exc:
        raise NetdietError(f"model factory '{spec}' raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise NetdietError(f"model factory '{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def default_inputs(spec: str, kwargs: dict | None = None) -> tuple[tuple[int, ...], torch.dtype, int | None]:
    """(shape, dtype, high) of the default input for batch 1; only zoo models have one."""
    _, entry = resolve(spec)
    if entry is None:
        hint = " (an hf: model makes its own once built: profile it)" if is_hub_spec(spec) else ""
        raise NetdietError(f"model '{spec}' has no default input{hint}; give one with --input, e.g. --input 1,3,32,32")
    kwargs = kwargs or {}
    shape = entry.input_for_kwargs(kwargs) if entry.input_for_kwargs else entry.input_shape
    high = entry.input_high_for_kwargs(kwargs) if entry.input_high_for_kwargs else entry.input_high
    return tuple(shape), entry.input_dtype, high


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, *, high: int | None = None,
                device: str | torch.device = "cpu", seed: int = 0) -> torch.Tensor:
    """A deterministic example input of the given shape (token ids when dtype is integer)."""
    device = torch.device(device)
    if device.type == "meta":
        return torch.empty(shape, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
    return torch.randint(0, high or 2, shape, generator=gen).to(dtype=dtype, device=device)
