"""Per-rank figures of DDP / FSDP2 / ZeRO layouts (analysis/parallel.py): sharded bytes and collective bytes equal
to hand counts, the section's shape, and bad layouts refused in one line (exit 2)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import netdiet
import netdiet.analysis.tensor_parallel
from netdiet.analysis.memory import estimate_memory
from netdiet.analysis.parallel import Layout, analyse, fsdp_units, micro_batch, parse_layout, per_rank, shard_numel
from netdiet.cli import main
from netdiet.errors import NetdietError

ADAM = dict(optimizer="adam")


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 3))


def _section(strategy: str, n: int, net: nn.Module | None = None, batch: int = 8) -> dict:
    net = net or _tiny()
    x = (torch.randn(batch // n, 10),)
    est = estimate_memory(net, x, **ADAM)
    return per_rank(parse_layout(strategy, n, None, None), net, x, mem_kw=ADAM, estimate=est)


def test_shard_sizes_are_torch_chunks_padded_to_rank_0():
    # FSDP2 chunks dim 0 into ceil(d0 / N) rows (torch.chunk) and pads every shard to chunk 0's size
    assert shard_numel((10, 3), 4) == 3 * 3      # ceil(10/4) = 3 rows of 3
    assert shard_numel((7,), 2) == 4             # ceil(7/2)
    assert shard_numel((3, 6), 4) == 1 * 6       # fewer rows than ranks: 1 row each, ranks 3.. get padding only
    assert shard_numel((), 4) == 1               # a scalar is not split
    assert [c.shape[0] for c in torch.chunk(torch.empty(10, 3), 4)] == [3, 3, 3, 1]   # what torch does


def test_fsdp_units_are_the_repeated_blocks_then_the_root():
    assert [n for n, _ in fsdp_units(_tiny())] == ["0", "2", ""]
    tf = netdiet.create_model("transformer")
    assert [n for n, _ in fsdp_units(tf)] == ["blocks.0", "blocks.1", ""]


def test_sharded_bytes_equal_the_hand_count_with_padding():
    # Linear(10,6) + Linear(6,3), fp32, N = 4:
    #   0.weight (6,10): ceil(6/4)=2 rows x 10 = 20   0.bias (6,): 2
    #   2.weight (3,6):  ceil(3/4)=1 row  x 6  = 6    2.bias (3,): 1      -> 29 elements per rank, 116 B
    # full model: 60 + 6 + 18 + 3 = 87 elements = 348 B; Adam: exp_avg + exp_avg_sq + a 4-byte step per tensor
    fsdp = _section("fsdp", 4)
    pr = fsdp["per_rank"]
    assert pr["weights"] == 29 * 4 and pr["gradients"] == 29 * 4
    assert pr["optimizer_state"] == 2 * 29 * 4 + 4 * 4
    assert fsdp["single_device"]["optimizer_state"] == 2 * 87 * 4 + 4 * 4     # our per-parameter count = simulation's
    z1 = _section("zero1", 4)["per_rank"]
    assert (z1["weights"], z1["gradients"], z1["optimizer_state"]) == (348, 348, 2 * 29 * 4 + 16)
    z2 = _section("zero2", 4)["per_rank"]
    assert (z2["weights"], z2["gradients"], z2["optimizer_state"]) == (348, 116, 2 * 29 * 4 + 16)
    z3 = _section("zero3", 4)["per_rank"]
    assert z3 == pr                                                               # ZeRO-3 = FSDP2 semantics
    ddp = _section("ddp", 4)["per_rank"]
    assert (ddp["weights"], ddp["gradients"], ddp["optimizer_state"]) == (348, 348, 2 * 87 * 4 + 16)


def test_ddp_collectives_are_one_all_reduce_of_the_gradients():
    c = _section("ddp", 4)["collectives"]
    assert c["messages"] == {"all_reduce": 348, "all_gather": 0, "reduce_scatter": 0}
    assert c["all_reduce"] == 2 * 3 * 348 // 4           # ring: 2 (N-1)/N x message = 522 B sent per rank
    assert c["per_module"] == {"0": {"all_reduce": 264}, "2": {"all_reduce": 84}}   # (60+6)x4, (18+3)x4


def test_fsdp_collectives_gather_forward_and_backward_and_reduce_scatter_once():
    # padded unsharded units at N = 4: unit 0 (20 + 2) x 4 ranks x 4 B = 352, unit 2 (6 + 1) x 4 x 4 = 112;
    # the root owns no parameter. all-gather: forward + backward = 2 x 464; reduce-scatter: 464
    c = _section("fsdp", 4)["collectives"]
    assert c["messages"] == {"all_reduce": 0, "all_gather": 2 * 464, "reduce_scatter": 464}
    assert (c["all_gather"], c["reduce_scatter"]) == (3 * 928 // 4, 3 * 464 // 4)
    assert c["per_module"]["0"] == {"all_gather": 704, "reduce_scatter": 352}


def test_transformer_fsdp_gathers_the_root_once():
    # zoo transformer (tiny): d=128, 2 blocks, d_ff=512, vocab 1000, seq 64. One block:
    #   ln1 2d + qkv (d*3d + 3d) + proj (d*d + d) + ln2 2d + fc1 (d*4d + 4d) + fc2 (4d*d + d) = 198,272 elements
    # root: tok 1000*d + pos 64*d + ln_f 2d + head 1000*d = 264,448 elements (every size divides by 2: no padding)
    d = 128
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    root = 1000 * d + 64 * d + 2 * d + 1000 * d
    assert (block, root) == (198_272, 264_448)
    net = netdiet.create_model("transformer")
    x = (torch.randint(0, 1000, (2, 64)),)
    sec = per_rank(parse_layout("fsdp", 2, None, None), net, x, mem_kw=ADAM, estimate=estimate_memory(net, x, **ADAM))
    m = sec["collectives"]["messages"]
    # the root is not resharded after forward (torch's rule for the root), so only the blocks gather again
    assert m["all_gather"] == 4 * root + 2 * 2 * 4 * block
    assert m["reduce_scatter"] == 4 * (root + 2 * block)
    assert sec["per_rank"]["weights"] == 4 * (root + 2 * block) // 2


def test_section_shape_and_ddp_adds_its_buckets_to_every_phase():
    sec = _section("ddp", 2)
    for key in ("strategy", "world_size", "tp", "dp", "micro_batch", "checkpointing", "per_rank", "collectives",
                "notes"):
        assert key in sec
    for key in ("weights", "gradients", "optimizer_state", "activations", "communication_buffers", "temporaries",
                "peak_estimated"):
        assert isinstance(sec["per_rank"][key], int)
    # the reducer's flat bucket copies of the gradients (gradient_as_bucket_view=False) live through the step
    assert sec["buffers"]["gradient_buckets"] == 348
    net = _tiny()
    x = (torch.randn(4, 10),)
    single = estimate_memory(net, x, **ADAM)
    assert sec["per_rank"]["peak_estimated"] == single.peak_estimated + 348
    assert sec["micro_batch"] == 4


def test_analyse_refuses_a_batch_the_ranks_do_not_divide():
    layout = Layout("ddp", 4)
    assert micro_batch(layout, 8) == 2
    with pytest.raises(NetdietError, match=r"global batch 6 is not divisible by the 4 data-parallel ranks.*"
                                           r"--batch-size 8"):
        analyse(layout, _tiny(), (torch.randn(6, 10),), counts=None, estimate=None, estimate_at=None,
                mem_kw=ADAM, measure=False, unavailable=None)


def test_parse_layout_refuses_bad_layouts():
    with pytest.raises(NetdietError, match="unknown --parallel 'dpp'"):
        parse_layout("dpp", 2, None, None)
    with pytest.raises(NetdietError, match="--world-size describe a parallel layout; add --parallel"):
        parse_layout(None, 2, None, None)
    with pytest.raises(NetdietError, match="--world-size 6 is not divisible by --tp 4"):
        parse_layout("fsdp", 6, 4, None)
    assert parse_layout("tp", 4, None, None).tp == 4 and parse_layout("fsdp", 8, 2, None).dp == 4


def _bad(capsys, argv: list[str], *phrases: str) -> None:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("netdiet: error:"), (code, err)
    for phrase in phrases:
        assert phrase in err[0], (phrase, err[0])


def test_cli_bad_layouts_are_one_line_exit_2(capsys):
    _bad(capsys, ["profile", "mlp", "--parallel", "ddp", "--world-size", "3", "--batch-size", "4"],
         "global batch 4 is not divisible by the 3", "--batch-size 6")
    _bad(capsys, ["profile", "mlp", "--parallel", "ring", "--world-size", "2"], "unknown --parallel 'ring'")
    _bad(capsys, ["profile", "mlp", "--world-size", "2"], "add --parallel")
    _bad(capsys, ["profile", "mlp", "--parallel", "fsdp", "--world-size", "6", "--tp", "4"], "not divisible by --tp 4")
    _bad(capsys, ["profile", "transformer", "--parallel", "tp", "--world-size", "3"],
         "--tp 3 does not divide the model's 4 attention heads")
    _bad(capsys, ["profile", "mlp", "--parallel", "zero2", "--world-size", "2", "--batch-size", "4", "--measure"],
         "estimated only")


def test_cli_profile_writes_the_distributed_section(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["profile", "transformer", "--batch-size", "4", "--parallel", "fsdp", "--world-size", "2",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "per-rank memory: fsdp, 2 ranks" in text and "all-gather" in text
    sec = json.loads(out.read_text())["distributed"]
    assert sec["strategy"] == "fsdp" and sec["dp"] == 2 and sec["micro_batch"] == 2 and sec["global_batch"] == 4
    # 2,643,968 B of fp32 parameters (the hand count above), halved without padding at N = 2
    assert sec["single_device"]["weights"] == 2_643_968 and sec["per_rank"]["weights"] == 1_321_984


def test_device_adds_the_projected_step_and_tp_takes_the_split(tmp_path, capsys):
    out = tmp_path / "d.json"
    assert main(["profile", "transformer", "--batch-size", "4", "--parallel", "fsdp", "--world-size", "2",
                 "--device", "h100-sxm", "--json", str(out)]) == 0
    sec = json.loads(out.read_text())["distributed"]
    assert sec["step_time_s"] > 0 and 0 < sec["mfu"] <= 1 and sec["tokens_or_samples_per_s"] > 0
    # token ids (4 x 64): the rate is in tokens, 4 samples of 64 per step, and the MFU is PaLM's 6 N per token
    assert sec["throughput_unit"] == "tokens/s" and "PaLM" in sec["mfu_definition"]
    assert sec["tokens_or_samples_per_s"] == pytest.approx(4 * 64 / sec["step_time_s"])
    assert "projected step" in capsys.readouterr().out
    # tensor parallel: each rank's parameters are tensor_parallel.split's (sharded + replicated) bytes
    net = netdiet.create_model("transformer")
    x = (torch.randint(0, 1000, (2, 64)),)
    est = estimate_memory(net, x, **ADAM)
    split = netdiet.analysis.tensor_parallel.split(net, 2, est)
    sec = per_rank(parse_layout("tp", 2, None, None), net, x, mem_kw=ADAM, estimate=est)
    assert abs(sec["per_rank"]["weights"] - (split["sharded_params"] + split["replicated_params"])) <= 3
    assert sec["per_rank"]["activations"] == split["activations_per_rank"]
    assert sec["collectives"]["messages"]["all_reduce"] == split["all_reduce_bytes_per_step"]


def test_under_tp_the_fsdp_walk_sees_each_tp_ranks_share(monkeypatch):
    # zero3 x 4 . tp 2: the walk of FSDP2's units must place each tp rank's split activations and its tp share of the
    # gradients (it was handed the whole model's, which put zero3 x tp 4 104 MB above zero2 x tp 4 on a d1024 stack)
    from netdiet.analysis import parallel
    with torch.device("meta"):
        net = netdiet.create_model("transformer", layers=4, d_model=128, heads=4, seq_len=32, vocab=4000)
    x = (torch.empty((4, 32), dtype=torch.int64, device="meta"),)
    kw = dict(optimizer="adam", dtype="bf16")
    est = estimate_memory(net, x, **kw)
    seen = {}
    walk = parallel._fsdp_timeline

    def spy(units, model, estimate, **kwargs):
        seen["acts"], seen["single"] = sum(estimate.module_activations.values()), kwargs["single"]
        return walk(units, model, estimate, **kwargs)

    monkeypatch.setattr(parallel, "_fsdp_timeline", spy)
    section = per_rank(Layout("zero3", 8, 2), net, x, mem_kw=kw, estimate=est)
    split = netdiet.analysis.tensor_parallel.split(net, 2, est)
    assert seen["acts"] == split["activations_per_rank"] == section["per_rank"]["activations"] < est.activations
    share = split["params_per_rank"] / est.weights
    assert 0.5 < share < 0.6                                  # the vocab-parallel embedding/head and the norms
    assert seen["single"][3] == int(est.gradients * share)
