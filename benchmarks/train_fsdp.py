"""FSDP2 beside DDP at world size 2 (gloo, this machine): each rank's measured tensor peak and the epoch time.

For each model, `netdiet train --nproc 2` once with `--parallel ddp` and once with `--parallel fsdp` (same seed, data,
global batch 64, Adam, 4 epochs on digits), one after the other:
  per_rank_peak   train.json's distributed.per_rank_peak_measured (one steady-state step per rank: the tensors held
                  at its start + the profiler's allocator events over it)
  epoch_s         median and range of epochs 2-4 (epoch 1 holds the start-up and the one profiled step)
  losses_equal    the per-epoch losses of the two runs agree to rel 1e-6
Ratios are FSDP / DDP. Expectation: FSDP's per-rank peak is below DDP's (1/2 of weights, gradients and Adam state
per rank, plus one unit gathered at a time); FSDP's epoch is slower here (about 3 collectives per unit and step,
latency-bound on 2 shared cores) -- measured, not assumed.

Run: .venv/bin/python benchmarks/train_fsdp.py   -> benchmarks/results/train_fsdp.json
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from netdiet import api  # noqa: E402
from netdiet.environment import environment  # noqa: E402
from netdiet.fileio import atomic_write_json  # noqa: E402
from netdiet.training import TrainConfig  # noqa: E402

MODELS = [("mlp", {"widths": [512, 512]}), ("cnn", {})]
EPOCHS = 4


def run(spec: str, kw: dict, parallel: str) -> dict:
    cfg = TrainConfig(epochs=EPOCHS, batch_size=64, lr=1e-3, progress=False, parallel=parallel)
    r = api.train(spec, model_kw=kw, data="digits", val_fraction=0.15, config=cfg, nproc=2)
    secs = [h["seconds"] for h in r.history[1:]]
    return {"per_rank_peak": r.distributed["per_rank_peak_measured"], "measured_step_seconds":
            r.distributed["measured_step_seconds"], "epoch_s": {"median": statistics.median(secs), "min": min(secs),
                                                                "max": max(secs)},
            "first_epoch_s": r.history[0]["seconds"], "losses": [h["loss"] for h in r.history], "params": r.params}


def main() -> None:
    rows = []
    for spec, kw in MODELS:
        ddp, fsdp = run(spec, kw, "ddp"), run(spec, kw, "fsdp")
        equal = all(abs(a - b) <= 1e-6 * abs(a) for a, b in zip(ddp["losses"], fsdp["losses"]))
        rows.append({"model": spec, "model_kw": kw, "ddp": ddp, "fsdp": fsdp, "losses_equal": equal,
                     "peak_ratio": [f / d for f, d in zip(fsdp["per_rank_peak"], ddp["per_rank_peak"])],
                     "epoch_time_ratio": fsdp["epoch_s"]["median"] / ddp["epoch_s"]["median"]})
        print(f"{spec}: per-rank peak fsdp {fsdp['per_rank_peak']} vs ddp {ddp['per_rank_peak']} B; epoch "
              f"{fsdp['epoch_s']['median']:.2f} s vs {ddp['epoch_s']['median']:.2f} s; losses equal {equal}", flush=True)
    out = Path(__file__).resolve().parent / "results" / "train_fsdp.json"
    atomic_write_json(out, {"schema": "netdiet.bench.train_fsdp/1", "world_size": 2, "data": "digits",
                            "global_batch": 64, "optimizer": "adam", "epochs": EPOCHS, "rows": rows,
                            "environment": environment()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
