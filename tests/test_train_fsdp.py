"""`netdiet train --parallel fsdp`: FSDP2 (fully_shard per block + root) over gloo equals one process and DDP, resumes
bit for bit from its gathered safetensors checkpoint (and from a DDP one), and measures each rank's tensor peak."""
import json
import os
import subprocess
import sys

import pytest
import torch

from netdiet import api
from netdiet.analysis.measurement import measure_memory
from netdiet.cli import main
from netdiet.data import get_dataset
from netdiet.fileio import load_state_dict
from netdiet.models import create_model
from netdiet.reporting.train_tables import train_summary_lines
from netdiet.training import TrainConfig
from netdiet.training.distributed import fsdp_units
from netdiet.units import format_bytes

# digits with a 15 % hold-out: 1,222 training samples, a multiple of 2, so both ranks' shards and last batches are
# equal and the mean of the two ranks' mean gradients is the one-process mean gradient (as tests/test_train_ddp.py)
DIGITS = {"data": "digits", "val_fraction": 0.15}
_TIMING = {"seconds", "samples_per_s", "data_wait_fraction", "peak_rss", "peak_rss_delta"}


def _metrics(history):
    return [{k: v for k, v in h.items() if k not in _TIMING} for h in history]


def _train(out, parallel, nproc=2, epochs=1, resume=False, **cfg):
    config = TrainConfig(epochs=epochs, batch_size=64, lr=3e-3, optimizer="adam", progress=False, parallel=parallel,
                         resume=resume, **cfg)
    return api.train("mlp", model_kw={"widths": [16]}, out=str(out), config=config, nproc=nproc, **DIGITS)


def test_two_fsdp_ranks_equal_one_process_and_each_holds_less_than_it(tmp_path):
    fsdp = _train(tmp_path / "fsdp", "fsdp")
    one = _train(tmp_path / "one", "ddp", nproc=1)
    assert fsdp.world_size == 2 and [h["steps"] for h in fsdp.history] == [h["steps"] for h in one.history] == [20]
    assert fsdp.history[0]["loss"] == pytest.approx(one.history[0]["loss"], rel=1e-6)   # float summation order only
    assert fsdp.history[0]["val_acc"] == one.history[0]["val_acc"] and fsdp.test_acc == one.test_acc
    w1, w2 = (load_state_dict(tmp_path / d / "model.safetensors") for d in ("one", "fsdp"))
    assert sorted(w2) == sorted(w1)                               # gathered whole, in the one-process layout
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-6)
    d = fsdp.distributed
    assert d["strategy"] == "fsdp" and d["world_size"] == 2 and d["measured_step"] == 2
    # Hand count of what each rank holds when its second step starts (mlp 64-16-10, Adam, micro-batch 32):
    #   weight shards: Linear1 16x64/2 + 16/2, Linear2 10x16/2 + 10/2 = 605 floats = 2,420 B; Adam m and v: 4,840 B;
    #   4 step counters 16 B; x 32x1x8x8 float32 8,192 B + y 32 int64 256 B          -> 15,724 B held,
    #   and in forward Linear1 is all-gathered whole (1,040 floats, 4,160 B)         -> peak >= 19,884 B.
    # One process training the same micro-batch holds all of it unsharded: every rank's peak is below that one's.
    x = get_dataset("digits").x_train[:32].clone()
    torch.manual_seed(0)
    single = measure_memory(create_model("mlp", widths=[16], in_features=64), x, optimizer="adam")["peak_measured"]
    for peak in d["per_rank_peak_measured"]:
        assert 19_884 <= peak < single, (peak, single)
    assert json.loads((tmp_path / "fsdp" / "train.json").read_text())["distributed"] == d
    line = [ln for ln in train_summary_lines(fsdp.to_dict()) if ln.startswith("fsdp on 2 processes")]
    assert len(line) == 1 and format_bytes(d["per_rank_peak_measured"][1]) in line[0]


