"""Ensembles and what they cost: one model -> K models (+accuracy, x cost) -> one distilled student.

For mnist5k and digits, lenet300 and cnn, and seeds 0, 1, 2: `netdiet.train_ensemble(K=5)` trains five members
through netdiet's loop; the ensembles K = 1, 3, 5 are the first 1, 3, 5 members (member seeds follow
`member_seed`, so K = 3 is a prefix of K = 5, as a user growing an ensemble would have it). For each K: test
accuracy of the mean of probabilities (mean +- std over the 3 seeds), param bytes and MACs per sample (netdiet's
profile of the K-member module), training seconds (the members' measured epochs) and latency of one forward of
64 test samples (loop over the members and vmap-batched; median over the seeds, each timing marked stable or not).

Then `netdiet.compress` with a one-stage recipe distils the K = 5 ensemble into one student (`teacher:
ensemble:PATH`, `student: copy`: member 1 trained on, under the ensemble's soft targets), beside a control that
is the same stage with alpha = 0 (member 1 trained on for the same epochs on the labels alone, no teacher): the
student's gain over the control is what distillation adds, not the extra epochs.

Run: .venv/bin/python benchmarks/ensemble.py   -> benchmarks/results/ensemble.json
Setup: CPU, torch's default threads for training, 1 thread for latency (netdiet's timing default); epochs are
small (EPOCHS below) so that the run is meant to take about 10 minutes on 2 quiet cores; the committed result took
65 minutes at a load average of 12-13 on the shared 2-core machine (mnist5k cnn alone 41 minutes).
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import netdiet  # noqa: E402
from netdiet.data import get_dataset  # noqa: E402
from netdiet.environment import environment  # noqa: E402
from netdiet.fileio import atomic_write_json  # noqa: E402
from netdiet.training import TrainConfig  # noqa: E402
from netdiet.training.ensemble import assemble  # noqa: E402

SEEDS = (0, 1, 2)
KS = (1, 3, 5)
# (data, model): (member epochs, distillation epochs)
EPOCHS = {("mnist5k", "lenet300"): (2, 1), ("mnist5k", "cnn"): (1, 1),
          ("digits", "lenet300"): (3, 2), ("digits", "cnn"): (3, 2)}
RESULT = Path(__file__).resolve().parent / "results" / "ensemble.json"


def _ms(stats: dict | None) -> float | None:
    return None if not stats else stats["median_ms"]


def _recipe(folder: Path, teacher: str, epochs: int, alpha: float) -> Path:
    path = folder / f"distill-alpha{alpha}.yaml"
    path.write_text(f"name: distill-ensemble\nstages:\n  - technique: distill\n"
                    f"    options: {{teacher: \"ensemble:{teacher}\", student: copy, temperature: 4, alpha: {alpha}}}\n"
                    f"    finetune: {{epochs: {epochs}, lr: 0.001}}\n")
    return path


def one_seed(data: str, model: str, seed: int, tmp: Path) -> dict:
    epochs, distill_epochs = EPOCHS[(data, model)]
    out = tmp / f"{data}-{model}-{seed}"
    cfg = TrainConfig(epochs=epochs, seed=seed, progress=False, projection_steps=0)
    run = netdiet.train_ensemble(model, max(KS), data=data, out=str(out), config=cfg, latency=False)
    dataset = get_dataset(data, seed=seed)
    rows = {}
    for k in KS:
        sub = assemble(model, run.model["kwargs"], dataset, cfg, run.train_docs[:k], run.models[:k])
        lat = sub.latency
        rows[k] = {"accuracy": sub.accuracy["mean"], "accuracy_vote": sub.accuracy["vote"],
                   "members_mean": sub.accuracy["members_mean"], "param_bytes": sub.cost["ensemble"]["param_bytes"],
                   "macs": sub.cost["ensemble"]["macs"], "flops": sub.cost["ensemble"]["flops"],
                   "train_seconds": sub.training["seconds"], "train_flops": sub.training["flops"],
                   "latency_loop_ms": _ms(lat["loop"]), "latency_loop_stable": lat["loop"].get("stable"),
                   "latency_vmap_ms": _ms(lat.get("vmap")),
                   "latency_vmap_stable": (lat.get("vmap") or {}).get("stable"),
                   "vmap_max_abs_diff": lat.get("vmap_max_abs_diff")}
    distilled = {}
    for name, alpha in (("student", 0.9), ("control", 0.0)):
        t0 = time.perf_counter()
        res = netdiet.compress(model, str(_recipe(tmp, str(out), distill_epochs, alpha)), data=data,
                               weights=str(out / "member-1" / "model.safetensors"), seed=seed, progress=False,
                               latency=name == "student")   # the control has the student's architecture: timed once
        stage = res.stages[-1]
        distilled[name] = {"accuracy": stage.accuracy, "bytes_on_disk": stage.bytes_on_disk, "macs": stage.macs,
                           "params": stage.params, "latency_ms": (stage.latency_ms or {}).get("pytorch"),
                           "seconds": time.perf_counter() - t0, "alpha": alpha, "epochs": distill_epochs,
                           "baseline_accuracy": res.baseline["accuracy"]}
    return {"k": rows, "distilled": distilled, "member_epochs": epochs}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(per_seed: list[dict]) -> dict:
    out = {"k": {}, "distilled": {}}
    for k in KS:
        rows = [s["k"][k] for s in per_seed]
        acc, sd = _mean_std([r["accuracy"] for r in rows])
        vote, vote_sd = _mean_std([r["accuracy_vote"] for r in rows])
        out["k"][str(k)] = {
            "accuracy_mean": acc, "accuracy_std": sd, "vote_mean": vote, "vote_std": vote_sd,
            "param_bytes": rows[0]["param_bytes"], "macs": rows[0]["macs"], "flops": rows[0]["flops"],
            "train_seconds_median": statistics.median(r["train_seconds"] for r in rows),
            "train_flops": rows[0]["train_flops"],
            "latency_loop_ms_median": statistics.median(r["latency_loop_ms"] for r in rows),
            "latency_loop_stable": [r["latency_loop_stable"] for r in rows],
            "latency_vmap_ms_median": (statistics.median(r["latency_vmap_ms"] for r in rows)
                                       if all(r["latency_vmap_ms"] is not None for r in rows) else None),
            "latency_vmap_stable": [r["latency_vmap_stable"] for r in rows]}
    for name in ("student", "control"):
        rows = [s["distilled"][name] for s in per_seed]
        acc, sd = _mean_std([r["accuracy"] for r in rows])
        out["distilled"][name] = {"accuracy_mean": acc, "accuracy_std": sd, "bytes_on_disk": rows[0]["bytes_on_disk"],
                                  "macs": rows[0]["macs"], "epochs": rows[0]["epochs"], "alpha": rows[0]["alpha"],
                                  "latency_ms_median": (statistics.median(r["latency_ms"] for r in rows)
                                                        if all(r["latency_ms"] is not None for r in rows) else None)}
    return out


def main() -> None:
    t_all = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="netdiet-bench-ensemble-") as tmp:
        for (data, model), (epochs, distill_epochs) in EPOCHS.items():
            t0 = time.perf_counter()
            per_seed = [one_seed(data, model, seed, Path(tmp)) for seed in SEEDS]
            summary = summarise(per_seed)
            results.append({"data": data, "model": model, "member_epochs": epochs, "distill_epochs": distill_epochs,
                            "seconds": time.perf_counter() - t0, "summary": summary, "per_seed": per_seed})
            k1, k5, st = summary["k"]["1"], summary["k"]["5"], summary["distilled"]["student"]
            print(f"{data} {model}: K=1 {100 * k1['accuracy_mean']:.2f}%  K=5 {100 * k5['accuracy_mean']:.2f}% "
                  f"({k5['param_bytes'] / k1['param_bytes']:.0f}x bytes)  student {100 * st['accuracy_mean']:.2f}% "
                  f"control {100 * summary['distilled']['control']['accuracy_mean']:.2f}%  "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    doc = {"schema": "netdiet.bench-ensemble/1", "seeds": list(SEEDS), "ks": list(KS),
           "setup": {"epochs": {f"{d}/{m}": {"members": e, "distill": de} for (d, m), (e, de) in EPOCHS.items()},
                     "batch_size": 64, "lr": 0.001, "optimizer": "adam", "val_fraction": 0.1, "mode": "seeds",
                     "latency_batch": 64, "student": "copy of member 1, distilled from K=5 (T=4, alpha=0.9)",
                     "control": "copy of member 1, same stage with alpha=0 (labels only)"},
           "results": results, "seconds": time.perf_counter() - t_all, "environment": environment()}
    atomic_write_json(RESULT, doc)
    print(f"wrote {RESULT} in {doc['seconds']:.0f} s")


if __name__ == "__main__":
    main()
