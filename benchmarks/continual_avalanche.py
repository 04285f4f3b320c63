"""The peer of benchmarks/continual.py: Avalanche 0.6 experience replay on the same class-IL Split-MNIST (mnist5k) at
the same byte budgets, with the same convnet (cnn, channels 8-16-32, 8,834 parameters), optimiser and epochs.

Avalanche keeps the model in float32 (35,808 B with the batch-norm buffers) and each exemplar as a float32 image and
an int64 label (3,144 B), so at a budget B its replay memory holds (B - 35,808) // 3,144 exemplars (ReplayPlugin,
experience-balanced). It runs in its own venv (Avalanche pins its own torch/torchvision pair), on the arrays that
netdiet's mnist5k loader wrote (no netdiet import here):

    mkdir -p /tmp/cl && .venv/bin/python -c "import numpy as np, netdiet; d = netdiet.get_dataset('mnist5k'); \
        np.savez('/tmp/cl/mnist5k.npz', **{k: np.asarray(getattr(d, k)) for k in ('x_train', 'y_train', 'x_test', 'y_test')})"
    python3 -m venv /tmp/ava && /tmp/ava/bin/pip install torch==2.14.1 torchvision==0.29.1 avalanche-lib==0.6.0
    /tmp/ava/bin/python benchmarks/continual_avalanche.py --data /tmp/cl/mnist5k.npz --seeds 1

Writes benchmarks/results/continual_avalanche.json (average accuracy over the 5 tasks after the last, per budget).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
BUDGETS_KIB = (64, 128, 256, 512)
MODEL_BYTES = 35808                 # float32 weights + batch-norm buffers of the convnet (as netdiet's ledger counts)
EXEMPLAR_BYTES = 28 * 28 * 4 + 8    # float32 image + int64 label


def convnet() -> nn.Module:
    layers, prev = [], 1
    for c in (8, 16, 32):
        layers += [nn.Conv2d(prev, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
        prev = c
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * 3 * 3, 10))


def run(data: dict, budget: int, seed: int, epochs: int) -> dict:
    from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
    from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_tensor_classification_dataset as mk
    from avalanche.training.plugins import ReplayPlugin
    from avalanche.training.supervised import Naive

    torch.manual_seed(seed)
    train = mk(torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"]).long())
    test = mk(torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"]).long())
    bench = nc_benchmark(train, test, n_experiences=5, task_labels=False, fixed_class_order=list(range(10)))
    model = convnet()
    mem = max(0, (budget - MODEL_BYTES) // EXEMPLAR_BYTES)
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=64, train_epochs=epochs, eval_mb_size=512,
                     device="cpu", plugins=[ReplayPlugin(mem_size=mem)] if mem else [], evaluator=None)
    for exp in bench.train_stream:
        strategy.train(exp)
    model.eval()
    x, y = torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"]).long()
    with torch.no_grad():
        pred = model(x).argmax(1)
    per_task = [(pred[(y // 2) == t] == y[(y // 2) == t]).float().mean().item() for t in range(5)]
    return {"budget": budget, "seed": seed, "exemplars": int(mem), "average_accuracy": sum(per_task) / 5,
            "per_task": per_task}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help=".npz with x_train, y_train, x_test, y_test (mnist5k)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "continual_avalanche.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    import avalanche
    with np.load(args.data, allow_pickle=False) as f:
        data = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    runs = []
    for seed in range(args.seeds):
        for kib in BUDGETS_KIB:
            t0 = time.perf_counter()
            r = run(data, kib * 1024, seed, args.epochs)
            r["seconds"] = time.perf_counter() - t0
            runs.append(r)
            print(f"avalanche replay {kib:4d} KiB seed {seed}: {100 * r['average_accuracy']:.2f} % "
                  f"({r['exemplars']} fp32 exemplars)", flush=True)
            rows = []
            for k in BUDGETS_KIB:
                accs = [q["average_accuracy"] for q in runs if q["budget"] == k * 1024]
                if accs:
                    rows.append({"budget": k * 1024, "seeds": len(accs), "average_accuracy": statistics.fmean(accs),
                                 "average_accuracy_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                                 "exemplars": max(0, (k * 1024 - MODEL_BYTES) // EXEMPLAR_BYTES)})
            doc = {"schema": "netdiet.bench.continual-avalanche/1", "peer": f"avalanche {avalanche.__version__}",
                   "torch": torch.__version__, "epochs": args.epochs, "model": "cnn 8-16-32 (fp32)",
                   "optimizer": "adam lr 1e-3, batch 64", "scenario": "class-IL split mnist5k, classes 0-9 in order",
                   "rows": rows, "runs": runs, "threads": 1}
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(args.out), suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh, indent=1)
            os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
