"""Example inputs a model is run on: typed shapes, named (keyword) inputs and dict arguments.

    parse_input("1,128:int64")                 # InputSpec(shape=(1, 128), dtype=torch.int64)
    parse_input("attention_mask=1,128:int64")  # a keyword argument of forward
    bind_inputs(model, args, kwargs)           # checks the names against forward's parameters

Engines (counter, memory estimate, measurement) call `model(*tensors)`. A model whose inputs are not a flat
tuple of tensors (keyword inputs, a dict argument) is run through `structured_forward`, which gives the model a
forward taking the flat tensors and rebuilding the call (args, kwargs) from them, so every engine sees plain
positional tensors while the model gets what it asks for. Module names and parameters are untouched.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import re
import types
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

from netdiet.errors import NetdietError
from netdiet.models.hub import HF_PREFIX, hf_default_inputs, is_hub_spec
from netdiet.models.registry import default_inputs
from netdiet.units import parse_shape

# the input dtypes one can ask for by name (torch's names and the usual short ones)
INPUT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "int": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
_NAME_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)$")


@dataclass(frozen=True)
class InputSpec:
    """One input to make: its shape (batch first), dtype (None: the model's default), keyword name, and for
    integer inputs the exclusive upper bound of the values drawn (None: from the model, see `integer_range`)
    and the lower bound (None: 0; an attention mask of ones is low=1, high=2)."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None = None
    name: str | None = None
    high: int | None = None
    low: int | None = None


def dtype_choices() -> str:
    return ", ".join(INPUT_DTYPES)


def parse_input_dtype(text: str, where: str) -> torch.dtype:
    key = str(text).strip().lower().replace("torch.", "")
    if key not in INPUT_DTYPES:
        raise NetdietError(f"unknown dtype '{text}' in {where}; choose one of {dtype_choices()}")
    return INPUT_DTYPES[key]


def parse_input(text: str, high: int | None = None) -> InputSpec:
    """'SHAPE[:DTYPE]' or 'NAME=SHAPE[:DTYPE]' -> InputSpec; one-line NetdietError naming what is wrong."""
    raw = str(text)
    where = f"--input {raw!r}"
    name = None
    m = _NAME_RE.match(raw)
    if m:
        name, raw_rest = m.group(1), m.group(2)
    elif "=" in raw:
        bad = raw.split("=", 1)[0].strip()
        raise NetdietError(f"input name {bad!r} in {where} is not a Python identifier; "
                           "write NAME=SHAPE[:DTYPE], e.g. input_ids=1,128:int64")
    else:
        raw_rest = raw
    shape_text, sep, dtype_text = raw_rest.partition(":")
    dtype = parse_input_dtype(dtype_text, where) if sep else None
    parts = [p.strip().lower() for p in shape_text.replace("x", ",").split(",")]
    named_dtypes = [p for p in parts if p in INPUT_DTYPES]
    if named_dtypes:
        raise NetdietError(f"'{named_dtypes[0]}' in {where} is a dtype, not a size; write SHAPE:DTYPE, "
                           f"e.g. {'1,128' if len(parts) < 2 else ','.join(p for p in parts if p not in INPUT_DTYPES) or '1,128'}"
                           f":{named_dtypes[0]}")
    shape = parse_shape(shape_text)
    return InputSpec(shape, dtype, name, high)


def input_specs(texts: list[str], high: int | None = None, spec: str | None = None,
                model_kw: dict | None = None) -> list[InputSpec] | None:
    """The specs of --input texts, each carrying `high` (--input-range); None for the model's default input.
    A range without texts applies to the zoo model's default input."""
    specs = [parse_input(t, high) for t in texts]
    if high is not None and not specs and spec is not None:
        shape, dtype, _ = default_inputs(spec, model_kw)
        specs = [InputSpec(tuple(shape), dtype, None, high)]
    return specs or None


def integer_range(model: nn.Module | None) -> int | None:
    """The exclusive upper bound of token ids the model takes: a transformers config's vocab_size, else the
    num_embeddings of its first nn.Embedding."""
    if model is None:
        return None
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0:
        return vocab
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            return int(mod.num_embeddings)
    return None


# The values of meta tensors netdiet makes itself with known contents (default token ids and all-ones masks for a
# model kept on meta, and those inputs at another batch): meta tensor -> its real values, kept while it lives. The
# meta-device runs give such an input a real twin (analysis/meta_values.py), so a forward that reads it runs there.
KNOWN: WeakIdKeyDictionary = WeakIdKeyDictionary()
VALUES_LIMIT = 1 << 20   # elements: the largest tensor whose values are kept


def values_fit(meta: Any, real: Any, limit: int = VALUES_LIMIT) -> bool:
    """`real` (a strided CPU tensor of at most `limit` elements) can stand for the values of the meta tensor `meta`:
    the same shape and dtype."""
    return (isinstance(meta, torch.Tensor) and isinstance(real, torch.Tensor) and meta.is_meta
            and real.device.type == "cpu" and real.layout == torch.strided and real.numel() <= limit
            and tuple(meta.shape) == tuple(real.shape) and meta.dtype == real.dtype)


def remember(meta: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Record `real` as the values of the meta tensor `meta` (when values_fit); returns `meta`."""
    if values_fit(meta, real):
        KNOWN[meta] = real
    return meta


def make_input(spec: InputSpec, dtype: torch.dtype, high: int | None, device: torch.device, seed: int) -> torch.Tensor:
    """A deterministic tensor: floats ~ N(0, 1), integers uniform in [0, high), booleans uniform.

    On the meta device nothing is allocated; small integer and boolean inputs (token ids, masks) keep the values
    they would have on the CPU beside them (remember), so a forward that reads them (whether a mask is all ones)
    runs on meta as on the CPU."""
    if device.type == "meta":
        meta = torch.empty(spec.shape, dtype=dtype, device=device)
        if not dtype.is_floating_point and not dtype.is_complex and math.prod(spec.shape) <= VALUES_LIMIT:
            remember(meta, make_input(spec, dtype, high, torch.device("cpu"), seed))
        return meta
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(spec.shape, generator=gen).to(dtype=dtype, device=device)
    low = 0 if spec.low is None else int(spec.low)
    upper = 2 if dtype == torch.bool else max(low + 1, int(high or 2))
    return torch.randint(low, upper, spec.shape, generator=gen).to(dtype=dtype, device=device)


def default_call(spec: str | None, model: nn.Module | None, model_kw: dict | None,
                 seq_len: int | None) -> tuple[Any, torch.dtype, int | None, str | None]:
    """(inputs, default dtype, default integer range, note) a spec is profiled with when no input is given: the
    zoo entry's input, or for an hf: model its named inputs (hub.hf_default_inputs) of batch 1 x `seq_len`; the
    note says what was left out and why (None: nothing)."""
    if spec is not None and spec.startswith(HF_PREFIX) and model is not None:
        named = hf_default_inputs(model, seq_len)   # on meta too: the mask's values travel with it (make_input)
        return ({name: InputSpec(shape, dtype, None, high, low) for name, (shape, dtype, low, high) in named.items()},
                torch.float32, None, None)
    if spec is not None and is_hub_spec(spec):  # timm: an image classifier, its pretrained_cfg says the size
        size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))
        return [(1, *size)], torch.float32, None, None
    shape, dtype, high = default_inputs(spec, model_kw)  # type: ignore[arg-type]
    return [tuple(shape)], dtype, high, None


def masks_of_ones(kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Integer keyword inputs named *mask without a range (--input attention_mask=1,128:int64) are ones: every
    position attended, as a batch without padding (random 0/1 values would mask half the tokens)."""
    out = dict(kwargs)
    for name, leaf in kwargs.items():
        if isinstance(leaf, InputSpec) and name.endswith("mask") and leaf.high is None and leaf.low is None \
                and not (leaf.dtype or dtype).is_floating_point:
            out[name] = dataclasses.replace(leaf, low=1, high=2)
    return out


def text_input_dtype(spec: str | None, model: nn.Module | None) -> torch.dtype | None:
    """The dtype of a shape given without one for an hf: text model: int64 token ids (None: no such rule)."""
    if spec is None or not spec.startswith(HF_PREFIX) or model is None:
        return None
    return torch.int64 if getattr(model, "main_input_name", None) == "input_ids" else None


# ------------------------------------------------------------------ binding to forward's parameters
def _forward_parameters(model: nn.Module) -> tuple[list[inspect.Parameter], bool]:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin forward: nothing to check against
        return [], True
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    if var_kw and hasattr(model, "main_input_name") and hasattr(model, "config"):
        # a transformers model's **kwargs carries options (attention flags, output switches), not inputs: an
        # input name that is no parameter would be dropped silently, so it is refused like any unknown name
        var_kw = False
    return [p for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)], var_kw


def forward_signature_text(model: nn.Module) -> str:
    params, var_kw = _forward_parameters(model)
    names = [p.name for p in params] + (["**kwargs"] if var_kw else [])
    return f"{type(model).__name__}.forward({', '.join(names)})"


def bind_inputs(model: nn.Module, args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """(args, kwargs) to call `model` with. Named inputs are keyword arguments when forward takes those names;
    when forward takes one argument and none of the names is a parameter, they form one dict argument
    (`forward(self, batch)` called as `forward({"a": ..., "b": ...})`). Otherwise: a NetdietError naming forward's
    parameters."""
    if not kwargs:
        return args, kwargs
    params, var_kw = _forward_parameters(model)
    names = {p.name for p in params}
    unknown = [k for k in kwargs if k not in names]
    if not unknown or var_kw:
        taken = {p.name for p in params[:len(args)]}
        twice = [k for k in kwargs if k in taken]
        if twice:
            raise NetdietError(f"input '{twice[0]}' is given both by position and by name to "
                               f"{forward_signature_text(model)}; give it once")
        return args, kwargs
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    annotation = positional[0].annotation if len(positional) == 1 else None
    if annotation in (torch.Tensor, "torch.Tensor", "Tensor"):
        positional = []  # forward(self, x: Tensor): a mistyped name, not a dict
    if not args and len(positional) == 1 and len(unknown) == len(kwargs):
        return [dict(kwargs)], {}
    raise NetdietError(f"input '{unknown[0]}' is not a parameter of {forward_signature_text(model)}; "
                       f"name one of: {', '.join(p.name for p in params) or '(none)'}")


@contextlib.contextmanager
def structured_forward(model: nn.Module, args: list[Any], kwargs: dict[str, Any]) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield the flat tensors of the call (args, kwargs); while inside, `model(*flat)` calls the model's own
    forward with (args, kwargs) rebuilt from them. A flat call (tensors only, no keywords) changes nothing.

    The replacement forward is a bound method of the instance, so deep copies of the model (the memory
    estimate's meta copy, the measurement's copy) carry it, bound to the copy."""
    leaves, spec = tree_flatten((list(args), dict(kwargs)))
    flat = not kwargs and all(isinstance(a, torch.Tensor) for a in args)
    if flat:
        yield tuple(args)
        return
    if not all(isinstance(t, torch.Tensor) for t in leaves):
        raise NetdietError("every input must be a tensor (or a dict of tensors); give tensors, shapes or specs")
    had = "forward" in model.__dict__
    previous = model.__dict__.get("forward")

    def forward(self: nn.Module, *tensors: torch.Tensor) -> Any:
        call_args, call_kwargs = tree_unflatten(list(tensors), spec)
        own = previous.__func__ if isinstance(previous, types.MethodType) else type(self).forward
        return own(self, *call_args, **call_kwargs)

    model.forward = types.MethodType(forward, model)
    try:
        yield tuple(leaves)
    finally:
        if had:
            model.__dict__["forward"] = previous
        else:
            model.__dict__.pop("forward", None)


# ------------------------------------------------------------------ from what a user gives to tensors
def _leaf(item: Any, where: str, allow_name: bool) -> Any:
    if isinstance(item, (torch.Tensor, InputSpec)):
        if isinstance(item, InputSpec) and item.name and not allow_name:
            raise NetdietError(f"{where} is named '{item.name}' inside a dict that already names it; drop one name")
        return item
    if isinstance(item, str):
        spec = parse_input(item)
        if spec.name and not allow_name:
            raise NetdietError(f"{where} ({item!r}) is named inside a dict that already names it; drop one name")
        return spec
    if isinstance(item, (tuple, list, torch.Size)) and item and all(isinstance(d, int) and not isinstance(d, bool)
                                                                     for d in item):
        shape = tuple(int(d) for d in item)
        if any(d <= 0 for d in shape):
            raise NetdietError(f"input shape {'x'.join(map(str, shape))} has a non-positive size; every size must be >= 1")
        return InputSpec(shape)
    raise NetdietError(f"{where} is of type {type(item).__name__}, neither a tensor nor a shape; give a tensor, "
                       "a shape such as (1, 3, 32, 32), 'SHAPE[:DTYPE]' text such as '1,128:int64', or a dict of those")


def _dict_of_leaves(d: dict, where: str) -> dict[str, Any]:
    if not d:
        raise NetdietError(f"{where} is an empty dict; give at least one named input")
    out = {}
    for k, v in d.items():
        if not isinstance(k, str):
            raise NetdietError(f"{where} has the key {k!r}; the names of inputs must be strings")
        out[k] = _leaf(v, f"input '{k}'", allow_name=False)
    return out


def collect_inputs(inputs: Any) -> tuple[list[Any], dict[str, Any]]:
    """(args, kwargs) whose leaves are tensors or InputSpecs, from: a tensor, an InputSpec, 'SHAPE[:DTYPE]' or
    'NAME=SHAPE[:DTYPE]' text, a shape, a dict {name: any of those} (keyword inputs), or a tuple/list of them
    (a dict inside the tuple is one positional dict argument; named items are keyword inputs)."""
    if isinstance(inputs, dict):
        return [], _dict_of_leaves(inputs, "the inputs")
    if isinstance(inputs, (torch.Tensor, InputSpec, str)) or (
            isinstance(inputs, (tuple, list, torch.Size)) and inputs and all(isinstance(d, int) for d in inputs)):
        items: list[Any] = [inputs]
    elif isinstance(inputs, (tuple, list)):
        items = list(inputs)
        if not items:
            raise NetdietError("no inputs given; give a tensor, a shape such as (1, 3, 32, 32), or --input 1,3,32,32")
    else:
        raise NetdietError(f"cannot use a {type(inputs).__name__} as model input; give a tensor, a tuple of tensors, "
                           "a dict of named tensors, or shapes")
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for i, item in enumerate(items):
        if isinstance(item, dict):
            args.append(_dict_of_leaves(item, f"input {i}"))
            continue
        leaf = _leaf(item, f"input {i}", allow_name=True)
        if isinstance(leaf, InputSpec) and leaf.name:
            if leaf.name in kwargs:
                raise NetdietError(f"input '{leaf.name}' is given twice; give each named input once")
            kwargs[leaf.name] = leaf
        elif kwargs:
            raise NetdietError(f"input {i} comes after a named input; give the positional inputs first")
        else:
            args.append(leaf)
    return args, kwargs


def materialise(args: list[Any], kwargs: dict[str, Any], *, dtype: torch.dtype, high: int | None,
                device: torch.device, seed: int) -> tuple[list[Any], dict[str, Any]]:
    """Tensors for every InputSpec leaf (dtype and integer range defaulting to `dtype` / `high`; seed + leaf
    index) and every given tensor on `device` (on the meta device: an empty tensor of its shape and dtype)."""
    leaves, spec = tree_flatten((list(args), dict(kwargs)))
    out = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, InputSpec):
            out.append(make_input(leaf, leaf.dtype or dtype, leaf.high if leaf.high is not None else high, device, seed + i))
        elif isinstance(leaf, torch.Tensor):
            t = leaf.detach()
            out.append(t if t.device == device else torch.empty(t.shape, dtype=t.dtype, device="meta")
                       if device.type == "meta" else t.to(device))
        else:
            raise NetdietError(f"input {i} is a {type(leaf).__name__}; every input must be a tensor or a shape")
    call_args, call_kwargs = tree_unflatten(out, spec)
    return list(call_args), dict(call_kwargs)


def input_names(args: list[Any], kwargs: dict[str, Any]) -> list[str | None]:
    """The name of each flat input, in the order of structured_forward: None for a positional tensor, the key
    for an entry of a dict argument, the keyword for a keyword input ('name.key' for a dict passed by keyword)."""
    names: list[str | None] = []
    for a in args:
        names += list(a) if isinstance(a, dict) else [None]
    for k, v in kwargs.items():
        names += [f"{k}.{key}" for key in v] if isinstance(v, dict) else [k]
    return names
