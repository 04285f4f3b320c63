"""The command line: the only place that parses arguments and prints. Thin over `netdiet.api`.

Each command is a function decorated with `@command` that adds its sub-parser and sets `func`.
Exit codes: 0 success, 2 bad input (one line, no traceback unless --debug), 1 internal error.

Why this module is long: it is every command's options and printing, one short section per command (eleven of
them), each read on its own; splitting them would only add a registry in between.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable

from rich.console import Console

from netdiet.errors import NetdietError


def _make_console(stderr: bool = False) -> Console:
    """A terminal gets its own width; a pipe or a file (a CI log) gets 200 columns, so that no table is cut
    to rich's default of 80 with '…'. Tables that fit 80 columns print the same either way."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr) if stream.isatty() else Console(stderr=stderr, width=200)


console = _make_console()
err_console = _make_console(stderr=True)
_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def _log(msg: str) -> None:
    """A long command's progress line (the `log` callback of api.compress / train / train_ensemble / sweep): dim, on stderr."""
    err_console.print(f"[dim]{msg}[/dim]")


def command(fn: Callable[[argparse._SubParsersAction], None]) -> Callable:
    _COMMANDS.append(fn)
    return fn


# ------------------------------------------------------------------ shared option helpers
def _epochs_or_text(value: str) -> int | str:
    """A plain number is N epochs; anything else ("500steps", "5min") is checked by the trainer's config check."""
    return int(value) if value.strip().isdigit() else value


def add_json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH (atomically)")


def add_seed_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same result; default 0)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="zoo name (`netdiet models`), package.module:callable or path/file.py:callable")
    p.add_argument("--model-kw", action="append", default=[], metavar="KEY=VALUE",
                   help="argument for the model factory (repeatable), e.g. --model-kw depth=20")


def add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", action="append", default=[], metavar="[NAME=]SHAPE[:DTYPE]",
                   help="an input, batch first: 1,3,224,224 or 1,128:int64 (repeatable: positional inputs in order); "
                        "NAME=SHAPE[:DTYPE] is a keyword input of forward; zoo models have a default")
    p.add_argument("--input-range", default=None, metavar="N",
                   help="integer inputs are drawn in [0, N) (default: the model's first nn.Embedding size, else 2)")


def add_data_options(p: argparse.ArgumentParser, default: str | None = "mnist5k") -> None:
    p.add_argument("--data", default=default, help=f"dataset name (`netdiet data --list`; default {default})")
    p.add_argument("--data-dir", default=None, help="folder with IDX files for mnist / fashion-mnist")


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for PyTorch (and ONNX Runtime) compute and timing (default: torch's own choice "
                        "for compute, 1 thread for timings)")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's intra-op threads from --threads (fewer threads give steadier timings on a busy machine)."""
    if getattr(args, "threads", None) is None:
        return
    if args.threads < 1:
        raise NetdietError(f"--threads {args.threads} must be at least 1")
    import torch
    torch.set_num_threads(args.threads)


def write_json(args: argparse.Namespace, doc: dict) -> None:
    if getattr(args, "json", None):
        from netdiet.fileio import atomic_write_json
        atomic_write_json(args.json, doc)
        err_console.print(f"[dim]wrote {args.json}[/dim]")


# ==================================================================== models
@command
def _models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo: name, parameters, default input")
    add_json_option(p)
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    # the registry alone (stored parameter counts), not the API: listing the zoo imports no analysis engine
    from netdiet.models import list_models
    from netdiet.reporting.terminal import models_table
    rows = [entry.row() for entry in list_models()]
    console.print(models_table(rows))
    write_json(args, {"schema": "netdiet.models/1", "models": rows})
    return 0


# ==================================================================== data
# (the data command is added in the analysis section below)
@command
def _data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="a dataset: samples, shapes, classes, dense vs CSR bytes, preprocessing cost")
    p.add_argument("name", nargs="?", help="dataset name (`netdiet data --list`)")
    p.add_argument("--list", action="store_true", help="list the datasets")
    p.add_argument("--data-dir", default=None, help="folder with IDX files for mnist / fashion-mnist")
    p.add_argument("--samples", type=int, default=5, help="how many samples to show (default 5)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats of each preprocessing step (default 7)")
    add_seed_option(p)
    add_json_option(p)
    p.set_defaults(func=_run_data)


