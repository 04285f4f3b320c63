"""netdiet plan: the layer-scaled simulation equals the full one byte for byte, the sweep ranks feasible layouts by
projected throughput and says why the others fail, and bad input is one line (exit 2)."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from netdiet.analysis import plan as plan_mod
from netdiet.analysis.counter import count_ops
from netdiet.analysis.devices import get_device
from netdiet.analysis.memory import estimate_memory
from netdiet.cli import demo_steps, main
from netdiet.documents import field_problems, read_result
from netdiet.errors import NetdietError
from netdiet.models import create_model

SMALL = dict(d_model=64, heads=4, seq_len=32, vocab=100)


def _meta(layers: int):
    with torch.device("meta"):
        return create_model("transformer", layers=layers, **SMALL)


def _x(mb: int = 2):
    return (torch.empty((mb, 32), dtype=torch.int64, device="meta"),)


@pytest.mark.parametrize("ckpt", [False, True])
def test_layer_scaled_estimate_equals_the_full_simulation(ckpt):
    net = _meta(6)
    stack = plan_mod.find_stack(net)
    assert stack == plan_mod.Stack("blocks", 6)
    kw = dict(optimizer="adam", dtype="bf16", checkpointing=ckpt)
    with plan_mod.truncated(net, stack, 2):
        e2 = estimate_memory(net, _x(), **kw)
    with plan_mod.truncated(net, stack, 3):
        e3 = estimate_memory(net, _x(), **kw)
    assert len(net.blocks) == 6                           # the container is put back
    full = estimate_memory(net, _x(), **kw)
    scaled = plan_mod.scale_estimate(e2, e3, stack)
    for f in plan_mod._INT_FIELDS + ("phase_peaks", "peak_breakdown", "peak_phase", "module_activations",
                                     "checkpointed_blocks"):
        assert getattr(scaled, f) == getattr(full, f), f
    if ckpt:
        assert full.recompute_flops > 0 and full.checkpointed_blocks == [f"blocks.{i}" for i in range(6)]


def test_every_micro_batch_is_checked_and_a_stack_not_affine_from_two_blocks_is_scaled_from_three():
    # d_model 128, vocab 4000, checkpointing, bf16: at micro-batch 1 the backward peak grows by the same bytes per
    # block from 2 blocks on; at micro-batch 4 it grows 1,264,432 B from 2 to 3 blocks but 1,586,224 B from 3 to 4
    # and from 4 to 5 (the peak moves to another place once a third block exists). A check made once at
    # micro-batch 1 would have extrapolated micro-batch 4 from 2 and 3 blocks: 1.3 MB low at 6 blocks.
    with torch.device("meta"):
        net = create_model("transformer", layers=6, d_model=128, heads=4, seq_len=32, vocab=4000)
    x_at = lambda mb: (torch.empty((mb, 32), dtype=torch.int64, device="meta"),)  # noqa: E731
    kw = dict(optimizer="adam", dtype="bf16")
    sim = plan_mod.Simulator(net, x_at, kw, "adam")
    for mb, base in ((1, 2), (4, 3)):
        scaled = sim.estimate(mb, True)
        assert sim.bases[(mb, True)] == base
        full = estimate_memory(net, x_at(mb), **kw, checkpointing=True)
        for f in plan_mod._INT_FIELDS + ("phase_peaks", "peak_breakdown", "peak_phase", "module_activations",
                                         "checkpointed_blocks"):
            assert getattr(scaled, f) == getattr(full, f), (mb, f)
    stack = plan_mod.find_stack(net)
    runs = {k: sim._estimate_with(k, 4, True).phase_peaks["backward"] for k in (2, 3, 4, 5)}
    assert [runs[3] - runs[2], runs[4] - runs[3], runs[5] - runs[4]] == [1_264_432, 1_586_224, 1_586_224]
    assert stack.length == 6 and sim.checked == {True: True}


def test_layer_scaled_counts_equal_the_full_count():
    net = _meta(6)
    stack = plan_mod.find_stack(net)
    parts = []
    for k in (2, 3):
        with plan_mod.truncated(net, stack, k):
            parts.append(count_ops(net, _x(), train=True, optimizer="adam"))
    full = count_ops(net, _x(), train=True, optimizer="adam")
    scaled = plan_mod.scale_counts(*parts, stack)
    assert scaled.operators == full.operators
    for f in plan_mod._COUNT_FIELDS:
        assert getattr(scaled, f) == getattr(full, f), f
    assert scaled.modules[0].params == full.modules[0].params == sum(p.numel() for p in net.parameters())


def test_small_helpers():
    assert plan_mod.micro_batches(12, None) == [1, 2, 4, 12]
    assert plan_mod.micro_batches(8, [3, 4]) == [4]
    dev = get_device("h100")
    assert plan_mod.tp_degrees(_meta(2), 8, dev) == [1, 2, 4]       # 4 heads: 8 does not divide them
    lays = plan_mod.layouts(8, [1, 8])
    assert [(lay.strategy, lay.tp) for lay in lays] == [("ddp", 1), ("zero1", 1), ("zero2", 1), ("zero3", 1),
                                                          ("fsdp", 1), ("tp", 8)]


def test_plan_ranks_by_throughput_and_explains_misfits(monkeypatch):
    # 10 identical blocks of width 64 on 4 L4s, simulated layer-scaled and checked against 4 blocks
    kw = dict(layers=10, **SMALL)
    doc = plan_mod.plan("transformer", "4xl4", model_kw=kw, global_batch=8, micro_batch=[1, 2]).to_dict()
    assert doc["simulation"]["method"].startswith("layer-scaled: 10 identical blocks")
    assert doc["simulation"]["checked"] == {"off": True, "on": True}
    ranked = doc["ranked"]
    assert ranked and [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
    rates = [r["throughput"] for r in ranked]
    assert rates == sorted(rates, reverse=True)
    for r in ranked:
        assert r["fits"] and r["peak"] <= 24e9 and r["micro_batch"] * r["accumulation"] * r["dp"] == 8
        assert r["throughput"] == pytest.approx(8 * 32 / r["step_time_s"])        # tokens per step / step time
    assert {r["tp"] for r in ranked} == {1, 2, 4}
    assert not field_problems(doc, "plan")
    # the same model on devices of 100 kB: every layout fails, and the message says by how much
    small = dataclasses.replace(get_device("l4"), name="tiny", memory_bytes=10**5)
    monkeypatch.setattr(plan_mod, "parse_devices", lambda _spec: (4, small))
    with pytest.raises(NetdietError, match=r"no layout of transformer fits 4x tiny \(97.66 KiB each\): the smallest "
                                           r"per-rank peak is .* over; use more devices"):
        plan_mod.plan("transformer", "4xl4", model_kw=kw, global_batch=8, micro_batch=[1])


def test_bad_input_is_one_line(capsys):
    assert main(["plan", "transformer", "--devices", "8xh10"]) == 2
    assert "unknown device 'h10'; did you mean h100-sxm?" in capsys.readouterr().err
    assert main(["plan", "transformer", "--devices", "8xh100", "--global-batch", "3", "--micro-batch", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "global batch 3 is not divisible by any data-parallel degree" in err and len(err.splitlines()) == 1
    assert main(["plan", "transformer", "--devices", "4xh100", "--strategies", "ddp,foo"]) == 2
    assert "unknown strategy 'foo'" in capsys.readouterr().err
    assert main(["plan", "transformer", "--devices", "8xh100", "--micro-batch", "3", "--no-checkpointing"]) == 2
    assert "no --micro-batch 3 divides a per-rank batch of global batch 8" in capsys.readouterr().err
    with pytest.raises(NetdietError, match="micro-batches must be positive integers"):
        plan_mod.plan("transformer", "2xh100", micro_batch=[0])
    assert main(["plan", "resnet", "--devices", "2xh100", "--seq-len", "100"]) == 2
    assert "resnet does not take token ids: drop --seq-len" in capsys.readouterr().err


def test_cli_plan_writes_a_validated_document(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "transformer", "--devices", "2xh100", "--no-checkpointing", "--micro-batch", "1",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "netdiet plan: transformer on 2x h100-sxm" in text
    doc = read_result(out)
    assert doc["schema"] == "netdiet.plan/1" and not field_problems(doc)
    assert doc["checkpointing"] == [False] and doc["global_batch"] == 2
    assert json.loads(out.read_text())["ranked"][0]["layout"] in text


def test_alive_at_peak_sums_to_the_peak():
    parts = dict(weights=10, gradients=10, optimizer_state=20, activations=30, communication_buffers=5, temporaries=3)
    # backward peak 70: the gradients alive then are 70 - 10 - 20 - 5 - 30 - 3 = 2 (not all 10)
    at = plan_mod.alive_at_peak({"per_rank": {**parts, "peak_estimated": 70}, "peak_phase": "backward"})
    assert at == {**parts, "gradients": 2} and sum(at.values()) == 70
    # optimizer peak 50: activations are freed; what is beyond the states and buffers (5) is the rest
    at = plan_mod.alive_at_peak({"per_rank": {**parts, "peak_estimated": 50}, "peak_phase": "optimizer"})
    assert at == {"weights": 10, "optimizer_state": 20, "gradients": 10, "communication_buffers": 5, "temporaries": 5}
    # parts that cannot make the peak this way are shown as the section has them
    at = plan_mod.alive_at_peak({"per_rank": {**parts, "peak_estimated": 40}, "peak_phase": "backward"})
    assert at == parts


def test_layer_scaled_simulation_of_a_transformers_llama_equals_the_full_one(tmp_path):
    # transformers' decoder layers differ only in the layer_idx they keep for the KV cache
    transformers = pytest.importorskip("transformers")
    transformers.LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=6, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=100, max_position_embeddings=64).save_pretrained(tmp_path)
    net, _ = plan_mod.resolve_model(f"hf:{tmp_path}", None, seed=0, before_real=lambda _m: False)
    stack = plan_mod.find_stack(net)
    assert stack == plan_mod.Stack("layers", 6)
    x = (torch.empty((2, 16), dtype=torch.int64, device="meta"),)
    kw = dict(optimizer="adam", dtype="bf16")
    parts = []
    for k in (2, 3):
        with plan_mod.truncated(net, stack, k):
            parts.append((estimate_memory(net, x, **kw), count_ops(net, x, train=True)))
    full, counted = estimate_memory(net, x, **kw), count_ops(net, x, train=True)
    scaled = plan_mod.scale_estimate(parts[0][0], parts[1][0], stack)
    for f in plan_mod._INT_FIELDS + ("phase_peaks", "peak_breakdown", "module_activations"):
        assert getattr(scaled, f) == getattr(full, f), f
    assert plan_mod.scale_counts(parts[0][1], parts[1][1], stack).operators == counted.operators


def test_a_model_that_fits_nowhere_is_one_line_with_by_how_much(capsys):
    # the 7B preset (6.7e9 parameters: 13.4 GB of bf16 weights alone) on one 16 GB TPU v5e chip
    assert main(["plan", "transformer", "--model-kw", "preset=7b", "--devices", "tpu-v5e", "--no-checkpointing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()       # the progress lines, then the one error line
    assert [line for line in err if "error" in line] == err[-1:]
    err = err[-1]
    assert re.search(r"no layout of transformer fits 1x tpu-v5e \(14.90 GiB each\): the smallest per-rank peak is "
                     r"[\d.]+ GiB \(ddp x1, micro-batch 1\), [\d.]+ GiB over", err), err


def test_the_demo_plans_the_7b_preset_on_8_h100s(tmp_path):
    title, argv, files = next(s for s in demo_steps(str(tmp_path)) if s[1][0] == "plan")
    assert argv[:5] == ["plan", "transformer", "--model-kw", "preset=7b", "--devices"] and argv[5] == "8xh100"
    assert files == [str(tmp_path / "plan.json")]
