"""`netdiet train MODEL --ensemble K`: K members trained through the one loop, combined, and priced.

Members. Member i (1-based) is an ordinary `netdiet train` run (`run.execute_member`: the same loop, its own
checkpoint and `--resume`) in `--out/member-i/`. Its seed is `member_seed(seed, i)`: member 1 keeps `--seed`
(so `--ensemble 1` is the plain train run), member i > 1 takes the first 32-bit word of numpy's
`SeedSequence([seed, i])` (a hash of both numbers: the members of seed 0 and of seed 1 do not overlap).
`--ensemble-mode bagging` also trains each member on a bootstrap resample of the training split (n draws with
replacement, drawn with the member's seed); the validation hold-out and the test split stay fixed.

Combining. `mean`: the mean of the members' softmax probabilities, predicted class its argmax (the first class
wins an exact tie, as torch.argmax does). `vote`: each member votes for its argmax; the class with the most
votes wins; a tie between classes with as many votes is broken by the higher mean probability, and a tie there
by the lower class index (TIE_RULE). Both are always reported; `--combine` picks the headline.

Cost, from the analysis engine (never written by hand): `netdiet.analysis.profile.profile` of one member and of the
K-member module (`Ensemble`, whose forward is the mean of probabilities) gives params, bytes, MACs and FLOPs per
sample; the members' share of the FLOPs is the sum of their module rows, the combination's is the rest. Training
FLOPs are the counted FLOPs of one training sample (the counter) times the samples each member saw; training time
is the members' measured epoch seconds. Latency (`netdiet.analysis.latency.time_interleaved`: interleaved rounds,
median, p95, the 95 % interval of the median and the engine's stable-or-not verdict) is measured for one member,
for the loop over the members, and for the members batched with `torch.func.stack_module_state` + `vmap` when they
share an architecture (its output checked against the loop's first); their ratio is kept only when both are stable.

Output folder:
    ensemble.json   the netdiet.train-ensemble/1 document (also what `--json` writes)
    member-i/       member i's `netdiet train` folder (model.safetensors, model.json, train.json, checkpoint/)
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from netdiet.analysis.counter import count_ops
from netdiet.analysis.latency import time_interleaved
from netdiet.analysis.profile import parameter_totals
from netdiet.analysis.ram import available_ram, measure_copy_bytes
from netdiet.checks import SEED_MAX, check_integer, check_seed
from netdiet.data import get_dataset
from netdiet.environment import environment
from netdiet.errors import NetdietError
from netdiet.fileio import atomic_write_json, load_state_dict, read_json
from netdiet.models import ModelSpec, create_model, list_models
from netdiet.training.distributed import launched_by_torchrun
from netdiet.training.loop import TrainConfig, check_train_config, predict
from netdiet.training.precision import resolve_device
from netdiet.training.run import (
    apply_memory_budget,
    build_classifier,
    check_out_dir,
    execute_member,
    out_dir_lock,
    train_flops_per_sample,
    zoo_kwargs_for,
)
from netdiet.units import format_bytes, parse_size

SCHEMA = "netdiet.train-ensemble/1"
INDEX = "ensemble.json"
MODES = ("seeds", "bagging")
COMBINES = ("mean", "vote")
LATENCY_BATCH = 64          # as `netdiet compress` times its stages: one forward of 64 test samples
SEED_RULE = "member 1: --seed; member i > 1: numpy SeedSequence([seed, i]).generate_state(1)[0]"
TIE_RULE = ("most votes wins; among classes with as many votes, the higher mean probability; then the lower class index")


def member_seed(seed: int, index: int) -> int:
    """The seed of member `index` (1-based): see the module docstring."""
    seed = check_seed(seed)
    if index == 1:
        return seed
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0]) % (SEED_MAX + 1)


# ---------------------------------------------------------------- combining
def member_probabilities(members: list[nn.Module], x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(K, N, C): each member's softmax probabilities for x (eval mode, no grad)."""
    return torch.stack([torch.softmax(predict(m, x, batch_size).float(), dim=1) for m in members])


def combine_mean(probs: torch.Tensor) -> torch.Tensor:
    """(N, C) mean over the members of (K, N, C) probabilities."""
    return probs.mean(dim=0)


def combine_vote(probs: torch.Tensor) -> torch.Tensor:
    """(N,) majority vote of the members' argmax classes, ties broken by TIE_RULE."""
    k, _, c = probs.shape
    votes = torch.nn.functional.one_hot(probs.argmax(dim=2), c).sum(dim=0)          # (N, C) votes per class
    mean = probs.mean(dim=0)
    leaders = votes == votes.max(dim=1, keepdim=True).values
    score = torch.where(leaders, mean, torch.full_like(mean, -1.0))   # only the classes with the most votes compete
    return score.argmax(dim=1)                                          # argmax keeps the first (lowest) index of a tie


