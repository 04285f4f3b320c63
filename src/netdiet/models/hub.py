"""Models from the hubs users have: `hf:NAME_OR_FOLDER` (transformers, from a config) and `timm:NAME`.

    build_hf("path/to/folder")                     # a folder with config.json; no weights, nothing downloaded
    build_hf("gpt2", task="base", n_layer=2)       # a hub name already in the local HF cache; config overrides
    build_timm("resnet18")                         # timm.create_model("resnet18", pretrained=False)
    hf_default_inputs(model, seq_len=128)          # {input name: (shape, dtype, low, high)} for batch 1

An `hf:` model is built from its config alone (random init): the head follows the config's `architectures`
(`task=` overrides it), every other keyword overrides a config field and must have that field's type. A hub
name is looked up in the local HF cache only (huggingface_hub's cache, as with HF_HUB_OFFLINE=1): netdiet never
downloads. transformers and timm are optional extras ([hf], [timm]); without them a spec is one line saying
which to install. Nothing here imports them before a spec asks for them.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netdiet.errors import NetdietError

HF_PREFIX, TIMM_PREFIX = "hf:", "timm:"
MAX_CONFIG_BYTES = 16 << 20
MAX_LAYERS = 4096   # the deepest published transformers have a few hundred layers
# --model-kw task=... -> the transformers auto class that builds that head
HF_TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "base": "AutoModel",
    "image-classification": "AutoModelForImageClassification",
    "sequence-classification": "AutoModelForSequenceClassification",
}


def is_hub_spec(spec: str) -> bool:
    return isinstance(spec, str) and (spec.startswith(HF_PREFIX) or spec.startswith(TIMM_PREFIX))


def import_extra(module: str, extra: str, spec: str) -> Any:
    """The optional package `module`, or one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise NetdietError(f"model spec {spec!r} needs the {module} package ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else 'not importable'}); install the extra: "
                           f"pip install 'netdiet[{extra}]'") from None


# ------------------------------------------------------------------ hf: where the config is
def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".json") or "\\" in name or name.count("/") > 1


