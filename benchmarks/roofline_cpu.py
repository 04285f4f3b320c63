"""Projected vs measured training-step time on the one device this machine has: its CPU (issue 14 asks for the
projection against a measured step on a GPU; there is none here, so this is the check that can be made).

    python benchmarks/roofline_cpu.py [--threads 1] [--out PATH]

For each model the `cpu` device is measured first (devices.measure_cpu: matmul peak per dtype, copy bandwidth, at
the timing thread count), then the step is projected (roofline.project_step on the counted training step, one
device, no communication) and measured (analysis.latency.measure_latency: netdiet's trainer step, repeated to a
stable median, with its 95 % interval). A roofline is a lower bound on time (an upper bound on speed): the ratio
measured / projected is >= 1 when the model holds, and says how far the kernels and the framework are from the
peaks. Writes benchmarks/results/roofline_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from netdiet.analysis import parallel
from netdiet.analysis.counter import count_ops
from netdiet.analysis.devices import measure_cpu
from netdiet.analysis.latency import measure_latency
from netdiet.analysis.memory import estimate_memory
from netdiet.analysis.roofline import project_step
from netdiet.models import create_model

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "mlp-1024 b256": ("mlp", {"widths": [1024, 1024], "in_features": 1024}, (256, 1024), torch.float32),
    "lenet5 b64": ("lenet5", {}, (64, 1, 28, 28), torch.float32),
    "transformer-small b4x256": ("transformer", {"preset": "small"}, (4, 256), torch.int64),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "roofline_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = measure_cpu()
    rows = []
    for name, (spec, kw, shape, dtype) in CASES.items():
        torch.manual_seed(0)
        net = create_model(spec, **kw)
        x = (torch.randint(0, 1000, shape) if dtype == torch.int64 else torch.randn(shape),)
        counts = count_ops(net, x, train=True, optimizer="adam")
        est = estimate_memory(net, x, optimizer="adam")
        section = parallel.per_rank(parallel.Layout("ddp", 1, 1), net, x, mem_kw={"optimizer": "adam"}, estimate=est)
        proj = project_step(counts, section, cpu, dtype="fp32", micro_batch=shape[0])
        lat = measure_latency(net, x, train=True, optimizer="adam", threads=args.threads)
        measured = lat.train_step_ms_median / 1e3
        rows.append({"case": name, "projected_s": proj["step_time_s"], "compute_s": proj["compute_s"],
                     "memory_s": proj["memory_s"], "measured_s": measured,
                     "measured_ci_s": [c / 1e3 for c in lat.train_step_ms_ci or []], "stable": lat.train_step_stable,
                     "measured_over_projected": measured / proj["step_time_s"], "mfu_counted": proj["mfu_counted"]})
        r = rows[-1]
        print(f"{name}: projected {r['projected_s'] * 1e3:.2f} ms, measured {measured * 1e3:.2f} ms "
              f"({'stable' if r['stable'] else 'unstable'}), measured/projected {r['measured_over_projected']:.2f}")
    doc = {"schema": "netdiet.benchmark/1", "benchmark": "roofline_cpu",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads,
           "load_average": os.getloadavg()[0], "device": cpu.to_dict(), "cases": rows,
           "note": "no GPU on this machine: the projection is checked against the CPU it measured; a roofline bounds "
                   "the time from below, so measured/projected >= 1 is expected"}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