def accuracies(probs: torch.Tensor, y: torch.Tensor) -> dict:
    """Each member alone, the mean of probabilities and the vote, on labels y; plus how often members disagree."""
    each = [(p.argmax(1) == y).float().mean().item() for p in probs]
    labels = probs.argmax(dim=2)
    k = len(each)
    pairs = [(labels[i] != labels[j]).float().mean().item() for i in range(k) for j in range(i + 1, k)]
    mean_acc = (combine_mean(probs).argmax(1) == y).float().mean().item()
    return {"members": each, "members_mean": float(np.mean(each)), "members_std": float(np.std(each)) if k > 1 else 0.0,
            "members_best": max(each), "members_worst": min(each), "mean": mean_acc,
            "vote": (combine_vote(probs) == y).float().mean().item(),
            "gain_over_members_mean": mean_acc - float(np.mean(each)),
            "disagreement": float(np.mean(pairs)) if pairs else 0.0, "samples": int(len(y))}


class Ensemble(nn.Module):
    """K members as one module. forward(x) = the mean of their softmax probabilities (N, C); with
    `log_probs=True`, its log (the teacher's logits for distillation: softmax(log p / T) is p^(1/T) renormalised)."""

    def __init__(self, members: list[nn.Module], log_probs: bool = False) -> None:
        super().__init__()
        if not members:
            raise NetdietError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.log_probs = log_probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.stack([torch.softmax(m(x), dim=1) for m in self.members]).mean(dim=0)
        return torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)) if self.log_probs else p


# ---------------------------------------------------------------- cost: profile, training, latency
def _totals(model: nn.Module, sample: torch.Tensor) -> tuple[dict, object]:
    counts = count_ops(model, sample[:1], train=False)
    totals = parameter_totals(model)
    return ({"params": int(totals["params"]), "param_bytes": int(totals["param_bytes"]),
             "buffer_bytes": int(totals["buffer_bytes"]), "macs": int(counts.macs), "flops": int(counts.flops)}, counts)


def ensemble_cost(members: list[nn.Module], sample: torch.Tensor) -> dict:
    """Params, bytes, MACs and FLOPs per sample of one member and of the K-member module, by netdiet's engine (the
    profile's parameter totals and its op counter, one eval-mode forward of one sample)."""
    sample = sample.to(_device(members[0]))
    one, _ = _totals(members[0], sample)
    all_, counts = _totals(Ensemble(members), sample)
    names = {f"members.{i}" for i in range(len(members))}
    rows = [m for m in counts.modules if m.name in names]
    member_flops, member_macs = sum(int(m.flops) for m in rows), sum(int(m.macs) for m in rows)
    all_.update({"members_flops": member_flops, "members_macs": member_macs, "combine_flops": all_["flops"] - member_flops})
    ratio = {k: (all_[k] / one[k] if one.get(k) else None) for k in ("params", "param_bytes", "macs", "flops")}
    return {"single": one, "ensemble": all_, "ratio": ratio, "k": len(members),
            "method": "netdiet.analysis.profile.parameter_totals and netdiet.analysis.counter.count_ops (eval-mode "
                      "forward of one sample) on one member and on the K-member module"}


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def same_architecture(members: list[nn.Module]) -> str | None:
    """None when all members share one architecture (class, parameter and buffer names and shapes), else why not."""
    def layout(m: nn.Module):
        return type(m), [(n, tuple(t.shape), t.dtype) for n, t in list(m.named_parameters()) + list(m.named_buffers())]
    first = layout(members[0])
    for i, m in enumerate(members[1:], start=2):
        if layout(m) != first:
            return f"member {i} differs from member 1 in its class or parameter/buffer shapes"
    return None


