"""The 7B-parameter transformer preset profiled on the meta device (batch 8, seq 2048): wall time and peak RSS.

    .venv/bin/python benchmarks/profile_7b.py

The profile runs in a fresh subprocess so its peak RSS (resource.getrusage ru_maxrss) is its own, not this
script's. Targets: < 60 s and < 1 GB RSS. The counts are checked against an independent closed form for a
decoder-only transformer (Kaplan et al.'s 2*N*tokens forward MACs-as-FLOPs plus the attention term).
Writes benchmarks/results/profile_7b.json and prints a table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, os, resource, sys, time
    os.environ["NETDIET_PROGRESS"] = "0"
    t0 = time.perf_counter()
    import torch
    torch.set_num_threads(1)
    import netdiet
    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = netdiet.profile("transformer", model_kw={"preset": "7b"}, batch_size=8, optimizer="adam",
                          progress=False)
    t_profile = time.perf_counter() - t1
    doc = res.to_dict()
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"import_s": t_import, "profile_s": t_profile, "total_s": time.perf_counter() - t0,
                      "max_rss_bytes": rss_kib * 1024, "doc": doc}))
""")


def closed_form(layers: int, d: int, seq: int, vocab: int, batch: int) -> dict:
    """Forward MACs of the zoo's TransformerLM (GELU MLP, d_ff = 4d, untied head), by hand.

    per token per layer: qkv 3d^2 + proj d^2 + mlp 8d^2 = 12 d^2 MACs; head d*vocab per token.
    attention: QK^T and AV each seq*seq*d per layer per sequence (full, non-causal count); a causal
    count that skips the masked scores keeps seq*(seq+1)/2 of them (the diagonal included).
    """
    tokens = batch * seq
    linear = tokens * (layers * 12 * d * d + d * vocab)
    attention_full = batch * layers * 2 * seq * seq * d
    attention_causal = batch * layers * 2 * d * seq * (seq + 1) // 2
    return {"linear_macs": linear, "attention_macs_full": attention_full, "attention_macs_causal": attention_causal,
            "macs_full": linear + attention_full, "macs_causal": linear + attention_causal}


def main() -> int:
    out = Path(__file__).parent / "results" / "profile_7b.json"
    env = dict(os.environ, NETDIET_PROGRESS="0")
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return 1
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    doc = child.pop("doc")
    from netdiet.models.zoo import TRANSFORMER_PRESETS
    cfg = TRANSFORMER_PRESETS["7b"]
    hand = closed_form(cfg["layers"], cfg["d_model"], cfg["seq_len"], cfg["vocab"], 8)
    totals, memory = doc["totals"], doc["memory"]
    result = {
        "schema": "netdiet.bench.profile_7b/1",
        "model": doc["model"], "inputs": doc["inputs"], "device": doc["device"],
        "targets": {"seconds": 60, "max_rss_bytes": 10**9},
        **child,
        "within_time": child["profile_s"] < 60, "within_rss": child["max_rss_bytes"] < 10**9,
        "params": totals["params"], "param_bytes": totals["param_bytes"],
        "macs": totals["macs"], "flops": totals["flops"], "train_flops": totals["train_flops"],
        "hand_count": hand,
        "macs_vs_hand_full": totals["macs"] / hand["macs_full"],
        "macs_vs_hand_causal": totals["macs"] / hand["macs_causal"],
        "train_flops_vs_6N_tokens": totals["train_flops"] / (6 * totals["params"] * 8 * cfg["seq_len"]),
        "memory": {k: memory.get(k) for k in ("weights", "gradients", "optimizer_state", "activations", "temporaries",
                                              "peak_estimated", "inference_peak")},
        "uncounted": doc["uncounted"],
        "note": "single run; wall time on a shared 2-core machine is noisy",
    }
    from netdiet.fileio import atomic_write_json
    atomic_write_json(out, result)

    from rich.console import Console
    from rich.table import Table
    from netdiet.units import format_bytes, format_count
    t = Table(title="7B transformer preset on the meta device (batch 8, seq 2048, adam)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("target / check", justify="right")
    t.add_row("profile wall time", f"{child['profile_s']:.1f} s", "< 60 s " + ("ok" if result["within_time"] else "MISSED"))
    t.add_row("peak RSS (subprocess)", format_bytes(child["max_rss_bytes"]), "< 1 GB " + ("ok" if result["within_rss"] else "MISSED"))
    t.add_row("import time", f"{child['import_s']:.1f} s", "")
    t.add_row("params", format_count(totals["params"]), "")
    t.add_row("forward MACs", format_count(totals["macs"]),
              f"hand {format_count(hand['macs_full'])} full / {format_count(hand['macs_causal'])} causal")
    t.add_row("training step FLOPs", format_count(totals["train_flops"]), f"{result['train_flops_vs_6N_tokens']:.3f} x 6*N*tokens")
    t.add_row("training peak (estimated)", format_bytes(memory.get("peak_estimated")), "")
    t.add_row("inference peak (estimated)", format_bytes(memory.get("inference_peak")), "")
    Console().print(t)
    print(f"wrote {out}", file=sys.stderr)
    return 0 if (result["within_time"] and result["within_rss"]) else 1


if __name__ == "__main__":
    sys.exit(main())
