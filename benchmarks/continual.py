"""Split-MNIST on mnist5k: continual-learning strategies under a byte budget, each number the mean over seeds.

    .venv/bin/python benchmarks/continual.py --suite budget        # 64/128/256/512 KiB, 3 seeds (about 40 min, 2 cores)
    .venv/bin/python benchmarks/continual.py --suite budget --part class-auto   # one part (parts run side by side)
    .venv/bin/python benchmarks/continual.py --suite budget --merge            # the table from the parts' JSON
    .venv/bin/python benchmarks/continual.py --suite legacy        # the earlier rows (bounds, EWC, LwF, PackNet, replay)

budget suite -> benchmarks/results/continual_budget.json: class-IL at each budget for strategy auto (the automatic
split, its default convnet) and for each strategy on the MLP at one hand split (int4 weights, 2-bit exemplars at
14x14), task-IL and domain-IL for auto; average accuracy, forgetting, BWT, bytes (max over tasks), what auto chose.
Finished runs are kept in the part's JSON and skipped on a rerun (the run checkpoints per run).
legacy suite -> benchmarks/results/continual.json. The peer: van de Ven & Tolias (2019, full MNIST, MLP 2x400)
published figures beside ours (Avalanche needs a torch/torchvision pair that does not install here).
All strategies of one comparison run in the same process on the same seeds, so the ratios are side by side.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from netdiet.data import get_dataset  # noqa: E402
from netdiet.errors import NetdietError  # noqa: E402
from netdiet.fileio import atomic_write_json  # noqa: E402
from netdiet.incremental.runner import build_model_fn, default_model, run_strategy  # noqa: E402
from netdiet.incremental.scenarios import make_scenario  # noqa: E402
from netdiet.incremental.strategies import ContinualConfig  # noqa: E402
from netdiet.progress import progress_bar  # noqa: E402

# van de Ven & Tolias 2019, "Three scenarios for continual learning", Split-MNIST, full MNIST, MLP 2x400, Table 4
PUBLISHED = {("class", "naive"): 19.90, ("class", "ewc"): 19.90, ("class", "lwf"): 24.17, ("class", "joint"): 97.93,
             ("task", "lwf"): 99.60}
BUDGET = 256 * 1024

# (label, setting, strategy, config overrides)
RUNS = [
    ("naive", "task", "naive", {}), ("joint", "task", "joint", {}),
    ("naive", "domain", "naive", {}), ("joint", "domain", "joint", {}),
    ("naive", "class", "naive", {}), ("joint", "class", "joint", {}),
    ("ewc", "class", "ewc", {}), ("lwf", "class", "lwf", {}), ("lwf", "task", "lwf", {}),
    ("packnet", "task", "packnet", {}),
    ("replay fp32 @256KiB", "class", "replay", {"budget": BUDGET, "exemplar_bits": 32}),
    ("replay uint8 @256KiB", "class", "replay", {"budget": BUDGET, "exemplar_bits": 8}),
    ("replay 4-bit @256KiB", "class", "replay", {"budget": BUDGET, "exemplar_bits": 4}),
    ("replay 2-bit @256KiB", "class", "replay", {"budget": BUDGET, "exemplar_bits": 2}),
    ("shrink int8 + 4-bit @256KiB", "class", "shrink", {"budget": BUDGET, "exemplar_bits": 4}),
]


def mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", choices=("budget", "legacy"), default="budget")
    ap.add_argument("--part", choices=PARTS, default=None, help="budget suite: run only this part")
    ap.add_argument("--merge", action="store_true", help="budget suite: table and curve from the parts' JSON")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed-only", type=int, default=None, help="budget suite: run only this seed (its own part file)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per task (budget 5, legacy 10)")
    ap.add_argument("--only", default=None, help="comma-separated labels to run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.suite == "budget":
        return budget_suite(args)
    args.epochs = args.epochs or 10
    args.out = args.out or str(ROOT / "benchmarks" / "results" / "continual.json")
    ds = get_dataset("mnist5k")
    only = set(args.only.split(",")) if args.only else None
    rows, t_start = [], time.perf_counter()
    scenarios = {s: make_scenario("split", ds, s) for s in ("task", "domain", "class")}
    for label, setting, strategy, over in RUNS:
        if only and label not in only:
            continue
        sc = scenarios[setting]
        model_fn, info = build_model_fn("mlp", None, sc)
        per_seed = []
        for seed in range(args.seeds):
            cfg = ContinualConfig(epochs=args.epochs, seed=seed, progress=False, **over)
            t0 = time.perf_counter()
            try:
                r = run_strategy(strategy, sc, model_fn, cfg)
            except NetdietError as exc:
                per_seed.append({"seed": seed, "stopped": str(exc)})
                continue
            per_seed.append({"seed": seed, "average_accuracy": r.average_accuracy, "bwt": r.bwt, "forgetting": r.forgetting,
                             "fwt": r.fwt, "bytes_per_task": r.bytes_per_task, "ledger_last": r.ledger_per_task[-1],
                             "exemplars": (r.exemplars_per_task or [None])[-1], "accuracy_matrix": r.accuracy_matrix,
                             "train_flops": None if None in r.train_flops_per_task else sum(r.train_flops_per_task),
                             "seconds": time.perf_counter() - t0})
        ok = [p for p in per_seed if "stopped" not in p]
        row = {"label": label, "setting": setting, "strategy": strategy, "options": over, "model": info,
               "seeds": args.seeds, "epochs": args.epochs,
               "average_accuracy": mean([p["average_accuracy"] for p in ok]),
               "average_accuracy_std": statistics.pstdev([p["average_accuracy"] for p in ok]) if len(ok) > 1 else 0.0,
               "bwt": mean([p["bwt"] for p in ok]), "forgetting": mean([p["forgetting"] for p in ok]),
               "fwt": mean([p["fwt"] for p in ok]),
               "max_bytes": max((max(p["bytes_per_task"]) for p in ok), default=None),
               "exemplars": ok[0]["exemplars"] if ok else None,
               "train_flops": mean([p["train_flops"] for p in ok]),
               "published_full_mnist": PUBLISHED.get((setting, strategy)),
               "per_seed": per_seed}
        rows.append(row)
        print(f"{label:30s} {setting:6s} acc {100 * (row['average_accuracy'] or 0):6.2f} +- {100 * row['average_accuracy_std']:.2f}"
              f"  forgetting {100 * (row['forgetting'] or 0):6.2f}  bytes {row['max_bytes']}  exemplars {row['exemplars']}"
              f"  [{time.perf_counter() - t_start:.0f}s]", flush=True)
        atomic_write_json(args.out, {"schema": "netdiet.bench.continual/1", "dataset": "mnist5k", "scenario": "split",
                                     "budget": BUDGET, "rows": rows, "threads": 1,
                                     "note": "timings noisy: 2 shared CPU cores"})
    _print_table(rows)
    _checks(rows)
    return 0


def _print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="Split-MNIST (mnist5k: 400 train images/class) - mean over seeds; published: van de Ven & Tolias 2019, full MNIST")
    for c in ("strategy", "setting", "avg acc %", "+-", "forgetting %", "BWT %", "max bytes", "exemplars", "published %"):
        t.add_column(c, justify="left" if c in ("strategy", "setting") else "right")
    for r in rows:
        pct = (lambda v: "-" if v is None else f"{100 * v:.2f}")
        t.add_row(r["label"], r["setting"], pct(r["average_accuracy"]), f"{100 * r['average_accuracy_std']:.2f}",
                  pct(r["forgetting"]), pct(r["bwt"]), str(r["max_bytes"]), str(r["exemplars"] or "-"),
                  "-" if r["published_full_mnist"] is None else f"{r['published_full_mnist']:.2f}")
    Console(width=160).print(t)


def _checks(rows: list[dict]) -> None:
    by = {(r["label"], r["setting"]): r for r in rows}
    def acc(label, setting):
        r = by.get((label, setting))
        return None if r is None else r["average_accuracy"]
    lines = []
    for s in ("task", "domain", "class"):
        n, j = acc("naive", s), acc("joint", s)
        if n is not None and j is not None:
            lines.append(f"{s}-IL bounds: naive {100 * n:.2f} % < joint {100 * j:.2f} %: {'yes' if n < j else 'NO'}")
    q4, f32 = acc("replay 4-bit @256KiB", "class"), acc("replay fp32 @256KiB", "class")
    if q4 is not None and f32 is not None:
        lines.append(f"class-IL at 256 KiB: 4-bit exemplars {100 * q4:.2f} % vs float32 exemplars {100 * f32:.2f} %: "
                     f"{'4-bit wins' if q4 > f32 else 'NO'}")
    p = by.get(("packnet", "task"))
    if p and p["average_accuracy"] is not None:
        growth = all(len(set(b2 - b1 for b1, b2 in zip(s["bytes_per_task"], s["bytes_per_task"][1:]))) == 1
                     for s in p["per_seed"] if "bytes_per_task" in s)
        lines.append(f"PackNet task-IL {100 * p['average_accuracy']:.2f} % (>= 97: {'yes' if p['average_accuracy'] >= 0.97 else 'NO'}), "
                     f"forgetting {100 * p['forgetting']:.2f} %, bytes grow by exactly one mask set per task: {'yes' if growth else 'NO'}")
    for line in lines:
        print(line)


# ==================================================================== budget suite
BUDGETS_KIB = (64, 128, 256, 512)
HAND_SPLIT = {"shrink": "int4", "exemplar_bits": 2, "exemplar_downsample": 2, "same_view": True}
CLASS_STRATEGIES = ("replay", "rehearsal", "replay-wa", "nme", "der++")
# the hand split stores every mnist5k training image at 256 KiB already (4,671 slots for 3,200 old-class samples):
# 512 KiB would repeat the 256 KiB runs exactly; lwf-logits keeps no exemplars, so one budget shows it
STRATEGY_BUDGETS_KIB = (64, 128, 256)
PARTS = ("class-auto", "class-strategies", "task-domain-auto")


def _runs(part: str) -> list[tuple[str, str, str, int, dict, str]]:
    """(label, setting, strategy, budget, config overrides, model) for one part."""
    out = []
    if part == "class-strategies":
        out.append(("lwf-logits (mlp, int4)", "class", "lwf-logits", 64 * 1024, {"shrink": "int4"}, "mlp"))
    for kib in BUDGETS_KIB:
        b = kib * 1024
        if part == "class-strategies" and kib in STRATEGY_BUDGETS_KIB:
            out += [(f"{s} (mlp, int4 + 2-bit 14x14)", "class", s, b, dict(HAND_SPLIT), "mlp") for s in CLASS_STRATEGIES]
        elif part == "class-auto":
            out.append(("auto (cnn)", "class", "auto", b, {}, "cnn"))
        elif part == "task-domain-auto":
            out += [("auto (cnn)", setting, "auto", b, {}, "cnn") for setting in ("task", "domain")]
    return out


def _part_path(part: str, seed: int | None = None) -> Path:
    suffix = "" if seed is None else f"_seed{seed}"
    return ROOT / "benchmarks" / "results" / f"continual_budget_{part}{suffix}.json"


def budget_suite(args) -> int:
    epochs = args.epochs or 5
    if args.merge:
        return _merge(args)
    ds = get_dataset("mnist5k")
    for part in ([args.part] if args.part else PARTS):
        path = _part_path(part, args.seed_only)
        done = {}
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("epochs") == epochs:
                done = {(r["label"], r["setting"], r["budget"], r["seed"]): r for r in old["runs"]}
        seeds = [args.seed_only] if args.seed_only is not None else range(args.seeds)
        runs = [(r, seed) for seed in seeds for r in _runs(part)]   # seed 0 of every row first
        bar = progress_bar(len(runs), f"continual {part}")
        records = []
        for (label, setting, strategy, budget, over, model), seed in runs:
            key = (label, setting, budget, seed)
            if key in done:
                records.append(done[key])
                bar.advance()
                continue
            sc = make_scenario("split", ds, setting)
            spec, kw = default_model("auto", sc) if model == "cnn" else ("mlp", None)
            model_fn, info = build_model_fn(spec, kw, sc)
            cfg = ContinualConfig(epochs=epochs, seed=seed, progress=False, budget=budget, **over)
            t0 = time.perf_counter()
            rec = {"label": label, "setting": setting, "strategy": strategy, "budget": budget, "seed": seed,
                   "options": over, "model": info}
            try:
                r = run_strategy(strategy, sc, model_fn, cfg)
                rec.update({"average_accuracy": r.average_accuracy, "bwt": r.bwt, "forgetting": r.forgetting,
                            "bytes_per_task": r.bytes_per_task, "ledger_last": r.ledger_per_task[-1],
                            "exemplars": (r.exemplars_per_task or [None])[-1], "accuracy_matrix": r.accuracy_matrix,
                            "decision": _slim(r.decision), "seconds": time.perf_counter() - t0})
            except NetdietError as exc:
                rec["stopped"] = str(exc)
            records.append(rec)
            bar.advance()
            atomic_write_json(path, {"schema": "netdiet.bench.continual-budget-part/1", "part": part, "epochs": epochs,
                                     "runs": records})
        bar.close()
    return _merge(args) if not args.part else 0


def _slim(decision: dict | None) -> dict | None:
    if not decision:
        return None
    keep = ("chosen", "predicted_bytes", "actual_bytes", "budget", "reference_accuracy", "exemplars_needed", "models", "formats")
    return {k: decision[k] for k in keep}


def _merge(args) -> int:
    runs, seen = [], set()
    for part in PARTS:
        for path in sorted(_part_path(part).parent.glob(f"continual_budget_{part}*.json")):
            for r in json.loads(path.read_text())["runs"]:
                key = (r["label"], r["setting"], r["budget"], r["seed"])
                if key not in seen:            # a seed run by two processes counts once
                    seen.add(key)
                    runs.append(r)
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["label"], r["setting"], r["budget"]), []).append(r)
    rows = []
    for (label, setting, budget), rs in groups.items():
        ok = [r for r in rs if "stopped" not in r]
        accs = [r["average_accuracy"] for r in ok]
        chosen = [r["decision"]["chosen"] for r in ok if r.get("decision")]
        rows.append({"label": label, "setting": setting, "budget": budget, "strategy": rs[0]["strategy"],
                     "seeds": len(ok), "stopped": [r["stopped"] for r in rs if "stopped" in r],
                     "average_accuracy": mean(accs), "average_accuracy_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                     "forgetting": mean([r["forgetting"] for r in ok]), "bwt": mean([r["bwt"] for r in ok]),
                     "max_bytes": max((max(r["bytes_per_task"]) for r in ok), default=None),
                     "exemplars": [r["exemplars"] for r in ok],
                     "chosen": [{k: c[k] for k in ("model", "bits", "downsample", "exemplars")} for c in chosen],
                     "predicted_vs_actual_bytes": [(r["decision"]["predicted_bytes"], r["decision"]["actual_bytes"])
                                                   for r in ok if r.get("decision")],
                     "published_full_mnist": PUBLISHED.get((setting, rs[0]["strategy"]))})
    rows.sort(key=lambda r: (r["setting"], r["label"], r["budget"]))
    curve = {}
    for r in rows:
        curve.setdefault(f"{r['setting']}: {r['label']}", []).append([r["budget"], r["average_accuracy"]])
    out = args.out or str(ROOT / "benchmarks" / "results" / "continual_budget.json")
    atomic_write_json(out, {"schema": "netdiet.bench.continual-budget/1", "dataset": "mnist5k", "scenario": "split",
                            "budgets": [k * 1024 for k in BUDGETS_KIB], "hand_split": HAND_SPLIT, "rows": rows,
                            "accuracy_vs_budget": curve, "threads": 1,
                            "targets": {"class-IL 256 KiB": 0.90, "class-IL 64 KiB": 0.80},
                            "peer": "van de Ven & Tolias 2019 (full MNIST, MLP 2x400): published figures in "
                                    "published_full_mnist; Avalanche does not install here (torch/torchvision pair)"})
    _print_budget_table(rows)
    return 0


def _print_budget_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="Split-MNIST (mnist5k) under a byte budget - mean over seeds (every byte kept counted)")
    for c in ("strategy", "setting", "budget", "avg acc %", "+-", "forgetting %", "BWT %", "max bytes", "seeds", "auto chose"):
        t.add_column(c, justify="left" if c in ("strategy", "setting", "auto chose") else "right")
    pct = (lambda v: "-" if v is None else f"{100 * v:.2f}")
    for r in rows:
        chose = "; ".join(sorted({f"{c['model']} + {c['bits']}b/{c['downsample']} x{c['exemplars']}" for c in r["chosen"]}))
        t.add_row(r["label"], r["setting"], f"{r['budget'] // 1024} KiB", pct(r["average_accuracy"]),
                  pct(r["average_accuracy_std"]), pct(r["forgetting"]), pct(r["bwt"]), str(r["max_bytes"]),
                  str(r["seeds"]), chose or "-")
    Console(width=200).print(t)


if __name__ == "__main__":
    sys.exit(main())
