"""Deep Compression (Han, Mao & Dally, ICLR 2016) with netdiet, next to the paper and to torch.nn.utils.prune + gzip.

For LeNet-300-100 and LeNet-5 on mnist5k (4,000 train / 1,000 test real MNIST digits):
  1. netdiet trains the dense baseline (the recipe's `baseline` settings),
  2. the built-in `deep-compression` recipe runs: magnitude pruning with retraining -> k-means weight sharing with
     centroid fine-tuning; each stage's .ndz archive is written and evaluated (accuracy of the stored file),
  3. sizes are compared with the dense fp32 safetensors file (the ratio's denominator) at three points, as in the
     paper's Table 1: pruned (positions + fp32 values, bit-packed, no entropy coding), + quantization (cluster
     indices at their bit width + codebooks, still no entropy coding) and + entropy coding (the real .ndz file:
     each stream in the smallest of raw / zstd / Huffman),
  4. what a user gets from torch.nn.utils.prune (global L1 at the same sparsity, made permanent, saved as
     safetensors, gzip -9) — bytes and accuracy, side by side, from the same baseline.

Targets (issue 3): >= 50x (LeNet-300-100) and >= 45x (LeNet-5) at <= 0.3 pt accuracy drop.
Note: 1,000 test images means one image is 0.1 pt; timings are not the point here.

    .venv/bin/python benchmarks/deep_compression.py [--models lenet300,lenet5] [--recipe deep-compression]
"""
from __future__ import annotations

import argparse
import copy
import gzip
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from netdiet.compression import archive  # noqa: E402
from netdiet.compression.recipe import load_recipe, run_recipe  # noqa: E402
from netdiet.data import get_dataset  # noqa: E402
from netdiet.fileio import atomic_write_json  # noqa: E402
from netdiet.models import create_model  # noqa: E402
from netdiet.training import evaluate_accuracy, fit  # noqa: E402

PAPER = {  # Han et al. 2016, Table 1 / section 6.1: compression vs the dense fp32 model after each step
    "lenet300": {"pruned": 12.0, "quantized": 32.0, "entropy": 40.0, "accuracy_drop_pt": -0.03},
    "lenet5": {"pruned": 12.0, "quantized": 33.0, "entropy": 39.0, "accuracy_drop_pt": -0.06},
}
TARGET = {"lenet300": 50.0, "lenet5": 45.0}
MAX_DROP_PT = 0.3
RESULTS = Path(__file__).resolve().parent / "results" / "deep_compression.json"


def packed_bytes(blob: bytes) -> int:
    """The archive's size if no stream were entropy coded: symbol streams bit-packed at their width, byte streams raw.
    Framing and the (compressed) JSON header count as they are."""
    header, payload = archive.read_header(blob)
    total = len(blob) - len(payload)

    def streams(obj):
        if isinstance(obj, dict):
            if "off" in obj and "len" in obj and "codec" in obj:
                yield obj
            else:
                for v in obj.values():
                    yield from streams(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from streams(v)

    for s in streams(header.get("tensors", [])):
        if "bits" in s and "n" in s:
            total += (int(s["n"]) * int(s["bits"]) + 7) // 8
        else:
            total += int(s.get("raw", s["len"]))
    return total


def safetensors_gzip_bytes(model: torch.nn.Module) -> int:
    """A sparse model stored the usual way: dense fp32 safetensors (zeros included), then gzip -9."""
    from safetensors.torch import save
    blob = save({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()})
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(blob)
    return len(buf.getvalue())


def torch_prune_gzip(model: torch.nn.Module, sparsity: float, data) -> dict:
    """What torch.nn.utils.prune gives a user: global L1 at `sparsity`, made permanent, safetensors, gzip -9."""
    import torch.nn.utils.prune as tprune
    from safetensors.torch import save

    m = copy.deepcopy(model)
    targets = [(mod, "weight") for mod in m.modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))]
    tprune.global_unstructured(targets, pruning_method=tprune.L1Unstructured, amount=sparsity)
    for mod, name in targets:
        tprune.remove(mod, name)
    blob = save({k: v.detach().contiguous() for k, v in m.state_dict().items()})
    return {"safetensors_bytes": len(blob), "gzip_bytes": safetensors_gzip_bytes(m),
            "accuracy": evaluate_accuracy(m, data.x_test, data.y_test)}


