"""Profiling overhead: time of netdiet's counting and of a full `profile()` as a ratio to one plain
forward+backward of the same model and batch, measured side by side in one run on the zoo models.

    .venv/bin/python benchmarks/profile_overhead.py [--batches 8,64] [--repeats 5] [--models lenet300,resnet]

Writes benchmarks/results/profile_overhead.json and prints a table. Times are medians of `repeats` runs
after one warm-up, on one thread; on a shared machine they are noisy (the spread is reported).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("NETDIET_PROGRESS", "0")

ZOO = ["lenet300", "lenet5", "mlp", "cnn", "resnet", "mobilenet", "transformer", "yolo"]
# yolo at 416x416 is ~100x the others; a smaller image keeps the whole run in minutes on 1 CPU thread
MODEL_KW = {"yolo": {"image_size": 160}}


def median_time(fn, repeats: int) -> tuple[float, float, float]:
    fn()  # warm-up (allocator, lazy init, first-call dispatch caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def plain_step(model, x):
    def run():
        out = model(*x)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        loss = sum(o.float().sum() for o in outs)
        loss.backward()
        for p in model.parameters():
            p.grad = None
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="8,64", help="batch sizes; yolo runs at the first only (it is ~100x the others)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default=",".join(ZOO))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "profile_overhead.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from rich.console import Console
    from rich.table import Table

    import netdiet
    from netdiet.analysis.counter import count_ops
    from netdiet.analysis.memory import estimate_memory
    from netdiet.analysis.profile import prepare_inputs
    from netdiet.fileio import atomic_write_json
    from netdiet.models import create_model

    rows = []
    batches = [int(b) for b in args.batches.split(",")]
    runs = [(name, b) for b in batches for name in args.models.split(",") if not (name == "yolo" and b != batches[0])]
    for name, batch in runs:
        kw = MODEL_KW.get(name, {})
        torch.manual_seed(0)
        model = create_model(name, **kw)
        x = prepare_inputs(None, name, kw, batch, torch.device("cpu"), 0)
        plain = median_time(plain_step(model, x), args.repeats)
        counting = median_time(lambda: count_ops(model, x, train=True, optimizer="adam"), args.repeats)
        estimating = median_time(lambda: estimate_memory(model, x, optimizer="adam", dtype=None, amp=False,
                                                         checkpointing=False), args.repeats)
        full = median_time(lambda: netdiet.profile(model, x, optimizer="adam", progress=False), args.repeats)
        for p in model.parameters():
            p.grad = None
        rows.append({
            "model": name, "model_kw": kw, "input": list(x[0].shape), "batch": batch,
            "plain_fwd_bwd_s": plain[0], "plain_min_s": plain[1], "plain_max_s": plain[2],
            "count_ops_s": counting[0], "estimate_memory_s": estimating[0], "profile_s": full[0],
            "count_ops_ratio": counting[0] / plain[0], "estimate_memory_ratio": estimating[0] / plain[0],
            "profile_ratio": full[0] / plain[0],
        })
        print(f"{name} batch {batch}: plain {plain[0] * 1e3:.1f} ms, count_ops {counting[0] / plain[0]:.2f}x, "
              f"profile {full[0] / plain[0]:.2f}x", file=sys.stderr)

    doc = {
        "schema": "netdiet.bench.profile_overhead/1",
        "target_ratio": 1.5,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "note": "medians after one warm-up; shared 2-core machine, timings are noisy",
        "rows": rows,
        "geomean": {str(b): {
            "count_ops_ratio": statistics.geometric_mean([r["count_ops_ratio"] for r in rows if r["batch"] == b]),
            "estimate_memory_ratio": statistics.geometric_mean([r["estimate_memory_ratio"] for r in rows if r["batch"] == b]),
            "profile_ratio": statistics.geometric_mean([r["profile_ratio"] for r in rows if r["batch"] == b]),
        } for b in batches},
    }
    atomic_write_json(args.out, doc)

    t = Table(title="profiling overhead vs one plain forward+backward (1 thread; target <= 1.5x)")
    for col in ("model", "input", "plain fwd+bwd", "count_ops", "estimate_memory", "profile()"):
        t.add_column(col, justify="left" if col in ("model", "input") else "right")
    for r in rows:
        t.add_row(r["model"], "x".join(map(str, r["input"])), f"{r['plain_fwd_bwd_s'] * 1e3:.1f} ms",
                  f"{r['count_ops_ratio']:.2f}x", f"{r['estimate_memory_ratio']:.2f}x", f"{r['profile_ratio']:.2f}x")
    for b, g in doc["geomean"].items():
        t.add_row(f"geomean, batch {b}", "", "", f"{g['count_ops_ratio']:.2f}x", f"{g['estimate_memory_ratio']:.2f}x",
                  f"{g['profile_ratio']:.2f}x")
    Console().print(t)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
