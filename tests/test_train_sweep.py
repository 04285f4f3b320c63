"""`netdiet sweep`: k-fold cross-validation over a knob, errors against complexity, the chosen point."""
import json

import numpy as np
import pytest
import torch

from netdiet.cli import main
from netdiet.errors import NetdietError
from netdiet.training.sweep import knob_kwargs, parse_knob, stratified_folds


def test_stratified_folds_are_disjoint_cover_everything_and_balance_classes():
    y = torch.tensor([0] * 30 + [1] * 12)
    folds = stratified_folds(y, 3, seed=0)
    allidx = np.concatenate(folds)
    assert sorted(allidx.tolist()) == list(range(42))
    assert [int((y[torch.from_numpy(f)] == 1).sum()) for f in folds] == [4, 4, 4]
    assert [len(f) for f in folds] == [14, 14, 14]


def test_knob_parsing_and_mlp_depth_means_hidden_layers_of_the_base_width():
    assert parse_knob("widths=[[64],[256],[1024,256]]") == ("widths", [[64], [256], [1024, 256]])
    assert knob_kwargs("mlp", {"width": 32}, "depth", 3) == {"widths": [32, 32, 32]}
    with pytest.raises(NetdietError):
        parse_knob("widths")


def test_sweep_cli_reports_params_by_hand_and_chooses_the_lowest_validation_error(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    code = main(["sweep", "mlp", "--data", "digits", "--knob", "widths=[[4],[64]]", "--folds", "2", "--epochs", "2",
                 "--batch-size", "64", "--lr", "0.005", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == "netdiet.sweep/1" and doc["k"] == 2
    p4, p64 = doc["points"]
    # mlp 64-4-10 and 64-64-10 (digits are 8x8 = 64 inputs): weights + biases
    assert p4["params"] == 64 * 4 + 4 + 4 * 10 + 10 and p64["params"] == 64 * 64 + 64 + 64 * 10 + 10
    for p in doc["points"]:
        assert len(p["folds"]) == 2
        assert p["val_error"] == pytest.approx(sum(f["val_error"] for f in p["folds"]) / 2)
    best = min(range(2), key=lambda i: doc["points"][i]["val_error"])
    assert doc["chosen_index"] == best and doc["chosen"] == doc["points"][best]["value"]
    assert p64["train_error"] < p4["train_error"]            # more capacity fits the training folds better
    assert "chosen" in capsys.readouterr().out