def ensemble_latency(members: list[nn.Module], x: torch.Tensor, *, warmup: int = 5, repeats: int = 30) -> dict:
    """Forward latency of one member, of the loop over the members (softmax, mean) and, when they share an
    architecture, of the members batched by torch.func.stack_module_state + vmap; eval mode, no grad."""
    from torch.func import functional_call, stack_module_state, vmap

    device = _device(members[0])
    x = x.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None     # asynchronous kernels inside the timing
    modes = [m.training for m in members]
    for m in members:
        m.eval()
    out: dict = {"batch": int(len(x)), "device": device.type, "vmap": None, "vmap_unavailable": None}
    try:
        with torch.no_grad():
            looped = Ensemble(members)        # its forward is the loop over the members (softmax, mean)
            fns: dict[str, Callable[[], object]] = {"single": lambda: members[0](x), "loop": lambda: looped(x)}
            reason = same_architecture(members)
            if reason is None:
                params, buffers = stack_module_state(members)
                base = copy.deepcopy(members[0]).to("meta")

                def one(p, b, xx):
                    return functional_call(base, (p, b), (xx,))

                batched = vmap(one, in_dims=(0, 0, None))

                def stacked() -> torch.Tensor:
                    return torch.softmax(batched(params, buffers, x), dim=2).mean(0)

                try:     # the batched result is checked against the loop's before it is timed
                    out["vmap_max_abs_diff"] = (stacked() - fns["loop"]()).abs().max().item()
                    fns["vmap"] = stacked
                except Exception as exc:  # noqa: BLE001 - a model vmap cannot batch is reported, not fatal
                    out["vmap_unavailable"] = f"vmap failed on this model ({type(exc).__name__}: {str(exc)[:120]})"
            else:
                out["vmap_unavailable"] = reason
            out.update(time_interleaved(fns, warmup=warmup, repeats=repeats, sync=sync))   # A B C A B C: load hits all alike
    finally:
        for m, was in zip(members, modes):
            m.train(was)
    if out["vmap"] and out["loop"].get("stable") and out["vmap"].get("stable"):
        out["vmap_speedup"] = out["loop"]["median_ms"] / out["vmap"]["median_ms"]   # a ratio of two stable timings only
    else:
        out["vmap_speedup"] = None
    return out


# ---------------------------------------------------------------- the run
@dataclass
class EnsembleRun:
    """Everything `netdiet train --ensemble` reports; `to_dict()` is the netdiet.train-ensemble/1 document."""

    model: dict
    data: dict
    config: dict
    k: int
    mode: str
    combine: str
    seed: int
    members: list[dict]
    accuracy: dict
    cost: dict
    training: dict
    latency: dict | None
    budget: dict | None = None
    memory: dict | None = None
    out: str | None = None
    files: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    models: list = field(default_factory=list, repr=False)     # the members' nn.Modules (not serialised)
    train_docs: list = field(default_factory=list, repr=False)  # the members' netdiet.train/1 documents (in files/)

    @property
    def combined_accuracy(self) -> float:
        return self.accuracy[self.combine]

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "model": self.model, "data": self.data, "config": self.config, "k": self.k,
                "mode": self.mode, "combine": self.combine, "seed": self.seed, "seed_rule": SEED_RULE,
                "tie_rule": TIE_RULE, "members": self.members, "accuracy": {**self.accuracy,
                                                                           "combined": self.combined_accuracy},
                "cost": self.cost, "training": self.training, "latency": self.latency, "budget": self.budget,
                "memory": self.memory, "out": self.out, "files": self.files,
                "environment": self.environment or environment()}


def check_ensemble_options(k, mode: str, combine: str, nproc: int = 1) -> int:
    """Bad K, mode, combine or a data-parallel request: one NetdietError (exit 2) before any work."""
    k = check_integer("ensemble", k, low=1, flag="--ensemble", example="--ensemble 5")
    if mode not in MODES:
        raise NetdietError(f"--ensemble-mode {mode!r} is unknown; choose one of: {', '.join(MODES)}")
    if combine not in COMBINES:
        raise NetdietError(f"--combine {combine!r} is unknown; choose one of: {', '.join(COMBINES)}")
    if nproc != 1 or launched_by_torchrun():
        raise NetdietError("--ensemble trains its members one after another in one process; data-parallel training "
                           "(--nproc, torchrun) is not supported with it: drop --nproc, or train members separately")
    return k


def check_ensemble_memory(model: nn.Module, k: int, budget_bytes: int | None) -> dict:
    """The K members' weights and buffers are held together (combined evaluation), and twice for the batched
    latency (stack_module_state copies them): refuse up front when that exceeds the budget or the RAM available."""
    if budget_bytes is not None and budget_bytes <= 0:
        raise NetdietError("--memory-budget must be positive, e.g. 512MiB")
    one = measure_copy_bytes(model)
    need = 2 * k * one
    avail = available_ram()
    info = {"member_weights_bytes": one, "ensemble_weights_bytes": k * one, "held_bytes": need,
            "budget_bytes": budget_bytes, "available_ram": avail}
    if budget_bytes is not None and need > budget_bytes:
        raise NetdietError(f"{k} members do not fit the memory budget {format_bytes(budget_bytes)}: their weights are held "
                           f"together twice (evaluation, batched latency), {k} x 2 x {format_bytes(one)} = "
                           f"{format_bytes(need)}; raise --memory-budget or use fewer members")
    if avail is not None and need > avail:
        raise NetdietError(f"{k} members need about {format_bytes(need)} of RAM for their weights ({k} x 2 x "
                           f"{format_bytes(one)}) but only {format_bytes(avail)} is available; use fewer members")
    return info


