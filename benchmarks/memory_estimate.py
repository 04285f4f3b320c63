"""netdiet's training-memory estimate beside the measured peak and beside torchinfo's size estimate.

    .venv/bin/python benchmarks/memory_estimate.py          # writes benchmarks/results/memory_estimate.json

For each zoo model, batch size and optimizer, in one run:
  - netdiet estimate: analysis.memory.estimate_memory (meta device, nothing allocated)
  - measured:         analysis.measurement.measure_memory (3 real trainer steps on CPU; steady-state peak of steps 2-3
                      from the profiler's allocator events, plus weights, buffers and the input batch)
  - torchinfo:        its "Estimated Total Size" (input + parameters + 2 x the leaf modules' outputs) plus the
                      gradient and optimizer-state bytes torchinfo leaves out (1x params for the gradients,
                      2x for Adam) — the figure a user would compute by hand from torchinfo's summary.
Errors are (estimate - measured) / measured. Byte counts are exact and repeatable; the wall times of each
column are single runs on a shared, loaded 2-core machine: noisy, shown only for scale.
"""
from __future__ import annotations

import io
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

from netdiet.analysis.measurement import measure_memory
from netdiet.analysis.memory import estimate_memory
from netdiet.fileio import atomic_write_json
from netdiet.models import create_model

RESULTS = Path(__file__).resolve().parent / "results" / "memory_estimate.json"

CASES = [  # (model, factory kwargs, per-sample input shape, input dtype, batch sizes)
    ("mlp", {}, (784,), torch.float32, (32, 256)),
    ("lenet5", {}, (1, 28, 28), torch.float32, (16, 64)),
    ("cnn", {}, (1, 28, 28), torch.float32, (16, 64)),
    ("resnet", {}, (3, 32, 32), torch.float32, (8, 32)),
    ("mobilenet", {}, (3, 32, 32), torch.float32, (8, 32)),
    ("transformer", {}, (64,), torch.int64, (4, 16)),
    ("yolo", {"width_mult": 0.25}, (3, 128, 128), torch.float32, (1, 4)),
]
VARIANTS = [  # extra settings measured on two models
    ("resnet", {}, (3, 32, 32), torch.float32, 16, {"checkpointing": True}),
    ("transformer", {}, (64,), torch.int64, 8, {"checkpointing": True}),
    ("transformer", {}, (64,), torch.int64, 8, {"amp": True}),
    ("transformer", {}, (64,), torch.int64, 8, {"dtype": "bf16"}),
    ("mlp", {}, (784,), torch.float32, 256, {"amp": True}),
    ("resnet", {}, (3, 32, 32), torch.float32, 16, {"amp": True}),
]


def make_input(shape, dtype, batch):
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn((batch,) + shape, generator=g)
    return torch.randint(0, 1000, (batch,) + shape, generator=g)


def torchinfo_bytes(model, x, optimizer: str) -> int | None:
    try:
        import torchinfo
    except ImportError:
        return None
    with redirect_stdout(io.StringIO()):
        stats = torchinfo.summary(model, input_data=[x], verbose=0, device="cpu", mode="train")
    params = stats.total_param_bytes
    total = stats.total_input + params + stats.total_output_bytes
    state = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}[optimizer] * params
    return int(total + params + state)


def run_case(name, kw, shape, dtype, batch, optimizer, extra) -> dict:
    torch.manual_seed(0)
    model = create_model(name, **kw)
    x = make_input(shape, dtype, batch)
    t0 = time.perf_counter()
    est = estimate_memory(model, x, optimizer=optimizer, **extra)
    t_est = time.perf_counter() - t0
    t0 = time.perf_counter()
    meas = measure_memory(model, x, optimizer=optimizer, **extra)
    t_meas = time.perf_counter() - t0
    ti = torchinfo_bytes(model, x, optimizer) if not extra else None
    m = meas["peak_measured"]
    return {
        "model": name, "model_kw": kw, "batch_size": batch, "optimizer": optimizer, "settings": extra,
        "peak_estimated": est.peak_estimated, "peak_measured": m, "error": (est.peak_estimated - m) / m,
        "inference_peak_estimated": est.inference_peak, "inference_peak_measured": meas["inference_peak_measured"],
        "inference_error": (est.inference_peak - meas["inference_peak_measured"]) / meas["inference_peak_measured"],
        "torchinfo_bytes": ti, "torchinfo_error": (ti - m) / m if ti else None,
        "peak_phase": est.peak_phase, "weights": est.weights, "gradients": est.gradients,
        "optimizer_state": est.optimizer_state, "activations": est.activations, "temporaries": est.temporaries,
        "checkpointing_saved": est.checkpointing_saved, "recompute_flops": est.recompute_flops,
        "estimate_seconds": t_est, "measure_seconds": t_meas,
    }


def main() -> int:
    torch.set_num_threads(1)
    rows = []
    jobs = [(n, kw, s, dt, b, o, {}) for n, kw, s, dt, bs in CASES for b in bs for o in ("sgd", "adam")]
    jobs += [(n, kw, s, dt, b, "adam", extra) for n, kw, s, dt, b, extra in VARIANTS]
    for i, job in enumerate(jobs, 1):
        rows.append(run_case(*job))
        r = rows[-1]
        print(f"[{i}/{len(jobs)}] {r['model']} b{r['batch_size']} {r['optimizer']} {r['settings'] or ''}", file=sys.stderr)

    from rich.console import Console
    from rich.table import Table
    from netdiet.units import format_bytes

    t = Table(title="training peak: netdiet estimate vs measured (CPU, torch %s)" % torch.__version__)
    for col in ("model", "batch", "opt", "settings", "estimated", "measured", "error", "torchinfo+opt", "ti error",
                "inference err", "est s"):
        t.add_column(col, justify="left" if col in ("model", "opt", "settings") else "right")
    for r in rows:
        settings = ",".join(f"{k}={v}" for k, v in r["settings"].items())
        t.add_row(r["model"], str(r["batch_size"]), r["optimizer"], settings, format_bytes(r["peak_estimated"]),
                  format_bytes(r["peak_measured"]), f"{r['error']:+.1%}",
                  format_bytes(r["torchinfo_bytes"]) if r["torchinfo_bytes"] else "-",
                  f"{r['torchinfo_error']:+.1%}" if r["torchinfo_error"] is not None else "-",
                  f"{r['inference_error']:+.1%}", f"{r['estimate_seconds']:.1f}")
    Console(width=170).print(t)
    plain = [r for r in rows if not r["settings"]]
    summary = {
        "cases": len(rows),
        "max_abs_error": max(abs(r["error"]) for r in rows),
        "max_abs_error_fp32": max(abs(r["error"]) for r in plain),
        "within_5_percent": sum(abs(r["error"]) < 0.05 for r in rows),
        "torchinfo_max_abs_error": max((abs(r["torchinfo_error"]) for r in plain if r["torchinfo_error"] is not None),
                                       default=None),
    }
    print(summary)
    atomic_write_json(RESULTS, {"schema": "netdiet.bench.memory_estimate/1", "torch": torch.__version__,
                                "threads": torch.get_num_threads(), "summary": summary, "rows": rows})
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
