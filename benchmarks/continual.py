"""Split-MNIST on mnist5k: continual-learning strategies under a byte budget, each number the mean over seeds.

    .venv/bin/python benchmarks/continual.py            # 3 seeds, 10 epochs per task (about 20-40 min on a loaded 2-core box)
    .venv/bin/python benchmarks/continual.py --seeds 1 --epochs 1   # smoke run

Writes benchmarks/results/continual.json and prints the table, with van de Ven & Tolias (2019, full MNIST) beside ours.
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

from netdiet.incremental.runner import build_model_fn, run_strategy  # noqa: E402
from netdiet.incremental.scenarios import make_scenario  # noqa: E402
from netdiet.incremental.strategies import ContinualConfig  # noqa: E402
from netdiet.data import get_dataset  # noqa: E402
from netdiet.errors import NetdietError  # noqa: E402
from netdiet.fileio import atomic_write_json  # noqa: E402

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
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--only", default=None, help="comma-separated labels to run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "continual.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
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


if __name__ == "__main__":
    sys.exit(main())
