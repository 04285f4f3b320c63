"""Trainer overhead: `netdiet.training.fit` against a hand-written PyTorch loop on the same model, data and batch order.

Both loops do the same work per step (forward, cross-entropy, zero_grad, backward, Adam step, loss.item()); the
hand loop is what a user would write. Runs alternate (hand, fit, fit, hand, ...) so machine load hits both alike;
the overhead is the median of the paired ratios minus 1. Target: <= 2 %. One thread; timings on a shared,
loaded machine are noisy - the spread is reported beside the median.

Run: .venv/bin/python benchmarks/train_overhead.py   -> benchmarks/results/train_overhead.json
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from netdiet.data import get_dataset  # noqa: E402
from netdiet.fileio import atomic_write_json  # noqa: E402
from netdiet.models import create_model  # noqa: E402
from netdiet.training import TrainConfig, fit  # noqa: E402

REPEATS = 6
BATCH = 64


def hand_loop(model, x, y, epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    n, total = len(x), 0.0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, n, BATCH):
            idx = perm[i:i + BATCH]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
    return time.perf_counter() - t0


def netdiet_loop(model, x, y, epochs: int, seed: int) -> float:
    t0 = time.perf_counter()
    fit(model, x, y, TrainConfig(epochs=epochs, batch_size=BATCH, lr=1e-3, optimizer="adam", seed=seed, progress=False))
    return time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(1)
    data = get_dataset("mnist5k")
    cases = [("lenet300", {}, 4000, 1), ("lenet5", {}, 1000, 1)]
    rows = []
    for spec, kw, n, epochs in cases:
        x, y = data.x_train[:n], data.y_train[:n]
        times = {"hand": [], "netdiet": []}
        ratios = []
        for r in range(REPEATS + 1):
            pair = {}
            order = ("hand", "netdiet") if r % 2 == 0 else ("netdiet", "hand")
            for name in order:
                torch.manual_seed(0)
                model = create_model(spec, **kw)
                pair[name] = (hand_loop if name == "hand" else netdiet_loop)(model, x, y, epochs, 0)
            if r == 0:
                continue                                   # warm-up pair (allocator, thread pool, first imports)
            for k in pair:
                times[k].append(pair[k])
            ratios.append(pair["netdiet"] / pair["hand"])
        row = {"model": spec, "samples": n, "epochs": epochs, "batch": BATCH, "repeats": REPEATS,
               "hand_seconds_median": statistics.median(times["hand"]), "netdiet_seconds_median": statistics.median(times["netdiet"]),
               "hand_seconds_min": min(times["hand"]), "netdiet_seconds_min": min(times["netdiet"]),
               "ratio_median": statistics.median(ratios), "ratio_min_over_min": min(times["netdiet"]) / min(times["hand"]),
               "ratios": ratios}
        row["overhead_pct"] = 100 * (row["ratio_median"] - 1)
        row["overhead_pct_min_over_min"] = 100 * (row["ratio_min_over_min"] - 1)
        rows.append(row)
    doc = {"schema": "netdiet.benchmark/1", "name": "train_overhead", "threads": 1, "target_overhead_pct": 2.0,
           "note": "shared 2-core machine under load from other jobs: timings are noisy; paired, alternating runs",
           "results": rows}
    out = Path(__file__).resolve().parent / "results" / "train_overhead.json"
    atomic_write_json(out, doc)
    from rich.console import Console
    from rich.table import Table
    t = Table(title="netdiet fit vs a hand-written loop (1 thread)")
    for c in ("model", "samples x epochs", "hand s (median)", "fit s (median)", "overhead (median pair)", "overhead (min/min)"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["model"], f"{r['samples']} x {r['epochs']}", f"{r['hand_seconds_median']:.3f}", f"{r['netdiet_seconds_median']:.3f}",
                  f"{r['overhead_pct']:+.2f} %", f"{r['overhead_pct_min_over_min']:+.2f} %")
    Console().print(t)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
