"""Recipes: a YAML list of compression stages, validated with line numbers, run one after another.

    name: deep-compression
    baseline: {epochs: 10, lr: 0.001, optimizer: adam, batch_size: 64}   # used only when no weights are given
    stages:
      - technique: prune
        options: {sparsity: 0.92, schedule: polynomial}
        finetune: {epochs: 4, lr: 0.0005}
        evaluate: true

A recipe is given as a path to a YAML file or as the name of a built-in one (`compression/recipes/<name>.yaml`).
Every validation error names the file and the YAML line it comes from (the document is composed with
`yaml.compose` so each value keeps its position), as one line: `recipe.yaml line 7: ...`.

The YAML is read by a strict composer: no anchors or aliases (a few hundred bytes of them expand into gigabytes,
"billion laughs"), no tags beyond the plain str/int/float/bool/null/seq/map ones (nothing constructs a Python
object), no duplicate keys, at most MAX_YAML_DEPTH levels of nesting and MAX_RECIPE_BYTES of text.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from netdiet.compression import archive, stage_checkpoint
from netdiet.compression.base import CompressionState, StageContext, create_technique, list_techniques
from netdiet.compression.evaluate import compression_ratio, evaluate
from netdiet.environment import environment
from netdiet.errors import NetdietError
from netdiet.fileio import folder_lock
from netdiet.optim import OPTIMIZERS
from netdiet.training.checkpoint import has_checkpoint
from netdiet.training.loop import TrainConfig, fit

RECIPE_DIR = Path(__file__).with_name("recipes")
_TOP_KEYS = ("name", "description", "baseline", "stages")
_STAGE_KEYS = ("name", "technique", "options", "finetune", "evaluate")
_TRAIN_KEYS = ("epochs", "lr", "optimizer", "batch_size", "weight_decay", "momentum")
DEFAULT_BASELINE = {"epochs": 10, "lr": 1e-3, "optimizer": "adam", "batch_size": 64}
MAX_RECIPE_BYTES = 1 << 20     # a recipe is a page of YAML; the built-in ones are under 2 KB
MAX_YAML_DEPTH = 32
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}


@dataclass
class Stage:
    name: str
    technique: str
    options: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] | None = None   # TrainConfig fields; None = no fine-tuning
    evaluate: bool = True
    line: int = 0                            # 1-based line of the stage in its YAML

    def train_config(self, seed: int = 0, progress: bool = True) -> TrainConfig | None:
        if not self.finetune or int(self.finetune.get("epochs", 0)) <= 0:
            return None
        return TrainConfig(seed=seed, progress=progress, description=f"{self.name} fine-tune", **self.finetune)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "technique": self.technique, "options": self.options,
                "finetune": self.finetune, "evaluate": self.evaluate}


@dataclass
class Recipe:
    name: str
    stages: list[Stage]
    baseline: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_BASELINE))
    description: str = ""
    source: str = ""          # file path, or "builtin:<name>"

    def baseline_config(self, seed: int = 0, progress: bool = True) -> TrainConfig:
        return TrainConfig(seed=seed, progress=progress, description="baseline", **self.baseline)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "description": self.description,
                "baseline": self.baseline, "stages": [s.to_dict() for s in self.stages]}


# ------------------------------------------------------------------ finding and reading recipes
def list_recipes() -> list[str]:
    """Names of the built-in recipes."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name, or a YAML file by path."""
    text_name = str(name_or_path)
    path = Path(text_name)
    if path.suffix.lower() in (".yaml", ".yml") or path.exists() or "/" in text_name:
        if not path.is_file():
            raise NetdietError(f"recipe file {path} does not exist; give a YAML file or a built-in recipe: {', '.join(list_recipes())}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise NetdietError(f"cannot read recipe {path} ({exc}); give a UTF-8 YAML file") from None
        return parse_recipe(text, source=str(path))
    builtin = RECIPE_DIR / f"{text_name}.yaml"
    if not builtin.is_file():
        close = difflib.get_close_matches(text_name, list_recipes(), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise NetdietError(f"no built-in recipe '{text_name}' and no such file; {hint}built-in: {', '.join(list_recipes())}")
    return parse_recipe(builtin.read_text(encoding="utf-8"), source=f"builtin:{text_name}")


class _Refused(Exception):
    """A construct the recipe reader does not accept, and the mark (line) where it stands."""

    def __init__(self, mark: Any, message: str) -> None:
        super().__init__(message)
        self.mark = mark


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader's composer that refuses anchors, aliases, tags, duplicate or non-scalar keys and deep nesting
    as it meets them, before any value is built (so an alias bomb fails at its first anchor)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(event.start_mark, f"YAML aliases (*{event.anchor}) are not allowed in a recipe; "
                                             "write the value out in full")
        if event.anchor is not None:
            raise _Refused(event.start_mark, f"YAML anchors (&{event.anchor}) are not allowed in a recipe "
                                             "(aliases can expand a few bytes into gigabytes); write the value out in full")
        tag = getattr(event, "tag", None)
        if tag is not None and tag not in _PLAIN_TAGS:
            raise _Refused(event.start_mark, f"YAML tag {tag!r} is not allowed in a recipe; use plain values "
                                             "(strings, numbers, booleans, lists, mappings)")
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise _Refused(event.start_mark, f"the YAML nests more than {MAX_YAML_DEPTH} levels deep; flatten it")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def compose_mapping_node(self, anchor: Any) -> Any:
        node = super().compose_mapping_node(anchor)
        seen: dict[str, int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode):
                raise _Refused(key.start_mark, "a mapping key must be a plain name, not a list or mapping")
            if key.value in seen:
                raise _Refused(key.start_mark, f"duplicate key '{key.value}' (first given on line {seen[key.value]}); "
                                               "give each key once")
            seen[key.value] = key.start_mark.line + 1
        return node


class _Doc:
    """A composed YAML node and its Python value, so every check can name the line it is about."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, node: yaml.Node | None, message: str) -> NetdietError:
        where = f"{self.source} line {node.start_mark.line + 1}" if node is not None else self.source
        return NetdietError(f"{where}: {message}")

    @staticmethod
    def value(node: yaml.Node) -> Any:
        loader = yaml.SafeLoader("")
        try:
            return loader.construct_document(node)
        finally:
            loader.dispose()

    @staticmethod
    def items(node: yaml.MappingNode) -> list[tuple[str, yaml.Node, yaml.Node]]:
        return [(str(k.value), k, v) for k, v in node.value]


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Validate a recipe's YAML text; any problem is one NetdietError naming `source` and the line."""
    doc = _Doc(source)
    if len(text) > MAX_RECIPE_BYTES:
        raise NetdietError(f"{source}: the recipe is {len(text)} characters (at most {MAX_RECIPE_BYTES}); "
                           "a recipe is a short list of stages")
    _check_flow_depth(text, source)
    try:
        root = yaml.compose(text, Loader=_StrictLoader)
    except _Refused as exc:
        raise NetdietError(f"{source} line {exc.mark.line + 1}: {exc}") from None
    except RecursionError:
        raise NetdietError(f"{source}: the YAML nests too deeply; flatten it") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source} line {mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise NetdietError(f"{where}: not valid YAML ({problem}); fix the syntax") from None
    if root is None:
        raise NetdietError(f"{source}: the recipe is empty; it needs `stages:` with at least one technique")
    if not isinstance(root, yaml.MappingNode):
        raise doc.error(root, "a recipe is a mapping with `name` and `stages`; see `netdiet recipes`")

    name, description, baseline, stages_node = Path(source.split(":")[-1]).stem, "", dict(DEFAULT_BASELINE), None
    for key, knode, vnode in doc.items(root):
        if key not in _TOP_KEYS:
            raise doc.error(knode, f"unknown key '{key}'; a recipe has {', '.join(_TOP_KEYS)}")
        if key == "name":
            name = str(doc.value(vnode))
        elif key == "description":
            description = str(doc.value(vnode))
        elif key == "baseline":
            baseline = {**DEFAULT_BASELINE, **_train_settings(doc, vnode, "baseline")}
        elif key == "stages":
            stages_node = vnode
    if stages_node is None:
        raise doc.error(root, "the recipe has no `stages:`; list at least one technique")
    if not isinstance(stages_node, yaml.SequenceNode) or not stages_node.value:
        raise doc.error(stages_node, "`stages` must be a non-empty list of {technique, options, finetune, evaluate}")

    known = list_techniques()
    stages: list[Stage] = []
    seen: dict[str, int] = {}
    for snode in stages_node.value:
        stage = _parse_stage(doc, snode, known)
        base = stage.name
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            stage.name = f"{base}-{seen[base]}"
        stages.append(stage)
    return Recipe(name=name, stages=stages, baseline=baseline, description=description, source=source)


def _check_flow_depth(text: str, source: str) -> None:
    """Refuse brackets nested past MAX_YAML_DEPTH before YAML sees them: PyYAML's scanner looks ahead up to 1,024
    characters for each open bracket, so `[[[[...` took a second to reach the composer's own depth check."""
    depth = 0
    for i, ch in enumerate(text):
        if ch in "[{":
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise NetdietError(f"{source} line {text.count(chr(10), 0, i) + 1}: the YAML nests more than "
                                   f"{MAX_YAML_DEPTH} levels deep; flatten it")
        elif ch in "]}" and depth:
            depth -= 1


def _parse_stage(doc: _Doc, snode: yaml.Node, known: list[str]) -> Stage:
    if not isinstance(snode, yaml.MappingNode):
        raise doc.error(snode, "each stage is a mapping with `technique:` (and optional options, finetune, evaluate)")
    fields = {key: (knode, vnode) for key, knode, vnode in doc.items(snode)}
    for key, (knode, _) in fields.items():
        if key not in _STAGE_KEYS:
            raise doc.error(knode, f"unknown stage key '{key}'; a stage has {', '.join(_STAGE_KEYS)}")
    if "technique" not in fields:
        raise doc.error(snode, "stage has no `technique:`; choose one of " + ", ".join(known))
    tnode = fields["technique"][1]
    technique = doc.value(tnode)
    if technique not in known:
        close = difflib.get_close_matches(str(technique), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise doc.error(tnode, f"unknown technique '{technique}'{hint}; choose one of: {', '.join(known)}")

    options: dict[str, Any] = {}
    onode = fields.get("options", (None, None))[1]
    if onode is not None and not (isinstance(onode, yaml.ScalarNode) and doc.value(onode) is None):
        if not isinstance(onode, yaml.MappingNode):
            raise doc.error(onode, f"options of '{technique}' must be a mapping of option: value")
        for key, knode, vnode in doc.items(onode):
            value = doc.value(vnode)
            _check_common_option(doc, vnode, key, value)
            options[key] = value
    try:
        create_technique(technique, **options)  # the technique's own validation, reported at this stage's line
    except NetdietError as exc:
        raise doc.error(onode if onode is not None else tnode, str(exc)) from None
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:  # an option of the wrong type
        raise doc.error(onode if onode is not None else tnode,
                        f"options of '{technique}' have a value of the wrong type ({type(exc).__name__}: {str(exc)[:100]}); "
                        "see `netdiet recipes` for each option's form") from None

    finetune = None
    if "finetune" in fields:
        fnode = fields["finetune"][1]
        if not (isinstance(fnode, yaml.ScalarNode) and doc.value(fnode) in (None, False)):
            finetune = _train_settings(doc, fnode, "finetune")
            finetune.setdefault("epochs", 1)
    if technique == "distill" and not (finetune and finetune.get("epochs", 0) >= 1):
        raise doc.error(snode, "distill trains the student: give the stage `finetune: {epochs: N}` with N >= 1")
    evaluate = True
    if "evaluate" in fields:
        evaluate = doc.value(fields["evaluate"][1])
        if not isinstance(evaluate, bool):
            raise doc.error(fields["evaluate"][1], f"evaluate must be true or false, got {evaluate!r}")
    name = doc.value(fields["name"][1]) if "name" in fields else None
    if name is None:
        mode = options.get("mode")
        name = f"{technique}-{mode}" if isinstance(mode, str) else technique
    return Stage(name=str(name), technique=technique, options=options, finetune=finetune, evaluate=evaluate,
                 line=snode.start_mark.line + 1)


def _check_common_option(doc: _Doc, node: yaml.Node, key: str, value: Any) -> None:
    """Ranges every technique shares, checked here so the message carries the exact line of the value."""
    values = list(value.values()) if isinstance(value, dict) else list(value) if isinstance(value, list) else [value]
    values = [v for v in values if v is not None]  # None = "use the default" for optional options such as conv_bits
    if "sparsity" in key:
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise doc.error(node, f"{key} {v!r} is outside [0, 1); sparsity is the fraction of weights removed, e.g. 0.8")
    if key == "bits" or key.endswith("_bits"):
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 8:
                raise doc.error(node, f"{key} {v!r} is outside 1..8; give an integer bit width such as 4 or 8")


def _train_settings(doc: _Doc, node: yaml.Node, what: str) -> dict[str, Any]:
    if not isinstance(node, yaml.MappingNode):
        raise doc.error(node, f"{what} must be a mapping such as {{epochs: 2, lr: 0.001, optimizer: adam, batch_size: 64}}")
    out: dict[str, Any] = {}
    for key, knode, vnode in doc.items(node):
        value = doc.value(vnode)
        if key not in _TRAIN_KEYS:
            raise doc.error(knode, f"unknown {what} key '{key}'; use {', '.join(_TRAIN_KEYS)}")
        if key in ("epochs", "batch_size"):
            low = 0 if key == "epochs" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise doc.error(vnode, f"{what} {key} {value!r} must be an integer >= {low}")
        elif key == "optimizer":
            if value not in OPTIMIZERS:
                raise doc.error(vnode, f"{what} optimizer {value!r} is unknown; choose one of: {', '.join(OPTIMIZERS)}")
        else:
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
                    or (key == "lr" and value == 0)):
                # checked at load, with its line: a `lr: .nan` used to surface only after the baseline had trained
                raise doc.error(vnode, f"{what} {key} {value!r} must be a finite "
                                       f"{'positive' if key == 'lr' else 'non-negative'} number")
            value = float(value)
        out[key] = value
    return out


# ------------------------------------------------------------------ running a recipe
LATENCY_BATCH = 64   # latency is the median time of one forward pass over this many test images


@dataclass
class StageResult:
    name: str
    technique: str
    options: dict[str, Any]
    accuracy: float | None              # of the runtime that deploys the archive (ORT int8 when stored, else PyTorch)
    bytes_on_disk: int | None           # the stage's .ndz archive
    ratio: float | None                 # evaluate.compression_ratio(dense fp32 bytes, bytes_on_disk)
    macs: int | None                    # per sample
    latency_ms: dict[str, float | None] | None   # {pytorch, onnxruntime}: median of one batch of LATENCY_BATCH
    params: int
    nonzero_params: int
    report: dict[str, Any]
    runtime: str = "pytorch"
    accuracy_pytorch: float | None = None
    accuracy_onnxruntime: float | None = None
    evaluated: bool = True
    seconds: float = 0.0
    latency_detail: dict[str, Any] | None = None   # evaluate's per-runtime timing: interval, stable, threads
    latency_speedup: dict[str, Any] | None = None  # evaluate's PyTorch / ORT ratio (value None unless both stable)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "technique": self.technique, "options": self.options, "accuracy": self.accuracy,
                "bytes_on_disk": self.bytes_on_disk, "ratio": self.ratio, "macs": self.macs,
                "latency_ms": self.latency_ms, "params": self.params, "nonzero_params": self.nonzero_params,
                "runtime": self.runtime, "accuracy_pytorch": self.accuracy_pytorch,
                "accuracy_onnxruntime": self.accuracy_onnxruntime, "evaluated": self.evaluated,
                "seconds": self.seconds, "report": self.report, "latency_detail": self.latency_detail,
                "latency_speedup": self.latency_speedup}


@dataclass
class CompressResult:
    model: dict[str, Any]                   # {spec, kwargs}
    data: str
    recipe: dict[str, Any]
    baseline: dict[str, Any]
    stages: list[StageResult]
    pareto: list[str]
    archive: dict[str, Any] | None
    seed: int = 0
    latency_batch: int = LATENCY_BATCH
    compressed_model: Any = field(default=None, repr=False)   # the final nn.Module (not serialised)
    state: Any = field(default=None, repr=False)              # its CompressionState (not serialised)
    environment: dict[str, Any] = field(default_factory=environment)   # what decided the numbers (netdiet.environment)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "netdiet.compress/1", "model": self.model, "data": self.data, "recipe": self.recipe,
                "seed": self.seed, "latency_batch": self.latency_batch, "baseline": self.baseline,
                "stages": [s.to_dict() for s in self.stages], "pareto": self.pareto, "archive": self.archive,
                "environment": self.environment or environment()}


