"""One interface for every compression technique, and the state that travels with a model through a recipe.

A technique is configured by plain options (validated at construction: bad options raise NetdietError),
`apply`-ed to a model with a `StageContext` (data, fine-tune settings, example inputs, teacher), reports what
it changed, and saves/restores its own tensors. What the archive needs to store the result lives in a
`CompressionState`: how each parameter is encoded (dense at some dtype, quantized ints + scales, cluster indices
+ codebook), which weights are masked, and the architecture edits (structured pruning, low-rank) that must be
replayed on the factory's model to rebuild it without pickle.

    tech = create_technique("prune", sparsity=0.8, schedule="polynomial")
    model = tech.apply(model, state, ctx)
    tech.report()        # {"sparsity": 0.8, "layers": {...}}
"""
from __future__ import annotations

import difflib
import fnmatch
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from netdiet.errors import NetdietError
from netdiet.training.loop import TrainConfig


@dataclass
class Encoding:
    """How the archive stores one parameter (set by the technique that last changed it).

    kind="dense":   stored at `dtype` (float32 | float16 | bfloat16).
    kind="quant":   integer codes `q` (same shape as the weight) at `bits` (1..8), per-channel `scale` along `axis`,
                    optional `zero_point` (None = symmetric). Value = (q - zero_point) * scale.
    kind="cluster": `indices` (same shape, values < 2**bits) into `codebook` (2**bits floats). Value = codebook[idx].
    Zeros from a mask are stored sparsely by the archive on top of any kind.
    """

    kind: str = "dense"
    bits: int = 32
    dtype: str = "float32"
    q: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    axis: int = 0
    codebook: torch.Tensor | None = None
    indices: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """The float weight this encoding represents (what the model computes with)."""
        if self.kind == "cluster":
            return self.codebook[self.indices.long()]
        if self.kind == "quant":
            shape = [1] * self.q.dim()
            shape[self.axis] = -1
            zp = self.zero_point.view(shape).float() if self.zero_point is not None else 0.0
            return (self.q.float() - zp) * self.scale.view(shape).float()
        raise ValueError(f"a {self.kind} encoding holds no codes to dequantize")


@dataclass
class CompressionState:
    """Everything besides the weights that the archive needs, accumulated stage by stage."""

    spec: dict | None = None                                   # ModelSpec.to_dict(): how to rebuild the dense model
    structure: list[dict] = field(default_factory=list)        # replayable architecture edits, in order
    encodings: dict[str, Encoding] = field(default_factory=dict)  # parameter name -> storage
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> bool keep-mask
    stages: list[dict] = field(default_factory=list)           # per-stage reports (technique, options, metrics)
    # deployment artefacts the archive must carry, e.g. "onnx_int8": {"model": bytes, "fill": [...], ...}
    # (written by quantize in dynamic/static mode; the archive stores them without duplicating weights)
    artifacts: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """What a technique may use while it works."""

    data: Any = None                        # netdiet.data.Dataset (train split for fine-tuning/calibration)
    finetune: TrainConfig | None = None     # None or epochs == 0: no fine-tuning
    example_inputs: torch.Tensor | None = None
    teacher: nn.Module | None = None        # for distillation (the model before this stage, by default)
    seed: int = 0


