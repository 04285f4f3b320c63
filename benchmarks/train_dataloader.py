"""Data-loader workers: epoch time and the share of it spent waiting for the next batch, 0 vs 1 vs 2 workers.

The batches carry real per-sample preprocessing (a random +-2 pixel shift and a 5x5 Gaussian blur, the kind of
augmentation that makes loading expensive). With 0 workers it runs in the training loop; with workers it runs in
DataLoader processes that prefetch while the model trains, so the loop should wait less. On this 2-core machine,
shared with other jobs, workers compete with the training thread for cores: the measured effect is what it is.

Run: .venv/bin/python benchmarks/train_dataloader.py   -> benchmarks/results/train_dataloader.json
"""
from __future__ import annotations

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

_K = torch.exp(-(torch.arange(5.0) - 2) ** 2 / 2)
KERNEL = (_K[:, None] * _K[None, :] / (_K.sum() ** 2)).view(1, 1, 5, 5)


def augment(x: torch.Tensor) -> torch.Tensor:
    """Per sample: random shift by up to 2 pixels, then a Gaussian blur (done sample by sample, as per-sample
    transforms in a Dataset are)."""
    out = torch.empty_like(x)
    for i in range(len(x)):
        dx, dy = torch.randint(-2, 3, (2,)).tolist()
        img = torch.roll(x[i:i + 1], shifts=(dy, dx), dims=(2, 3))
        out[i:i + 1] = F.conv2d(img, KERNEL, padding=2)
    return out


def main() -> None:
    torch.set_num_threads(1)
    data = get_dataset("mnist5k")
    x, y = data.x_train[:2000], data.y_train[:2000]
    rows = []
    for workers in (0, 1, 2, 0):                 # 0 twice: first and last, to see drift from machine load
        torch.manual_seed(0)
        model = create_model("lenet5")
        t0 = time.perf_counter()
        res = fit(model, x, y, TrainConfig(epochs=1, batch_size=64, workers=workers, prefetch=4, progress=False), transform=augment)
        h = res.history[0]
        rows.append({"workers": workers, "epoch_seconds": h["seconds"], "samples_per_s": h["samples_per_s"],
                     "data_wait_fraction": h["data_wait_fraction"], "wall_seconds": time.perf_counter() - t0})
    base = (rows[0]["epoch_seconds"] + rows[-1]["epoch_seconds"]) / 2
    for r in rows:
        r["time_ratio_vs_0_workers"] = r["epoch_seconds"] / base
    doc = {"schema": "netdiet.benchmark/1", "name": "train_dataloader", "model": "lenet5", "samples": 2000, "batch": 64,
           "threads": 1, "prefetch": 4, "transform": "random shift + 5x5 Gaussian blur per sample", "results": rows,
           "note": "2 cores shared with other jobs: workers and the training thread compete; noisy"}
    out = Path(__file__).resolve().parent / "results" / "train_dataloader.json"
    atomic_write_json(out, doc)
    from rich.console import Console
    from rich.table import Table
    t = Table(title="DataLoader workers (lenet5, 2,000 augmented samples, 1 training thread)")
    for c in ("workers", "epoch s", "samples/s", "waiting for data", "time vs 0 workers"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["workers"]), f"{r['epoch_seconds']:.2f}", f"{r['samples_per_s']:.0f}",
                  f"{100 * r['data_wait_fraction']:.1f} %", f"{r['time_ratio_vs_0_workers']:.2f}")
    Console().print(t)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