def measure(model, state, data, *, latency: bool = True, header: dict | None = None) -> dict[str, Any]:
    """Write the stage's archive and evaluate *that file* with `netdiet.compression.evaluate` (one producer per figure:
    accuracy of the runtime that deploys it, bytes on disk, MACs, latency); `archive_bytes` is the encoded file."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="netdiet-stage-") as tmp:
        path = Path(tmp) / "stage.ndz"
        archive.write(path, model, state, header=header)
        spec = (state.spec or {}).get("spec")
        result = evaluate(path, data, latency=latency, latency_batch=LATENCY_BATCH, model_spec=spec)
    return {"accuracy": result.accuracy, "bytes_on_disk": int(result.bytes_on_disk), "macs": result.macs,
            "latency_ms": dict(result.latency_ms), "params": int(result.params),
            "nonzero_params": int(result.nonzero_params), "runtime": result.runtime,
            "accuracy_pytorch": result.accuracy_pytorch, "accuracy_onnxruntime": result.accuracy_onnxruntime,
            "latency_detail": result.latency_detail or None, "latency_speedup": result.latency_speedup}


def deployed_latency(latency_ms: dict | None) -> float | None:
    """The latency of the runtime that deploys the file: ONNX Runtime when measured, else PyTorch."""
    if not latency_ms:
        return None
    return latency_ms.get("onnxruntime") if latency_ms.get("onnxruntime") is not None else latency_ms.get("pytorch")


def pareto_front(points: list[tuple[str, float | None, int | None]]) -> list[str]:
    """Names of the points no other point beats on both accuracy (higher) and bytes (lower)."""
    valid = [(n, a, b) for n, a, b in points if a is not None and b is not None]
    front = []
    for name, acc, size in valid:
        dominated = any((a2 >= acc and b2 <= size) and (a2 > acc or b2 < size) for n2, a2, b2 in valid if n2 != name)
        if not dominated:
            front.append(name)
    return front


def run_recipe(model, recipe: Recipe, data, *, spec: dict[str, Any], trained: bool = False, seed: int = 0,
               out: str | Path | None = None, latency: bool = True, progress: bool = True,
               log=None, on_stage=None, resume: bool = False) -> CompressResult:
    """Train the dense baseline unless `trained`, run every stage, evaluate each stage's archive, write the last to `out`.

    With `out`, the run checkpoints into `<out>.partial/` after the baseline and after every stage (and during the
    baseline's training); `resume` continues an unfinished run from its last finished stage, with the same numbers
    as a run never stopped. `on_stage(stage_result, model, state)` is called after each stage run here (e.g. to
    keep intermediate archives)."""
    if resume and out is None:
        raise NetdietError("--resume needs --out MODEL.ndz (the archive of the unfinished run to continue)")
    folder = stage_checkpoint.partial_dir(out) if out is not None else None
    fingerprint = {"model": dict(spec), "recipe": {k: v for k, v in recipe.to_dict().items() if k != "source"},
                   "seed": seed, "data": getattr(data, "name", None), "trained": trained, "latency": latency,
                   "weights": stage_checkpoint.weights_digest(model)}
    if folder is None:
        return _run_stages(model, recipe, data, spec, trained, seed, out, latency, progress, log, on_stage, None, fingerprint, False)
    with folder_lock(folder, f"{out} is being written by another netdiet compress run ({folder} is locked); wait for it "
                             "to finish or choose another --out"):
        if not resume and any(has_checkpoint(folder / part) for part in ("stages", "baseline")):
            raise NetdietError(f"{folder} holds an unfinished compress run into {out}; pass --resume to continue it, "
                               "or delete that folder to start over")
        result = _run_stages(model, recipe, data, spec, trained, seed, out, latency, progress, log, on_stage, folder,
                             fingerprint, resume)
    stage_checkpoint.remove(out)     # the archive is written: nothing is left to resume
    return result


def _run_stages(model, recipe, data, spec, trained, seed, out, latency, progress, log, on_stage, folder, fingerprint,
                resume) -> CompressResult:
    import copy
    import dataclasses
    import time

    import torch

    say = log or (lambda _msg: None)
    resumed = None
    if resume:
        resumed = stage_checkpoint.load(folder / "stages", fingerprint=fingerprint, stages_in_recipe=len(recipe.stages),
                                        model_spec=spec["spec"])
        if resumed is None:
            say(f"--resume: no finished stage in {folder} yet; starting from the baseline")
    baseline_cfg = recipe.baseline_config(seed, progress) if not trained else None
    if resumed is not None:
        names = [s.name for s in recipe.stages[:resumed.done]]
        if [s.get("name") for s in resumed.stages] != names:
            raise NetdietError(f"{folder} is damaged: its finished stages are not the recipe's first {resumed.done} "
                               f"({', '.join(names) or 'none'}); delete that folder and run afresh")
        model, teacher, state, baseline = resumed.model, resumed.teacher, resumed.state, resumed.baseline
        stages = [StageResult(**{f.name: s.get(f.name) for f in dataclasses.fields(StageResult)}) for s in resumed.stages]
        say(f"--resume: the baseline and {resumed.done} of {len(recipe.stages)} stages are done; continuing")
    else:
        if baseline_cfg is not None:
            say(f"training the dense baseline: {baseline_cfg.epochs} epochs, {baseline_cfg.optimizer}, lr {baseline_cfg.lr}")
            run_cfg = baseline_cfg if folder is None else dataclasses.replace(
                baseline_cfg, checkpoint_dir=str(folder / "baseline"), resume=resume)
            fit(model, data.x_train, data.y_train, run_cfg, fingerprint={"compress": fingerprint}, log=say if resume else None)
        model.eval()
        base = evaluate(model, data, latency=latency, latency_batch=LATENCY_BATCH)
        baseline = {"accuracy": base.accuracy, "bytes_on_disk": int(base.dense_fp32_bytes), "macs": base.macs,
                    "latency_ms": dict(base.latency_ms), "latency_detail": base.latency_detail or None,
                    "params": int(base.params),
                    "nonzero_params": int(base.nonzero_params), "trained_by_netdiet": not trained,
                    "train": baseline_cfg.to_dict() if baseline_cfg is not None else None}
        teacher = copy.deepcopy(model)
        state = CompressionState(spec=dict(spec))
        stages: list[StageResult] = []
    dense_bytes = baseline["bytes_on_disk"]
    say(f"baseline: accuracy {baseline['accuracy']:.4f}, dense fp32 safetensors {dense_bytes} bytes")

    def checkpoint() -> None:
        if folder is not None:
            stage_checkpoint.save(folder / "stages", done=len(stages), fingerprint=fingerprint, baseline=baseline,
                                  stages=[s.to_dict() for s in stages], model=model, teacher=teacher, state=state)

    if resumed is None:
        checkpoint()
    header = {"recipe": recipe.to_dict(), "baseline": {"accuracy": baseline["accuracy"], "dense_fp32_bytes": dense_bytes}}
    for stage in recipe.stages[len(stages):]:
        t0 = time.perf_counter()
        tech = create_technique(stage.technique, **stage.options)
        ctx = StageContext(data=data, finetune=stage.train_config(seed, progress),
                           example_inputs=data.x_train[:LATENCY_BATCH], teacher=teacher, seed=seed)
        torch.manual_seed(seed)
        model = tech.apply(model, state, ctx)
        report = tech.report()
        seconds = time.perf_counter() - t0
        if stage.evaluate:
            m = measure(model, state, data, latency=latency, header=header)
        else:
            params = list(model.parameters())
            m = {"accuracy": None, "bytes_on_disk": None, "macs": None, "latency_ms": None,
                 "params": int(sum(p.numel() for p in params)),
                 "nonzero_params": int(sum(int(torch.count_nonzero(p.detach())) for p in params))}
        ratio = compression_ratio(dense_bytes, m["bytes_on_disk"])
        result = StageResult(name=stage.name, technique=stage.technique, options=tech.options, report=report,
                             ratio=ratio, evaluated=stage.evaluate, seconds=seconds, **m)
        stages.append(result)
        if on_stage is not None:
            on_stage(result, model, state)
        # what the archive header records per stage; wall-clock seconds stay out so the same seed gives the same file
        state.stages.append({k: v for k, v in result.to_dict().items()
                             if k not in ("report", "seconds", "latency_ms", "latency_detail", "latency_speedup")})
        acc = f"{m['accuracy']:.4f}" if m["accuracy"] is not None else "-"
        size = f"{m['bytes_on_disk']} bytes ({ratio:.1f}x)" if ratio else "-"
        say(f"stage {stage.name}: accuracy {acc}, {size}")
        checkpoint()

    points = [("baseline", baseline["accuracy"], dense_bytes)] + [(s.name, s.accuracy, s.bytes_on_disk) for s in stages]
    archive_info = None
    if out is not None:
        last = stages[-1]
        written = archive.write(out, model, state, header={
            **header, "metrics": {"accuracy": last.accuracy, "baseline_accuracy": baseline["accuracy"],
                                  "data": getattr(data, "name", None)}})
        # the file kept: its ratio is the one `evaluate` of it gives (the stage rows are each stage's own file)
        archive_info = {"path": str(out), "bytes": int(written), "dense_fp32_bytes": dense_bytes,
                        "ratio": compression_ratio(dense_bytes, int(written))}
    return CompressResult(model=dict(spec), data=getattr(data, "name", ""), recipe=recipe.to_dict(), baseline=baseline,
                          stages=stages, pareto=pareto_front(points), archive=archive_info, seed=seed,
                          compressed_model=model, state=state)
