"""`netdiet train` end to end: the files it leaves are what compress/evaluate need, and its JSON holds real figures."""
import json

import pytest
import torch

from netdiet import api
from netdiet.cli import main
from netdiet.training import evaluate_accuracy


def test_train_cli_writes_weights_spec_and_log_that_rebuild_the_same_model(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "mlp", "--data", "digits", "--model-kw", "widths=[32,32]", "--epochs", "2", "--batch-size", "32",
                 "--grad-accum", "2", "--schedule", "cosine", "--checkpointing", "--out", str(out), "--json",
                 str(tmp_path / "t.json"), "--projection-steps", "3"])
    assert code == 0
    doc = json.loads((out / "train.json").read_text())
    assert doc == json.loads((tmp_path / "t.json").read_text())
    assert doc["schema"] == "netdiet.train/1" and [h["epoch"] for h in doc["history"]] == [1, 2]
    # 1,295 training samples (10 % held out) / 32 = 41 micro-batches -> 21 optimizer steps per epoch
    assert doc["data"]["train_used"] == 1295 and doc["steps"] == 42
    assert doc["history"][-1]["lr"] < doc["config"]["lr"] * 0.01          # cosine ends near zero
    assert doc["projection"]["projected_seconds"] > 0 and doc["projection"]["total_samples"] == 2 * 1295
    # segments [Flatten, Linear 64->32, ReLU] and [Linear 32->32, ReLU, Linear 32->10]; backward recomputes each up
    # to the last tensor it needs, so the final Linear (whose output nobody saves) is not recomputed:
    # 2 x (64*32 + 32*32) MAC FLOPs + 2 x 32 bias adds + 2 x 32 ReLUs = 6,272 per sample
    assert doc["recompute"]["recompute_flops_per_sample"] == 2 * (64 * 32 + 32 * 32) + 2 * 32 + 2 * 32
    assert doc["recompute"]["activations_checkpointed"] < doc["recompute"]["activations_plain"]
    spec = json.loads((out / "model.json").read_text())
    assert spec["spec"] == "mlp" and spec["kwargs"] == {"widths": [32, 32], "in_features": 64}
    model = api.load_model(spec["spec"], str(out / "model.safetensors"), **spec["kwargs"])
    data = api.get_dataset("digits")
    assert evaluate_accuracy(model, data.x_test, data.y_test) == pytest.approx(doc["test_acc"])
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "recompute adds" in printed


def test_train_refuses_a_language_model_in_one_line(capsys):
    assert main(["train", "transformer", "--data", "digits"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "classifiers" in err[0]