def _run_data(args: argparse.Namespace) -> int:
    from netdiet import api
    from netdiet.reporting.data_tables import data_tables, datasets_table
    if args.list or not args.name:
        if not args.list:
            raise NetdietError("give a dataset name, e.g. `netdiet data mnist5k`, or --list to see them")
        rows = api.list_datasets()
        console.print(datasets_table(rows))
        write_json(args, {"schema": "netdiet.datasets/1", "datasets": [{"name": n, "description": d} for n, d in rows]})
        return 0
    if args.repeats < 1:
        raise NetdietError(f"--repeats must be 1 or more, got {args.repeats}")
    doc = api.describe_data(args.name, data_dir=args.data_dir, seed=args.seed, samples=args.samples, repeats=args.repeats)
    console.print(data_tables(doc))
    write_json(args, doc)
    return 0


# ==================================================================== profile
@command
def _profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="what a model costs: params, bytes, FLOPs/MACs per module and operator, memory, time, scaling")
    add_model_options(p)
    add_input_options(p)
    p.add_argument("--batch-size", default=None, help="replace dim 0 of every input")
    p.add_argument("--seq-len", default=None, metavar="N",
                   help="length of an hf: model's default inputs (input_ids, attention_mask; default 128)")
    p.add_argument("--depth", default=None, help="module tree depth to show and keep (default: 3 shown, all kept in --json)")
    p.add_argument("--optimizer", default="adam", help="sgd|momentum|adam|adamw|none (default adam)")
    p.add_argument("--measure", action="store_true", help="also run real steps: measured memory peak and latency")
    p.add_argument("--force", action="store_true", help="measure even when the estimate exceeds the available RAM")
    p.add_argument("--dtype", default=None, help="training precision fp32|bf16|fp16 (default: the model's own)")
    p.add_argument("--amp", action="store_true", help="autocast mixed precision (fp32 master weights)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (less memory, recompute FLOPs)")
    p.add_argument("--batch-sizes", default=None, metavar="B1,B2,...", help="sweep these batch sizes and fit memory and FLOPs")
    p.add_argument("--max-batch-for", default=None, metavar="SIZE", help="largest batch whose training peak fits, e.g. 4GiB")
    p.add_argument("--dataset-size", default=None, help="samples per epoch, for total training FLOPs and time")
    p.add_argument("--epochs", default=None, help="epochs, with --dataset-size")
    p.add_argument("--warmup", default="2", help="untimed warm-up runs before timing (with --measure; default 2)")
    p.add_argument("--repeats", default="10", help="timed runs (with --measure; default 10)")
    p.add_argument("--weights", default=None, metavar="PATH", help="load trained/pruned weights (safetensors) first")
    p.add_argument("--parallel", default=None, metavar="STRATEGY",
                   help="per-rank figures of a layout over --world-size devices: ddp|fsdp|zero1|zero2|zero3|tp")
    p.add_argument("--world-size", default=None, metavar="N", help="devices in the --parallel layout")
    p.add_argument("--tp", default=None, metavar="T", help="tensor-parallel degree within --world-size (default 1)")
    p.add_argument("--device", default=None, metavar="NAME",
                   help="a device from the devices table (e.g. h100-sxm) for step time and MFU with --parallel")
    add_threads_option(p)
    add_json_option(p)
    add_seed_option(p)
    p.set_defaults(func=_run_profile)


def _profile_int(value: str | None, flag: str, minimum: int) -> int | None:
    """Integer options parsed here, not by argparse, so a typo is one line (exit 2) like every bad input."""
    if value is None:
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise NetdietError(f"{flag} {value!r} is not an integer >= {minimum}; e.g. {flag} {max(minimum, 8)}")
    return number


def _run_profile(args: argparse.Namespace) -> int:
    from netdiet import api
    from netdiet.models import input_specs, parse_model_kw
    from netdiet.reporting.profile_tables import profile_report
    apply_threads(args)
    from netdiet.units import parse_int_list, parse_size
    budget = parse_size(args.max_batch_for) if args.max_batch_for is not None else None
    batch_sizes = parse_int_list(args.batch_sizes, "--batch-sizes") if args.batch_sizes is not None else None
    inputs = input_specs(args.input, _profile_int(args.input_range, "--input-range", 1), args.model,
                         parse_model_kw(args.model_kw))
    depth = _profile_int(args.depth, "--depth", 0)
    result = api.profile(args.model, inputs, model_kw=parse_model_kw(args.model_kw),
                         batch_size=_profile_int(args.batch_size, "--batch-size", 1), optimizer=args.optimizer,
                         depth=depth, measure=args.measure, force=args.force, dtype=args.dtype, amp=args.amp,
                         checkpointing=args.checkpointing, batch_sizes=batch_sizes, max_batch_for=budget,
                         dataset_size=_profile_int(args.dataset_size, "--dataset-size", 1),
                         epochs=_profile_int(args.epochs, "--epochs", 1), seed=args.seed,
                         warmup=_profile_int(args.warmup, "--warmup", 0), repeats=_profile_int(args.repeats, "--repeats", 1),
                         weights=args.weights, seq_len=_profile_int(args.seq_len, "--seq-len", 1),
                         parallel=args.parallel, world_size=_profile_int(args.world_size, "--world-size", 1),
                         tp=_profile_int(args.tp, "--tp", 1), target_device=args.device)
    doc = result.to_dict()
    console.print(profile_report(doc, depth if depth is not None else 3))  # the JSON keeps every module
    write_json(args, doc)
    return 0


