"""Devices as data (named figures with sources, the measured CPU, lookup) and the roofline step projection,
checked against step times worked out by hand on a tiny hand-made OpCounts."""
from __future__ import annotations

import pytest

from netdiet.analysis.counter import ModuleCost, OpCounts
from netdiet.analysis.devices import DEVICES, Device, get_device, measure_cpu, parse_devices
from netdiet.analysis.roofline import project_step, ring_seconds
from netdiet.errors import NetdietError

FIGURES = ("peak_flops", "memory_bytes", "memory_bandwidth", "interconnect.intra_node", "interconnect.inter_node",
           "devices_per_node")


def test_every_device_has_its_figures_and_a_source_for_each():
    assert set(DEVICES) == {"h100-sxm", "h100-pcie", "h200", "a100-40gb", "a100-80gb", "l4", "mi300x", "tpu-v5e"}
    for d in [*DEVICES.values(), measure_cpu()]:
        assert d.memory_bytes > 0 and d.memory_bandwidth > 0 and d.devices_per_node >= 1
        assert d.peak_flops and all(v > 0 for v in d.peak_flops.values())
        assert set(d.interconnect) == {"intra_node", "inter_node"}
        for key in FIGURES:
            assert d.source[key].strip(), (d.name, key)
    # vendor figures, dense (the datasheets' sparsity figures halved): H100 SXM bf16 1,979 TF* -> 989.4 TF
    h100 = get_device("h100")
    assert h100.name == "h100-sxm" and h100.peak("bf16") == 989.4e12 and h100.memory_bytes == 80e9
    assert h100.memory_bandwidth == 3.35e12 and h100.interconnect["intra_node"][1] == 450e9  # 900 GB/s both ways
    assert get_device("h200").memory_bytes == 141e9 and get_device("h200").peak("bf16") == h100.peak("bf16")
    assert get_device("tpu-v5e").peak("bf16") == 197e12 and "fp32" not in get_device("tpu-v5e").peak_flops


def test_lookup_aliases_specs_and_one_line_errors():
    assert get_device("H100-SXM") is DEVICES["h100-sxm"] and get_device("a100").name == "a100-80gb"
    assert parse_devices("64xh100") == (64, DEVICES["h100-sxm"])
    assert parse_devices("8xh200")[0] == 8 and parse_devices("l4") == (1, DEVICES["l4"])
    with pytest.raises(NetdietError, match=r"unknown device 'h10'; did you mean h100-sxm\?"):
        get_device("h10")
    for bad in ("0xh100", "64x", "x h100 y"):
        with pytest.raises(NetdietError):
            parse_devices(bad)
    with pytest.raises(NetdietError, match="no peak FLOP/s figure for fp32"):
        get_device("tpu-v5e").peak("fp32")


def test_cpu_is_measured_here():
    cpu = measure_cpu()
    assert cpu.measured and cpu.name == "cpu" and set(cpu.peak_flops) == {"fp32", "bf16"}
    # a 2-core CPU does between 100 MFLOP/s and 10 TFLOP/s and copies at 100 MB/s .. 1 TB/s
    assert 1e8 < cpu.peak("fp32") < 1e13 and 1e8 < cpu.memory_bandwidth < 1e12
    assert get_device("cpu") is cpu


# ------------------------------------------------------------------ the roofline, by hand
TEST_DEVICE = Device("test", "hand-made", 100 * 10**9, {"bf16": 1e12}, 1e11,
                     {"intra_node": ("fast", 1e10), "inter_node": ("slow", 1e9)}, 4,
                     {k: "test" for k in FIGURES})


def _counts() -> OpCounts:
    ops = {  # mm: 9e12 FLOPs (1/3 forward), 1e11 bytes; relu: 2e9 FLOPs, 2e11 bytes
        "aten.mm": {"count": 1, "macs": 0, "flops": 3e12, "backward_count": 2, "backward_macs": 0,
                    "backward_flops": 6e12, "bytes_read": 6e10, "bytes_written": 4e10},
        "aten.relu": {"count": 1, "macs": 0, "flops": 1e9, "backward_count": 1, "backward_macs": 0,
                      "backward_flops": 1e9, "bytes_read": 1e11, "bytes_written": 1e11},
    }
    root = ModuleCost("", "Net", 0, 10**9, 2 * 10**9, 0, 0, 0, 0, None)
    return OpCounts([root], ops, {}, 0, 0, 0, 0, "adam", 10**9, 9.003e12, train=True)


def test_ring_collectives():
    # all-reduce of 8 GB over 4 ranks at 1 GB/s: 2 * 3/4 * 8 = 12 s; all-gather of the same: 6 s
    assert ring_seconds("all_reduce", 8e9, 4, 1e9) == pytest.approx(12.0)
    assert ring_seconds("all_gather", 8e9, 4, 1e9) == pytest.approx(6.0)
    assert ring_seconds("all_reduce", 8e9, 1, 1e9) == 0.0


