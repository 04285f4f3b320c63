"""Two data-parallel processes (DDP over gloo) equal one process with the same global batch."""
import pytest
import torch

from netdiet import api
from netdiet.fileio import load_state_dict
from netdiet.training import TrainConfig


@pytest.mark.slow
def test_two_process_ddp_run_equals_one_process_with_the_same_global_batch(tmp_path):
    # digits with a 15 % hold-out leaves 1,222 training samples: a multiple of 2, so both ranks' shards and last
    # batches have equal sizes and the mean of the two ranks' mean gradients is the one-process mean gradient.
    runs = {}
    for nproc in (1, 2):
        cfg = TrainConfig(epochs=2, batch_size=64, lr=0.1, optimizer="sgd", progress=False)
        runs[nproc] = api.train("mlp", model_kw={"widths": [32]}, data="digits", val_fraction=0.15,
                                out=str(tmp_path / f"n{nproc}"), config=cfg, nproc=nproc)
    one, two = runs[1], runs[2]
    assert two.world_size == 2 and one.world_size == 1
    assert [h["steps"] for h in one.history] == [h["steps"] for h in two.history] == [20, 40]
    for a, b in zip(one.history, two.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)          # stated tolerance: float summation order only
        assert b["val_acc"] == a["val_acc"] and b["train_acc"] == a["train_acc"]
    w1 = load_state_dict(tmp_path / "n1" / "model.safetensors")
    w2 = load_state_dict(tmp_path / "n2" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-6)
    assert two.test_acc == one.test_acc
    # only rank 0 wrote: one set of files
    assert sorted(p.name for p in (tmp_path / "n2").iterdir()) == ["checkpoint", "model.json", "model.safetensors", "train.json"]


@pytest.mark.slow
def test_torchrun_launch_trains_two_ranks_and_matches_one_process(tmp_path):
    import json
    import os
    import subprocess
    import sys
    common = ["train", "mlp", "--data", "digits", "--model-kw", "widths=[32]", "--val-fraction", "0.15", "--epochs", "1",
              "--optimizer", "sgd", "--lr", "0.1", "--projection-steps", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "netdiet", *common, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "netdiet", *common,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    a = json.loads((tmp_path / "one" / "train.json").read_text())
    b = json.loads((tmp_path / "two" / "train.json").read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert b["history"][0]["loss"] == pytest.approx(a["history"][0]["loss"], rel=1e-6)
    assert b["test_acc"] == a["test_acc"]
    assert two.stdout.count("test accuracy") == 1                       # only rank 0 reports


@pytest.mark.slow
def test_a_diverging_two_process_run_stops_with_exit_2_and_keeps_a_loadable_checkpoint(tmp_path, capsys, monkeypatch):
    import json

    from test_train_hostile import BOMB

    from netdiet.cli import main
    from netdiet.training.checkpoint import load_checkpoint
    (tmp_path / "bombs.py").write_text(BOMB)
    out = tmp_path / "run"
    base = ["train", f"{tmp_path / 'bombs.py'}:bomb", "--data", "digits", "--val-fraction", "0.15", "--optimizer", "sgd",
            "--lr", "0.05", "--batch-size", "64", "--epochs", "3", "--projection-steps", "0", "--nproc", "2",
            "--out", str(out)]
    # 1,222 training samples / 64 = 20 steps an epoch, each rank one forward per step: NaN from step 26 (epoch 2)
    monkeypatch.setenv("BOMB_AFTER", "25")
    assert main(base) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "diverged at epoch 2 step 26 (loss nan)" in line and "epoch 1" in line, line
    doc = json.loads((out / "train.json").read_text())
    assert doc["diverged"] == {"epoch": 2, "step": 26, "loss": "nan", "checkpoint_epoch": 1} and doc["world_size"] == 2
    ck = load_checkpoint(out / "checkpoint")                              # the last good one, loadable
    assert ck.epoch == 1 and ck.step == 20 and all(bool(torch.isfinite(t).all()) for t in ck.model.values())
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["checkpoint.json", "epoch-0001.safetensors"]
    monkeypatch.setenv("BOMB_AFTER", "0")
    assert main(base + ["--resume"]) == 0                                 # and --resume continues from it
    doc = json.loads((out / "train.json").read_text())
    assert doc["resumed_from_epoch"] == 1 and len(doc["history"]) == 3 and doc["diverged"] is None
