"""`netdiet train` end to end: model + data -> (memory budget) -> fit -> files.

Output folder:
    model.safetensors   the trained weights (best weights when early stopping restored them)
    model.json          {"spec", "kwargs"}: how to rebuild the model (`netdiet compress/evaluate --weights`)
    train.json          the netdiet.train/1 document (also what `--json` writes)
    checkpoint/         the resumable per-epoch checkpoint (see checkpoint.py)
"""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from netdiet.analysis.counter import count_ops
from netdiet.data import get_dataset
from netdiet.data.registry import stratified_split
from netdiet.environment import environment, steady_threads
from netdiet.errors import NetdietError
from netdiet.fileio import atomic_write_json, folder_lock, read_json, save_state_dict
from netdiet.models import ModelSpec, create_model, resolve
from netdiet.training.budget import choose_for_budget, measure_activation_bytes
from netdiet.training.checkpoint import INDEX, has_checkpoint
from netdiet.training.distributed import (
    check_parallel,
    dist_info,
    gather_state,
    init_from_env,
    launched_by_torchrun,
    spawn,
)
from netdiet.training.loop import TrainConfig, TrainingDiverged, check_train_config, evaluate_accuracy, fit
from netdiet.training.precision import resolve_device
from netdiet.training.recompute import disable_checkpointing, enable_checkpointing

SCHEMA = "netdiet.train/1"


@dataclass
class TrainRun:
    """Everything `netdiet train` reports; `to_dict()` is the netdiet.train/1 document."""

    model: dict
    data: dict
    config: dict
    history: list[dict]
    steps: int
    seconds: float
    test_acc: float | None
    params: int
    world_size: int = 1
    out: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    resumed_from_epoch: int | None = None
    projection: dict | None = None
    early_stopping: dict | None = None
    recompute: dict | None = None
    budget: dict | None = None
    precision_effect: dict | None = None
    train_flops_per_sample: int | None = None
    flops_method: str | None = None
    memory_method: str = "rss_delta"
    environment: dict = field(default_factory=dict)   # netdiet.environment.environment() where the numbers were made
    diverged: dict | None = None    # {"epoch", "step", "loss" (a string: "nan"), "checkpoint_epoch"} when the loss blew up
    distributed: dict | None = None  # 2+ processes: {strategy, world_size, per_rank_peak_measured: [bytes per rank], ...}

    @property
    def peak_memory_bytes(self) -> int | None:
        peaks = [h.get("peak_rss_delta") for h in self.history if h.get("peak_rss_delta") is not None]
        return max(peaks) if peaks else None

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "model": self.model, "data": self.data, "config": self.config, "params": self.params,
                "world_size": self.world_size, "history": self.history, "steps": self.steps, "seconds": self.seconds,
                "test_acc": self.test_acc, "peak_memory_bytes": self.peak_memory_bytes, "memory_method": self.memory_method,
                "resumed_from_epoch": self.resumed_from_epoch, "projection": self.projection,
                "early_stopping": self.early_stopping, "recompute": self.recompute, "budget": self.budget,
                "precision_effect": self.precision_effect,
                "train_flops_per_sample": self.train_flops_per_sample, "flops_method": self.flops_method,
                "out": self.out, "files": self.files, "diverged": self.diverged, "distributed": self.distributed,
                "environment": self.environment or environment()}


