"""The per-rank estimate checked against the real thing: world_size gloo processes each train the model under
DistributedDataParallel or FSDP2 (fully_shard per block + root) at the per-rank micro-batch and read their own
tensor peak from the profiler's allocator events (analysis/parallel_measure.py). The estimate is rank 0's; the
measured figure is the largest rank's. The collectives each rank issued are counted on the way out (a DDP comm
hook, wrappers of torch.distributed's all_gather_single / reduce_scatter_single): an independent check of the
estimated message bytes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import netdiet
from netdiet.analysis.memory import estimate_memory
from netdiet.analysis.parallel import parse_layout, per_rank
from netdiet.analysis.parallel_measure import measure_layout
from netdiet.cli import main

ADAM = dict(optimizer="adam")
TOLERANCE = 0.05


def _inputs(name: str, batch: int) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    if name == "transformer":
        return (torch.randint(0, 1000, (batch, 64)),)
    if name == "cnn":
        return (torch.randn(batch, 1, 28, 28),)
    return (torch.randn(batch, 784),)


def _check(net, x_global, strategy: str, n: int) -> dict:
    layout = parse_layout(strategy, n, None, None)
    x = tuple(t[: t.shape[0] // n] for t in x_global)
    sec = per_rank(layout, net, x, mem_kw=ADAM, estimate=estimate_memory(net, x, **ADAM))
    measured = measure_layout(layout, net, x, mem_kw=ADAM)
    est, peak = sec["per_rank"]["peak_estimated"], max(measured["peaks"])
    assert abs(est - peak) <= TOLERANCE * peak, (strategy, n, est, measured["peaks"])
    # every rank issued exactly the estimated collective messages in a steady-state step
    expect = sec["collectives"]["messages"]
    for rank_coll in measured["collectives"]:
        assert rank_coll == expect, (rank_coll, expect)
    return {"estimated": est, "measured": peak, "error": (est - peak) / peak}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_mlp_world_size_2_estimate_within_5_percent_of_the_measured_rank_peak(strategy):
    _check(netdiet.create_model("mlp"), _inputs("mlp", 32), strategy, 2)


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_zoo_estimate_within_5_percent_of_the_measured_rank_peak(name, strategy, n):
    _check(netdiet.create_model(name), _inputs(name, 32), strategy, n)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict[str, Path]:
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf-parallel")
    configs = {
        "gpt2": transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128,
                                        bos_token_id=0, eos_token_id=0, architectures=["GPT2LMHeadModel"]),
        "llama": transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                          max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
                                          architectures=["LlamaForCausalLM"]),
    }
    out = {}
    for name, config in configs.items():
        config.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_estimate_within_5_percent_through_profile_measure(hf_folders, name, strategy, n):
    # the whole path: profile(..., parallel=, world_size=, measure=True) -> analyse -> the gloo ranks
    doc = netdiet.profile(f"hf:{hf_folders[name]}", seq_len=32, batch_size=8, parallel=strategy, world_size=n,
                          measure=True, repeats=1, warmup=0, progress=False).to_dict()
    pr = doc["distributed"]["per_rank"]
    assert len(pr["peak_measured_per_rank"]) == n
    assert abs(pr["peak_estimated"] - pr["peak_measured"]) <= TOLERANCE * pr["peak_measured"], pr
    for rank_coll in doc["distributed"]["measured"]["collectives"]:
        assert rank_coll == doc["distributed"]["collectives"]["messages"]


def test_cli_measure_puts_each_rank_peak_beside_the_estimate(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["profile", "mlp", "--batch-size", "16", "--parallel", "fsdp", "--world-size", "2", "--measure",
                 "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    assert "peak (measured)" in capsys.readouterr().out
    sec = json.loads(out.read_text())["distributed"]
    pr = sec["per_rank"]
    assert len(pr["peak_measured_per_rank"]) == 2 and pr["peak_measured"] == max(pr["peak_measured_per_rank"])
    assert abs(pr["peak_estimated"] - pr["peak_measured"]) <= TOLERANCE * pr["peak_measured"]
    assert all(c == sec["collectives"]["messages"] for c in sec["measured"]["collectives"])
