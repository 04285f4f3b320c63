"""Per-rank training memory of a 7B and a 70B Llama shape: netdiet beside the estimators people use instead.

    .venv/bin/python benchmarks/distributed_formulas.py [--deepspeed-python /tmp/ds/bin/python] [--quick]

Both models are transformers' LlamaForCausalLM built from a LlamaConfig on the meta device (Llama-2 7B: h 4096,
i 11008, 32 layers, 32 heads, vocab 32000, seq 2048, 8 GPUs; Llama-2 70B: h 8192, i 28672, 80 layers, 64 heads, 8 KV
heads, vocab 32000, seq 4096, 64 GPUs = 8 nodes x 8, and tensor parallel 8). Micro-batch 1, Adam, bf16 autocast.

* netdiet: the single-device meta simulation (memory.estimate_memory, amp) laid out per rank by
  netdiet.analysis.parallel.per_rank (ZeRO-2, ZeRO-3) and netdiet.analysis.tensor_parallel.split (tp 8).
* DeepSpeed: `estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs`, the functions the
  `..._all_cold` estimators print (offload none: the per-GPU column), run in a separate venv where deepspeed is
  installed (it installs and imports on this CPU machine, torch 2.13 CPU); without one, the same formula as
  DeepSpeed 0.19.8's source (stage_1_and_2.py, stage3.py): ZeRO-2 2P + 18P/N, ZeRO-3 4 x largest layer + 18P/N.
* accelerate: `accelerate estimate-memory`'s "Training using Adam" column, max(estimate_training_usage(...)) of
  accelerate/commands/estimate.py: fp32 weights x 4 (weights, gradients, Adam's two states), bf16 mixed precision
  fp32 size x 2; one device, batch 1, no activations.
* EleutherAI's transformer-math (Anthony et al. 2023, blog.eleuther.ai/transformer-math): mixed-precision Adam
  2 + 2 + 12 bytes per parameter (fp16 weights and gradients, fp32 master copy, momentum and variance), sharded per
  ZeRO stage; activations per layer s b h (34 + 5 a s / h) bytes without recompute, and s b h (10 + 24 / t +
  5 a s / (h t)) with tensor parallel t (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", Eq. 1-2); parameters 12 L h^2 + V h (GPT-style closed form; the exact count is also shown).

The check on the tensor-parallel split (`measured_tp`, skipped with --no-measure): torch's own tensor parallelism
(parallelize_module, loss_parallel) on 2 gloo processes here, for the tiny zoo transformer and a 2-layer Llama with
grouped KV heads, each rank's parameters, saved activations, all-reduce bytes and allocator peak beside the split
and parallel.per_rank's per-rank peak.

Writes benchmarks/results/distributed_formulas.json and prints tables. The formula rows allocate nothing (meta).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from netdiet.analysis.memory import estimate_memory
from netdiet.analysis.parallel import Layout, per_rank
from netdiet.analysis.tensor_parallel import measure_split, split
from netdiet.fileio import atomic_write_json
from netdiet.models.inputs import integer_range
from netdiet.models.registry import create_model
from netdiet.units import format_bytes

SHAPES = {
    "llama-7b": dict(config=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
                     seq=2048, gpus_per_node=8, nodes=1, tp=8),
    "llama-70b": dict(config=dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
                      seq=4096, gpus_per_node=8, nodes=8, tp=8),
}
QUICK = {"llama-tiny": dict(config=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=4, vocab_size=1000),
                            seq=128, gpus_per_node=4, nodes=1, tp=2)}

DEEPSPEED_CHILD = textwrap.dedent("""
    import json, sys
    P, largest, per_node, nodes, fp32_bytes = json.loads(sys.argv[1])
    out = {}
    try:
        import deepspeed
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        out["deepspeed_version"] = deepspeed.__version__
        out["zero2"] = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=per_node, num_nodes=nodes,
                                                             cpu_offload=False)[1]
        out["zero3"] = estimate_zero3_model_states_mem_needs(P, largest, num_gpus_per_node=per_node, num_nodes=nodes,
                                                             cpu_offload=False, cpu_offload_params=False)[1]
    except Exception as exc:
        out["deepspeed_error"] = f"{type(exc).__name__}: {exc}"
    try:
        import accelerate
        from accelerate.commands.estimate import estimate_training_usage
        out["accelerate_version"] = accelerate.__version__
        out["accelerate"] = {dt: max(estimate_training_usage(fp32_bytes, dt).values())
                             for dt in ("float32", "bfloat16")}
    except Exception as exc:
        out["accelerate_error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))
""")


def peer_figures(python: str | None, P: int, largest: int, per_node: int, nodes: int, fp32_bytes: int) -> dict:
    """DeepSpeed's and accelerate's own functions in their venv; their published formulas where that fails."""
    got: dict = {}
    if python:
        proc = subprocess.run([python, "-c", DEEPSPEED_CHILD, json.dumps([P, largest, per_node, nodes, fp32_bytes])],
                              capture_output=True, text=True, timeout=600)
        lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
        got = json.loads(lines[-1]) if lines else {"deepspeed_error": proc.stderr.strip()[-300:]}
    n = per_node * nodes
    if "zero2" not in got:
        got["zero2"], got["deepspeed_method"] = 2 * P + int(18 * P / n), "formula of DeepSpeed 0.19.8's source"
        got["zero3"] = 4 * largest + int(18 * P / n)
    else:
        got["deepspeed_method"] = f"deepspeed {got['deepspeed_version']} estimate_zero2/3_model_states_mem_needs"
    if "accelerate" not in got:
        got["accelerate"] = {"float32": 4 * fp32_bytes, "bfloat16": 2 * fp32_bytes}
        got["accelerate_method"] = "formula of accelerate's estimate_training_usage"
    else:
        got["accelerate_method"] = f"accelerate {got['accelerate_version']} estimate_training_usage"
    return got


def korthikanti(L: int, s: int, b: int, h: int, a: int, t: int = 1) -> int:
    """Activation bytes of L layers without recompute (Korthikanti et al. 2022): s b h (10 + 24/t + 5 a s/(h t))
    per layer; t = 1 gives s b h (34 + 5 a s / h)."""
    return int(L * s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))


def run_shape(name: str, spec: dict, ds_python: str | None) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**spec["config"])
    with torch.device("meta"):
        net = LlamaForCausalLM(cfg)
    s, b = spec["seq"], 1
    h, L, a, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size
    n = spec["gpus_per_node"] * spec["nodes"]
    P = sum(p.numel() for p in net.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules())
    x = (torch.empty((b, s), dtype=torch.long, device="meta"),)
    t0 = time.perf_counter()
    est = estimate_memory(net, x, optimizer="adam", amp=True)
    sim_s = time.perf_counter() - t0
    mem_kw = {"optimizer": "adam", "amp": True}
    tp = spec["tp"]
    layouts = {k: per_rank(Layout(k, n), net, x, mem_kw=mem_kw, estimate=est)["per_rank"] for k in ("zero2", "zero3")}
    layouts["tp"] = per_rank(Layout("tp", tp, tp), net, x, mem_kw=mem_kw, estimate=est)["per_rank"]
    # what autocast saves for backward beside the activations proper: the bf16 copy of every Linear weight
    weight_copies = sum(2 * m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Linear))
    tp_split = split(net, tp, est)
    peers = peer_figures(ds_python, P, largest, spec["gpus_per_node"], spec["nodes"], 4 * P)

    def states(d: dict) -> int:
        return int(d["weights"] + d["gradients"] + d["optimizer_state"])

    eleuther = {"zero2": 2 * P + int(14 * P / n), "zero3": int(16 * P / n), f"tp{tp}": int(16 * P / tp),
                "single_device": 16 * P, "params_closed_form": 12 * L * h * h + V * h,
                "activations": korthikanti(L, s, b, h, a), f"activations_tp{tp}": korthikanti(L, s, b, h, a, tp)}
    return {
        "shape": {**spec["config"], "seq": s, "micro_batch": b, "world_size": n, "tp": tp},
        "params": P, "largest_layer_params": largest, "simulation_s": round(sim_s, 1),
        "autocast_weight_copies": weight_copies,
        "netdiet": {"single_device": {k: int(getattr(est, k)) for k in
                                      ("weights", "gradients", "optimizer_state", "activations", "temporaries",
                                       "peak_estimated")},
                    "zero2": {**layouts["zero2"], "model_states": states(layouts["zero2"])},
                    "zero3": {**layouts["zero3"], "model_states": states(layouts["zero3"])},
                    f"tp{tp}": {**layouts["tp"], "model_states": states(layouts["tp"]),
                                **{k: tp_split[k] for k in ("params_per_rank", "sharded_params", "replicated_params",
                                                            "activations_per_rank", "all_reduce_bytes_per_step")}}},
        "deepspeed": {k: peers.get(k) for k in ("zero2", "zero3", "deepspeed_method", "deepspeed_error")
                      if peers.get(k) is not None},
        "accelerate": {k: peers.get(k) for k in ("accelerate", "accelerate_method", "accelerate_error")
                       if peers.get(k) is not None},
        "eleuther": eleuther,
    }


def measured_tp() -> dict:
    """The split beside torch's own tensor parallelism on 2 gloo processes (real tensors, this CPU)."""
    import tempfile

    from transformers import LlamaConfig

    out = {}
    with tempfile.TemporaryDirectory() as folder:
        LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1000, max_position_embeddings=64,
                    architectures=["LlamaForCausalLM"]).save_pretrained(folder)
        cases = {"zoo transformer tiny, batch 2 x 64": ("transformer", {"preset": "tiny"}, 2, 64),
                 "Llama 2 layers, 4 heads / 2 KV, batch 2 x 32": (f"hf:{folder}", {}, 2, 32)}
        for name, (spec, kw, b, seq) in cases.items():
            torch.manual_seed(0)
            net = create_model(spec, **kw)
            x = (torch.randint(0, integer_range(net), (b, seq)),)
            est = estimate_memory(net, x, optimizer="adam")
            s = split(net, 2, est)
            composed = per_rank(Layout("tp", 2, 2), net, x, mem_kw={"optimizer": "adam"}, estimate=est)["per_rank"]
            ranks = measure_split(spec, kw, batch=b, tp=2, seq=seq)["ranks"]
            out[name] = {
                "estimated": {"params": s["params_per_rank"], "activations": s["activations_per_rank"],
                              "all_reduce": s["all_reduce_bytes_per_step"], "peak": composed["peak_estimated"],
                              "single_device_peak": est.peak_estimated},
                "measured": [{"params": r["param_bytes"], "activations": r["activations"],
                              "all_reduce": sum(c["bytes"] for c in r["collectives"] if c["kind"] == "all_reduce"),
                              "peak": r["peak_measured"], "max_abs_diff": r["max_abs_diff_vs_unsharded"]}
                             for r in ranks]}
    return out