# ---------------------------------------------------------------- pieces shared with sweep and the budget picker
def build_classifier(spec: str, kwargs: dict, sample_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
    """The model, checked to be a classifier that accepts the dataset's samples."""
    _, entry = resolve(spec)
    if entry is not None and entry.task != "classification":
        raise NetdietError(f"model '{spec}' is made for the '{entry.task}' task; netdiet train fits classifiers on image datasets "
                           "(choose lenet300, lenet5, mlp, cnn, resnet or mobilenet)")
    kwargs = dict(kwargs)
    model = create_model(spec, **kwargs)
    probe = torch.zeros((2,) + tuple(sample_shape))
    try:
        out = eval_output(model, probe)
    except Exception as exc:  # noqa: BLE001 - a shape mismatch is bad input, said in one line
        raise NetdietError(f"model '{spec}' cannot take the dataset's samples of shape {list(sample_shape)}: "
                           f"{str(exc).splitlines()[0]}; adjust --model-kw (e.g. in_channels, image_size, in_features)") from None
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape[1] < num_classes:
        fix = (f"set --model-kw num_classes={num_classes}" if factory_accepts(spec, "num_classes")
               else f"its factory takes no num_classes, so make it return {num_classes} class scores (or give it a num_classes argument)")
        raise NetdietError(f"model '{spec}' returns {tuple(out.shape) if torch.is_tensor(out) else type(out).__name__} "
                           f"for a batch of 2, not (2, >= {num_classes}) class scores; {fix}")
    return model


def eval_output(model: torch.nn.Module, x: torch.Tensor):
    """The model's output for `x` in eval mode without gradients (its train/eval mode is restored): the probe that
    checks a model fits the data before any training."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was)


def factory_accepts(spec: str, name: str) -> bool:
    """Whether the model factory of `spec` takes the keyword `name` (by name or through **kwargs)."""
    factory, _ = resolve(spec)
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):        # a builtin or C callable without a signature: do not guess
        return False
    return any(p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.kind == p.VAR_KEYWORD
               for p in params)


def zoo_kwargs_for(spec: str, kwargs: dict, sample_shape: tuple[int, ...]) -> dict:
    """Fill the zoo factories' input arguments from the data (mlp in_features, cnn in_channels/image_size) unless given."""
    factory, entry = resolve(spec)
    if entry is None:
        return dict(kwargs)
    params = inspect.signature(factory).parameters
    out = dict(kwargs)
    if "in_features" in params and "in_features" not in out:
        out["in_features"] = int(np.prod(sample_shape))
    if len(sample_shape) == 3:
        if "in_channels" in params and "in_channels" not in out:
            out["in_channels"] = int(sample_shape[0])
        if "image_size" in params and "image_size" not in out and entry.name not in ("resnet", "mobilenet", "yolo"):
            out["image_size"] = int(sample_shape[1])
    return out


def split_validation(y: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): a fixed stratified hold-out from the training split (test stays unseen)."""
    if not 0 <= fraction < 1:
        raise NetdietError(f"--val-fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return torch.arange(len(y)), torch.arange(0)
    tr, va = stratified_split(y.numpy(), fraction, seed=0)
    return torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(va))


def train_flops_per_sample(model: torch.nn.Module, x: torch.Tensor, optimizer: str) -> tuple[int | None, str | None]:
    """Counted FLOPs of one training step divided by its batch (netdiet's counter)."""
    import copy
    probe = copy.deepcopy(model)
    try:
        counts = count_ops(probe, x, train=True, optimizer=optimizer)
        return int(counts.train_flops) // len(x), "netdiet.analysis.counter (forward + backward + optimizer step)"
    except Exception:  # noqa: BLE001 - a projection without FLOPs is still a projection
        return None, None


def recompute_report(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: str, precision: str) -> dict:
    """What --checkpointing buys and costs on this model: activation bytes kept for backward (measured, live tensors)
    with and without it, and the training FLOPs it adds (counted with and without; the difference is the recompute)."""
    import copy
    x, y = x.clone(), y.clone()
    plain = measure_activation_bytes(model, x, y, precision=precision)
    ckpt = measure_activation_bytes(model, x, y, precision=precision, checkpointing=True)
    out = {"batch": len(x), "activations_plain": plain, "activations_checkpointed": ckpt,
           "activations_saved_fraction": 1 - ckpt / plain if plain else None, "recompute_flops_per_sample": None}
    base, method = train_flops_per_sample(model, x, optimizer)
    patched = copy.deepcopy(model)
    enable_checkpointing(patched)
    with_ckpt, _ = train_flops_per_sample(patched, x, optimizer)
    if base is not None and with_ckpt is not None:
        out["recompute_flops_per_sample"] = with_ckpt - base
        out["flops_method"] = method
    return out


def precision_report(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str, checkpointing: bool) -> dict:
    """Activation bytes kept for backward in fp32 and in `precision` (measured, live tensors, one forward each).
    The time effect is in the per-epoch samples/s (and benchmarks/train_memory.py runs both side by side)."""
    x, y = x.clone(), y.clone()
    fp32 = measure_activation_bytes(model, x, y, precision="fp32", checkpointing=checkpointing)
    low = measure_activation_bytes(model, x, y, precision=precision, checkpointing=checkpointing)
    return {"batch": len(x), "precision": precision, "activations_fp32": fp32, "activations": low,
            "activations_ratio": low / fp32 if fp32 else None}


def check_out_dir(out: str | os.PathLike, resume: bool) -> Path:
    """Create/validate the output folder before any work; refuse to overwrite an earlier run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NetdietError(f"--out {out} is a file, not a folder; choose a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NetdietError(f"cannot create output folder {out}: {exc.strerror}; choose a writable --out") from None
    probe = out / f".netdiet-write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise NetdietError(f"output folder {out} is not writable ({exc.strerror}); choose a writable --out") from None
    if not resume and _unfinished(out):
        raise NetdietError(f"{out} holds an unfinished training run; pass --resume to continue it or choose a new --out")
    return out


def _unfinished(out: Path) -> bool:
    """A checkpoint newer than the run's final train.json: resumable work a fresh run would overwrite.
    (A finished run is replaced by a new one, file by file, atomically.)"""
    if not has_checkpoint(out / "checkpoint"):
        return False
    try:
        ck = read_json(out / "checkpoint" / INDEX)
        final = read_json(out / "train.json")
        return int(final.get("steps", -1)) != int(ck.get("step", -2))
    except (NetdietError, ValueError, TypeError, AttributeError):
        return True


# ---------------------------------------------------------------- the run (one process, or each DDP worker)
def execute(params: dict, dataset=None) -> dict:
    """One training run from plain values (so DDP workers can rebuild it); rank 0 writes the files.

    Returns the netdiet.train/1 document.
    """
    return execute_member(params, dataset)[0]


def execute_member(params: dict, dataset=None, callbacks: list | None = None) -> tuple[dict, torch.nn.Module]:
    """`execute`, also returning the trained model; `callbacks` go to the loop. `params["bootstrap_seed"]` (an
    ensemble's bagging member) trains on a bootstrap resample of the training split, drawn with that seed."""
    rank, world = dist_info()
    cfg = TrainConfig(**params["config"])
    data = dataset or get_dataset(params["data"], data_dir=params.get("data_dir"), seed=cfg.seed)
    kwargs = zoo_kwargs_for(params["spec"], params["kwargs"], data.input_shape)
    torch.manual_seed(cfg.seed)                      # the same initial weights on every rank and every rerun
    model = build_classifier(params["spec"], kwargs, data.input_shape, data.num_classes)
    tr, va = split_validation(data.y_train, params.get("val_fraction", 0.1))
    if params.get("bootstrap_seed") is not None:     # n draws with replacement; the validation hold-out stays fixed
        tr = tr[torch.randint(len(tr), (len(tr),), generator=torch.Generator().manual_seed(params["bootstrap_seed"]))]
    x_tr, y_tr = data.x_train[tr], data.y_train[tr]
    x_va, y_va = (data.x_train[va], data.y_train[va]) if len(va) else (None, None)
    flops, flops_method = params.get("train_flops_per_sample"), params.get("flops_method")
    out = Path(params["out"]) if params.get("out") else None
    if out is not None:
        cfg.checkpoint_dir = str(out / "checkpoint")
    log = _logger() if rank == 0 else None
    fingerprint = {"model": ModelSpec(params["spec"], kwargs).to_dict(), "data": params["data"],
                   "val_fraction": params.get("val_fraction", 0.1),
                   **({"bootstrap_seed": params["bootstrap_seed"]} if params.get("bootstrap_seed") is not None else {})}
    with steady_threads():   # the record below names the threads the fit really ran on
        try:
            res = fit(model, x_tr, y_tr, cfg, x_val=x_va, y_val=y_va, callbacks=callbacks, fingerprint=fingerprint,
                      train_flops_per_sample=flops, log=log)
        except TrainingDiverged as exc:
            if out is not None and rank == 0:
                _write_diverged(out, params, kwargs, data, len(tr), len(va), cfg, world, model, exc)
            raise
        env = environment(resolve_device(cfg.device))
    run = TrainRun(model=ModelSpec(params["spec"], kwargs).to_dict(), data={**data.summary(), "train_used": len(tr),
                   "validation": len(va), "val_fraction": params.get("val_fraction", 0.1)},
                   config=cfg.to_dict(), history=res.history, steps=res.steps, seconds=res.seconds,
                   test_acc=evaluate_accuracy(model, data.x_test, data.y_test), params=sum(p.numel() for p in model.parameters()),
                   world_size=world, out=str(out) if out else None, resumed_from_epoch=res.resumed_from_epoch,
                   projection=res.projection, early_stopping=res.early_stopping,
                   recompute={**res.recompute, **(params.get("recompute_effect") or {})} if res.recompute else None,
                   budget=params.get("budget"), precision_effect=params.get("precision_effect"),
                   train_flops_per_sample=flops, flops_method=flops_method,
                   memory_method=res.memory_method, environment=env, distributed=res.distributed)
    weights = gather_state(model)[0] if out is not None else None   # every rank: FSDP gathers the shards
    if out is not None and rank == 0:
        disable_checkpointing(model)
        run.files = {"weights": str(out / "model.safetensors"), "model": str(out / "model.json"),
                     "log": str(out / "train.json"), "checkpoint": str(out / "checkpoint" / "checkpoint.json")}
        save_state_dict(out / "model.safetensors", weights, metadata={"spec": params["spec"]})
        atomic_write_json(out / "model.json", {"schema": "netdiet.model/1", **ModelSpec(params["spec"], kwargs).to_dict()})
        atomic_write_json(out / "train.json", run.to_dict())
    return run.to_dict(), model


def _write_diverged(out: Path, params: dict, kwargs: dict, data, n_train: int, n_val: int, cfg: TrainConfig, world: int,
                    model: torch.nn.Module, exc: TrainingDiverged) -> None:
    """train.json for a run whose loss blew up: the epochs it finished, where it diverged, the checkpoint kept.
    No weights are written (they are NaN); the last good checkpoint stays loadable by --resume."""
    ck = out / "checkpoint" / INDEX
    run = TrainRun(model=ModelSpec(params["spec"], kwargs).to_dict(), data={**data.summary(), "train_used": n_train,
                   "validation": n_val, "val_fraction": params.get("val_fraction", 0.1)},
                   config=cfg.to_dict(), history=exc.history, steps=exc.step, seconds=0.0, test_acc=None,
                   params=sum(p.numel() for p in model.parameters()), world_size=world, out=str(out), diverged=exc.record(),
                   files={"log": str(out / "train.json"), **({"checkpoint": str(ck)} if ck.is_file() else {})},
                   environment=environment(resolve_device(cfg.device)))
    atomic_write_json(out / "train.json", run.to_dict())


def _logger() -> Callable[[str], None]:
    import sys
    def log(msg: str) -> None:
        print(f"netdiet: {msg}", file=sys.stderr, flush=True)
    return log


def _ddp_execute(params: dict) -> dict:
    return execute(params)


def train(spec: str, *, model_kw: dict | None = None, data: str = "mnist5k", data_dir: str | None = None,
          out: str | None = None, config: TrainConfig | None = None, nproc: int = 1, memory_budget: str | int | None = None,
          val_fraction: float = 0.1, log: Callable[[str], None] | None = None) -> TrainRun:
    """Train `spec` on `data`; returns a TrainRun (and writes `out/` when given). `config.parallel` says how `nproc`
    processes (or torchrun's) share the work: "ddp" (the default) or "fsdp" (which needs 2 or more)."""
    cfg = config or TrainConfig()
    check_train_config(cfg)                          # bad numbers fail before the dataset is even loaded
    if nproc < 1:
        raise NetdietError(f"--nproc must be at least 1, got {nproc}")
    check_parallel(cfg.parallel, nproc, cfg.batch_size, resolve_device(cfg.device).type, cfg.precision)
    if out is None and cfg.resume:
        raise NetdietError("--resume needs --out DIR (the folder of the run to continue)")
    with out_dir_lock(out) if out is not None else contextlib.nullcontext():
        if out is not None:
            check_out_dir(out, cfg.resume)
        return _train(spec, model_kw, data, data_dir, out, cfg, nproc, memory_budget, val_fraction, log)


def out_dir_lock(out: str | os.PathLike):
    """Hold an exclusive lock (flock) on the --out folder for the whole run: a second `netdiet train` into the same folder is refused
    (one line) instead of interleaving its checkpoints with this run's. The OS drops the lock when the process ends,
    so a killed run never leaves the folder locked. Under torchrun only rank 0 takes it."""
    folder = Path(out)
    if os.environ.get("RANK", "0") != "0" or (folder.exists() and not folder.is_dir()):
        return contextlib.nullcontext()               # other ranks share rank 0's lock; check_out_dir names a file
    return folder_lock(folder, f"--out {folder} is in use by another netdiet train run; wait for it to finish "
                               "or choose another --out")


def _train(spec, model_kw, data, data_dir, out, cfg, nproc, memory_budget, val_fraction, log) -> TrainRun:
    dataset = get_dataset(data, data_dir=data_dir, seed=cfg.seed)
    kwargs = zoo_kwargs_for(spec, model_kw or {}, dataset.input_shape)
    model = build_classifier(spec, kwargs, dataset.input_shape, dataset.num_classes)
    budget = apply_memory_budget(model, dataset, memory_budget, cfg, log)
    flops, flops_method = train_flops_per_sample(model, dataset.x_train[:min(8, len(dataset.x_train))], cfg.optimizer)
    recompute = None
    if cfg.checkpointing:
        n = min(cfg.batch_size, len(dataset.x_train))
        recompute = recompute_report(model, dataset.x_train[:n], dataset.y_train[:n], cfg.optimizer, cfg.precision)
    precision_effect = None
    if cfg.precision == "bf16" and torch.device(cfg.device if cfg.device != "auto" else "cpu").type == "cpu":
        n = min(cfg.batch_size, len(dataset.x_train))
        precision_effect = precision_report(model, dataset.x_train[:n], dataset.y_train[:n], cfg.precision, cfg.checkpointing)
    params = {"spec": spec, "kwargs": kwargs, "data": data, "data_dir": data_dir, "out": out, "config": cfg.to_dict(),
              "val_fraction": val_fraction, "budget": budget, "train_flops_per_sample": flops, "flops_method": flops_method,
              "recompute_effect": recompute, "precision_effect": precision_effect}
    if launched_by_torchrun():
        init_from_env(resolve_device(cfg.device).type)
        doc = execute(params, dataset)
    elif nproc > 1:
        doc = spawn(_ddp_execute, (params,), nproc)
    else:
        doc = execute(params, dataset)
    return _from_doc(doc)


def apply_memory_budget(model: torch.nn.Module, dataset, memory_budget: str | int | None, cfg: TrainConfig,
                        log: Callable[[str], None] | None = None) -> dict | None:
    """--memory-budget: set cfg's batch, checkpointing and precision to the largest choice whose predicted peak fits
    (budget.choose_for_budget); returns the decision's record (None without a budget)."""
    if memory_budget is None:
        return None
    decision = choose_for_budget(model, dataset.input_shape, memory_budget, optimizer=cfg.optimizer,
                                 batch_size=cfg.batch_size, x_sample=dataset.x_train, y_sample=dataset.y_train)
    cfg.batch_size, cfg.checkpointing, cfg.precision = decision.batch_size, decision.checkpointing, decision.precision
    if log:
        log(decision.explanation)
    return decision.to_dict()


def _from_doc(doc: dict) -> TrainRun:
    keys = TrainRun.__dataclass_fields__
    return TrainRun(**{k: v for k, v in doc.items() if k in keys})
