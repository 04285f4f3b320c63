"""The per-rank estimate beside the real thing: DDP and FSDP2 on 2 and 4 gloo processes of this machine.

    .venv/bin/python benchmarks/parallel_measured.py [--quick]

For each model (zoo mlp, cnn, transformer preset tiny; GPT-2 and Llama built locally from tiny transformers
configs, as tests/test_hf.py builds them), each strategy and world size: the single-device meta simulation at the
per-rank micro-batch (global batch 32, or 8 for the HF models at 32 tokens), laid out by parallel.per_rank, and
parallel_measure.measure_layout's per-rank peaks (profiler allocator events; the largest rank is the measured
figure). The collectives each rank issued are compared with the estimated messages. Writes
benchmarks/results/parallel_measured.json and prints the table.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import netdiet  # noqa: E402
from netdiet.analysis.memory import estimate_memory  # noqa: E402
from netdiet.analysis.parallel import parse_layout, per_rank  # noqa: E402
from netdiet.analysis.parallel_measure import measure_layout  # noqa: E402
from netdiet.analysis.profile import prepare_call  # noqa: E402
from netdiet.fileio import atomic_write_json  # noqa: E402
from netdiet.models.inputs import structured_forward  # noqa: E402

ADAM = {"optimizer": "adam"}


def _hf_configs():
    import transformers

    return {
        "hf-gpt2": transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128,
                                           bos_token_id=0, eos_token_id=0, architectures=["GPT2LMHeadModel"]),
        "hf-llama": transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                             max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
                                             architectures=["LlamaForCausalLM"]),
    }


def _row(name: str, net, x, strategy: str, n: int) -> dict:
    layout = parse_layout(strategy, n, None, None)
    est = estimate_memory(net, x, **ADAM, real_step_bytes=1 << 30)
    sec = per_rank(layout, net, x, mem_kw=ADAM, estimate=est)
    t0 = time.perf_counter()
    measured = measure_layout(layout, net, x, mem_kw=ADAM)
    peak = max(measured["peaks"])
    e = sec["per_rank"]["peak_estimated"]
    return {"model": name, "strategy": strategy, "world_size": n, "micro_batch": int(x[0].shape[0]),
            "estimated": e, "measured": peak, "measured_per_rank": measured["peaks"],
            "error_pct": round(100.0 * (e - peak) / peak, 3), "single_device_peak": int(est.peak_estimated),
            "collectives_equal": all(c == sec["collectives"]["messages"] for c in measured["collectives"]),
            "collectives": sec["collectives"]["messages"], "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="world size 2 only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [2] if args.quick else [2, 4]
    rows = []
    for name in ("mlp", "cnn", "transformer"):
        net = netdiet.create_model(name)
        torch.manual_seed(0)
        x_all = {"mlp": (torch.randn(32, 784),), "cnn": (torch.randn(32, 1, 28, 28),),
                 "transformer": (torch.randint(0, 1000, (32, 64)),)}[name]
        for strategy in ("ddp", "fsdp"):
            for n in sizes:
                rows.append(_row(name, net, tuple(t[: 32 // n] for t in x_all), strategy, n))
                print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in _hf_configs().items():
            config.save_pretrained(Path(tmp) / name)
            spec = f"hf:{Path(tmp) / name}"
            net = netdiet.create_model(spec)
            for strategy in ("ddp", "fsdp"):
                for n in sizes:
                    call = prepare_call(None, spec, {}, 8 // n, torch.device("cpu"), 0, model=net, seq_len=32)
                    with structured_forward(net, call.args, call.kwargs) as x:
                        rows.append(_row(name, net, x, strategy, n))
                    print(rows[-1], flush=True)
    out = ROOT / "benchmarks" / "results" / "parallel_measured.json"
    atomic_write_json(str(out), {"schema": "netdiet.bench.parallel_measured/1", "torch": torch.__version__,
                                 "optimizer": "adam", "rows": rows,
                                 "max_abs_error_pct": max(abs(r["error_pct"]) for r in rows)})
    print(f"{'model':<12} {'strategy':<6} {'N':>2} {'estimated':>11} {'measured':>11} {'error':>8}")
    for r in rows:
        print(f"{r['model']:<12} {r['strategy']:<6} {r['world_size']:>2} {r['estimated']:>11,} {r['measured']:>11,} "
              f"{r['error_pct']:>+7.2f}%{'' if r['collectives_equal'] else '  collectives differ'}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
