"""`profile`: one call that gathers every cost figure of a model into a ProfileResult.

It resolves the model (a module or a spec) and its inputs, then asks each engine for its figures:
counter.count_ops (MACs/FLOPs per module and operator, forward, backward and optimizer step),
memory.estimate_memory (training and inference memory without allocating), storage.weight_storage,
and with `measure` measurement.measure_memory and latency.measure_latency; scaling.py adds batch sweeps, the
largest batch for a budget and dataset x epochs projections. This module computes no figure itself except
parameter totals; it orchestrates and turns bad input into one-line errors.

Why this module is long: besides the orchestration it holds the two things only the orchestration can decide,
and each needs every engine in view: which inputs a model is called with (prepare_call: positional, named and
dict inputs, their dtypes and integer ranges) and what is still known when an engine cannot run (training_count,
inference_memory, engine_failure: a frozen model, a model without a loss, a layer that fails in train mode, a
meta-device limit lose only the figures that depend on them, each with its one-line reason).
"""
from __future__ import annotations

import contextlib
import math
import re
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from netdiet.analysis import parallel as parallel_engine
from netdiet.analysis import scaling
from netdiet.analysis.counter import count_ops
from netdiet.analysis.latency import measure_latency
from netdiet.analysis.measurement import measure_memory
from netdiet.analysis.memory import MetaDeviceLimit, estimate_memory
from netdiet.analysis.passes import count_step
from netdiet.analysis.ram import available_ram, check_fits_in_ram, measure_copy_bytes
from netdiet.analysis.scaling import with_batch
from netdiet.analysis.step import DTYPE_NAMES, model_device, normalise_optimizer, parse_dtype
from netdiet.analysis.storage import weight_storage
from netdiet.environment import environment  # the one record of what decides the numbers (also every other result's)
from netdiet.errors import NetdietError
from netdiet.fileio import load_state_dict
from netdiet.models import create_model, default_inputs
from netdiet.models.inputs import (
    InputSpec,
    bind_inputs,
    collect_inputs,
    default_call,
    input_names,
    integer_range,
    masks_of_ones,
    materialise,
    structured_forward,
    text_input_dtype,
)
from netdiet.progress import progress_bar
from netdiet.units import format_bytes, parse_size

SCHEMA = "netdiet.profile/1"
# A spec whose weights alone exceed this is counted and estimated on the meta device (nothing allocated)
# unless the user asks to measure it.
META_THRESHOLD_BYTES = 1 << 30


@dataclass
class ProfileResult:
    """Everything `netdiet profile` reports. `to_dict()` is the netdiet.profile/1 JSON document."""

    model: dict[str, Any]
    inputs: list[dict[str, Any]]
    device: str
    depth: int | None
    totals: dict[str, Any]
    memory: dict[str, Any]
    modules: list[dict[str, Any]]
    operators: dict[str, dict[str, Any]]
    uncounted: dict[str, int]
    storage: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    scaling: Any = None            # scaling.ScalingResult
    max_batch: dict[str, Any] | None = None
    projection: Any = None         # scaling.Projection
    environment: dict[str, Any] = field(default_factory=dict)
    # the engines' own result objects, for Python users who want more than the document holds
    op_counts: Any = field(default=None, repr=False)
    memory_estimate: Any = field(default=None, repr=False)
    # why the training step's figures are missing (None: they are all there); inference figures are kept
    training_unavailable: str | None = None
    # --parallel: per-rank figures of the layout (analysis/parallel.py), None for a single-device profile
    distributed: dict[str, Any] | None = None
    # how the counts were made: where the training pass ran (device), and whether the inference forward was
    # derived from it or counted in a separate pass (and why), see passes.py
    counting: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "model": self.model,
            "inputs": self.inputs,
            "device": self.device,
            "depth": self.depth,
            "totals": self.totals,
            "memory": self.memory,
            "modules": self.modules,
            "operators": self.operators,
            "uncounted": self.uncounted,
            "counting": self.counting,
            "training_unavailable": self.training_unavailable,
            "storage": self.storage,
            "latency": self.latency,
            "environment": self.environment or environment(self.device),
        }
        if self.scaling is not None:
            doc["scaling"] = self.scaling.to_dict()
        if self.max_batch is not None:
            doc["max_batch"] = self.max_batch
        if self.projection is not None:
            doc["projection"] = self.projection.to_dict()
        if self.distributed is not None:
            doc["distributed"] = self.distributed
        return doc


# ------------------------------------------------------------------ argument checks
def normalise_dtype(dtype: str | torch.dtype | None) -> str | None:
    """None (keep the model's own precision), 'fp32', 'bf16' or 'fp16': the step's dtype (step.parse_dtype), named."""
    parsed = parse_dtype(dtype)
    return None if parsed is None else DTYPE_NAMES[parsed]


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape) if len(shape) else "scalar"