def hf_config_file(name: str) -> Path:
    """config.json of a folder (or the file itself), else of a hub name in the local HF cache; never downloads."""
    spec = HF_PREFIX + name
    if not name.strip():
        raise NetdietError("hf: needs a folder or a hub name, e.g. hf:path/to/model or hf:gpt2")
    path = Path(name).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise NetdietError(f"folder {path} has no config.json; give the folder a transformers model was saved to "
                               f"(save_pretrained or a hub snapshot) in {spec!r}")
        return config
    if path.is_file():
        if path.name != "config.json" and path.suffix != ".json":
            raise NetdietError(f"{path} is a file, not a model folder; give the folder holding config.json in {spec!r}")
        return path
    if _looks_like_path(name):
        raise NetdietError(f"model folder {name} does not exist; check the path in {spec!r}")
    hub = import_extra("huggingface_hub", "hf", spec)
    try:
        found = hub.try_to_load_from_cache(name, "config.json")
    except Exception as exc:  # an invalid repo id (huggingface_hub's HFValidationError)
        raise NetdietError(f"{name!r} is neither a folder nor a hub model name ({_first_line(exc)}); "
                           f"give a folder with config.json, e.g. hf:path/to/model") from None
    if not isinstance(found, str):
        cache = getattr(getattr(hub, "constants", None), "HF_HUB_CACHE", "the HF cache")
        raise NetdietError(f"hub model {name!r} is not in the local HF cache ({cache}) and netdiet never downloads; "
                           f"pass a folder with its config.json instead: hf:path/to/folder")
    return Path(found)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200].rstrip(".")


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _coerce(key: str, value: Any, current: Any, spec: str) -> Any:
    """`value` as the type of the config field's current value (None: any value)."""
    if current is None:
        return value
    want = type(current)
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(current, str):
        return str(value)
    elif isinstance(current, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return want(value)
    elif isinstance(current, dict):
        if isinstance(value, dict):
            return value
    else:
        return value
    raise NetdietError(f"--model-kw {key}={value!r} for {spec}: the config field {key} is {_a(want.__name__)} "
                       f"(now {current!r}); give {_a(want.__name__)}")


def load_hf_config(name: str, overrides: dict[str, Any]) -> Any:
    """The transformers config of `name` with `overrides` applied (each typed by the field it replaces)."""
    spec = HF_PREFIX + name
    transformers = import_extra("transformers", "hf", spec)
    file = hf_config_file(name)
    if file.stat().st_size > MAX_CONFIG_BYTES:   # a config is kilobytes; never read a huge file into memory
        raise NetdietError(f"{file} is {file.stat().st_size} bytes, not a model config (at most {MAX_CONFIG_BYTES}); "
                           f"give the config.json transformers wrote")
    try:
        if file.name == "config.json":
            config = transformers.AutoConfig.from_pretrained(str(file.parent), local_files_only=True,
                                                             trust_remote_code=False)
        else:
            config_dict, _ = transformers.PretrainedConfig.get_config_dict(str(file), local_files_only=True)
            config = transformers.AutoConfig.for_model(**config_dict)
    except Exception as exc:
        raise NetdietError(f"transformers cannot read the config of {spec} ({file}): {type(exc).__name__}: "
                           f"{_first_line(exc)}; give a config.json transformers {transformers.__version__} knows") from None
    for key, value in overrides.items():
        if not hasattr(config, key):
            close = difflib.get_close_matches(key, list(config.to_dict()), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise NetdietError(f"--model-kw {key}: the {type(config).__name__} of {spec} has no field '{key}'; {hint}"
                               f"give a field of its config.json or task={'|'.join(HF_TASKS)}")
        try:
            setattr(config, key, _coerce(key, value, getattr(config, key), spec))
        except NetdietError:
            raise
        except Exception as exc:
            raise NetdietError(f"transformers rejected --model-kw {key}={value!r} for {spec}: "
                               f"{type(exc).__name__}: {_first_line(exc)}") from None
    return config


def _check_depth(config: Any, spec: str) -> None:
    """Refuse a layer count no real model has: every layer is built as a module (on the meta device too), so
    num_hidden_layers=10**9 would hang the build instead of failing."""
    for key, value in config.to_dict().items():
        if ("layer" in key and isinstance(value, int) and not isinstance(value, bool) and value > MAX_LAYERS
                and key.startswith(("num_", "n_", "encoder_", "decoder_"))):
            raise NetdietError(f"{spec}: {key}={value} is more layers than any real model has (at most {MAX_LAYERS} "
                               f"here: each is built as a module); give a real config or --model-kw {key}=N")


def _hf_class(transformers: Any, config: Any, task: str | None, spec: str) -> Any:
    """The class that builds the model: the task's auto class, else the config's first architecture."""
    if task is not None:
        if task not in HF_TASKS:
            raise NetdietError(f"unknown --model-kw task={task!r} for {spec}; choose one of: {', '.join(HF_TASKS)}")
        return getattr(transformers, HF_TASKS[task])
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:
        return transformers.AutoModel
    cls = getattr(transformers, str(archs[0]), None)
    if cls is None:
        raise NetdietError(f"the config of {spec} names the architecture {archs[0]!r}, which transformers "
                           f"{transformers.__version__} does not have; choose a head with --model-kw "
                           f"task={'|'.join(HF_TASKS)}")
    return cls


def build_hf(name: str, **kwargs: Any) -> nn.Module:
    """A transformers model from the config of `name` (folder or cached hub name): random weights, nothing
    downloaded. `task=` picks the head; every other keyword overrides a config field."""
    spec = HF_PREFIX + name
    task = kwargs.pop("task", None)
    config = load_hf_config(name, kwargs)
    _check_depth(config, spec)
    transformers = import_extra("transformers", "hf", spec)
    cls = _hf_class(transformers, config, task, spec)
    try:
        if hasattr(cls, "from_config"):  # the auto classes
            model = cls.from_config(config, trust_remote_code=False)
        else:
            model = cls._from_config(config)
    except Exception as exc:
        if "meta tensor" in str(exc) or isinstance(exc, NotImplementedError):
            raise  # the meta device's limit: the caller builds it on the CPU instead
        if task is not None and "Unrecognized configuration class" in str(exc):
            raise NetdietError(f"transformers has no {task} head for {type(config).__name__} ({spec}); choose another "
                               f"--model-kw task= ({', '.join(HF_TASKS)})") from None
        raise NetdietError(f"transformers rejected the config of {spec} ({cls.__name__}): {type(exc).__name__}: "
                           f"{_first_line(exc)}; fix config.json or the --model-kw overrides") from None
    return model


def build_timm(name: str, **kwargs: Any) -> nn.Module:
    """timm.create_model(name, pretrained=False, **kwargs): random weights, nothing downloaded."""
    spec = TIMM_PREFIX + name
    timm = import_extra("timm", "timm", spec)
    if kwargs.pop("pretrained", False):
        raise NetdietError(f"{spec}: pretrained=True would download weights; netdiet builds timm models with "
                           "random weights (load trained ones with --weights file.safetensors)")
    try:
        known = bool(timm.is_model(name))
    except Exception:
        known = True
    if not known:
        close = difflib.get_close_matches(name, list(timm.list_models()), n=1)
        hint = f"did you mean 'timm:{close[0]}'? " if close else ""
        raise NetdietError(f"timm has no model {name!r}; {hint}timm.list_models() lists them")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise NetdietError(f"timm model {name!r} rejected its arguments: {_first_line(exc)}; check --model-kw") from None


def build_hub(spec: str, **kwargs: Any) -> nn.Module:
    if spec.startswith(HF_PREFIX):
        return build_hf(spec[len(HF_PREFIX):], **kwargs)
    return build_timm(spec[len(TIMM_PREFIX):], **kwargs)


# ------------------------------------------------------------------ default inputs of a hub model
def _forward_takes(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _max_positions(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def hf_default_inputs(model: nn.Module, seq_len: int | None) -> dict[str, tuple[tuple[int, ...], torch.dtype, int,
                                                                            int | None]]:
    """{name: (shape, dtype, low, high)} of batch 1 for a transformers model: input_ids (values in
    [0, vocab_size)) and attention_mask (ones) where forward takes one, decoder_input_ids for an encoder-decoder;
    pixel_values (1, channels, size, size) for a vision config. `seq_len` None means 128.

    A model on the meta device gets the mask too: transformers asks `.item()` whether a mask is all ones, and the
    values netdiet's meta inputs carry answer it (models.inputs.make_input, analysis/meta_values.py)."""
    config = getattr(model, "config", None)
    if config is None:
        raise NetdietError(f"{type(model).__name__} has no transformers config to make inputs from; give --input")
    main = getattr(model, "main_input_name", "input_ids")
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        return {"pixel_values": ((1, int(getattr(config, "num_channels", 3)), int(h), int(w)), torch.float32, 0, None)}
    if main != "input_ids":
        raise NetdietError(f"{type(model).__name__}'s main input is '{main}', for which netdiet has no default; "
                           f"give it with --input {main}=SHAPE[:DTYPE]")
    length = 128 if seq_len is None else int(seq_len)
    limit = _max_positions(config)
    if limit is not None and length > limit:
        raise NetdietError(f"--seq-len {length} exceeds the model's {limit} positions (max_position_embeddings); "
                           f"give --seq-len {limit} or less")
    vocab = getattr(config, "vocab_size", None)
    high = int(vocab) if isinstance(vocab, int) and vocab > 0 else None
    out = {"input_ids": ((1, length), torch.int64, 0, high)}
    if _forward_takes(model, "attention_mask"):
        out["attention_mask"] = ((1, length), torch.int64, 1, 2)
    if getattr(config, "is_encoder_decoder", False) and _forward_takes(model, "decoder_input_ids"):
        out["decoder_input_ids"] = ((1, length), torch.int64, 0, high)
    return out
