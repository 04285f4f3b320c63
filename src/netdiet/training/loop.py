"""The training loop, readable top to bottom.

Techniques that need to act inside the loop (pruning masks, cluster-gradient gathering, distillation
losses, regularisers, early stopping) do it through a `Callback`, never by copying the loop. Features
(precision, recompute, data loading, schedules, checkpoints, DDP/FSDP) are small functions in the sibling modules;
`fit` only calls them.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from netdiet.checks import check_fields, check_integer, check_number, check_seed, json_finite
from netdiet.environment import steady_threads
from netdiet.errors import NetdietError
from netdiet.optim import OPTIMIZERS, make_optimizer
from netdiet.progress import progress_bar
from netdiet.training.callbacks import Callback, EarlyStopping, penalised_weights, weight_penalty
from netdiet.training.checkpoint import (
    Checkpoint,
    capture_rng,
    check_compatible,
    has_checkpoint,
    load_checkpoint,
    optimizer_state_for,
    restore_rng,
    save_checkpoint,
)
from netdiet.training.data import batch_iterator, epoch_batches
from netdiet.training.distributed import (
    StepPeak,
    all_reduce_sum,
    check_batch_split,
    dist_info,
    gather_state,
    gather_tensors,
    gradient_sync,
    load_state,
    shard_like,
)
from netdiet.training.measure import PeakRSS, projection
from netdiet.training.precision import autocast, check_precision, grad_scaler, resolve_device
from netdiet.training.recompute import enable_checkpointing
from netdiet.training.schedule import check_schedule, lr_at
from netdiet.units import format_count

__all__ = ["OPTIMIZERS", "Callback", "TrainConfig", "TrainResult", "TrainingDiverged", "check_train_config",
           "evaluate_accuracy", "fit", "make_optimizer", "predict"]


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 64             # global batch per micro-step (split across processes under DDP)
    lr: float = 1e-3
    optimizer: str = "adam"          # sgd | momentum | adam | adamw
    weight_decay: float = 0.0
    momentum: float = 0.9
    seed: int = 0
    progress: bool = True
    description: str = "train"
    # --- added for `netdiet train`; defaults keep the original behaviour
    grad_accum: int = 1              # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
    schedule: str = "constant"       # constant | cosine | step | linear  (see schedule.lr_at)
    warmup_steps: int = 0
    step_epochs: int = 0             # step schedule: multiply the LR by gamma every step_epochs epochs
    gamma: float = 0.1
    l1: float = 0.0                  # penalty l1 * sum|w| on weights with 2+ dims
    l2: float = 0.0                  # penalty l2/2 * sum w^2 (coupled to the loss, unlike weight_decay)
    precision: str = "fp32"          # fp32 | bf16 (CPU/CUDA autocast) | fp16 (CUDA autocast + GradScaler)
    checkpointing: bool = False      # activation recompute on the model's sequential blocks
    checkpoint_segments: int = 0     # 0 = about sqrt(number of blocks)
    workers: int = 0                 # 0 = index tensors in the loop; >0 = DataLoader worker processes
    prefetch: int = 2                # batches each worker prepares ahead
    pin_memory: bool = False         # only takes effect with CUDA
    patience: int = 0                # early stopping after `patience` epochs without improvement (0 = off)
    monitor: str = "val_acc"         # val_acc | val_loss | train_acc | loss
    min_delta: float = 0.0
    restore_best: bool = True
    checkpoint_dir: str | None = None  # write a resumable checkpoint here every `checkpoint_every`
    checkpoint_every: int | str = 1    # N epochs, or "500steps" / "5min" / "90s" / "2h" (mid-epoch; one process)
    resume: bool = False             # continue from the checkpoint in checkpoint_dir
    device: str = "cpu"              # cpu | cuda | auto
    projection_steps: int = 0        # >0: after this many steps, project the full run's time from the throughput
    parallel: str = "ddp"            # ddp | fsdp: how 2+ processes share the work (distributed.py); unused on one
    clip_grad_norm: float = 0.0      # >0: scale the gradients so their total norm is at most this (0 = off)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)   # one dict per epoch
    steps: int = 0
    seconds: float = 0.0
    world_size: int = 1
    resumed_from_epoch: int | None = None
    projection: dict | None = None
    early_stopping: dict | None = None
    recompute: dict | None = None
    memory_method: str = "rss_delta"
    distributed: dict | None = None  # 2+ processes: {strategy, world_size, per_rank_peak_measured, ...}

    def to_dict(self) -> dict:
        return {"history": self.history, "steps": self.steps, "seconds": self.seconds, "world_size": self.world_size,
                "resumed_from_epoch": self.resumed_from_epoch, "projection": self.projection,
                "early_stopping": self.early_stopping, "recompute": self.recompute, "memory_method": self.memory_method,
                "distributed": self.distributed}


class TrainingDiverged(NetdietError):
    """The loss became NaN or infinite: the run stops (bad input: the learning rate, usually) and says where.

    `history` holds the epochs completed before it; `checkpoint_epoch` is the last good checkpoint (None: none)."""

    def __init__(self, epoch: int, step: int, loss: float, history: list[dict], checkpoint_epoch: int | None,
                 checkpoint_dir: str | None, grad_norm: float | None = None) -> None:
        self.epoch, self.step, self.loss, self.grad_norm = epoch, step, loss, grad_norm
        self.history, self.checkpoint_epoch = history, checkpoint_epoch
        if checkpoint_epoch is not None:
            kept = (f"; the last good checkpoint (epoch {checkpoint_epoch}) is kept in {checkpoint_dir}: "
                    "add --resume with a lower --lr to continue from it")
        elif checkpoint_dir:
            kept = "; no checkpoint had been written yet"
        else:
            kept = ""
        what = f"loss {loss}" + (f", gradient norm {grad_norm}" if grad_norm is not None else "")
        super().__init__(f"training diverged at epoch {epoch} step {step} ({what}); lower --lr{kept}")

    def record(self) -> dict:
        """The divergence as JSON-safe values (the loss as a string: 'nan', 'inf')."""
        return {"epoch": self.epoch, "step": self.step, "loss": str(self.loss), "checkpoint_epoch": self.checkpoint_epoch,
                **({"gradient_norm": str(self.grad_norm)} if self.grad_norm is not None else {})}


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits for all of x, in eval mode (the model's mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    outs = [model(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(outs)


def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    if len(y) == 0:
        return float("nan")
    return (predict(model, x, batch_size).argmax(1) == y).float().mean().item()


@steady_threads()   # the loop runs on exactly torch.get_num_threads() threads, however busy the machine is
def fit(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, config: TrainConfig | None = None, *,
        x_val: torch.Tensor | None = None, y_val: torch.Tensor | None = None,
        callbacks: list[Callback] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        optimizer: torch.optim.Optimizer | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        fingerprint: dict | None = None, train_flops_per_sample: int | None = None,
        log: Callable[[str], None] | None = None) -> TrainResult:
    """Train `model` in place on in-memory tensors; returns the per-epoch history.

    transform: per-batch preprocessing of x (runs in DataLoader workers when cfg.workers > 0).
    fingerprint: extra run facts (model spec, data) a resumed checkpoint must match.
    train_flops_per_sample: counted FLOPs of one training sample, for the projection.
    """

    cfg = config or TrainConfig()
    callbacks = list(callbacks or [])
    rank, world = dist_info()
    device = resolve_device(cfg.device)
    _check_config(cfg, len(x_train), world)
    check_precision(cfg.precision, device)
    check_schedule(cfg.schedule)
    torch.manual_seed(cfg.seed)
    model.to(device)
    result = TrainResult(world_size=world)
    if cfg.checkpointing:
        result.recompute = enable_checkpointing(model, cfg.checkpoint_segments)
    if optimizer is not None and world > 1 and cfg.parallel == "fsdp":
        raise NetdietError("fit under FSDP builds its optimizer over the sharded parameters itself; pass no optimizer")
    rank_peak = StepPeak(device)                     # one steady-state step measured per rank (2+ processes)
    net = rank_peak.wrap(model, cfg.parallel, world)  # FSDP shards `model` in place: net is model
    opt = optimizer or make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum)
    base_lrs = [g["lr"] for g in opt.param_groups]
    scheduled = cfg.schedule != "constant" or cfg.warmup_steps > 0
    scaler = grad_scaler(cfg.precision, device)
    early = EarlyStopping(cfg.patience, cfg.monitor, cfg.min_delta, cfg.restore_best) if cfg.patience else None
    if early:
        callbacks.append(early)
    penalised = penalised_weights(model) if (cfg.l1 or cfg.l2) else []
    start_epoch, step = 0, 0
    fingerprint = {**_fingerprint(cfg, world), **(fingerprint or {})}
    every_unit, every = parse_checkpoint_every(cfg.checkpoint_every)
    if every_unit != "epochs" and world > 1:
        every_unit, every = "epochs", 1      # a mid-epoch checkpoint would hold rank 0's partial sums only
    skip, partial = 0, None                  # a mid-epoch checkpoint: batches already done, their running sums
    if cfg.resume:
        start_epoch, step, skip, partial = _resume(cfg, model, opt, scaler, early, fingerprint, result, log)
    saved_epoch = result.resumed_from_epoch          # the last good checkpoint on disk (None: none yet)
    for cb in callbacks:
        cb.on_train_begin(model, opt)

    n, per_rank = len(x_train), cfg.batch_size // world
    batches_per_epoch = math.ceil(math.ceil(n / world) / per_rank)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch
    progress = _progress(cfg.progress and rank == 0, (cfg.epochs - start_epoch) * batches_per_epoch, cfg.description)
    rss, t_start, first_step, t_first = PeakRSS(), time.perf_counter(), step, None
    measure_at = first_step + 1 if world > 1 else -1   # the process's second step: the optimizer state exists
    t_saved = t_start
    opt.zero_grad(set_to_none=True)
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        rss.reset()
        batches = epoch_batches(n, per_rank, epoch, cfg.seed, rank=rank, world=world)
        first = skip if epoch == start_epoch else 0
        data = batch_iterator(x_train, y_train, batches[first:], workers=cfg.workers, prefetch=cfg.prefetch,
                              pin_memory=cfg.pin_memory, transform=transform)
        loss_sum, correct, count, done_s, waited = 0.0, 0, 0, 0.0, 0.0
        if first and partial:
            loss_sum, correct, count, done_s, waited = (partial[k] for k in ("loss_sum", "correct", "count", "seconds", "waited"))
        t0 = time.perf_counter() - done_s
        for i in range(first, len(batches)):
            t_wait = time.perf_counter()
            x, y = next(data)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            waited += time.perf_counter() - t_wait
            last_micro = (i + 1) % cfg.grad_accum == 0 or i + 1 == len(batches)
            if step == measure_at and i % cfg.grad_accum == 0 and rank_peak.peak is None:
                rank_peak.start(model, opt, (x, y))
            with gradient_sync(net, cfg.parallel, world, last_micro):
                with autocast(cfg.precision, device):
                    logits = net(x)
                    loss = loss_fn(logits, y)
                total = loss
                for cb in callbacks:
                    extra = cb.extra_loss(model, x, y, logits)
                    if extra is not None:
                        total = total + extra
                penalty = weight_penalty(penalised, cfg.l1, cfg.l2)
                if penalty is not None:    # of FSDP shards: summed over the ranks into one plain tensor
                    total = total + (penalty.full_tensor() if hasattr(penalty, "full_tensor") else penalty)
                if cfg.grad_accum > 1:
                    total = total / cfg.grad_accum
                loss_value = loss.item()
                bad = loss_value if not math.isfinite(loss_value) else _non_finite(total)
                if world > 1:     # every rank stops together, or the others would wait forever in the next all-reduce
                    bad_anywhere = all_reduce_sum(torch.tensor([0.0 if bad is None else 1.0], dtype=torch.float64))
                    bad = bad if bad is not None else (float("nan") if bad_anywhere.item() else None)
                if bad is not None:
                    progress.close()
                    raise TrainingDiverged(epoch + 1, step + 1, bad, json_finite(result.history), saved_epoch,
                                           cfg.checkpoint_dir)
                (scaler.scale(total) if scaler else total).backward()
            loss_sum += loss_value * len(y)
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
            if last_micro:
                for g, base in zip(opt.param_groups, base_lrs if scheduled else []):   # constant: leave the LR alone
                    g["lr"] = lr_at(step, base_lr=base, schedule=cfg.schedule, total_steps=total_steps,
                                    warmup_steps=cfg.warmup_steps, steps_per_epoch=steps_per_epoch,
                                    step_epochs=cfg.step_epochs, gamma=cfg.gamma)
                if scaler:
                    scaler.unscale_(opt)
                else:   # a NaN/inf gradient would make NaN weights, and the next checkpoint would keep them
                    grad_norm = _non_finite_grad(opt)   # (the fp16 GradScaler skips such steps by itself)
                    if grad_norm is not None:
                        progress.close()
                        raise TrainingDiverged(epoch + 1, step + 1, loss_value, json_finite(result.history), saved_epoch,
                                               cfg.checkpoint_dir, grad_norm=grad_norm)
                if cfg.clip_grad_norm:      # the norm over all gradients (under FSDP: of every rank's shards)
                    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.clip_grad_norm)
                for cb in callbacks:
                    cb.before_step(model, step)
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                if rank_peak.running:
                    rank_peak.stop()
                step += 1
                for cb in callbacks:
                    cb.after_step(model, step)
                if step == first_step + 1:
                    t_first = time.perf_counter()        # the first step (warm-up) is left out of the projection
                if cfg.projection_steps and step == first_step + 1 + cfg.projection_steps and epoch == start_epoch:
                    result.projection = projection(cfg.projection_steps * cfg.batch_size * cfg.grad_accum,
                                                   time.perf_counter() - t_first, n * (cfg.epochs - start_epoch),
                                                   train_flops_per_sample)
                    if log:
                        log(_projection_line(result.projection))
                due = (every_unit == "steps" and step % every == 0
                       or every_unit == "seconds" and time.perf_counter() - t_saved >= every)
                if cfg.checkpoint_dir and rank == 0 and due and i + 1 < len(batches):   # mid-epoch (ends save below)
                    sums = {"loss_sum": loss_sum, "correct": correct, "count": count,    # this batch is already in them
                            "seconds": time.perf_counter() - t0, "waited": waited}
                    _save(cfg.checkpoint_dir, model, opt, scaler, early, epoch, step, result.history, fingerprint,
                          batch=i + 1, partial=sums)
                    t_saved = time.perf_counter()
            progress.advance()
        seconds = time.perf_counter() - t0
        sums = all_reduce_sum(torch.tensor([loss_sum, correct, count], dtype=torch.float64))  # over all ranks
        metrics = _epoch_metrics(epoch, sums, seconds, waited, rss, opt, step,
                                 model, x_val, y_val, loss_fn)
        result.history.append(metrics)
        stop = any([cb.on_epoch_end(model, epoch, metrics) for cb in callbacks])
        metrics["stopped_early"] = bool(stop)
        if cfg.checkpoint_dir and (stop or epoch + 1 == cfg.epochs or every_unit != "epochs" or (epoch + 1) % every == 0):
            _save(cfg.checkpoint_dir, model, opt, scaler, early, epoch + 1, step, result.history, fingerprint, rank=rank)
            saved_epoch, t_saved = epoch + 1, time.perf_counter()
        if stop:
            break
    progress.close()
    for cb in callbacks:
        cb.on_train_end(model)
    result.steps, result.seconds = step, time.perf_counter() - t_start
    result.early_stopping = early.summary() if early else None
    result.memory_method = rss.method if rss.available else "unavailable"
    if world > 1:
        result.distributed = {"strategy": cfg.parallel, "world_size": world, "per_rank_peak_measured": rank_peak.gather(),
                              "peak_method": rank_peak.method, "measured_step": measure_at + 1,
                              "measured_step_seconds": rank_peak.seconds}   # rank 0's, profiler included
    return result


# ---------------------------------------------------------------- the loop's small helpers
# field -> (kind, low, high, CLI flag, example); kind "int" = whole number, "real" = finite number, "pos" = finite > 0
_NUMBERS: dict[str, tuple[str, float | None, float | None, str, str]] = {
    "epochs": ("int", 1, None, "--epochs", "--epochs 5"),
    "batch_size": ("int", 1, None, "--batch-size", "--batch-size 64"),
    "lr": ("pos", 0, None, "--lr", "--lr 0.001"),
    "weight_decay": ("real", 0, None, "--weight-decay", "--weight-decay 0.0001"),
    "momentum": ("real", 0, 1, "momentum", "momentum=0.9"),
    "grad_accum": ("int", 1, None, "--grad-accum", "--grad-accum 2"),
    "warmup_steps": ("int", 0, None, "--warmup-steps", "--warmup-steps 100"),
    "step_epochs": ("int", 0, None, "--step-epochs", "--step-epochs 10"),
    "gamma": ("pos", 0, None, "--gamma", "--gamma 0.1"),
    "l1": ("real", 0, None, "--l1", "--l1 0.00001"),
    "l2": ("real", 0, None, "--l2", "--l2 0.0001"),
    "checkpoint_segments": ("int", 0, None, "--segments", "--segments 0 (about sqrt(blocks))"),
    "workers": ("int", 0, None, "--workers", "--workers 2"),
    "prefetch": ("int", 1, None, "--prefetch", "--prefetch 2"),
    "patience": ("int", 0, None, "--patience", "--patience 3"),
    "min_delta": ("real", 0, None, "--min-delta", "--min-delta 0.001"),
    "projection_steps": ("int", 0, None, "--projection-steps", "--projection-steps 5"),
    "clip_grad_norm": ("real", 0, None, "--clip-grad-norm", "--clip-grad-norm 1.0"),
}


def check_train_config(cfg: TrainConfig) -> None:
    """Every number of a TrainConfig finite, in range and integer where an integer is meant (NetdietError otherwise).

    The one check for the CLI, the recipes and the API: `fit` runs it first, `netdiet.train` before any work."""
    check_fields(cfg, ((name, *rule) for name, rule in _NUMBERS.items()))
    check_seed(cfg.seed)
    parse_checkpoint_every(cfg.checkpoint_every)


_EVERY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(epochs?|steps?|s|sec|min|h)\s*$")
_SECONDS = {"s": 1, "sec": 1, "min": 60, "h": 3600}


def parse_checkpoint_every(value: int | str) -> tuple[str, float]:
    """checkpoint_every as (unit, amount): ("epochs", N), ("steps", N) or ("seconds", T).
    An integer is epochs; a string is "3epochs", "500steps", "90s", "5min" or "2h"."""
    example = "--checkpoint-every 1 (epochs), 500steps or 5min"
    if not isinstance(value, str):
        return "epochs", check_integer("checkpoint_every", value, low=1, flag="--checkpoint-every", example=example)
    m = _EVERY.match(value.lower())
    if not m:
        raise NetdietError(f"checkpoint_every (--checkpoint-every) {value!r} is not N epochs, N steps or a time; "
                           f"e.g. {example}")
    amount, unit = float(m.group(1)), m.group(2)
    if unit in _SECONDS:
        return "seconds", check_number("checkpoint_every", amount * _SECONDS[unit], low=0, low_open=True,
                                       flag="--checkpoint-every", example=example)
    n = check_integer("checkpoint_every", amount, low=1, flag="--checkpoint-every", example=example)
    return ("steps" if unit.startswith("step") else "epochs"), n


def _check_config(cfg: TrainConfig, n: int, world: int) -> None:
    check_train_config(cfg)
    if n == 0:
        raise NetdietError("no training samples; check the dataset or the task split")
    check_batch_split(cfg.batch_size, world)
    if cfg.resume and not cfg.checkpoint_dir:
        raise NetdietError("--resume needs the folder of the run to continue (--out DIR)")


def _fingerprint(cfg: TrainConfig, world: int) -> dict:
    """Settings a resumed run must share with the run that wrote the checkpoint (epochs may grow)."""
    keys = ("batch_size", "grad_accum", "optimizer", "seed", "precision", "schedule", "l1", "l2", "weight_decay")
    # --parallel is not a key: DDP and FSDP checkpoints hold the same whole state, so either resumes the other
    return {**{k: getattr(cfg, k) for k in keys}, "world_size": world,
            **({"clip_grad_norm": cfg.clip_grad_norm} if cfg.clip_grad_norm else {})}


def _epoch_metrics(epoch: int, sums: torch.Tensor, seconds: float, waited: float, rss,
                   opt: torch.optim.Optimizer, step: int, model: nn.Module, x_val, y_val, loss_fn) -> dict:
    loss_sum, correct, count = sums.tolist()
    metrics = {"epoch": epoch + 1, "loss": loss_sum / count, "train_acc": correct / count, "seconds": seconds,
               "samples_per_s": count / seconds if seconds > 0 else None, "data_wait_fraction": waited / seconds if seconds > 0 else None,
               "peak_rss": rss.peak(), "peak_rss_delta": rss.peak_delta(), "lr": opt.param_groups[0]["lr"], "steps": step}
    if x_val is not None and y_val is not None and len(y_val):
        logits = predict(model, x_val)
        metrics["val_acc"] = (logits.argmax(1) == y_val).float().mean().item()
        metrics["val_loss"] = float(loss_fn(logits, y_val))
    return metrics


def _save(folder, model, opt, scaler, early, epoch, step, history, fingerprint, batch=0, partial=None, rank=0) -> None:
    """Every rank calls it (under FSDP the whole state is gathered from all of them); rank 0 writes."""
    model_state, opt_state = gather_state(model, opt)
    callbacks = {}
    if early:
        scalars, tensors = early.state_dict()
        callbacks["early_stopping"] = (scalars, gather_tensors(tensors))
    if rank == 0:
        save_checkpoint(folder, Checkpoint(epoch, step, history, fingerprint, model_state, opt_state,
                                           capture_rng(), callbacks, scaler.state_dict() if scaler else None,
                                           batch=batch, partial=partial))


def _non_finite(total: torch.Tensor) -> float | None:
    """The loss with penalties and callback terms, when it is NaN or infinite (None when finite)."""
    value = float(total.detach())
    return None if math.isfinite(value) else value


def _non_finite_grad(opt: torch.optim.Optimizer) -> float | None:
    """The total gradient norm when it is NaN or infinite (None when finite). Under DDP the gradients are already
    averaged, so every rank sees the same value and stops at the same step."""
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return None
    norm = float(torch.nn.utils.get_total_norm(grads))
    return None if math.isfinite(norm) else norm


def _resume(cfg, model, opt, scaler, early, fingerprint, result, log) -> tuple[int, int, int, dict | None]:
    """(epoch to start, steps done, batches of that epoch already done, their running sums)."""
    if not has_checkpoint(cfg.checkpoint_dir):   # killed before its first checkpoint: nothing is lost by starting over
        if log:
            log(f"--resume: no checkpoint in {cfg.checkpoint_dir} yet (the run stopped before its first one); starting fresh")
        return 0, 0, 0, None
    ck = load_checkpoint(cfg.checkpoint_dir)
    check_compatible(ck, model, fingerprint, cfg.checkpoint_dir)
    configured = [g["lr"] for g in opt.param_groups]
    try:     # hyperparameters: this run's; under FSDP each rank keeps its shards of the whole state
        load_state(model, opt, ck.model, optimizer_state_for(opt, ck, cfg.checkpoint_dir))
        for g, lr in zip(opt.param_groups, configured):   # the LR asked for now wins (resume after a divergence)
            g["lr"] = lr
    except (ValueError, KeyError, TypeError) as exc:
        raise NetdietError(f"optimizer state in {cfg.checkpoint_dir} does not fit: {exc}; resume with the same --optimizer") from None
    restore_rng(ck.rng)
    try:
        if scaler and ck.scaler:
            scaler.load_state_dict(ck.scaler)
        if early and "early_stopping" in ck.callbacks:
            scalars, tensors = ck.callbacks["early_stopping"]
            early.load_state_dict(scalars, shard_like(model, tensors))
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise NetdietError(f"{cfg.checkpoint_dir}/checkpoint.json is damaged: the scaler or early-stopping state does not load "
                           f"({type(exc).__name__}: {exc}); train afresh into a new --out") from None
    result.history = list(ck.history)
    result.resumed_from_epoch = ck.epoch
    finished = bool(ck.history and ck.history[-1].get("stopped_early"))
    return (cfg.epochs if finished else ck.epoch), ck.step, (0 if finished else ck.batch), ck.partial


def _projection_line(p: dict) -> str:
    line = (f"projection: {p['total_samples']:,} samples at {p['samples_per_s']:.0f} samples/s "
            f"(measured over {p['measured_samples']:,}) -> about {p['projected_seconds']:.1f} s")
    if p.get("total_train_flops"):
        line += f"; {format_count(p['total_train_flops'])}FLOP counted, {format_count(p['achieved_flops_per_s'])}FLOP/s achieved"
    return line


class _progress:
    """A rich progress bar when asked for and stderr is a terminal; silent otherwise."""

    def __init__(self, enabled: bool, total: int, description: str) -> None:
        self._bar = None
        if enabled and total > 0:
            self._bar = progress_bar(total, description)

    def advance(self) -> None:
        if self._bar:
            self._bar.advance()

    def close(self) -> None:
        if self._bar:
            self._bar.close()