# ==================================================================== plan
@command
def _plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="rank DDP/FSDP/ZeRO/tensor-parallel layouts of a model on N named devices by "
                                    "projected throughput; say why the others do not fit")
    add_model_options(p)
    p.add_argument("--devices", default="8xh100-sxm", metavar="NxNAME",
                   help="how many of which device, e.g. 64xh100, 8xh200, 4xcpu (default 8xh100-sxm; names: "
                        "h100-sxm h100-pcie h200 a100-40gb a100-80gb l4 mi300x tpu-v5e cpu)")
    p.add_argument("--global-batch", default=None, metavar="B", help="samples per optimizer step (default: one per device)")
    p.add_argument("--seq-len", default=None, metavar="S", help="tokens per sample of a language model (default: its own)")
    p.add_argument("--optimizer", default="adam", help="sgd|momentum|adam|adamw|none (default adam)")
    p.add_argument("--dtype", default="bf16", help="training precision fp32|bf16|fp16 (default bf16)")
    p.add_argument("--amp", action="store_true", help="fp32 weights with bf16 autocast instead of --dtype throughout")
    p.add_argument("--micro-batch", default=None, metavar="M1,M2,...",
                   help="micro-batches to try (default: the power-of-two divisors of each per-rank batch and itself)")
    p.add_argument("--strategies", default=None, metavar="S1,S2,...", help="data-parallel strategies to sweep "
                                                                           "(default ddp,zero1,zero2,zero3,fsdp)")
    p.add_argument("--no-checkpointing", action="store_true", help="do not sweep activation checkpointing")
    p.add_argument("--top", default="15", metavar="N", help="ranked rows to print (default 15; the JSON has all)")
    add_json_option(p)
    p.set_defaults(func=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from netdiet import api
    from netdiet.models import parse_model_kw
    from netdiet.reporting.plan_tables import plan_report
    from netdiet.units import parse_int_list
    strategies = tuple(s.strip().lower() for s in args.strategies.split(",") if s.strip()) if args.strategies else None
    result = api.plan(args.model, args.devices, model_kw=parse_model_kw(args.model_kw),
                      global_batch=_profile_int(args.global_batch, "--global-batch", 1),
                      seq_len=_profile_int(args.seq_len, "--seq-len", 1), optimizer=args.optimizer, dtype=args.dtype,
                      amp=args.amp, micro_batch=parse_int_list(args.micro_batch, "--micro-batch") if args.micro_batch
                      else None, checkpointing=(False,) if args.no_checkpointing else (False, True),
                      strategies=strategies, log=_log)
    doc = result.to_dict()
    console.print(plan_report(doc, _profile_int(args.top, "--top", 1)))
    write_json(args, doc)
    return 0


# ==================================================================== compress / evaluate
@command
def _compress(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="run a compression recipe (prune, cluster, quantize, low-rank, distill...) and "
                                        "report accuracy, bytes, MACs and latency per stage")
    add_model_options(p)
    p.add_argument("--recipe", required=True, metavar="R.yaml|NAME",
                   help="a recipe YAML file or a built-in recipe name (`netdiet recipes` lists them)")
    add_data_options(p)
    p.add_argument("--weights", default=None, metavar="FILE.safetensors",
                   help="trained dense weights; without them the dense baseline is trained first")
    p.add_argument("--out", default=None, metavar="MODEL.ndz", help="write the compressed model archive here")
    p.add_argument("--baseline-epochs", type=int, default=None, metavar="N", help="override the recipe's baseline epochs")
    p.add_argument("--finetune-epochs", type=int, default=None, metavar="N",
                   help="override every stage's fine-tune epochs (0 = no fine-tuning)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement of each stage")
    add_threads_option(p)
    add_json_option(p)
    p.add_argument("--resume", action="store_true", help="continue an unfinished run into --out after its last finished stage")
    add_seed_option(p)
    p.set_defaults(func=_run_compress)


def _run_compress(args: argparse.Namespace) -> int:
    from netdiet import api
    from netdiet.models import parse_model_kw
    from netdiet.reporting.compress_tables import compress_table
    apply_threads(args)
    if args.out:  # fail before training, not after
        from netdiet.fileio import check_writable
        check_writable(args.out)
    result = api.compress(args.model, args.recipe, data=args.data, data_dir=args.data_dir, out=args.out,
                          weights=args.weights, model_kwargs=parse_model_kw(args.model_kw), seed=args.seed,
                          baseline_epochs=args.baseline_epochs, finetune_epochs=args.finetune_epochs,
                          latency=not args.no_latency, log=_log,
                          resume=args.resume)
    doc = result.to_dict()
    console.print(compress_table(doc))
    if doc["archive"]:
        kept = doc["archive"]
        ratio = f", {kept['ratio']:.1f}x smaller than dense fp32" if kept.get("ratio") else ""
        console.print(f"wrote {kept['path']} ({kept['bytes']} bytes{ratio})")
    write_json(args, doc)
    return 0


@command
def _recipes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="list the built-in compression recipes")
    add_json_option(p)
    p.set_defaults(func=_run_recipes)


