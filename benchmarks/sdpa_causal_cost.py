"""What does causal attention really cost on CPU? The measurement behind netdiet's SDPA convention.

    .venv/bin/python benchmarks/sdpa_causal_cost.py     # writes benchmarks/results/sdpa_causal_cost.json

Times F.scaled_dot_product_attention with and without is_causal, on PyTorch's default CPU kernel (flash) and on
the math kernel, side by side in one run, and puts netdiet's counted MACs next to them. If the kernel skips the
masked half, causal time / full time is near the counted causal MACs / full MACs (~0.5); if it computes everything,
near 1. One thread; the median of several runs; a shared machine, so the times are noisy.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from netdiet.analysis.ops import causal_pairs
from netdiet.fileio import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results" / "sdpa_causal_cost.json"


def median_seconds(q, k, v, causal: bool, repeats: int) -> float:
    F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for b, h, length, e in [(1, 8, 512, 64), (1, 8, 1024, 64), (1, 8, 2048, 64)]:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, length, e, generator=gen) for _ in range(3))
        full_macs = b * h * length * length * 2 * e
        causal_macs = b * h * causal_pairs(length, length) * 2 * e
        row = {"shape": [b, h, length, e], "netdiet_macs_full": full_macs, "netdiet_macs_causal": causal_macs,
               "counted_ratio": round(causal_macs / full_macs, 4)}
        for label, backend in (("default", None), ("math", SDPBackend.MATH)):
            repeats = 5 if label == "default" else 3
            if backend is None:
                full, causal = median_seconds(q, k, v, False, repeats), median_seconds(q, k, v, True, repeats)
            else:
                with sdpa_kernel(backend):
                    full, causal = median_seconds(q, k, v, False, repeats), median_seconds(q, k, v, True, repeats)
            row[label] = {"full_s": round(full, 5), "causal_s": round(causal, 5), "time_ratio": round(causal / full, 3)}
        rows.append(row)
    doc = {"schema": "netdiet.bench.sdpa_causal_cost/1", "torch": torch.__version__, "threads": 1, "rows": rows,
           "note": "median wall time of F.scaled_dot_product_attention, fp32 CPU; noisy shared machine"}
    atomic_write_json(RESULTS, doc)

    from rich.console import Console
    from rich.table import Table
    table = Table(title="causal vs full SDPA on CPU (1 thread)")
    for col in ("B,H,L,E", "counted causal/full", "default kernel causal/full", "math kernel causal/full"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(",".join(map(str, r["shape"])), f"{r['counted_ratio']:.3f}",
                      f"{r['default']['time_ratio']:.3f} ({r['default']['causal_s'] * 1e3:.0f} / {r['default']['full_s'] * 1e3:.0f} ms)",
                      f"{r['math']['time_ratio']:.3f} ({r['math']['causal_s'] * 1e3:.0f} / {r['math']['full_s'] * 1e3:.0f} ms)")
    Console().print(table)
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