def member_dir(out: str | Path, index: int) -> Path:
    return Path(out) / f"member-{index}"


def train_ensemble(spec: str, *, k: int, mode: str = "seeds", combine: str = "mean", model_kw: dict | None = None,
                   data: str = "mnist5k", data_dir: str | None = None, out: str | None = None,
                   config: TrainConfig | None = None, nproc: int = 1, memory_budget: str | int | None = None,
                   val_fraction: float = 0.1, latency: bool = True, log: Callable[[str], None] | None = None,
                   member_callbacks: Callable[[int], list] | None = None) -> EnsembleRun:
    """Train K members of `spec` on `data` (see the module docstring); writes `out/` when given.

    `member_callbacks(i)` gives loop callbacks for member i (1-based), e.g. to stop a run in a test."""
    cfg = config or TrainConfig()
    k = check_ensemble_options(k, mode, combine, nproc)
    check_train_config(cfg)
    if out is None and cfg.resume:
        raise NetdietError("--resume needs --out DIR (the folder of the ensemble to continue)")
    dataset = get_dataset(data, data_dir=data_dir, seed=cfg.seed)
    kwargs = zoo_kwargs_for(spec, model_kw or {}, dataset.input_shape)
    probe = build_classifier(spec, kwargs, dataset.input_shape, dataset.num_classes)
    memory = check_ensemble_memory(probe, k, parse_size(memory_budget) if memory_budget is not None else None)
    with out_dir_lock(out) if out is not None else contextlib.nullcontext():
        if out is not None:                           # every member folder is checked before the first trains
            check_out_dir(out, resume=True)           # (the members' folders say whether they are unfinished)
            for i in range(1, k + 1):
                check_out_dir(member_dir(out, i), cfg.resume)
        budget = apply_memory_budget(probe, dataset, memory_budget, cfg, log)   # each member trains alone: as `train`
        flops, flops_method = train_flops_per_sample(probe, dataset.x_train[:min(8, len(dataset.x_train))], cfg.optimizer)
        docs, models = [], []
        for i in range(1, k + 1):
            seed_i = member_seed(cfg.seed, i)
            mcfg = TrainConfig(**{**cfg.to_dict(), "seed": seed_i, "description": f"member {i}/{k}"})
            params = {"spec": spec, "kwargs": kwargs, "data": data, "data_dir": data_dir,
                      "out": str(member_dir(out, i)) if out is not None else None, "config": mcfg.to_dict(),
                      "val_fraction": val_fraction, "budget": budget, "train_flops_per_sample": flops,
                      "flops_method": flops_method, "bootstrap_seed": seed_i if mode == "bagging" else None}
            if log:
                log(f"member {i}/{k}: seed {seed_i}{' (bootstrap resample)' if mode == 'bagging' else ''}")
            doc, model = execute_member(params, dataset, callbacks=member_callbacks(i) if member_callbacks else None)
            docs.append(doc)
            models.append(model.eval())
        run = assemble(spec, kwargs, dataset, cfg, docs, models, mode=mode, combine=combine, latency=latency,
                       flops_method=flops_method)
        run.budget, run.memory = budget, memory
        if out is not None:
            run.out = str(out)
            run.files = {"index": str(Path(out) / INDEX), "members": [str(member_dir(out, i)) for i in range(1, k + 1)]}
            atomic_write_json(Path(out) / INDEX, run.to_dict())
        return run