def measured_table(measured: dict) -> str:
    rows = ["| model (tp 2) | params / rank | activations / rank | all-reduce / step | peak / rank |",
            "|---|---|---|---|---|"]
    for name, r in measured.items():
        e, ms = r["estimated"], r["measured"]

        def cell(key: str) -> str:
            got = sorted({m[key] for m in ms})
            spread = " / ".join(str(g) for g in got)
            return f"{e[key]} est · {spread} measured ({(max(got) / e[key] - 1) * 100:+.1f} %)"
        rows.append(f"| {name} | {cell('params')} | {cell('activations')} | {cell('all_reduce')} | {cell('peak')} |")
    return "\n".join(rows)


def table(results: dict) -> str:
    rows = ["| model · layout | netdiet model states | DeepSpeed | transformer-math | netdiet activations (of which "
            "bf16 weight copies) | Korthikanti activations | netdiet peak |", "|---|---|---|---|---|---|---|"]
    fb = format_bytes
    for name, r in results.items():
        nd, ds, el = r["netdiet"], r["deepspeed"], r["eleuther"]
        one, acc, copies = nd["single_device"], r["accelerate"]["accelerate"], r["autocast_weight_copies"]
        n, tp = r["shape"]["world_size"], r["shape"]["tp"]
        rows.append(f"| {name} · 1 device | {fb(one['weights'] + one['gradients'] + one['optimizer_state'])} | "
                    f"accelerate: {fb(acc['float32'])} (fp32), {fb(acc['bfloat16'])} (bf16) | "
                    f"{fb(el['single_device'])} | {fb(one['activations'])} ({fb(copies)}) | "
                    f"{fb(el['activations'])} | {fb(one['peak_estimated'])} |")
        for k, label, div in (("zero2", f"ZeRO-2 × {n}", 1), ("zero3", f"ZeRO-3 × {n}", 1), (f"tp{tp}", f"TP {tp}", tp)):
            peer = fb(ds[k]) if k in ds else "—"
            kk = f"activations_tp{tp}" if div > 1 else "activations"
            rows.append(f"| {name} · {label} | {fb(nd[k]['model_states'])} | {peer} | {fb(el[k])} | "
                        f"{fb(nd[k]['activations'])} ({fb(copies // div)}) | {fb(el[kk])} | "
                        f"{fb(nd[k]['peak_estimated'])} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deepspeed-python", default="/tmp/ds/bin/python",
                    help="a python with deepspeed and accelerate installed ('' to use their published formulas)")
    ap.add_argument("--quick", action="store_true", help="a tiny Llama shape only (seconds; not written)")
    ap.add_argument("--no-measure", action="store_true", help="skip the measured tensor-parallel check")
    args = ap.parse_args()
    ds_python = args.deepspeed_python if args.deepspeed_python and Path(args.deepspeed_python).exists() else None
    shapes = QUICK if args.quick else SHAPES
    results = {name: run_shape(name, spec, ds_python) for name, spec in shapes.items()}
    print(table(results))
    measured = {} if args.no_measure else measured_tp()
    if measured:
        print(measured_table(measured))
    if not args.quick:
        out = Path(__file__).parent / "results" / "distributed_formulas.json"
        atomic_write_json(out, {"benchmark": "distributed_formulas", "results": results, "measured_tp": measured,
                                "torch": torch.__version__, "python": sys.version.split()[0]})
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