# ------------------------------------------------------------------ model and inputs
def resolve_model(model: nn.Module | str, model_kw: dict | None, *, seed: int,
                  before_real: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """(module, {spec, kwargs, class}).

    A spec is first built on the meta device (nothing allocated). `before_real(meta_model)` decides:
    it returns False to keep the meta model (too large to hold, nothing to measure) and may raise to refuse
    (e.g. a --measure run whose estimate exceeds the RAM); otherwise the real model is built with `seed`.
    `built_on` says where the spec was first built: "meta", or "cpu" when its constructor needs real data
    (`built_on_reason` says why; the size check before allocating is then not possible).
    """
    kwargs = dict(model_kw or {})
    if isinstance(model, nn.Module):
        if kwargs:
            raise NetdietError("model_kw applies to a model spec, not to an nn.Module; build the module with those arguments")
        return model, {"spec": None, "kwargs": {}, "class": type(model).__name__, "built_on": None}
    if not isinstance(model, str):
        raise NetdietError(f"model must be an nn.Module or a spec string, not {type(model).__name__}")
    try:
        with torch.device("meta"):
            meta_model = create_model(model, **kwargs)
    except NetdietError as meta_error:
        # a constructor that reads tensor values (.tolist(), .item()) cannot run on the meta device: build it
        # for real; if that fails too, the real build's error is the real cause
        torch.manual_seed(seed)
        built = create_model(model, **kwargs)
        cause = meta_error.__context__ or meta_error
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:160]
        return built, {"spec": model, "kwargs": kwargs, "class": type(built).__name__, "built_on": "cpu",
                       "built_on_reason": f"the constructor cannot run on the meta device ({type(cause).__name__}: "
                                          f"{first}); built on the CPU directly"}
    if before_real is not None and before_real(meta_model) is False:
        built = meta_model
    else:
        del meta_model
        torch.manual_seed(seed)
        built = create_model(model, **kwargs)
    return built, {"spec": model, "kwargs": kwargs, "class": type(built).__name__, "built_on": "meta"}