def assemble(spec: str, kwargs: dict, dataset, cfg: TrainConfig, docs: list[dict], models: list[nn.Module], *,
             mode: str = "seeds", combine: str = "mean", latency: bool = True, flops_method: str | None = None) -> EnsembleRun:
    """The ensemble of the trained members `models` (their train documents `docs`): accuracy alone and combined on
    the test split, cost, training totals, latency. A prefix of a larger ensemble's members is an ensemble too."""
    k = len(models)
    probs = member_probabilities(models, dataset.x_test)
    acc = accuracies(probs, dataset.y_test)
    members = []
    for i, (doc, a) in enumerate(zip(docs, acc["members"]), start=1):
        hist = doc.get("history") or []
        per_sample = doc.get("train_flops_per_sample")
        samples = int(doc["data"]["train_used"]) * len(hist)
        members.append({"index": i, "seed": doc["config"]["seed"], "test_acc": a, "train_test_acc": doc.get("test_acc"),
                        "val_acc": hist[-1].get("val_acc") if hist else None, "epochs": len(hist), "steps": doc["steps"],
                        "seconds": float(sum(h.get("seconds") or 0.0 for h in hist)), "samples_seen": samples,
                        "train_flops": per_sample * samples if per_sample is not None else None,
                        "resumed_from_epoch": doc.get("resumed_from_epoch"), "out": doc.get("out")})
    flops = [m["train_flops"] for m in members]
    training = {"seconds": sum(m["seconds"] for m in members), "seconds_per_member": [m["seconds"] for m in members],
                "flops": sum(flops) if None not in flops else None, "flops_per_member": flops,
                "flops_per_sample": docs[0].get("train_flops_per_sample"), "flops_method": flops_method or docs[0].get("flops_method"),
                "seconds_method": "sum of the members' measured epoch seconds (netdiet train's history)"}
    cost = ensemble_cost(models, dataset.x_test[:1])
    cost["file_bytes"] = _file_bytes(docs)
    lat = ensemble_latency(models, dataset.x_test[:LATENCY_BATCH]) if latency else None
    return EnsembleRun(model=ModelSpec(spec, kwargs).to_dict(), data=docs[0]["data"], config=cfg.to_dict(), k=k, mode=mode,
                       combine=combine, seed=cfg.seed, members=members, accuracy=acc, cost=cost, training=training,
                       latency=lat, environment=environment(resolve_device(cfg.device)), models=models,
                       train_docs=list(docs))


def _file_bytes(docs: list[dict]) -> dict | None:
    """Bytes on disk of the members' model.safetensors files (None when the run wrote no files)."""
    sizes = []
    for d in docs:
        path = (d.get("files") or {}).get("weights")
        if not path or not Path(path).is_file():
            return None
        sizes.append(Path(path).stat().st_size)
    return {"single": sizes[0], "ensemble": sum(sizes), "members": sizes}


# ---------------------------------------------------------------- reading an ensemble back (distillation's teacher)
def load_ensemble(path: str | Path, *, allow_spec: str | None = None) -> tuple[Ensemble, dict]:
    """(the K members as an Ensemble, its netdiet.train-ensemble/1 document) from an ensemble's --out folder.
    Weights are safetensors; a member built from user code (not a zoo name) is rebuilt only when that spec is
    `allow_spec` (the one the user passed on the command line): a file never makes netdiet import code."""
    folder = Path(path)
    index = folder / INDEX
    if not index.is_file():
        raise NetdietError(f"{folder} holds no {INDEX}; give the --out folder of `netdiet train --ensemble K`")
    doc = read_json(index)
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise NetdietError(f"{index} is not a {SCHEMA} document; give the --out folder of `netdiet train --ensemble K`")
    spec = (doc.get("model") or {}).get("spec")
    kwargs = (doc.get("model") or {}).get("kwargs") or {}
    if not isinstance(spec, str) or not isinstance(kwargs, dict):
        raise NetdietError(f"{index} has no model spec; regenerate it with `netdiet train --ensemble K`")
    if spec not in {e.name for e in list_models()} and spec != allow_spec:
        raise NetdietError(f"{index} names model {spec!r}, which is not a zoo model; pass that spec as the MODEL on "
                           "the command line to allow building it")
    k = doc.get("k")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise NetdietError(f"{index} has no valid member count 'k'; regenerate it with `netdiet train --ensemble K`")
    if not (member_dir(folder, k) / "model.safetensors").is_file():    # a hostile k fails here, before any model is built
        raise NetdietError(f"{index} names {k} members but {member_dir(folder, k)}/model.safetensors is missing; "
                           "finish the ensemble with `netdiet train ... --ensemble K --resume` or train it again")
    members = []
    for i in range(1, k + 1):
        model = create_model(spec, **kwargs)
        if i == 1:
            check_ensemble_memory(model, k, None)      # the K members must fit the RAM before they are built
        weights = member_dir(folder, i) / "model.safetensors"
        missing, unexpected = model.load_state_dict(load_state_dict(weights), strict=False)
        if missing or unexpected:
            raise NetdietError(f"{weights} does not fit model {spec!r} (missing {list(missing)[:3]}, unexpected "
                               f"{list(unexpected)[:3]}); the ensemble folder is damaged: train it again")
        members.append(model.eval())
    return Ensemble(members), doc
