"""Activation checkpointing and bf16 autocast: memory and time, measured side by side in one run.

For each model and configuration (fp32, fp32 + checkpointing, bf16, bf16 + checkpointing):
  activations  bytes kept for backward at the end of a real forward (live tensor storages tracked per op)
  peak         steady-state training peak over real steps 2-3 (same tracking; includes weights/grads/Adam state)
  step ms      median wall time of a training step (forward + backward + Adam), 1 thread
Ratios are against fp32 of the same model. Targets: checkpointing saves >= 40 % of activation memory on a deep
MLP and a deep CNN. bf16 on a CPU without bf16 matrix units is usually *slower*; that is measured, not assumed.

Run: .venv/bin/python benchmarks/train_memory.py   -> benchmarks/results/train_memory.json
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from netdiet.fileio import atomic_write_json  # noqa: E402
from netdiet.models import create_model  # noqa: E402
from netdiet.training.budget import measure_activation_bytes, measure_training_peak  # noqa: E402
from netdiet.training.precision import autocast  # noqa: E402
from netdiet.training.recompute import enable_checkpointing  # noqa: E402

CONFIGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def step_ms(model, x, y, precision: str, checkpointing: bool, repeats: int = 3) -> float:
    net = copy.deepcopy(model)
    if checkpointing:
        enable_checkpointing(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        with autocast(precision, torch.device("cpu")):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cases = [("deep MLP mlp widths=[1024]*8", create_model("mlp", widths=[1024] * 8), (784,), 256),
             ("deep CNN cnn channels=[32]*4", create_model("cnn", channels=[32, 32, 32, 32], dropout=0.0), (1, 28, 28), 64),
             ("lenet300", create_model("lenet300"), (1, 28, 28), 256)]
    rows = []
    for name, model, shape, batch in cases:
        x, y = torch.rand((batch,) + shape), torch.randint(0, 10, (batch,))
        base = None
        for precision, ckpt in CONFIGS:
            r = {"model": name, "batch": batch, "precision": precision, "checkpointing": ckpt,
                 "activations": measure_activation_bytes(model, x, y, precision=precision, checkpointing=ckpt),
                 "peak": measure_training_peak(model, x, y, optimizer="adam", precision=precision, checkpointing=ckpt),
                 "step_ms": step_ms(model, x, y, precision, ckpt)}
            base = base or r
            r["activations_saved_vs_fp32"] = 1 - r["activations"] / base["activations"]
            r["peak_ratio_vs_fp32"] = r["peak"] / base["peak"]
            r["time_ratio_vs_fp32"] = r["step_ms"] / base["step_ms"]
            rows.append(r)
    ck = {r["model"]: r["activations_saved_vs_fp32"] for r in rows if r["precision"] == "fp32" and r["checkpointing"]}
    doc = {"schema": "netdiet.benchmark/1", "name": "train_memory", "threads": 1,
           "measurement": "live tensor storages tracked per aten op (netdiet.training.budget.LiveStorageTracker)",
           "target": "checkpointing saves >= 40 % of activation memory on the deep MLP and CNN",
           "checkpointing_activation_saving": ck,
           "target_met": all(v >= 0.40 for k, v in ck.items() if k.startswith("deep")), "results": rows,
           "note": "timings on a shared 2-core machine under load are noisy"}
    out = Path(__file__).resolve().parent / "results" / "train_memory.json"
    atomic_write_json(out, doc)
    from rich.console import Console
    from rich.table import Table
    from netdiet.units import format_bytes
    t = Table(title="activation checkpointing and bf16 autocast (1 thread, Adam)")
    for c in ("model", "config", "activations", "saved", "peak", "peak x", "step ms", "time x"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["model"], f"{r['precision']}{' +ckpt' if r['checkpointing'] else ''}", format_bytes(r["activations"]),
                  f"{100 * r['activations_saved_vs_fp32']:.0f} %", format_bytes(r["peak"]), f"{r['peak_ratio_vs_fp32']:.2f}",
                  f"{r['step_ms']:.1f}", f"{r['time_ratio_vs_fp32']:.2f}")
    Console().print(t)
    print(f"wrote {out}; checkpointing target met: {doc['target_met']}")


if __name__ == "__main__":
    main()