def load_weights(model: nn.Module, path: str, name: str) -> None:
    """Load a safetensors state dict into `model` (strict: every key must match)."""
    if model_device(model).type == "meta":
        raise NetdietError("weights cannot be loaded into a model on the meta device; give a real model")
    state = load_state_dict(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        raise NetdietError(f"{path} does not fit model '{name}': {str(exc).splitlines()[-1].strip()}; "
                           "give the weights of this model (and the same --model-kw)") from None
    if missing or unexpected:
        raise NetdietError(f"{path} does not fit model '{name}': missing {list(missing)[:3]}, unexpected "
                           f"{list(unexpected)[:3]}; give the weights of this model (and the same --model-kw)")


@dataclass
class PreparedInputs:
    """The call a model is profiled with: `args`/`kwargs` as forward receives them, `flat` the tensors the
    engines pass positionally (see models.inputs.structured_forward), `names` one per flat tensor."""

    args: list[Any]
    kwargs: dict[str, Any]
    names: list[str | None]
    note: str | None = None   # what the default inputs left out and why (an hf: mask on the meta device)

    @property
    def flat(self) -> tuple[torch.Tensor, ...]:
        return tuple(tree_flatten((self.args, self.kwargs))[0])

    def records(self, flat: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
        """The JSON `inputs`: one {name?, shape, dtype} per tensor, as given to the model."""
        out = []
        for name, t in zip(self.names, flat):
            row: dict[str, Any] = {"name": name} if name else {}
            row.update({"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")})
            out.append(row)
        return out


def prepare_call(inputs: Any, spec: str | None, model_kw: dict | None, batch_size: int | None,
                 device: torch.device, seed: int, model: nn.Module | None = None,
                 seq_len: int | None = None) -> PreparedInputs:
    """The call to profile `model` with, on `device`: from a tensor, a tuple of tensors, a dict of named tensors,
    shape(s), 'SHAPE[:DTYPE]' / 'NAME=SHAPE[:DTYPE]' text, InputSpecs, or the spec's default (inputs None: the
    zoo entry's input; for hf: input_ids and attention_mask of batch 1 x `seq_len`, see models.hub).

    Integer inputs are drawn in [0, N): N from the spec (--input-range), else the zoo model's vocabulary, else
    the model's config.vocab_size or the num_embeddings of its first nn.Embedding, else 2; integer inputs named
    *mask are ones."""
    if batch_size is not None and int(batch_size) <= 0:
        raise NetdietError(f"batch size must be positive, got {batch_size}")
    dtype, high = torch.float32, None
    is_zoo = spec is not None and ":" not in spec and not spec.endswith(".py")
    if is_zoo:  # shapes given for a zoo model take its input dtype (token ids for the transformer)
        _, dtype, high = default_inputs(spec, model_kw)
    dtype = text_input_dtype(spec, model) or dtype  # shapes given for an hf: text model are token ids
    if seq_len is not None and (inputs is not None or spec is None or not spec.startswith("hf:")):
        raise NetdietError("--seq-len sets the length of an hf: model's default inputs; "
                           + ("with --input, give the length in its shape" if inputs is not None
                              else "give this model an --input shape instead"))
    note = None
    if inputs is None:
        inputs, dtype, high, note = default_call(spec, model, model_kw, seq_len)
    if high is None:
        high = integer_range(model)
    args, kwargs = collect_inputs(inputs)
    kwargs = masks_of_ones(kwargs, dtype)
    check_inputs_fit(args, kwargs, dtype, batch_size, device)
    args, kwargs = materialise(args, kwargs, dtype=dtype, high=high, device=device, seed=seed)
    if model is not None:
        args, kwargs = bind_inputs(model, args, kwargs)
    if batch_size is not None:
        leaves, tree = tree_flatten((args, kwargs))
        args, kwargs = tree_unflatten(list(with_batch(leaves, int(batch_size))), tree)
    return PreparedInputs(list(args), dict(kwargs), input_names(args, kwargs), note)


def check_inputs_fit(args: list[Any], kwargs: dict[str, Any], dtype: torch.dtype, batch_size: int | None,
                     device: torch.device) -> None:
    """Refuse (one line) input shapes whose tensors could not be made on a real device: their bytes (at
    `batch_size` when given) above the RAM available. On the meta device nothing is allocated, so any size passes."""
    if device.type == "meta":
        return
    avail = available_ram()
    if avail is None:
        return
    leaves = [leaf for leaf in tree_flatten((list(args), dict(kwargs)))[0] if isinstance(leaf, InputSpec)]
    total, largest = 0, None
    for leaf in leaves:
        shape = tuple(int(d) for d in leaf.shape)  # made at its own shape first, then cut or repeated to the batch
        if batch_size is not None and shape and int(batch_size) > shape[0]:
            shape = (int(batch_size), *shape[1:])
        size = math.prod(shape) * torch.empty((), dtype=leaf.dtype or dtype).element_size()
        total += size
        if largest is None or size > largest[0]:
            largest = (size, shape)
    if largest is not None and total > avail:
        raise NetdietError(f"the input {_shape_text(largest[1])} needs {format_bytes(largest[0])}"
                           f"{f' ({format_bytes(total)} for all inputs)' if len(leaves) > 1 else ''} but only "
                           f"{format_bytes(avail)} of RAM is available; give a smaller --input shape or --batch-size")


def prepare_inputs(inputs: Any, spec: str | None, model_kw: dict | None, batch_size: int | None,
                   device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    """The flat input tensors of `prepare_call` (for positional inputs: the tuple forward takes)."""
    return prepare_call(inputs, spec, model_kw, batch_size, device, seed).flat


# ------------------------------------------------------------------ which layer an input does not fit
class _ModuleTracker:
    """Forward pre-hooks that remember which module is running and what it was given.

    When a forward raises, the innermost module still on the stack is the one that failed.
    """

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[tuple[str, nn.Module, list[tuple[int, ...]]]] = []
        self.dtypes: dict[str, list[torch.dtype]] = {}   # of the latest call of each module
        self.handles = []
        for name, mod in model.named_modules():
            self.handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self.handles.append(mod.register_forward_hook(self._post))

    def _pre(self, name: str):
        def hook(mod: nn.Module, args: tuple) -> None:
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            self.dtypes[name] = [a.dtype for a in args if isinstance(a, torch.Tensor)]
            self.stack.append((name, mod, shapes))
        return hook

    def _post(self, mod: nn.Module, args: tuple, out: Any) -> None:
        if self.stack and self.stack[-1][1] is mod:
            self.stack.pop()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def describe_misfit(model_inputs: Sequence[torch.Tensor], name: str, mod: nn.Module, shapes: list[tuple[int, ...]],
                    exc: BaseException, dtypes: Sequence[torch.dtype] = ()) -> str:
    """One line: which input does not fit which layer, with both shapes (and the dtype when that is the misfit)."""
    given = ", ".join(_shape_text(t.shape) for t in model_inputs)
    if isinstance(mod, nn.Embedding) and dtypes and dtypes[0].is_floating_point:
        ids = "x".join(str(d) for d in shapes[0]) if shapes else "SHAPE"
        return (f"layer '{name or type(mod).__name__}' (Embedding) takes integer token ids but got a "
                f"{str(dtypes[0]).replace('torch.', '')} input {ids}; give the input an integer dtype, "
                f"e.g. --input {ids.replace('x', ',')}:int64")
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point() and dtypes and dtypes[0].is_floating_point \
            and dtypes[0] != w.dtype:
        have, want = (str(d).replace("torch.", "") for d in (dtypes[0], w.dtype))
        return (f"layer '{name or type(mod).__name__}' ({type(mod).__name__}) has {want} weights but got a {have} "
                f"input; give the input as :{want} (e.g. --input {','.join(str(d) for d in shapes[0]) if shapes else 'SHAPE'}"
                f":{want}), or cast the model")
    if is_meta_limit(exc) and any(t.device.type == "meta" for t in model_inputs):
        layer = f"layer '{name}' ({type(mod).__name__})" if name else f"model {type(mod).__name__}"
        return (f"{layer} cannot run on the meta device: its forward reads tensor values or uses an op without a "
                f"meta kernel ({_first_line(exc)}); this is a meta-device limit, not a bad input: profile a real "
                "model (a spec under 1 GiB of weights, or --measure)")
    layer = f"layer '{name}'" if name else f"model {type(mod).__name__}"
    x = shapes[0] if shapes else None
    kind = type(mod).__name__
    weight = getattr(mod, "weight", None)
    wshape = f"weight {_shape_text(weight.shape)}" if isinstance(weight, torch.Tensor) else None
    got = f"layer input {_shape_text(x)}" if x is not None else None
    detail = None
    if isinstance(mod, nn.modules.conv._ConvNd) and x is not None and len(x) >= 2:
        want = mod.in_channels
        have = x[1] if len(x) == mod.weight.dim() else x[0]
        if have != want:
            detail = f"{kind} expects {want} input channel{'s' if want != 1 else ''}, got {have}"
    elif isinstance(mod, nn.Linear) and x is not None and x[-1] != mod.in_features:
        detail = f"Linear expects {mod.in_features} input features, got {x[-1]}"
    elif isinstance(mod, nn.modules.batchnorm._NormBase) and x is not None and len(x) >= 2 and x[1] != mod.num_features:
        detail = f"{kind} expects {mod.num_features} channels, got {x[1]}"
    elif isinstance(mod, nn.LayerNorm) and x is not None and tuple(x[-len(mod.normalized_shape):]) != tuple(mod.normalized_shape):
        detail = f"LayerNorm expects trailing size {_shape_text(mod.normalized_shape)}, got {_shape_text(x)}"
    if detail is None:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # an engine may have wrapped the forward's own message: keep only the forward's words
        msg = re.sub(r"^running the model on the given inputs failed: |; check the input shape and dtype$", "", msg)
        detail = f"{kind}: {msg[:200]}"
    if not name:
        got = None  # the model's own input: already named at the start
    extras = "; ".join(s for s in (wshape, got) if s)
    return (f"input {given} does not fit {layer} ({detail}{'; ' + extras if extras else ''}); "
            "give an --input shape that matches the model")


@contextlib.contextmanager
def input_fit_check(model: nn.Module, model_inputs: Sequence[torch.Tensor]) -> Iterator[None]:
    """Turn a forward's shape error into a NetdietError that names the layer and both shapes."""
    tracker = _ModuleTracker(model)
    try:
        with warnings.catch_warnings():
            # torch warns that a hook with always_call=True failed while the forward was already failing;
            # the forward's error is the one the user needs
            warnings.filterwarnings("ignore", message=r".*always_call=True.*raised an exception")
            yield
    except (NetdietError, RuntimeError, ValueError, IndexError, TypeError, AssertionError) as exc:
        # an engine may already have turned the forward's error into a generic NetdietError; while a module
        # is still on the stack we know better which layer it was
        if not tracker.stack:
            raise
        name, mod, shapes = tracker.stack[-1]
        raise NetdietError(describe_misfit(model_inputs, name, mod, shapes, exc, tracker.dtypes.get(name, ()))) from exc
    finally:
        tracker.remove()


# ------------------------------------------------------------------ figures from the model itself
def parameter_totals(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())  # shared parameters appear once
    return {
        "params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers()),
    }


def _module_rows(counts: Any, estimate: Any, depth: int | None, inference: Any = None) -> list[dict[str, Any]]:
    if counts is None:  # no training step: the inference rows, with the training figures unknown
        rows = _module_rows(inference, estimate, depth, inference)
        for row in rows:
            row.update({"train_forward_flops": None, "backward_macs": None, "backward_flops": None,
                        "activation_bytes": None, "activation_bytes_self": None})
        return rows
    rows = _module_rows_of(counts, estimate, depth, inference)
    if estimate is None:  # no memory estimate: the saved activations are unknown, not zero
        for row in rows:
            row.update({"activation_bytes": None, "activation_bytes_self": None})
    return rows


def _module_rows_of(counts: Any, estimate: Any, depth: int | None, inference: Any = None) -> list[dict[str, Any]]:
    """One row per module (to `depth`). Forward MACs/FLOPs are the inference (eval-mode) pass when `inference`
    is given, backward figures come from the training step. Costs are inclusive of submodules, as the counter reports them;
    the memory engine attributes each saved activation to the one module that saved it, so its figures are
    summed over each module's subtree here to be inclusive too (`activation_bytes_self` keeps the own part)."""
    own = dict(getattr(estimate, "module_activations", None) or {})
    module_names = {m.name for m in counts.modules if not m.name.startswith("<")}
    outside = sum(int(n) for name, n in own.items() if name not in module_names)
    own = {name: n for name, n in own.items() if name in module_names}
    for m in counts.modules:
        if m.name.startswith("<"):  # the counter's loss row: what was saved outside the module tree
            own[m.name] = outside
    inclusive: dict[str, int] = {}
    for name, nbytes in own.items():
        if name.startswith("<"):
            continue
        parts = name.split(".") if name else []
        for i in range(len(parts) + 1):
            key = ".".join(parts[:i])
            inclusive[key] = inclusive.get(key, 0) + int(nbytes)
    forward = {m.name: m for m in inference.modules} if inference is not None else {}
    rows = []
    for m in counts.modules:
        if depth is not None and m.depth > depth:
            continue
        fwd = forward.get(m.name, m)
        rows.append({
            "name": m.name, "type": m.type, "depth": m.depth,
            "params": int(m.params), "param_bytes": int(m.param_bytes),
            "macs": int(fwd.macs), "flops": int(fwd.flops),
            "train_forward_flops": int(m.flops),
            "backward_macs": int(m.backward_macs), "backward_flops": int(m.backward_flops),
            "activation_bytes": inclusive.get(m.name, 0) if not m.name.startswith("<") else int(own.get(m.name, 0)),
            "activation_bytes_self": int(own.get(m.name, 0)),
            "output_shape": _plain_shape(m.output_shape),
        })
    return rows


def _plain_shape(shape: Any) -> Any:
    if shape is None:
        return None
    if isinstance(shape, (tuple, list, torch.Size)):
        return [_plain_shape(s) if isinstance(s, (tuple, list, torch.Size)) else int(s) for s in shape]
    return shape


MEMORY_KEYS = ("batch_size", "optimizer", "dtype", "amp", "checkpointing", "weights", "buffers", "gradients",
               "optimizer_state", "activations", "temporaries", "peak_estimated", "inference_peak")
TRAINING_MEMORY_KEYS = ("gradients", "optimizer_state", "activations", "temporaries", "peak_estimated")


def _memory_section(estimate: Any, measured: dict | None, inference: Any = None, unavailable: str | None = None,
                    batch: int | None = None, mem_kw: dict | None = None) -> dict[str, Any]:
    """The memory figures. Without a training estimate, the inference-only estimate gives weights, buffers and
    the inference peak and the training parts are None; `not_estimated` says why (None when all is there)."""
    source = estimate if estimate is not None else inference
    out = {k: _plain(getattr(source, k, None)) for k in MEMORY_KEYS}
    if estimate is None:
        kw = mem_kw or {}
        out.update({k: None for k in TRAINING_MEMORY_KEYS})
        out.update({"batch_size": batch, "optimizer": kw.get("optimizer"), "amp": bool(kw.get("amp")),
                    "checkpointing": bool(kw.get("checkpointing"))})
        if inference is None:
            out["dtype"] = kw.get("dtype")
    out["not_estimated"] = None if estimate is not None else (
        f"training memory not estimated: {unavailable}" if inference is not None else f"not estimated: {unavailable}")
    breakdown = getattr(estimate, "peak_breakdown", None)
    out["peak_breakdown"] = {k: int(v) for k, v in breakdown.items()} if breakdown else None
    out["peak_phase"] = getattr(estimate, "peak_phase", None)
    for extra in ("recompute_flops", "checkpointing_saved"):
        if hasattr(estimate, extra):
            out[extra] = _plain(getattr(estimate, extra))
    # which CPU's kernel-scratch rules priced the step, and the kernels no rule covers (counted as 0 bytes)
    # where the step was simulated: "meta", or "cpu" when a value-dependent op stopped the meta simulation
    out["simulation"] = getattr(source, "simulation", None)
    out["simulation_reason"] = getattr(source, "simulation_reason", None)
    out["cpu_rules"] = getattr(source, "cpu_rules", None) or None
    out["unmodelled"] = list(getattr(source, "unmodelled", None) or [])
    out["warnings"] = list(getattr(source, "warnings", None) or [])
    out["peak_measured"] = None
    out["inference_peak_measured"] = None
    out["measure_method"] = None
    if measured:
        out["peak_measured"] = _plain(measured.get("peak_measured"))
        out["inference_peak_measured"] = _plain(measured.get("inference_peak_measured"))
        out["measure_method"] = measured.get("method")
        out["measure_device"] = measured.get("device")
        if out["peak_measured"] and out["peak_estimated"]:
            out["estimate_error"] = (out["peak_estimated"] - out["peak_measured"]) / out["peak_measured"]
    return out


# ------------------------------------------------------------------ what cannot be known, in one line
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    first = re.sub(r"^running the model on the given inputs failed: |; check the input shape and dtype$", "", first)
    return first[:240]


def is_meta_limit(exc: BaseException) -> bool:
    """The error is the meta device's (a tensor value read with .item()/.tolist(), an op without a meta kernel)."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if isinstance(seen, NotImplementedError) or "meta tensor" in text or "Cannot copy out of meta" in text \
                or "'meta'" in text or "on the meta device" in text.lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def engine_failure(exc: BaseException, what: str) -> str:
    """One line for an engine that could not run: a meta-device limit is named as such, not as bad input."""
    if is_meta_limit(exc):
        return (f"{what} cannot run this model: the forward reads tensor values or uses an op the meta device "
                f"does not have ({_first_line(exc)})")
    return f"{what} failed ({_first_line(exc)})"


def training_count(net: nn.Module, x: Sequence[torch.Tensor], optimizer: str,
                   derive: bool = False) -> tuple[Any, str | None]:
    """(the training-step count, None), or (None, why the training step cannot run) - the inference figures
    stand either way. No trainable parameter, no loss, or a layer that fails in train mode (batch norm at
    batch 1) make the training step impossible, not the profile. With `derive`, a third item: the inference
    counts derived from the same pass (passes.count_step; None when they need a pass of their own), and a fourth:
    how the counting ran (the profile's `counting` section)."""
    def result(counts: Any, why: str | None, inference: Any = None, how: dict | None = None) -> tuple:
        return (counts, why, inference, how) if derive else (counts, why)

    if not any(p.requires_grad for p in net.parameters()):
        return result(None, "the model has no trainable parameter (every parameter is frozen, or it has none): "
                            "there is no training step to count")
    failure: BaseException | None = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*always_call=True.*raised an exception")
            counts, inference, how = count_step(net, tuple(x), optimizer, derive=derive)
    except (NetdietError, RuntimeError, ValueError, IndexError, TypeError, AssertionError, NotImplementedError) as exc:
        failure = exc
    if failure is not None:
        # counted again on the real tensors with a layer tracker, to name the layer that failed
        tracker = _ModuleTracker(net)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*always_call=True.*raised an exception")
                count_ops(net, x, train=True, optimizer=optimizer, meta=False)
        except (NetdietError, RuntimeError, ValueError, IndexError, TypeError, AssertionError, NotImplementedError) as exc:
            failure = exc
        finally:
            tracker.remove()
        where = ""
        if tracker.stack and tracker.stack[-1][0]:
            where = f" in layer '{tracker.stack[-1][0]}' ({type(tracker.stack[-1][1]).__name__})"
        msg = _first_line(failure)
        hint = "; profile with --batch-size 2 or more for the training figures" \
            if "more than 1 value per channel" in msg else ""
        return result(None, f"the training step fails{where} in train mode: {msg}{hint}")
    if any("nothing to back-propagate" in n for n in counts.notes):
        return result(None, "no floating-point output depends on a trainable parameter, so there is no loss to "
                            "back-propagate: no training step to count")
    return result(counts, None, inference, how)


def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def _constant_loss(output: Any) -> torch.Tensor:
    return torch.zeros((), device="meta")


def real_step_bound(net: nn.Module, x: Sequence[torch.Tensor], counts: Any) -> int | None:
    """An upper bound of the bytes a real-tensor step of `net` allocates (memory.estimate_memory's fallback when a
    value-dependent op stops the meta simulation): the model's copy, the inputs, and twice every byte the counted
    step's ops write (step 1 creates the optimizer state, step 2 runs beside it). None without a count."""
    if counts is None:
        return None
    inputs = sum(t.numel() * t.element_size() for t in x)
    return measure_copy_bytes(net) + inputs + 2 * int(counts.bytes_written)


def inference_memory(net: nn.Module, x: Sequence[torch.Tensor], dtype: str | None, amp: bool,
                     real_step_bytes: int | None = None) -> Any:
    """The memory estimate's inference part alone, for a model whose training step cannot run.

    estimate_memory simulates the eval-mode forward first, then training steps; here the model's copy is kept in
    eval mode with a constant loss and no optimizer, so the training simulation cannot fail, and only the
    weights, buffers and inference peak of the result are used (they are computed exactly as in a full estimate)."""
    had = "train" in net.__dict__
    previous = net.__dict__.get("train")
    net.train = types.MethodType(_eval_only_train, net)
    try:
        return estimate_memory(net, x, optimizer="none", dtype=dtype, amp=amp, checkpointing=False,
                               loss_fn=_constant_loss, real_step_bytes=real_step_bytes)
    finally:
        if had:
            net.__dict__["train"] = previous
        else:
            net.__dict__.pop("train", None)


def _plain(v: Any) -> Any:
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, bool) or v is None or isinstance(v, (str, float)):
        return v
    if isinstance(v, int):
        return int(v)
    return str(v)


def _operators(counts: Any) -> dict[str, dict[str, Any]]:
    return {op: {k: (int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in row.items()}
            for op, row in sorted(counts.operators.items())}


def _throughput(latency: dict | None) -> tuple[float | None, str | None]:
    """Training samples per second from the measured latency (batch / median training-step time)."""
    if latency and latency.get("train_throughput_samples_per_s"):
        return float(latency["train_throughput_samples_per_s"]), "latency.train_throughput_samples_per_s"
    return None, None


# ------------------------------------------------------------------ the orchestration
def profile(model: nn.Module | str, inputs: Any = None, *, model_kw: dict | None = None, batch_size: int | None = None,
            optimizer: str = "adam", depth: int | None = None, measure: bool = False, force: bool = False,
            dtype: str | torch.dtype | None = None, amp: bool = False, checkpointing: bool = False,
            batch_sizes: Sequence[int] | None = None, max_batch_for: int | str | None = None,
            dataset_size: int | None = None, epochs: int | None = None, seed: int = 0,
            warmup: int = 2, repeats: int = 10, progress: bool = True, weights: str | None = None,
            seq_len: int | None = None, parallel: str | None = None, world_size: int | None = None,
            tp: int | None = None, target_device: str | None = None) -> ProfileResult:
    """Profile a model: see the module docstring. Bad input raises NetdietError (one line).

    `seq_len` is the length of an hf: spec's default inputs (input_ids, attention_mask; default 128).

    `weights` (a safetensors file, never a pickle) loads trained or pruned weights first, so the storage
    figures show the model's real sparsity.
    """

    optimizer = normalise_optimizer(optimizer)
    dtype_name = normalise_dtype(dtype)
    # --parallel: the layout is checked before anything is built (strategy, world size, TP degree, device name)
    layout = parallel_engine.parse_layout(parallel, world_size, tp, target_device)
    if depth is not None and int(depth) < 0:
        raise NetdietError(f"depth must be 0 or more, got {depth}")
    budget = parse_size(max_batch_for) if max_batch_for is not None else None
    if (dataset_size is None) != (epochs is None):
        raise NetdietError("a training projection needs both --dataset-size and --epochs")
    if batch_sizes is not None:
        batch_sizes = [int(b) for b in batch_sizes]
        if not batch_sizes or any(b <= 0 for b in batch_sizes):
            raise NetdietError(f"batch sizes must be positive integers, got {batch_sizes}; give e.g. --batch-sizes 1,8,32")
    if warmup < 0 or repeats < 1:
        raise NetdietError(f"warmup must be >= 0 and repeats >= 1, got {warmup} and {repeats}")

    mem_kw = dict(optimizer=optimizer, dtype=dtype_name, amp=amp, checkpointing=checkpointing)
    early: dict[str, Any] = {}   # the estimate made before building a spec for real (it depends on shapes only)

    def before_real(meta_model: nn.Module) -> bool:
        """Keep a large spec on the meta device; refuse a --measure that would not fit before allocating it."""
        if not measure:
            small = sum(p.numel() * p.element_size() for p in meta_model.parameters()) <= META_THRESHOLD_BYTES
            return small or weights is not None
        meta_call = prepare_call(inputs, model if isinstance(model, str) else None, model_kw, batch_size,
                                 torch.device("meta"), seed, model=meta_model, seq_len=seq_len)
        with structured_forward(meta_model, meta_call.args, meta_call.kwargs) as x_meta:
            try:
                first = estimate_memory(meta_model, x_meta, **mem_kw)
            except NetdietError:
                return True  # the profile below says why the estimate cannot be made
        # the measured run trains a deep copy: the estimated peak plus the model's own weights and buffers
        check_fits_in_ram(int(first.peak_estimated) + measure_copy_bytes(meta_model), force)
        early["estimate"], early["shapes"] = first, [(tuple(t.shape), t.dtype) for t in x_meta]
        return True

    net, model_info = resolve_model(model, model_kw, seed=seed, before_real=before_real)
    if weights is not None:
        load_weights(net, weights, model_info["spec"] or model_info["class"])
        model_info["weights"] = str(weights)
    device = model_device(net)
    if measure and device.type == "meta":
        raise NetdietError("the model is on the meta device, so nothing can be measured; drop --measure or give a real model")
    spec = model_info["spec"]
    call = prepare_call(inputs, spec, model_kw, batch_size, device, seed, model=net, seq_len=seq_len)
    if call.note:
        model_info["inputs_note"] = call.note
    stack = contextlib.ExitStack()
    x = stack.enter_context(structured_forward(net, call.args, call.kwargs))
    batch = int(x[0].shape[0]) if x and x[0].dim() else 1

    steps = (2 + (2 if measure else 0) + len(batch_sizes or []) * (2 if measure else 1)
             + (1 if budget is not None else 0))
    bar = progress_bar(steps, "profile") if progress else None

    def tick() -> None:
        if bar:
            bar.advance()

    try:
        if layout is not None:   # a layout the batch or the heads do not divide is refused before any pass runs
            parallel_engine.check_model(layout, net, batch)
        was_training = net.training
        # Forward figures are reported for inference (eval mode), as papers and peers report them:
        # in training mode batch norm computes batch statistics and dropout draws masks, which costs more.
        # One training pass gives both where the two forwards differ only in those layers (passes.py); otherwise,
        # or when the step cannot run, the inference forward is counted alone, and when that fails the inputs
        # do not fit the model.
        counts, training_unavailable, inference_counts, counting = training_count(net, x, optimizer, derive=True)
        if inference_counts is None:
            with input_fit_check(net, x):
                inference_counts = count_ops(net, x, train=False)
            if counting is None:
                counting = {"device": None, "inference_forward": "separate pass", "recounted_calls": 0,
                            "reason": "no training step to derive it from", "fallback": None}
            counting["reason"] = counting.get("reason") or "no training step to derive it from"
        for p in net.parameters():
            p.grad = None
        tick()
        estimate, memory_unavailable = None, None
        if training_unavailable is None and early.get("shapes") == [(tuple(t.shape), t.dtype) for t in x]:
            estimate = early["estimate"]
        elif training_unavailable is None:
            try:
                estimate = estimate_memory(net, x, **mem_kw, real_step_bytes=real_step_bound(net, x, counts))
            except NetdietError as exc:
                memory_unavailable = engine_failure(exc, "the meta-device memory estimate")
        inference_estimate = estimate
        if estimate is None:
            try:
                inference_estimate = inference_memory(net, x, dtype_name, amp,
                                                      real_step_bound(net, x, inference_counts))
            except NetdietError as exc:
                memory_unavailable = memory_unavailable or engine_failure(exc, "the meta-device memory estimate")
        tick()
        net.train(was_training)
        # the batch sweep, the budget search and the projection need the training step and its memory
        if (training_unavailable or memory_unavailable) and (batch_sizes or budget is not None or dataset_size is not None):
            note = "; so the batch sweep, --max-batch-for and the projection (which need them) were skipped"
            if training_unavailable:
                training_unavailable += note
            else:
                memory_unavailable += note
            batch_sizes, budget, dataset_size = None, None, None

        measured = latency = None
        if measure:
            if estimate is not None:
                check_fits_in_ram(int(estimate.peak_estimated) + measure_copy_bytes(net), force)
                measured = measure_memory(net, x, **mem_kw)
            tick()
            lat = measure_latency(net, x, train=training_unavailable is None, optimizer=optimizer, warmup=warmup,
                                  repeats=repeats)
            latency = lat.to_dict() if hasattr(lat, "to_dict") else dict(lat)
            tick()
            net.train(was_training)

        storage = None
        if device.type != "meta":
            storage = weight_storage(net)

        # every figure at the profiled batch is already known: the sweep and the budget search reuse it
        estimates, op_counts, measurements = {batch: estimate}, {batch: counts}, {batch: measured}

        def count_at(model: nn.Module, inputs: Any, **kw: Any) -> Any:
            b = int(inputs[0].shape[0])
            if b not in op_counts:
                op_counts[b] = count_ops(model, inputs, **kw)
            return op_counts[b]

        def estimate_at(model: nn.Module, inputs: Any, **kw: Any) -> Any:
            b = int(inputs[0].shape[0])
            if b not in estimates:
                try:
                    estimates[b] = estimate_memory(model, inputs, **kw)
                except MetaDeviceLimit:
                    if any(t.device.type == "meta" for t in inputs):
                        # the budget search passes meta inputs; a value-dependent forward needs the real ones
                        inputs = real_inputs_at(b, inputs)
                    bound = real_step_bound(model, inputs, count_at(model, inputs, train=True, optimizer=optimizer))
                    estimates[b] = estimate_memory(model, inputs, **kw, real_step_bytes=bound)
            return estimates[b]

        def real_inputs_at(b: int, meta_inputs: Any) -> Any:
            """The profiled inputs at batch `b` (real: a forward that reads their values needs them; the step
            itself still runs on meta, with their real twins, see meta_values.py), refused (as the meta limit) when
            they would not fit in RAM. A forward that needs a real-tensor step is guarded by estimate_memory."""
            avail = available_ram()
            if device.type == "meta":
                raise MetaDeviceLimit("the memory search runs on meta inputs and the forward reads tensor values; "
                                      "no real-tensor step can stand in here")
            need = scaling.batch_input_bytes(x, b)
            if avail is not None and need > avail:
                raise MetaDeviceLimit(f"the inputs at batch {b} (the forward reads their values, so they must be "
                                      f"real) would need {format_bytes(need)} but only {format_bytes(avail)} of "
                                      f"RAM is available; give a smaller budget")
            return with_batch(x, b)

        sweep = None
        if batch_sizes:
            sweep = scaling.sweep_batch_sizes(
                net, x, batch_sizes, measure=False, counter=count_at, estimator=estimate_at,
                on_point=lambda _p: tick(), **mem_kw)
            if measure:
                check_fits_in_ram(max(p.peak_estimated for p in sweep.points) + measure_copy_bytes(net), force)
                for point in sweep.points:
                    m = measurements.get(point.batch_size) or measure_memory(
                        net, scaling.with_batch(x, point.batch_size), **mem_kw)
                    point.peak_measured = scaling._int_or_none(m.get("peak_measured"))
                    point.inference_peak_measured = scaling._int_or_none(m.get("inference_peak_measured"))
                    tick()
                sweep.refit()
                net.train(was_training)

        max_batch = None
        if budget is not None:
            best, best_est = scaling.largest_batch_within(net, scaling.with_batch(x, 1), dtype_name, budget,
                                                          estimator=estimate_at, **{k: v for k, v in mem_kw.items()
                                                                                        if k != "dtype"})
            max_batch = {"budget": budget, "batch_size": best, "peak_estimated": int(best_est.peak_estimated),
                         "fits": best > 0, "capped": best >= scaling.MAX_BATCH}
            if sweep is not None:
                sweep.budget_bytes = budget
            tick()
            net.train(was_training)

        distributed = None
        if layout is not None:
            distributed = parallel_engine.analyse(
                layout, net, x, counts=counts, estimate=estimate, estimate_at=estimate_at, mem_kw=mem_kw,
                measure=measure, unavailable=training_unavailable or memory_unavailable)
            net.train(was_training)
    finally:
        stack.close()
        if bar:
            bar.close()

    projection = None
    if dataset_size is not None:
        sps, source = _throughput(latency)
        projection = scaling.project_training(int(counts.train_flops), batch, int(dataset_size), int(epochs),
                                              samples_per_second=sps, throughput_source=source)

    totals = parameter_totals(net)
    trained = counts is not None
    totals.update({
        "macs": int(inference_counts.macs), "flops": int(inference_counts.flops),
        "train_forward_flops": int(counts.flops) if trained else None,
        "backward_macs": int(counts.backward_macs) if trained else None,
        "backward_flops": int(counts.backward_flops) if trained else None,
        "optimizer": counts.optimizer if trained else optimizer,
        "optimizer_flops": int(counts.optimizer_flops) if trained else None,
        "train_flops": int(counts.train_flops) if trained else None,
    })
    shown = counts if trained else inference_counts
    return ProfileResult(
        model=model_info,
        inputs=call.records(x),
        device=device.type,
        depth=None if depth is None else int(depth),
        totals=totals,
        memory=_memory_section(estimate, measured, inference_estimate, memory_unavailable or training_unavailable,
                               batch, mem_kw),
        modules=_module_rows(counts, estimate, depth, inference_counts),
        operators=_operators(shown),
        uncounted={op: int(n) for op, n in sorted(shown.uncounted.items())},
        storage=storage,
        latency=latency,
        scaling=sweep,
        max_batch=max_batch,
        projection=projection,
        environment=environment(device),
        op_counts=counts if trained else inference_counts,
        memory_estimate=estimate,
        training_unavailable=training_unavailable,
        distributed=distributed,
        counting=counting,
    )
