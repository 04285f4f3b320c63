"""The public Python API. Every CLI command is a thin layer over a function here.

Sections are owned by the capability that produces them; each returns a result object with `to_dict()`.
The public names are listed once, in the package root (`netdiet.__all__`), which resolves them from here on
first use so that `import netdiet` (and so the CLI) does not import torch until a name is asked for.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from netdiet import __all__  # noqa: F401 - the public names, listed once in the package root
from netdiet import models as zoo
from netdiet.analysis import latency as latency_engine
from netdiet.analysis import measurement, scaling
from netdiet.analysis import memory as memory_engine
from netdiet.analysis import plan as plan_engine
from netdiet.analysis import profile as profile_engine
from netdiet.analysis.lazy_dynamo import without_dynamo_import
from netdiet.analysis.storage import data_report
from netdiet.analysis.storage import weight_storage as storage_of
from netdiet.compression import evaluate as evaluation
from netdiet.compression import recipe as recipes
from netdiet.data import get_dataset as dataset_by_name
from netdiet.data import registry as data_registry
from netdiet.documents import read_result
from netdiet.environment import environment
from netdiet.errors import NetdietError
from netdiet.fileio import load_state_dict
from netdiet.incremental import runner as incremental_runner
from netdiet.incremental.strategies import ContinualConfig
from netdiet.reporting.html import write_report
from netdiet.training import ensemble as training_ensemble
from netdiet.training import run as training_run
from netdiet.training import sweep as training_sweep
from netdiet.training.loop import TrainConfig
from netdiet.units import format_bytes, parse_size


# ==================================================================== models and data
def list_datasets() -> list[tuple[str, str]]:
    """(name, description) of every registered dataset."""
    return data_registry.list_datasets()


def describe_data(name: str, data_dir: str | None = None, seed: int = 0, samples: int = 5, repeats: int = 7) -> dict:
    """`netdiet data NAME`: sizes, classes, samples, dense vs CSR bytes, preprocessing cost (netdiet.data/1)."""
    return data_report(name, data_dir=data_dir, seed=seed, samples=samples, repeats=repeats)


def estimate_memory(model, inputs, **kwargs: Any):
    """Training/inference memory predicted on the meta device (analysis.memory.estimate_memory)."""
    with without_dynamo_import():
        return memory_engine.estimate_memory(model, inputs, **kwargs)


def measure_memory(model, inputs, **kwargs: Any) -> dict:
    """Measured steady-state training peak of real steps (analysis.measurement.measure_memory)."""
    return measurement.measure_memory(model, inputs, **kwargs)


def measure_latency(model, inputs, **kwargs: Any):
    """Forward and training-step latency with warm-up, median and p95 (analysis.latency.measure_latency)."""
    return latency_engine.measure_latency(model, inputs, **kwargs)


def weight_storage(model) -> dict:
    """Per-parameter sparsity and dense / CSR / bitmask bytes (analysis.storage.weight_storage)."""
    return storage_of(model)


def list_models() -> list[dict[str, Any]]:
    """One row per zoo model: name, parameters, default input, description (ModelEntry.row: the stored counts,
    nothing is built)."""
    return [entry.row() for entry in zoo.list_models()]


def create_model(spec: str, **kwargs: Any):
    """A model from a zoo name, `package.module:callable` or `path/file.py:callable`."""
    return zoo.create_model(spec, **kwargs)


def get_dataset(name: str = "mnist5k", data_dir: str | None = None, seed: int = 0):
    return dataset_by_name(name, data_dir=data_dir, seed=seed)


def load_model(spec: str, weights: str | None = None, **kwargs: Any):
    """Build `spec` and, if given, load safetensors weights (never a pickle)."""
    model = create_model(spec, **kwargs)
    if weights:
        state = load_state_dict(weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise NetdietError(f"{weights} does not fit model '{spec}': missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}; "
                               "give the weights of this model (and the same --model-kw)")
    return model


# ==================================================================== profile
def profile(model: Any, inputs: Any = None, *, model_kw: dict | None = None, batch_size: int | None = None,
            optimizer: str = "adam", depth: int | None = None, measure: bool = False, force: bool = False,
            dtype: Any = None, amp: bool = False, checkpointing: bool = False, batch_sizes: Any = None,
            max_batch_for: Any = None, dataset_size: int | None = None, epochs: int | None = None, seed: int = 0,
            warmup: int = 2, repeats: int = 10, progress: bool = True, weights: str | None = None,
            seq_len: int | None = None, parallel: str | None = None, world_size: int | None = None,
            tp: int | None = None, target_device: str | None = None):
    """Every cost figure of `model` (an nn.Module or a spec such as "resnet", "pkg.mod:fn", "file.py:fn",
    "hf:FOLDER_OR_CACHED_NAME", "timm:NAME").

    `inputs` is a tensor, a tuple of tensors, a dict of named tensors, a shape such as (1, 3, 32, 32) or a list
    of shapes; zoo and hf: specs supply their own default (`seq_len`: the hf: inputs' length, default 128).
    Returns a ProfileResult; `.to_dict()` is the netdiet.profile/1 document.

    `parallel` (ddp|fsdp|zero1|zero2|zero3|tp) with `world_size`, `tp` (tensor-parallel degree) and `target_device`
    (a name from the devices table) adds the per-rank `distributed` section.

    Nothing on this path compiles, so torch's own lazy `import torch._dynamo` (2 s) is kept out (lazy_dynamo).
    """
    with without_dynamo_import():
        return profile_engine.profile(model, inputs, model_kw=model_kw, batch_size=batch_size, optimizer=optimizer,
                    depth=depth, measure=measure, force=force, dtype=dtype, amp=amp, checkpointing=checkpointing,
                    batch_sizes=batch_sizes, max_batch_for=max_batch_for, dataset_size=dataset_size, epochs=epochs,
                    seed=seed, warmup=warmup, repeats=repeats, progress=progress, weights=weights, seq_len=seq_len,
                    parallel=parallel, world_size=world_size, tp=tp, target_device=target_device)


def plan(model: Any, devices: str = "8xh100-sxm", **kwargs: Any):
    """Layouts of `model` on `devices` ('64xh100') ranked by projected throughput, with why the others do not fit
    (analysis.plan.plan; keyword arguments: global_batch, seq_len, model_kw, optimizer, dtype, amp, micro_batch,
    checkpointing, strategies). Returns a PlanResult; `.to_dict()` is the netdiet.plan/1 document."""
    return plan_engine.plan(model, devices, **kwargs)


def largest_batch_within(model_factory_or_model: Any, input_shape_at_batch1: Any, dtype: Any, budget_bytes: Any, *,
                         optimizer: str = "adam", amp: bool = False, checkpointing: bool = False,
                         input_dtype: Any = None):
    """(batch, memory estimate): the largest batch whose estimated training peak fits in the budget (0 if none)."""
    with without_dynamo_import():
        return scaling.largest_batch_within(model_factory_or_model, input_shape_at_batch1, dtype, budget_bytes,
                    optimizer=optimizer, amp=amp, checkpointing=checkpointing, input_dtype=input_dtype)


# ==================================================================== compress / evaluate
def list_recipes() -> list[str]:
    """Names of the built-in compression recipes (`deep-compression`, `int8`, `structured-50`, `seed-incremental`)."""
    return recipes.list_recipes()


def load_recipe(recipe: str):
    """A validated `Recipe` from a built-in name or a YAML path (errors name the YAML line)."""
    return recipes.load_recipe(recipe)


def compress(model: str, recipe: str, *, data: str = "mnist5k", data_dir: str | None = None, out: str | None = None,
             weights: str | None = None, model_kwargs: dict[str, Any] | None = None, seed: int = 0,
             baseline_epochs: int | None = None, finetune_epochs: int | None = None, latency: bool = True,
             progress: bool = True, log=None, resume: bool = False):
    """Run a compression recipe on a model; returns a `CompressResult` (`.to_dict()` is schema netdiet.compress/1).

    Without `weights` the dense baseline is trained first (the recipe's `baseline` settings). `baseline_epochs`
    and `finetune_epochs` override the recipe's epochs (for quick runs). `out` writes the final .ndz archive and
    checkpoints every finished stage into `<out>.partial/` until then; `resume` continues such an unfinished run.
    """
    kwargs = dict(model_kwargs or {})
    rec = load_recipe(recipe)
    for value, what in ((baseline_epochs, "baseline_epochs"), (finetune_epochs, "finetune_epochs")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise NetdietError(f"{what} {value!r} must be an integer >= 0")
    if baseline_epochs == 0 and weights is None:
        raise NetdietError("--baseline-epochs 0 needs --weights (trained dense weights); without them the dense "
                           "baseline is trained first, for at least 1 epoch")
    if baseline_epochs is not None:
        rec.baseline = {**rec.baseline, "epochs": baseline_epochs}
    if finetune_epochs is not None:
        rec.stages = [dataclasses.replace(s, finetune={**s.finetune, "epochs": finetune_epochs} if s.finetune else None)
                      for s in rec.stages]
    dataset = get_dataset(data, data_dir=data_dir, seed=seed)
    kwargs = training_run.zoo_kwargs_for(model, kwargs, dataset.input_shape)  # like train: mlp in_features etc. from the data
    training_run.build_classifier(model, kwargs, dataset.input_shape, dataset.num_classes)  # a shape mismatch is one line, exit 2
    torch.manual_seed(seed)
    net = load_model(model, weights, **kwargs)
    return recipes.run_recipe(net, rec, dataset, spec={"spec": model, "kwargs": kwargs}, trained=weights is not None, seed=seed,
                      out=out, latency=latency, progress=progress, log=log, resume=resume)


def evaluate(model_or_archive_path, data="mnist5k", *, batch_size: int = 256, latency: bool = True,
             onnx: bool | None = None, model_spec: str | None = None, data_dir: str | None = None,
             latency_batch: int = 64, warmup: int = 5, repeats: int = 30, max_memory: str | int | None = None):
    """Accuracy, bytes on disk, ratio to the dense fp32 safetensors file, MACs and latency (PyTorch, and ONNX
    Runtime when the archive carries an int8 ONNX model) of a model or a .ndz archive; an `EvaluateResult`
    (`.to_dict()` is schema netdiet.evaluate/1). `data` is a Dataset or a dataset name (its test split).
    `max_memory` (bytes or '512MiB') caps what reading the archive may take; default: the RAM available."""
    return evaluation.evaluate(model_or_archive_path, data, batch_size=batch_size, latency=latency, onnx=onnx,
                               model_spec=model_spec, latency_batch=latency_batch, warmup=warmup, repeats=repeats,
                               data_dir=data_dir, max_memory=None if max_memory is None else parse_size(max_memory))


# ==================================================================== train / sweep
def train(spec: str, *, model_kw: dict[str, Any] | None = None, data: str = "mnist5k", data_dir: str | None = None,
          out: str | None = None, config: Any = None, nproc: int = 1, memory_budget: str | int | None = None,
          val_fraction: float = 0.1, log: Any = None, **config_fields: Any):
    """Train a zoo model or user callable on a dataset; returns a `netdiet.training.run.TrainRun` (to_dict: netdiet.train/1).

    Options are `TrainConfig` fields (epochs, batch_size, lr, optimizer, precision, checkpointing, workers,
    grad_accum, schedule, l1, l2, patience, resume, ...), given as `config=TrainConfig(...)` or as keywords.
    """
    cfg = config or TrainConfig(**config_fields)
    return training_run.train(spec, model_kw=model_kw, data=data, data_dir=data_dir, out=out, config=cfg, nproc=nproc,
                  memory_budget=memory_budget, val_fraction=val_fraction, log=log)


def train_ensemble(spec: str, k: int, *, mode: str = "seeds", combine: str = "mean", model_kw: dict[str, Any] | None = None,
                   data: str = "mnist5k", data_dir: str | None = None, out: str | None = None, config: Any = None,
                   nproc: int = 1, memory_budget: str | int | None = None, val_fraction: float = 0.1,
                   latency: bool = True, log: Any = None, **config_fields: Any):
    """Train K members of `spec` (seeds or bagging) through the one loop, each resumable in `out/member-i/`; returns an
    `EnsembleRun` (to_dict: netdiet.train-ensemble/1): accuracy alone and combined, K x cost, training, latency."""
    cfg = config or TrainConfig(**config_fields)
    return training_ensemble.train_ensemble(spec, k=k, mode=mode, combine=combine, model_kw=model_kw, data=data,
                                            data_dir=data_dir, out=out, config=cfg, nproc=nproc,
                                            memory_budget=memory_budget, val_fraction=val_fraction, latency=latency,
                                            log=log)


def sweep(spec: str, knob: str, values: list[Any] | None = None, *, model_kw: dict[str, Any] | None = None,
          data: str = "mnist5k", data_dir: str | None = None, k: int = 3, config: Any = None, log: Any = None,
          **config_fields: Any):
    """k-fold cross-validation over one model knob; returns a `netdiet.training.sweep.SweepResult` (netdiet.sweep/1).

    `knob` is a name with `values`, or one string 'widths=[[64],[256]]'.
    """
    if values is None:
        knob, values = training_sweep.parse_knob(knob)
    cfg = config or TrainConfig(**config_fields)
    return training_sweep.sweep(spec, knob, list(values), model_kw=model_kw, data=data, data_dir=data_dir, k=k, config=cfg, log=log)


# ==================================================================== continual
def continual(scenario: str = "split", data: str = "mnist5k", setting: str = "class", strategy: str | None = None, *,
              model: str | None = None, model_kw: dict | None = None, budget: str | int | None = None, seed: int = 0,
              epochs: int = 5, batch_size: int = 64, lr: float = 1e-3, optimizer: str = "adam",
              exemplar_bits: int = 32, exemplar_downsample: int = 1, exemplars: int | None = None,
              shrink: str | None = None, data_dir: str | None = None, tasks: int | None = None,
              classes_per_task: int | None = None, order_seed: int | None = None, progress: bool = True, **options: Any):
    """Continual learning under a hard byte budget: returns a ContinualResult (accuracy matrix, BWT, forgetting,
    bytes and training FLOPs per task for each strategy). `strategy="all"` runs every applicable strategy.
    Further ContinualConfig fields (ewc_lambda, lwf_temperature, exemplar_schedule, ...) go in **options.
    Without a strategy: `auto` (netdiet splits the budget itself) when a budget is given, else `replay`."""
    known = {f.name for f in dataclasses.fields(ContinualConfig)}
    unknown = set(options) - known
    if unknown:
        raise NetdietError(f"continual has no option(s) {', '.join(sorted(unknown))}; its options are: {', '.join(sorted(known))}")
    cfg = ContinualConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed, progress=progress,
                          budget=None if budget is None else parse_size(budget), exemplar_bits=exemplar_bits,
                          exemplar_downsample=exemplar_downsample, exemplars=exemplars, shrink=shrink, **options)
    return incremental_runner.continual(scenario, data, setting, strategy, model=model, model_kw=model_kw, data_dir=data_dir, tasks=tasks,
                classes_per_task=classes_per_task, order_seed=order_seed, config=cfg)


# ==================================================================== report / demo
def report(results: list[str], out: str = "report.html", *, title: str = "netdiet report") -> dict:
    """Render JSON results (any mix of netdiet commands) into one self-contained HTML file."""
    return write_report(list(results), out, title=title)


def demo_summary(result_paths: list[str]) -> dict:
    """The demo's headline figures, each taken from (or derived in one step from) a result file it names."""
    docs = {}
    for p in result_paths:
        try:
            docs[Path(p).name] = read_result(p)
        except NetdietError:
            continue
    heads: list[dict] = []

    def add(label: str, value, unit: str, source: str, path: str | None = None, **extra) -> None:
        if value is not None:
            heads.append({"label": label, "value": value, "unit": unit, "source": source,
                          **({"path": path} if path else {}), **extra})

    names = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5"}
    for net, pretty in names.items():
        prof = docs.get(f"profile-{net}.json", {})
        add(f"{pretty} MACs / image", (prof.get("totals") or {}).get("macs"), "count", f"profile-{net}.json")
        for recipe in ("deep-compression", "int8"):
            src = f"compress-{net}-{recipe}.json"
            comp = docs.get(src)
            if not comp or not comp.get("stages"):
                continue
            last = comp["stages"][-1]
            # the kept archive's ratio (evaluate.compression_ratio), the one `evaluate` of that file gives
            kept = comp.get("archive") if isinstance(comp.get("archive"), dict) else {}
            if kept.get("ratio") is not None:
                add(f"{pretty} {recipe}: smaller than dense fp32", kept["ratio"], "ratio", src, "archive.ratio")
            else:
                add(f"{pretty} {recipe}: smaller than dense fp32", last.get("ratio"), "ratio", src,
                    f"stages.{len(comp['stages']) - 1}.ratio")
            base_acc = (comp.get("baseline") or {}).get("accuracy")
            if base_acc is not None and last.get("accuracy") is not None:
                add(f"{pretty} {recipe}: accuracy {100 * base_acc:.2f} % -> {100 * last['accuracy']:.2f} %",
                    round(100 * (last["accuracy"] - base_acc), 2), "pt", src)
            ev = docs.get(f"evaluate-{net}-{recipe}.json") or {}
            speed = ev.get("latency_speedup") if isinstance(ev.get("latency_speedup"), dict) else {}
            # a ratio of two timings is a headline only when both are stable (value is None otherwise)
            if speed.get("stable") and speed.get("value") is not None:
                add(f"{pretty} {recipe}: ONNX Runtime faster than PyTorch ({speed.get('threads')} thread"
                    f"{'s' if speed.get('threads') != 1 else ''}, interleaved)", speed["value"], "ratio",
                    f"evaluate-{net}-{recipe}.json", "latency_speedup.value", interval=[speed.get("low"), speed.get("high")])
    cont = docs.get("continual.json")
    if cont:
        for st in cont.get("strategies") or []:
            add(f"continual {st.get('name')}: average accuracy after {len(st.get('accuracy_matrix') or [])} tasks",
                st.get("average_accuracy"), "pct", "continual.json")
            bpt = st.get("bytes_per_task") or []
            if bpt:
                budget = cont.get("budget")
                add(f"continual {st.get('name')}: most bytes kept"
                    + (f" (budget {format_bytes(budget)})" if isinstance(budget, int) else ""), max(bpt), "bytes", "continual.json")
    planned = docs.get("plan.json") or {}
    ranked = planned.get("ranked") if isinstance(planned.get("ranked"), list) else []
    if ranked and isinstance(ranked[0], dict) and isinstance(planned.get("devices"), dict):
        dev, kw = planned["devices"], (planned.get("model") or {}).get("kwargs") or {}
        add(f"{kw.get('preset', '')} {(planned.get('model') or {}).get('spec')} on {dev.get('count')}x {dev.get('name')}: "
            f"fastest layout {ranked[0].get('layout')}, projected {ranked[0].get('throughput_unit')}".strip(),
            ranked[0].get("throughput"), "count", "plan.json", "ranked.0.throughput")
    # the demo process's own record; each step's record is in its result file (a reused step keeps the one it ran with)
    return {"schema": "netdiet.demo/1", "headlines": heads, "sources": sorted(docs), "environment": environment()}