class Technique(ABC):
    """The contract every technique implements; `tests/test_compress_contract.py` checks it for all of them."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise NetdietError(f"technique '{self.name}' has no option(s) {', '.join(sorted(unknown))}; "
                               f"its options are: {', '.join(sorted(self.defaults)) or 'none'}")
        self.options: dict[str, Any] = {**self.defaults, **options}
        self.validate()
        self._report: dict[str, Any] = {}

    def validate(self) -> None:
        """Raise NetdietError naming the bad option and its allowed range."""

    @abstractmethod
    def apply(self, model: nn.Module, state: CompressionState, ctx: StageContext) -> nn.Module:
        """Transform `model` (in place, or return a new module), fine-tune if ctx.finetune asks, update `state`."""

    def report(self) -> dict[str, Any]:
        """What changed, JSON-serialisable (sparsity per layer, bits, ranks, params before/after...)."""
        return dict(self._report)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The technique's own tensors (masks, codebooks...) so it can be restored without re-running."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise NetdietError(f"technique '{self.name}' keeps no tensors but was given {len(state)}")

    def get_config(self) -> dict[str, Any]:
        return {"technique": self.name, **self.options}


# ------------------------------------------------------------------ registries
_TECHNIQUES: dict[str, type[Technique]] = {}
_STRUCTURE_OPS: dict[str, Callable[[nn.Module, dict], nn.Module]] = {}


def register_technique(cls: type[Technique]) -> type[Technique]:
    _TECHNIQUES[cls.name] = cls
    return cls


def list_techniques() -> list[str]:
    _import_all()
    return sorted(_TECHNIQUES)


def create_technique(name: str, **options: Any) -> Technique:
    _import_all()
    if name not in _TECHNIQUES:
        close = difflib.get_close_matches(name, list(_TECHNIQUES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise NetdietError(f"unknown technique '{name}'{hint}; choose one of: {', '.join(sorted(_TECHNIQUES))}")
    return _TECHNIQUES[name](**options)


def register_structure_op(op: str):
    """`@register_structure_op("lowrank")` on `fn(model, edit) -> model`, replaying one architecture edit."""
    def wrap(fn: Callable[[nn.Module, dict], nn.Module]) -> Callable[[nn.Module, dict], nn.Module]:
        _STRUCTURE_OPS[op] = fn
        return fn
    return wrap


def replay_structure(model: nn.Module, edits: list[dict]) -> nn.Module:
    """Rebuild a compressed architecture from the factory's dense model (no pickle, no code from the file)."""
    _import_all()
    for edit in edits:
        op = edit.get("op")
        if op not in _STRUCTURE_OPS:
            raise NetdietError(f"unknown architecture edit '{op}' in archive; it was written by a newer netdiet")
        model = _STRUCTURE_OPS[op](model, edit)
    return model


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at dotted `name`; returns the (possibly new) root."""
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(get_submodule(model, parent_name), child, new)
    return model


def prunable_parameters(model: nn.Module, include_bias: bool = False) -> dict[str, torch.nn.Parameter]:
    """Weights of Linear / Conv / ConvTranspose / Embedding layers (what pruning and clustering act on)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Embedding)
    out: dict[str, torch.nn.Parameter] = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, kinds):
            prefix = f"{mod_name}." if mod_name else ""
            out[prefix + "weight"] = mod.weight
            if include_bias and getattr(mod, "bias", None) is not None:
                out[prefix + "bias"] = mod.bias
    return out


def check_name_patterns(technique: str, options: dict[str, Any], keys: tuple[str, ...] = ("layers", "exclude")) -> None:
    """`layers` / `exclude` options are None or lists of glob patterns over parameter names."""
    for key in keys:
        v = options[key]
        if v is not None and (not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v)):
            raise NetdietError(f"{technique}: {key} must be a list of parameter-name patterns, got {v!r}")


def select_by_patterns(technique: str, params: dict[str, torch.nn.Parameter], layers: list[str] | None,
                       exclude: list[str]) -> dict[str, torch.nn.Parameter]:
    """Keep the parameters matching any `layers` pattern (all when None) and none of the `exclude` patterns."""
    if layers is not None:
        params = {n: p for n, p in params.items() if any(fnmatch.fnmatchcase(n, pat) for pat in layers)}
    params = {n: p for n, p in params.items() if not any(fnmatch.fnmatchcase(n, pat) for pat in exclude)}
    if not params:
        raise NetdietError(f"{technique}: no parameter matches; check `layers`/`exclude` "
                           "(names as in model.named_parameters())")
    return params


def _import_all() -> None:
    """Import the technique modules so their @register_technique runs (missing ones are skipped)."""
    import importlib
    for mod in ("prune", "structured", "quantize", "cluster", "lowrank", "distill"):
        try:
            importlib.import_module(f"netdiet.compression.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"netdiet.compression.{mod}":
                raise