def test_ddp_step_by_hand():
    section = {"strategy": "ddp", "world_size": 8, "tp": 1, "dp": 8,
               "per_rank": {"optimizer_state": 8 * 10**9},
               "collectives": {"messages": {"all_reduce": 5e9}}}
    r = project_step(_counts(), section, TEST_DEVICE, dtype="bf16", micro_batch=4, accumulation=2,
                     samples_unit="tokens", tokens_per_sample=128)
    # mm: max(9e12/1e12 = 9 s, 1e11/1e11 = 1 s) = 9 s compute (3 s fwd, 6 s bwd);
    # relu: max(2e9/1e12, 2e11/1e11 = 2 s) = 2 s memory (1 s fwd, 1 s bwd)  -> fwd 4 s, bwd 7 s per micro-batch
    # optimizer (not sharded): max(1e9/1e12, (2 * 8e9 + 3 * 2 B * 1e9) / 1e11 = 0.22 s) = 0.22 s
    # all-reduce: dp 8 > 4 per node -> network: 2 * 7/8 * 5e9 / 1e9 = 8.75 s; exposed 8.75 - 7 = 1.75 s
    # step = 2 * (4 + 7) + 0.22 + 1.75 = 23.97 s
    assert r["forward_s"] == pytest.approx(8.0) and r["backward_s"] == pytest.approx(14.0)
    assert r["compute_s"] == pytest.approx(18.0) and r["memory_s"] == pytest.approx(4.22)
    assert r["optimizer_s"] == pytest.approx(0.22) and r["comm_s"] == pytest.approx(8.75)
    assert r["comm_exposed_s"] == pytest.approx(1.75) and r["step_time_s"] == pytest.approx(23.97)
    assert r["links"]["data_parallel"] == "slow"
    # 4 x 2 x 8 = 64 samples x 128 tokens / 23.97 s; MFU = 6 x 1e9 x 8192 / (23.97 s x 8 x 1e12)
    assert r["samples_per_step"] == 64
    assert r["tokens_or_samples_per_s"] == pytest.approx(8192 / 23.97)
    assert r["mfu"] == pytest.approx(6e9 * 8192 / (23.97 * 8e12))
    assert r["mfu_counted"] == pytest.approx(9.003e12 * 2 * 8 / (23.97 * 8e12))
    assert "PaLM" in r["mfu_definition"] and "backward" in r["overlap"]


def test_fsdp_with_tensor_parallel_by_hand():
    section = {"strategy": "fsdp", "world_size": 8, "tp": 2, "dp": 4,
               "per_rank": {"optimizer_state": 10**9},
               "collectives": {"messages": {"all_reduce": 1e9, "all_gather": 8e9, "reduce_scatter": 2e9},
                               "per_module": {"(tensor parallel)": {"all_reduce": 1e9}}}}
    # counts made at batch 8, projected at micro-batch 8 with tp 2: every operator's work halves
    r = project_step(_counts(), section, TEST_DEVICE, dtype="bf16", micro_batch=8, counts_batch=8)
    # fwd 2 s, bwd 3.5 s; dp 4 > 4/2 per node -> network. all-gather 3/4 * 8e9/1e9 = 6 s (3 s fwd, 3 s bwd),
    # reduce-scatter 3/4 * 2e9/1e9 = 1.5 s: exposed max(0, 3 - 2) + max(0, 3 + 1.5 - 3.5) = 2 s
    # tp all-reduce inside a node: 2 * 1/2 * 1e9 / 1e10 = 0.1 s, not overlapped
    # optimizer shard of 1/8: max(1e9/8/1e12, (2 * 1e9 + 3 * 2 B * 1e9/8) / 1e11 = 0.0275 s)
    assert r["forward_s"] == pytest.approx(2.0) and r["backward_s"] == pytest.approx(3.5)
    assert r["tp_comm_s"] == pytest.approx(0.1) and r["optimizer_s"] == pytest.approx(0.0275)
    assert r["comm_exposed_s"] == pytest.approx(2.1)
    assert r["step_time_s"] == pytest.approx(5.5 + 0.0275 + 2.0 + 0.1)
    assert r["links"] == {"data_parallel": "slow", "tensor_parallel": "fast"}
    assert r["mfu"] == r["mfu_counted"]          # samples, not tokens: the counted FLOPs stand in
    assert "6 N per token applies to token models only" in r["mfu_definition"]


def test_recompute_adds_forward_time_per_flop():
    section = {"strategy": "ddp", "world_size": 1, "tp": 1, "dp": 1, "per_rank": {"optimizer_state": 0},
               "collectives": {"messages": {}}}
    plain = project_step(_counts(), section, TEST_DEVICE, dtype="bf16", micro_batch=1)
    ckpt = project_step(_counts(), section, TEST_DEVICE, dtype="bf16", micro_batch=1, recompute_flops=3.001e12 / 2)
    # forward: 4 s for 3.001e12 FLOPs; recomputing half of them costs 2 s more backward
    assert ckpt["step_time_s"] - plain["step_time_s"] == pytest.approx(2.0)
    assert ckpt["recompute_s"] == pytest.approx(2.0)
    # tokens without a sequence length: samples/s and the counted MFU; counts at the section's global batch
    r = project_step(_counts(), {**section, "global_batch": 2}, TEST_DEVICE, dtype="bf16", micro_batch=1,
                     samples_unit="tokens")
    assert r["throughput_unit"] == "samples/s" and r["mfu"] == r["mfu_counted"]
    assert r["forward_s"] == pytest.approx(2.0)          # counts at batch 2 projected to micro-batch 1
    with pytest.raises(NetdietError, match="must be >= 1"):
        project_step(_counts(), section, TEST_DEVICE, dtype="bf16", micro_batch=0)