def _run_recipes(args: argparse.Namespace) -> int:
    from netdiet import api
    from netdiet.reporting.compress_tables import recipes_table
    rows = []
    for name in api.list_recipes():
        r = api.load_recipe(name).to_dict()
        rows.append({"name": name, "description": r["description"], "stages": [s["technique"] for s in r["stages"]],
                     "recipe": r})
    console.print(recipes_table(rows))
    write_json(args, {"schema": "netdiet.recipes/1", "recipes": rows})
    return 0


@command
def _evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="accuracy, bytes on disk, ratio vs dense fp32, MACs and latency of a .ndz archive")
    p.add_argument("archive", metavar="MODEL.ndz", help="an archive written by `netdiet compress --out`")
    add_data_options(p)
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="allow rebuilding an archive made from user code (pkg.module:callable or file.py:callable)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size for accuracy (default 256)")
    p.add_argument("--latency-batch", type=int, default=64, help="batch size for latency (default 64)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per runtime (default 30, after 5 warm-up runs)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--onnx", action="store_true", help="also time an fp32 ONNX Runtime export when the archive has no int8 ONNX model")
    p.add_argument("--tensors", action="store_true", help="also print the storage of every tensor")
    p.add_argument("--max-memory", metavar="SIZE", default=None,
                   help="refuse an archive whose model would take more than SIZE to read, e.g. 2GiB (default: free RAM)")
    add_threads_option(p)
    add_json_option(p)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from netdiet import api
    from netdiet.reporting.evaluate_tables import evaluate_report
    apply_threads(args)
    result = api.evaluate(args.archive, args.data, data_dir=args.data_dir, batch_size=args.batch_size,
                          latency=not args.no_latency, onnx=True if args.onnx else None, model_spec=args.model,
                          latency_batch=args.latency_batch, repeats=args.repeats, max_memory=args.max_memory)
    doc = result.to_dict()
    console.print(evaluate_report(doc, tensors=args.tensors))
    write_json(args, doc)
    return 0


# ==================================================================== train / sweep
def _add_train_options(p: argparse.ArgumentParser, epochs: int) -> None:
    p.add_argument("--epochs", type=int, default=epochs, help=f"passes over the training data (default {epochs})")
    p.add_argument("--batch-size", type=int, default=64, help="global batch per micro-step (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--optimizer", default="adam", choices=["sgd", "momentum", "adam", "adamw"], help="default adam")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled/optimizer weight decay (default 0)")
    p.add_argument("--l1", type=float, default=0.0, help="L1 penalty l1*sum|w| on weights (default 0)")
    p.add_argument("--l2", type=float, default=0.0, help="L2 penalty l2/2*sum w^2 on weights (default 0)")
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine", "step", "linear"], help="LR schedule")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up steps (default 0)")
    p.add_argument("--step-epochs", type=int, default=0, help="step schedule: multiply LR by --gamma every N epochs")
    p.add_argument("--gamma", type=float, default=0.1, help="step schedule factor (default 0.1)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="fp32, bf16 autocast (CPU/CUDA) or fp16 autocast with gradient scaling (CUDA)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="default cpu")