def run_model(name: str, recipe_name: str, data, seed: int) -> dict:
    recipe = load_recipe(recipe_name)
    torch.manual_seed(seed)
    model = create_model(name)
    t0 = time.perf_counter()
    fit(model, data.x_train, data.y_train, recipe.baseline_config(seed, progress=False))
    train_s = time.perf_counter() - t0
    dense = copy.deepcopy(model)

    packed: dict[str, int] = {}

    gzipped: dict[str, int] = {}

    def keep_packed(stage, m, state) -> None:  # the stage's archive without entropy coding, and the usual gzip
        packed[stage.name] = packed_bytes(archive.encode(m, state))
        gzipped[stage.name] = safetensors_gzip_bytes(m)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.ndz"
        t0 = time.perf_counter()
        result = run_recipe(model, recipe, data, spec={"spec": name, "kwargs": {}}, trained=True, seed=seed,
                            out=out, latency=False, progress=False, on_stage=keep_packed,
                            log=lambda m: print(f"  [{name}] {m}", flush=True))
        compress_s = time.perf_counter() - t0
        final_bytes = out.stat().st_size
    doc = result.to_dict()
    dense_bytes = doc["baseline"]["bytes_on_disk"]
    base_acc = doc["baseline"]["accuracy"]

    prune = next(s for s in result.stages if s.technique == "prune")
    last = result.stages[-1]
    sparsity = float(prune.report["sparsity"])  # over the pruned weights (biases stay dense)
    points = {
        "pruned": {"stage": prune.name, "bytes": packed[prune.name], "ratio": dense_bytes / packed[prune.name],
                   "accuracy": prune.accuracy},
        "quantized": {"stage": last.name, "bytes": packed[last.name], "ratio": dense_bytes / packed[last.name],
                      "accuracy": last.accuracy},
        "entropy": {"stage": last.name, "bytes": final_bytes, "ratio": dense_bytes / final_bytes, "accuracy": last.accuracy},
    }
    torch_side = torch_prune_gzip(dense, sparsity, data)
    row = {
        "model": name, "recipe": doc["recipe"], "baseline_accuracy": base_acc, "dense_fp32_bytes": dense_bytes,
        "params": doc["baseline"]["params"], "weight_sparsity": sparsity,
        "baseline_train_seconds": train_s, "compress_seconds": compress_s,
        "stages": [{"name": s.name, "technique": s.technique, "accuracy": s.accuracy,
                    "drop_pt": 100 * (base_acc - s.accuracy), "bytes_on_disk": s.bytes_on_disk, "ratio": s.ratio,
                    "bytes_packed": packed[s.name], "nonzero_params": s.nonzero_params} for s in result.stages],
        "points": points,
        "final": {"accuracy": last.accuracy, "drop_pt": 100 * (base_acc - last.accuracy), "bytes_on_disk": final_bytes,
                  "ratio": dense_bytes / final_bytes},
        # the very same pruned + fine-tuned weights, saved as dense safetensors and gzipped: the format's share
        "pruned_safetensors_gzip": {"bytes": gzipped[prune.name], "ratio": dense_bytes / gzipped[prune.name],
                                    "accuracy": prune.accuracy},
        "torch_prune_gzip": {**torch_side, "ratio": dense_bytes / torch_side["gzip_bytes"],
                             "drop_pt": 100 * (base_acc - torch_side["accuracy"])},
        "paper": PAPER[name], "target_ratio": TARGET[name], "max_drop_pt": MAX_DROP_PT,
    }
    row["meets_target"] = bool(row["final"]["ratio"] >= TARGET[name] and row["final"]["drop_pt"] <= MAX_DROP_PT)
    return row


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="Deep Compression on mnist5k: size reduction vs dense fp32 safetensors (paper = Han et al. 2016, full MNIST)")
    for col in ("model", "step", "netdiet", "paper", "accuracy", "drop pt", "bytes"):
        t.add_column(col, justify="left" if col in ("model", "step") else "right")
    labels = {"pruned": "pruned (no entropy coding)", "quantized": "+ quantization (cluster)", "entropy": "+ entropy coding (.ndz)"}
    for r in rows:
        t.add_row(r["model"], "dense fp32 baseline", "1.0x", "1x", f"{100 * r['baseline_accuracy']:.2f} %", "",
                  str(r["dense_fp32_bytes"]))
        for key, label in labels.items():
            p = r["points"][key]
            t.add_row("", label, f"{p['ratio']:.1f}x", f"{r['paper'][key]:.0f}x", f"{100 * p['accuracy']:.2f} %",
                      f"{100 * (r['baseline_accuracy'] - p['accuracy']):+.2f}", str(p["bytes"]))
        tp = r["torch_prune_gzip"]
        t.add_row("", f"torch.nn.utils.prune {100 * r['weight_sparsity']:.0f} % + gzip (no fine-tune)", f"{tp['ratio']:.1f}x", "-",
                  f"{100 * tp['accuracy']:.2f} %", f"{tp['drop_pt']:+.2f}", str(tp["gzip_bytes"]))
        sg = r["pruned_safetensors_gzip"]
        t.add_row("", "netdiet's pruned weights as safetensors + gzip", f"{sg['ratio']:.1f}x", "-",
                  f"{100 * sg['accuracy']:.2f} %", f"{100 * (r['baseline_accuracy'] - sg['accuracy']):+.2f}", str(sg["bytes"]))
        ok = "meets" if r["meets_target"] else "MISSES"
        t.add_row("", f"target >= {r['target_ratio']:.0f}x at <= {MAX_DROP_PT} pt: {ok}", "", "", "", "", "")
    Console(width=130).print(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="lenet300,lenet5")
    ap.add_argument("--recipe", default="deep-compression", help="built-in recipe name or YAML path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("NETDIET_PROGRESS", "0")
    data = get_dataset("mnist5k")
    rows = [run_model(name.strip(), args.recipe, data, args.seed) for name in args.models.split(",") if name.strip()]
    doc = {"schema": "netdiet.bench.deep_compression/1", "data": "mnist5k", "seed": args.seed, "threads": 1,
           "torch": torch.__version__, "models": rows,
           "note": "ratios vs the dense fp32 safetensors file; accuracy on the 1,000 mnist5k test images (0.1 pt = 1 image)"}
    atomic_write_json(args.out, doc)
    print_table(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
