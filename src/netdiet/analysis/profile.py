"""`profile`: one call that gathers every cost figure of a model into a ProfileResult.

It resolves the model (a module or a spec) and its inputs, then asks each engine for its figures:
counter.count_ops (MACs/FLOPs per module and operator, forward, backward and optimizer step),
memory.estimate_memory (training and inference memory without allocating), storage.weight_storage,
and with `measure` measurement.measure_memory and latency.measure_latency; scaling.py adds batch sweeps, the
largest batch for a budget and dataset x epochs projections. This module computes no figure itself except
parameter totals; it orchestrates and turns bad input into one-line errors.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from netdiet.analysis import scaling
from netdiet.analysis.counter import count_ops
from netdiet.analysis.latency import measure_latency
from netdiet.analysis.measurement import measure_memory
from netdiet.analysis.memory import estimate_memory
from netdiet.analysis.ram import check_fits_in_ram, measure_copy_bytes
from netdiet.analysis.scaling import with_batch
from netdiet.analysis.storage import weight_storage
from netdiet.environment import environment  # the one record of what decides the numbers (also every other result's)
from netdiet.errors import NetdietError
from netdiet.fileio import load_state_dict
from netdiet.models import create_model, default_inputs, make_inputs
from netdiet.progress import progress_bar
from netdiet.units import parse_shape, parse_size

SCHEMA = "netdiet.profile/1"
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "none")
DTYPES = {"fp32": "fp32", "float32": "fp32", "float": "fp32",
          "bf16": "bf16", "bfloat16": "bf16",
          "fp16": "fp16", "float16": "fp16", "half": "fp16"}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
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
        return doc


# ------------------------------------------------------------------ argument checks
def normalise_optimizer(name: str | None) -> str:
    key = "none" if name is None else str(name).lower()
    if key not in OPTIMIZERS:
        raise NetdietError(f"unknown optimizer '{name}'; choose one of {', '.join(OPTIMIZERS)}")
    return key


def normalise_dtype(dtype: str | torch.dtype | None) -> str | None:
    """None (keep the model's own precision), 'fp32', 'bf16' or 'fp16'."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        for name, td in TORCH_DTYPES.items():
            if td == dtype:
                return name
        raise NetdietError(f"dtype {dtype} is not supported for profiling; choose fp32, bf16 or fp16")
    key = str(dtype).lower()
    if key not in DTYPES:
        raise NetdietError(f"unknown dtype '{dtype}'; choose fp32, bf16 or fp16")
    return DTYPES[key]


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape) if len(shape) else "scalar"