def _train_config(args: argparse.Namespace, **extra):
    from netdiet.training.loop import TrainConfig
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                       weight_decay=args.weight_decay, seed=args.seed, l1=args.l1, l2=args.l2, schedule=args.schedule,
                       warmup_steps=args.warmup_steps, step_epochs=args.step_epochs, gamma=args.gamma,
                       grad_accum=args.grad_accum, precision=args.precision, device=args.device, **extra)


@command
def _train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model: per-epoch loss/accuracy/time/memory, checkpoints, resume, DDP, budgets")
    add_model_options(p)
    add_data_options(p)
    _add_train_options(p, epochs=5)
    p.add_argument("--out", metavar="DIR", help="folder for model.safetensors, model.json, train.json and checkpoints")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of the training split (default 0.1)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the sequential blocks")
    p.add_argument("--segments", type=int, default=0, help="checkpointed segments (default about sqrt(blocks))")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0: index in the loop)")
    p.add_argument("--prefetch", type=int, default=2, help="batches each worker prepares ahead (default 2)")
    p.add_argument("--pin-memory", action="store_true", help="pin batches in page-locked memory (CUDA only)")
    p.add_argument("--patience", type=int, default=0, help="early stopping after N epochs without improvement (0 = off)")
    p.add_argument("--monitor", default="val_acc", choices=["val_acc", "val_loss", "train_acc", "loss"])
    p.add_argument("--min-delta", type=float, default=0.0, help="smallest change that counts as improvement")
    p.add_argument("--no-restore-best", action="store_true", help="keep the last weights instead of the best")
    p.add_argument("--checkpoint-every", type=_epochs_or_text, default=1, metavar="N|Nsteps|TIME",
                   help="write the resumable checkpoint every N epochs, every N steps (500steps) or every TIME (5min)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes (DDP over gloo on CPU; default 1)")
    p.add_argument("--parallel", default=None, metavar="ddp|fsdp",
                   help="how --nproc (or torchrun's) processes share the work: ddp (replicas; the default) or fsdp "
                        "(FSDP2: parameters, gradients and optimizer state sharded)")
    p.add_argument("--clip-grad-norm", type=float, default=0.0, metavar="MAX",
                   help="clip the gradients' total norm to MAX before each step (default 0: off)")
    p.add_argument("--memory-budget", metavar="SIZE", help="fit training into SIZE (e.g. 512MiB): batch, then checkpointing, then bf16")
    p.add_argument("--projection-steps", type=int, default=5, help="steps measured for the run-time projection (0 = off)")
    p.add_argument("--ensemble", type=int, default=None, metavar="K",
                   help="train K members (each in --out/member-i, resumable) and report them alone, combined and their cost")
    p.add_argument("--ensemble-mode", default="seeds", choices=["seeds", "bagging"],
                   help="members differ by seed, or also by a bootstrap resample of the training split (default seeds)")
    p.add_argument("--combine", default="mean", choices=["mean", "vote"],
                   help="headline combination: mean of probabilities or majority vote (both are reported; default mean)")
    add_threads_option(p)
    add_seed_option(p)
    add_json_option(p)
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from netdiet import api
    from netdiet.models import parse_model_kw
    from netdiet.reporting.train_tables import train_history_table, train_summary_lines
    apply_threads(args)
    cfg = _train_config(args, checkpointing=args.checkpointing, checkpoint_segments=args.segments, workers=args.workers,
                        prefetch=args.prefetch, pin_memory=args.pin_memory, patience=args.patience, monitor=args.monitor,
                        min_delta=args.min_delta, restore_best=not args.no_restore_best,
                        checkpoint_every=args.checkpoint_every, resume=args.resume, projection_steps=args.projection_steps,
                        clip_grad_norm=args.clip_grad_norm, parallel=args.parallel or "ddp")
    if args.ensemble is not None:
        if args.parallel is not None:
            raise NetdietError(f"--ensemble trains its members one after another in one process; --parallel "
                               f"{args.parallel} is not supported with it: drop --parallel, or train members separately")
        return _run_train_ensemble(args, cfg)
    run = api.train(args.model, model_kw=parse_model_kw(args.model_kw), data=args.data, data_dir=args.data_dir, out=args.out,
                    config=cfg, nproc=args.nproc, memory_budget=args.memory_budget, val_fraction=args.val_fraction,
                    log=_log)
    doc = run.to_dict()
    import os
    if os.environ.get("RANK", "0") != "0":   # under torchrun only rank 0 reports and writes
        return 0
    console.print(train_history_table(doc))
    for line in train_summary_lines(doc):
        console.print(line)
    write_json(args, doc)
    return 0