def test_the_fsdp_unit_rule_on_the_zoo():
    # a Sequential model's parameter-holding layers; a transformer's blocks (embeddings, final norm, head -> root)
    assert fsdp_units(create_model("mlp", widths=[16], in_features=64)) == ["1", "3"]   # Flatten, Linear, ReLU, Linear
    assert fsdp_units(create_model("mlp", widths=[16, 8], in_features=64)) == ["1", "3", "5"]
    assert fsdp_units(create_model("cnn", channels=[4, 8], in_channels=1, image_size=8)) == ["0", "1", "4", "5", "10"]
    lm = create_model("transformer", layers=3, d_model=32, heads=2, seq_len=16, vocab=50)
    assert fsdp_units(lm) == ["blocks.0", "blocks.1", "blocks.2"]
    lists = torch.nn.Module()
    lists.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2)])
    lists.head = torch.nn.Linear(2, 1)
    assert fsdp_units(lists) == ["layers.0", "layers.2"]


@pytest.mark.parametrize("argv,words", [
    (["--parallel", "fsdp"], "needs 2 or more processes"),
    (["--parallel", "fsdp", "--nproc", "1"], "needs 2 or more processes"),
    (["--parallel", "fsdp", "--nproc", "3"], "batch size 64 does not split evenly over 3 processes"),
    (["--parallel", "zero3", "--nproc", "2"], "use --parallel fsdp"),
    (["--parallel", "zero1", "--nproc", "2"], "ZeRO stage 1"),
    (["--parallel", "tp", "--nproc", "2"], "tensor parallel"),
    (["--parallel", "fdsp", "--nproc", "2"], "unknown; choose one of: ddp, fsdp"),
    (["--parallel", "fsdp", "--nproc", "2", "--ensemble", "2"], "--ensemble"),
    (["--parallel", "fsdp", "--nproc", "2", "--clip-grad-norm", "-1"], "--clip-grad-norm"),
    (["--parallel", "fsdp", "--nproc", "2", "--precision", "fp16"], "use --precision bf16"),
], ids=["no-nproc", "nproc-1", "batch-split", "zero3", "zero1", "tp", "unknown", "ensemble", "clip", "fp16"])
def test_bad_parallel_requests_are_one_line_exit_2_before_any_work(tmp_path, capsys, argv, words):
    out = tmp_path / "run"
    code = main(["train", "mlp", "--data", "digits", "--batch-size", "64", "--out", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and len(err.splitlines()) == 1, err
    assert not (out / "checkpoint").exists()


@pytest.mark.slow
def test_fsdp_and_ddp_give_the_same_losses_and_fsdp_ranks_hold_less(tmp_path):
    # stated tolerance: rel 1e-6 on the loss (float summation order: DDP all-reduces whole gradients, FSDP
    # reduce-scatters shards), accuracies equal, weights within 1e-6
    fsdp = _train(tmp_path / "fsdp", "fsdp", epochs=3)
    ddp = _train(tmp_path / "ddp", "ddp", epochs=3)
    assert [h["steps"] for h in fsdp.history] == [h["steps"] for h in ddp.history] == [20, 40, 60]
    for a, b in zip(ddp.history, fsdp.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["val_acc"] == a["val_acc"] and b["train_acc"] == a["train_acc"]
    wd, wf = (load_state_dict(tmp_path / d / "model.safetensors") for d in ("ddp", "fsdp"))
    for k in wd:
        torch.testing.assert_close(wf[k], wd[k], rtol=0, atol=1e-6)
    # DDP holds a whole replica plus its gradient bucket (1,210 floats, 4,840 B) on each rank: more than one
    # process training the micro-batch, and more than an FSDP rank
    x = get_dataset("digits").x_train[:32].clone()
    torch.manual_seed(0)
    single = measure_memory(create_model("mlp", widths=[16], in_features=64), x, optimizer="adam")["peak_measured"]
    for f, d in zip(fsdp.distributed["per_rank_peak_measured"], ddp.distributed["per_rank_peak_measured"]):
        assert f < single + 4_840 <= d, (f, single, d)
    assert ddp.distributed["strategy"] == "ddp"


@pytest.mark.slow
def test_fsdp_resume_is_bit_identical_and_a_ddp_checkpoint_resumes_under_fsdp(tmp_path):
    extra = {"patience": 3, "clip_grad_norm": 1.0}      # early stopping's best weights travel in the checkpoint too
    full = _train(tmp_path / "full", "fsdp", epochs=2, **extra)
    _train(tmp_path / "resumed", "fsdp", epochs=1, **extra)
    resumed = _train(tmp_path / "resumed", "fsdp", epochs=2, resume=True, **extra)
    assert resumed.resumed_from_epoch == 1
    assert _metrics(resumed.history) == _metrics(full.history)          # loss, accuracy, LR per epoch, bit for bit
    assert ((tmp_path / "resumed" / "model.safetensors").read_bytes()
            == (tmp_path / "full" / "model.safetensors").read_bytes())
    # the checkpoint holds whole tensors in the one-process layout whoever wrote it: a DDP run's resumes under FSDP
    _train(tmp_path / "mixed", "ddp", epochs=1, **extra)
    mixed = _train(tmp_path / "mixed", "fsdp", epochs=2, resume=True, **extra)
    assert mixed.resumed_from_epoch == 1 and mixed.distributed["strategy"] == "fsdp"
    for a, b in zip(full.history, mixed.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["val_acc"] == a["val_acc"]
    wf, wm = (load_state_dict(tmp_path / d / "model.safetensors") for d in ("full", "mixed"))
    for k in wf:
        torch.testing.assert_close(wm[k], wf[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_torchrun_launch_trains_with_fsdp(tmp_path):
    common = ["train", "mlp", "--data", "digits", "--model-kw", "widths=[16]", "--val-fraction", "0.15", "--epochs", "1",
              "--lr", "3e-3", "--projection-steps", "0", "--parallel", "fsdp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "netdiet", *common,
                          "--out", str(tmp_path / "tr")], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    doc = json.loads((tmp_path / "tr" / "train.json").read_text())
    spawned = _train(tmp_path / "sp", "fsdp")
    assert doc["world_size"] == 2 and doc["distributed"]["strategy"] == "fsdp"
    assert doc["history"][0]["loss"] == pytest.approx(spawned.history[0]["loss"], rel=1e-6)
    assert run.stdout.count("test accuracy") == 1                       # only rank 0 reports
    assert "fsdp on 2 processes: tensor peak of step 2 per rank" in run.stdout


@pytest.mark.slow
def test_the_loop_features_run_the_same_under_fsdp_and_ddp(tmp_path):
    # --grad-accum (FSDP: no reduce-scatter on the first micro-batch), --l1 (the shards' penalty summed over the
    # ranks), --clip-grad-norm (the norm over every rank's shards), bf16 autocast, activation checkpointing: the
    # same numbers as DDP to float-summation order (stated rel 1e-6; measured identical to the last bit)
    runs = {}
    for parallel in ("ddp", "fsdp"):
        cfg = TrainConfig(epochs=2, batch_size=64, lr=3e-3, progress=False, parallel=parallel, grad_accum=2, l1=1e-4,
                          clip_grad_norm=0.5, precision="bf16", checkpointing=True)
        runs[parallel] = api.train("cnn", model_kw={"channels": [4, 8]}, out=str(tmp_path / parallel), config=cfg,
                                   nproc=2, **DIGITS)
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert [h["steps"] for h in fsdp.history] == [h["steps"] for h in ddp.history] == [10, 20]   # 20 batches / 2
    for a, b in zip(ddp.history, fsdp.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert fsdp.recompute["segments"] == ddp.recompute["segments"]