# ------------------------------------------------------------------ model and inputs
def resolve_model(model: nn.Module | str, model_kw: dict | None, *, seed: int,
                  before_real: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """(module, {spec, kwargs, class}).

    A spec is first built on the meta device (nothing allocated). `before_real(meta_model)` decides:
    it returns False to keep the meta model (too large to hold, nothing to measure) and may raise to refuse
    (e.g. a --measure run whose estimate exceeds the RAM); otherwise the real model is built with `seed`.
    """
    kwargs = dict(model_kw or {})
    if isinstance(model, nn.Module):
        if kwargs:
            raise NetdietError("model_kw applies to a model spec, not to an nn.Module; build the module with those arguments")
        return model, {"spec": None, "kwargs": {}, "class": type(model).__name__}
    if not isinstance(model, str):
        raise NetdietError(f"model must be an nn.Module or a spec string, not {type(model).__name__}")
    with torch.device("meta"):
        meta_model = create_model(model, **kwargs)
    if before_real is not None and before_real(meta_model) is False:
        built = meta_model
    else:
        del meta_model
        torch.manual_seed(seed)
        built = create_model(model, **kwargs)
    return built, {"spec": model, "kwargs": kwargs, "class": type(built).__name__}


def load_weights(model: nn.Module, path: str, name: str) -> None:
    """Load a safetensors state dict into `model` (strict: every key must match)."""
    if _model_device(model).type == "meta":
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


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _is_shape(x: Any) -> bool:
    return isinstance(x, (tuple, list, torch.Size)) and len(x) > 0 and all(isinstance(d, int) for d in x)


def prepare_inputs(inputs: Any, spec: str | None, model_kw: dict | None, batch_size: int | None,
                   device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    """Example input tensors on `device` from a tensor, tuple of tensors, shape(s), '1,3,32,32' text, or the zoo default."""

    if batch_size is not None and int(batch_size) <= 0:
        raise NetdietError(f"batch size must be positive, got {batch_size}")
    zoo_dtype, zoo_high = torch.float32, None
    is_zoo = spec is not None and ":" not in spec and not spec.endswith(".py")
    if is_zoo:  # shapes given for a zoo model take its input dtype (token ids for the transformer)
        _, zoo_dtype, zoo_high = default_inputs(spec, model_kw)
    if inputs is None:
        shape, dtype, high = default_inputs(spec, model_kw)  # type: ignore[arg-type]
        items: list[Any] = [shape]
    elif isinstance(inputs, torch.Tensor):
        items = [inputs]
    elif isinstance(inputs, str) or _is_shape(inputs):
        items = [inputs]
    elif isinstance(inputs, (tuple, list)):
        items = list(inputs)
        if not items:
            raise NetdietError("no inputs given; give a tensor, a shape such as (1, 3, 32, 32), or --input 1,3,32,32")
    else:
        raise NetdietError(f"cannot use {type(inputs).__name__} as model input; give a tensor, a tuple of tensors or shapes")
    tensors = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            t = item.detach()
            tensors.append(t if t.device == device else (torch.empty(t.shape, dtype=t.dtype, device="meta")
                                                          if device.type == "meta" else t.to(device)))
            continue
        shape = parse_shape(item) if isinstance(item, str) else tuple(int(d) for d in item) if _is_shape(item) else None
        if shape is None:
            raise NetdietError(f"input {i} ({item!r}) is neither a tensor nor a shape; write shapes like 1,3,32,32")
        if any(d <= 0 for d in shape):
            raise NetdietError(f"input shape {_shape_text(shape)} has a non-positive size; every size must be >= 1")
        tensors.append(make_inputs(shape, zoo_dtype, high=zoo_high, device=device, seed=seed + i))
    if batch_size is not None:
        tensors = list(with_batch(tensors, int(batch_size)))
    return tuple(tensors)


# ------------------------------------------------------------------ which layer an input does not fit
class _ModuleTracker:
    """Forward pre-hooks that remember which module is running and what it was given.

    When a forward raises, the innermost module still on the stack is the one that failed.
    """

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[tuple[str, nn.Module, list[tuple[int, ...]]]] = []
        self.handles = []
        for name, mod in model.named_modules():
            self.handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self.handles.append(mod.register_forward_hook(self._post))

    def _pre(self, name: str):
        def hook(mod: nn.Module, args: tuple) -> None:
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            self.stack.append((name, mod, shapes))
        return hook

    def _post(self, mod: nn.Module, args: tuple, out: Any) -> None:
        if self.stack and self.stack[-1][1] is mod:
            self.stack.pop()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def describe_misfit(model_inputs: Sequence[torch.Tensor], name: str, mod: nn.Module, shapes: list[tuple[int, ...]],
                    exc: BaseException) -> str:
    """One line: which input does not fit which layer, with both shapes."""
    given = ", ".join(_shape_text(t.shape) for t in model_inputs)
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
        raise NetdietError(describe_misfit(model_inputs, name, mod, shapes, exc)) from exc
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


def _memory_section(estimate: Any, measured: dict | None) -> dict[str, Any]:
    keys = ("batch_size", "optimizer", "dtype", "amp", "checkpointing", "weights", "buffers", "gradients",
            "optimizer_state", "activations", "temporaries", "peak_estimated", "inference_peak")
    out = {k: _plain(getattr(estimate, k, None)) for k in keys}
    breakdown = getattr(estimate, "peak_breakdown", None)
    out["peak_breakdown"] = {k: int(v) for k, v in breakdown.items()} if breakdown else None
    out["peak_phase"] = getattr(estimate, "peak_phase", None)
    for extra in ("recompute_flops", "checkpointing_saved"):
        if hasattr(estimate, extra):
            out[extra] = _plain(getattr(estimate, extra))
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
            warmup: int = 2, repeats: int = 10, progress: bool = True, weights: str | None = None) -> ProfileResult:
    """Profile a model: see the module docstring. Bad input raises NetdietError (one line).

    `weights` (a safetensors file, never a pickle) loads trained or pruned weights first, so the storage
    figures show the model's real sparsity.
    """

    optimizer = normalise_optimizer(optimizer)
    dtype_name = normalise_dtype(dtype)
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
        x_meta = prepare_inputs(inputs, model if isinstance(model, str) else None, model_kw, batch_size,
                                torch.device("meta"), seed)
        with input_fit_check(meta_model, x_meta):
            first = estimate_memory(meta_model, x_meta, **mem_kw)
        # the measured run trains a deep copy: the estimated peak plus the model's own weights and buffers
        check_fits_in_ram(int(first.peak_estimated) + measure_copy_bytes(meta_model), force)
        early["estimate"], early["shapes"] = first, [(tuple(t.shape), t.dtype) for t in x_meta]
        return True

    net, model_info = resolve_model(model, model_kw, seed=seed, before_real=before_real)
    if weights is not None:
        load_weights(net, weights, model_info["spec"] or model_info["class"])
        model_info["weights"] = str(weights)
    device = _model_device(net)
    if measure and device.type == "meta":
        raise NetdietError("the model is on the meta device, so nothing can be measured; drop --measure or give a real model")
    spec = model_info["spec"]
    x = prepare_inputs(inputs, spec, model_kw, batch_size, device, seed)
    batch = int(x[0].shape[0]) if x and x[0].dim() else 1

    steps = (2 + (2 if measure else 0) + len(batch_sizes or []) * (2 if measure else 1)
             + (1 if budget is not None else 0))
    bar = progress_bar(steps, "profile") if progress else None

    def tick() -> None:
        if bar:
            bar.advance()

    try:
        was_training = net.training
        with input_fit_check(net, x):
            counts = count_ops(net, x, train=True, optimizer=optimizer)
            # Forward figures are reported for inference (eval mode), as papers and peers report them:
            # in training mode batch norm computes batch statistics and dropout draws masks, which costs more.
            inference_counts = count_ops(net, x, train=False)
        for p in net.parameters():
            p.grad = None
        tick()
        if early.get("shapes") == [(tuple(t.shape), t.dtype) for t in x]:
            estimate = early["estimate"]
        else:
            with input_fit_check(net, x):
                estimate = estimate_memory(net, x, **mem_kw)
        tick()
        net.train(was_training)

        measured = latency = None
        if measure:
            check_fits_in_ram(int(estimate.peak_estimated) + measure_copy_bytes(net), force)
            measured = measure_memory(net, x, **mem_kw)
            tick()
            lat = measure_latency(net, x, train=True, optimizer=optimizer, warmup=warmup, repeats=repeats)
            latency = lat.to_dict() if hasattr(lat, "to_dict") else dict(lat)
            tick()
            net.train(was_training)

        storage = None
        if device.type != "meta":
            storage = weight_storage(net)

        # every figure at the profiled batch is already known: the sweep and the budget search reuse it
        estimates, op_counts, measurements = {batch: estimate}, {batch: counts}, {batch: measured}

        def estimate_at(model: nn.Module, inputs: Any, **kw: Any) -> Any:
            b = int(inputs[0].shape[0])
            if b not in estimates:
                estimates[b] = estimate_memory(model, inputs, **kw)
            return estimates[b]

        def count_at(model: nn.Module, inputs: Any, **kw: Any) -> Any:
            b = int(inputs[0].shape[0])
            if b not in op_counts:
                op_counts[b] = count_ops(model, inputs, **kw)
            return op_counts[b]

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
    finally:
        if bar:
            bar.close()

    projection = None
    if dataset_size is not None:
        sps, source = _throughput(latency)
        projection = scaling.project_training(int(counts.train_flops), batch, int(dataset_size), int(epochs),
                                              samples_per_second=sps, throughput_source=source)

    totals = parameter_totals(net)
    totals.update({
        "macs": int(inference_counts.macs), "flops": int(inference_counts.flops),
        "train_forward_flops": int(counts.flops),
        "backward_macs": int(counts.backward_macs), "backward_flops": int(counts.backward_flops),
        "optimizer": counts.optimizer, "optimizer_flops": int(counts.optimizer_flops),
        "train_flops": int(counts.train_flops),
    })
    return ProfileResult(
        model=model_info,
        inputs=[{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in x],
        device=device.type,
        depth=None if depth is None else int(depth),
        totals=totals,
        memory=_memory_section(estimate, measured),
        modules=_module_rows(counts, estimate, depth, inference_counts),
        operators=_operators(counts),
        uncounted={op: int(n) for op, n in sorted(counts.uncounted.items())},
        storage=storage,
        latency=latency,
        scaling=sweep,
        max_batch=max_batch,
        projection=projection,
        environment=environment(device),
        op_counts=counts,
        memory_estimate=estimate,
    )