def _run_train_ensemble(args: argparse.Namespace, cfg) -> int:
    from netdiet import api
    from netdiet.models import parse_model_kw
    from netdiet.reporting.ensemble_tables import ensemble_tables
    run = api.train_ensemble(args.model, args.ensemble, mode=args.ensemble_mode, combine=args.combine,
                             model_kw=parse_model_kw(args.model_kw), data=args.data, data_dir=args.data_dir, out=args.out,
                             config=cfg, nproc=args.nproc, memory_budget=args.memory_budget,
                             val_fraction=args.val_fraction, log=_log)
    doc = run.to_dict()
    for table in ensemble_tables(doc):
        console.print(table)
    if doc["files"]:
        console.print(f"wrote {doc['files']['index']} and {len(doc['files']['members'])} member folders")
    write_json(args, doc)
    return 0


@command
def _sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="k-fold cross-validation over a model knob: train/validation error vs params and FLOPs")
    add_model_options(p)
    add_data_options(p)
    p.add_argument("--knob", required=True, metavar="NAME=[...]",
                   help="factory argument and its values, e.g. widths=[[64],[256],[1024,256]] or depth=[1,2,4]")
    p.add_argument("--folds", type=int, default=3, help="k of k-fold cross-validation (default 3)")
    _add_train_options(p, epochs=3)
    add_seed_option(p)
    add_json_option(p)
    p.set_defaults(func=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> int:
    from netdiet import api
    from netdiet.models import parse_model_kw
    from netdiet.reporting.train_tables import sweep_table
    res = api.sweep(args.model, args.knob, model_kw=parse_model_kw(args.model_kw), data=args.data, data_dir=args.data_dir,
                    k=args.folds, config=_train_config(args), log=_log)
    doc = res.to_dict()
    console.print(sweep_table(doc))
    console.print(f"chosen: {doc['knob']}={doc['chosen']} ({doc['rule']})")
    write_json(args, doc)
    return 0


# ==================================================================== continual
@command
def _continual(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("continual", help="learn task after task under a hard byte budget; accuracy matrix, forgetting, bytes kept")
    p.add_argument("--scenario", default="split", help="split | permuted | incremental-data (default split)")
    p.add_argument("--setting", default="class", help="task | domain | class -incremental (default class)")
    p.add_argument("--strategy", default=None,
                   help="naive | joint | ewc | lwf | lwf-logits | replay | replay-reservoir | rehearsal | replay-wa | nme | "
                        "der++ | packnet | shrink | auto | all (default: auto with --budget, else replay)")
    p.add_argument("--budget", default=None, help="hard cap on the bytes a strategy keeps, e.g. 256KiB (default: none)")
    p.add_argument("--exemplar-bits", type=int, default=32, help="bits per stored exemplar pixel: 32, 16, 8, 4, 2, 1 (default 32)")
    p.add_argument("--exemplar-downsample", type=int, default=1, help="store exemplars down-sampled by this factor (default 1)")
    p.add_argument("--exemplars", type=int, default=None, help="at most this many exemplars (default: what the budget allows, else 200)")
    p.add_argument("--shrink", default=None, help="after every task: int8 | int4 | prune=0.5 | prune=0.5+int4 (compress techniques)")
    p.add_argument("--model", default=None, help="zoo name or package.module:callable (default mlp with widths [64,64]; "
                                                 "for auto a small cnn, channels [8,16,32])")
    p.add_argument("--model-kw", action="append", default=[], metavar="KEY=VALUE", help="argument for the model factory (repeatable)")
    p.add_argument("--tasks", type=int, default=None, help="number of tasks (split: from classes; permuted 5; incremental-data 4)")
    p.add_argument("--classes-per-task", type=int, default=None, help="split: classes per task (default 2)")
    p.add_argument("--order-seed", type=int, default=None, help="split: shuffle the class order with this seed (default 0,1,2,...)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per task (default 5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam", help="sgd | momentum | adam | adamw (default adam)")
    p.add_argument("--ewc-lambda", type=float, default=5000.0)
    p.add_argument("--matrix", action="store_true", help="also print each strategy's accuracy matrix and ledger")
    add_data_options(p)
    add_seed_option(p)
    add_json_option(p)
    p.set_defaults(func=_run_continual)


def _run_continual(args: argparse.Namespace) -> int:
    from netdiet import api
    from netdiet.models import parse_model_kw
    from netdiet.reporting.continual_tables import decision_lines, matrix_table, stopped_lines, summary_table
    strategy = args.strategy or ("auto" if args.budget else "replay")
    result = api.continual(args.scenario, args.data, args.setting, strategy, model=args.model,
                           model_kw=parse_model_kw(args.model_kw) or None, budget=args.budget, seed=args.seed,
                           epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                           exemplar_bits=args.exemplar_bits, exemplar_downsample=args.exemplar_downsample,
                           exemplars=args.exemplars, shrink=args.shrink, data_dir=args.data_dir, tasks=args.tasks,
                           classes_per_task=args.classes_per_task, order_seed=args.order_seed, ewc_lambda=args.ewc_lambda)
    doc = result.to_dict()
    if args.matrix or strategy != "all":
        for s in doc["strategies"]:
            if s["status"] == "ok":
                console.print(matrix_table(s))
    for line in decision_lines(doc):
        console.print(line)
    console.print(summary_table(doc))
    for line in stopped_lines(doc):
        console.print(f"[red]{line}[/red]")
    if doc.get("flops_note"):
        console.print(f"[dim]{doc['flops_note']}[/dim]")
    write_json(args, doc)
    return 0


# ==================================================================== report / demo
@command
def _report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="render netdiet JSON results into one self-contained HTML page")
    p.add_argument("results", nargs="+", metavar="RESULT.json", help="JSON files written by netdiet commands with --json")
    p.add_argument("-o", "--out", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--title", default="netdiet report")
    add_json_option(p)
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from netdiet import api
    from netdiet.fileio import check_writable
    check_writable(args.out)
    info = api.report(args.results, args.out, title=args.title)
    console.print(f"wrote [bold]{info['out']}[/bold] ({info['bytes']:,} bytes) from {len(info['sources'])} result(s)")
    write_json(args, info)
    return 0



@command
def _demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole story on mnist5k: train, profile, compress, evaluate, continual, report")
    p.add_argument("--out", default="netdiet-demo", help="folder for every JSON, archive and report.html (default netdiet-demo)")
    p.add_argument("--fresh", action="store_true", help="redo every step instead of reusing finished ones")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="passed to every step that takes it: CPU threads for compute and timings (default: torch's own "
                        "choice for compute, 1 thread for timings; the report names the count)")
    add_seed_option(p)
    add_json_option(p)
    p.set_defaults(func=_run_demo)


def demo_steps(out: str, seed: int = 0, threads: int | None = None) -> list[tuple[str, list[str], list[str]]]:
    """(title, argv, files the step must leave behind) — the same commands a user would type."""
    from pathlib import Path
    d = Path(out)
    s = ["--seed", str(seed)]
    t = [] if threads is None else ["--threads", str(threads)]
    steps: list[tuple[str, list[str], list[str]]] = []
    for net, epochs in (("lenet300", 12), ("lenet5", 8)):
        steps.append((f"train {net}", ["train", net, "--data", "mnist5k", "--epochs", str(epochs), "--batch-size", "64",
                                      "--lr", "0.001", "--optimizer", "adam", "--out", str(d / net),
                                      "--json", str(d / f"train-{net}.json"), *s, *t],
                      [str(d / f"train-{net}.json"), str(d / net / "model.safetensors")]))
    for net in ("lenet300", "lenet5"):
        steps.append((f"profile {net}", ["profile", net, "--batch-sizes", "1,32,128", "--measure", "--max-batch-for", "16MiB",
                                        "--json", str(d / f"profile-{net}.json"), *s, *t], [str(d / f"profile-{net}.json")]))
    for net, recipe in (("lenet300", "deep-compression"), ("lenet5", "deep-compression"), ("lenet300", "int8")):
        tag = f"{net}-{recipe}"
        steps.append((f"compress {net} ({recipe})", ["compress", net, "--weights", str(d / net / "model.safetensors"),
                                                     "--recipe", recipe, "--data", "mnist5k", "--out", str(d / f"{tag}.ndz"),
                                                     "--resume", "--json", str(d / f"compress-{tag}.json"), *s, *t],
                      [str(d / f"compress-{tag}.json"), str(d / f"{tag}.ndz")]))
        steps.append((f"evaluate {tag}.ndz", ["evaluate", str(d / f"{tag}.ndz"), "--data", "mnist5k",
                                              "--json", str(d / f"evaluate-{tag}.json"), *t], [str(d / f"evaluate-{tag}.json")]))
    # no --strategy: under a budget netdiet splits it itself (model precision, exemplar bits, resolution, count)
    steps.append(("continual under 256 KiB, budget split by netdiet", ["continual", "--scenario", "split", "--data", "mnist5k",
                                                                      "--setting", "class", "--budget", "256KiB",
                                                                      "--json", str(d / "continual.json"), *s],
                  [str(d / "continual.json")]))
    # past one machine: the zoo's 7B preset on 8 H100s, planned on the meta device (nothing allocated)
    steps.append(("plan the 7B transformer on 8 H100s", ["plan", "transformer", "--model-kw", "preset=7b", "--devices",
                                                          "8xh100", "--json", str(d / "plan.json")],
                  [str(d / "plan.json")]))
    return steps


def _step_done(files: list[str]) -> bool:
    """A step is reused only when everything it writes exists and its JSON is a netdiet result."""
    from pathlib import Path

    from netdiet.documents import read_result
    for f in files:
        path = Path(f)
        if not path.is_file() or path.stat().st_size == 0:
            return False
        if path.suffix == ".json":
            try:
                read_result(path)
            except NetdietError:
                return False
    return True


def _run_demo(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from netdiet import api
    from netdiet.reporting.terminal import demo_summary_table
    out = Path(args.out)
    steps = demo_steps(str(out), args.seed, args.threads)
    t0 = time.perf_counter()
    for i, (title, argv, files) in enumerate(steps, 1):
        if not args.fresh and _step_done(files):
            console.print(f"[dim]step {i}/{len(steps)} {title}: done before, reused[/dim]")
            continue
        console.rule(f"step {i}/{len(steps)}: netdiet {' '.join(argv[:2])}")
        code = main(argv)
        if code != 0:
            err_console.print(f"netdiet: demo step '{title}' failed (exit {code}); fix it and rerun `netdiet demo` (finished steps are reused)")
            return code
    results = [f for _, _, files in steps for f in files if f.endswith(".json")]
    summary = api.demo_summary([str(f) for f in results])
    from netdiet.fileio import atomic_write_json
    atomic_write_json(out / "demo.json", summary)
    write_json(args, summary)  # --json: the same netdiet.demo/1 summary, where the user wants it
    info = api.report([str(out / "demo.json"), *results], str(out / "report.html"), title="netdiet demo: LeNets on MNIST-5k")
    console.print(demo_summary_table(summary))
    console.print(f"wrote [bold]{info['out']}[/bold] and {len(results) + 1} JSON results in {out}/ "
                  f"({time.perf_counter() - t0:.0f} s)")
    return 0


# ==================================================================== entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netdiet", description="What your neural network really costs, and how to make it cheaper.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    from netdiet import __version__
    parser.add_argument("--version", action="version", version=f"netdiet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _COMMANDS:
        add(sub)
    return parser


def _check_command_name(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A mistyped command gets one line with the closest command, not argparse's usage and list of choices."""
    import difflib
    words = [a for a in argv if not a.startswith("-")]
    if not words or any(a in ("-h", "--help", "--version") for a in argv[:argv.index(words[0])]):
        return
    commands = list(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse keeps them here
    if words[0] not in commands:
        close = difflib.get_close_matches(words[0], commands, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise NetdietError(f"unknown command '{words[0]}'; {hint}`netdiet --help` lists the commands")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if debug:  # accepted anywhere ('netdiet profile x --debug'), as the error messages suggest
        argv = ["--debug", *[a for a in argv if a != "--debug"]]
    try:
        parser = build_parser()
        _check_command_name(parser, argv)
        args = parser.parse_args(argv)
        if getattr(args, "json", None):  # a bad --json path fails now, not after minutes of work
            from netdiet.fileio import check_writable
            check_writable(args.json)
        from netdiet.analysis.latency import timing_threads_of
        from netdiet.environment import steady_threads
        # a fixed OpenMP team; --threads applies to this command only (its compute and its timings), never to the next
        with steady_threads(), timing_threads_of(getattr(args, "threads", None)):
            return int(args.func(args) or 0)
    except NetdietError as exc:
        if debug:
            traceback.print_exc()
        print(f"netdiet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("netdiet: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # argparse: 2 for usage errors, 0 for --help
        return int(exc.code) if isinstance(exc.code, int) else 2
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        if debug:
            traceback.print_exc()
        print(f"netdiet: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
