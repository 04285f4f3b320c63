"""`netdiet compress` and `netdiet recipes` end to end: JSON, archive, exit codes, --weights."""
import json

import pytest
import torch

from netdiet.cli import main
from netdiet.fileio import save_state_dict
from netdiet.models import create_model
from netdiet.training import TrainConfig, evaluate_accuracy, fit

# one torch thread: these train end to end, and two threads thrash on a loaded 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


# sklearn's 8x8 digits and a 64-32-10 MLP keep these end-to-end runs to seconds on a loaded machine
MLP = ["--data", "digits", "--model-kw", "in_features=64", "--model-kw", "widths=[32]"]
MLP_KW = {"in_features": 64, "widths": [32]}

TINY = """\
name: tiny
baseline: {epochs: 1, lr: 0.001}
stages:
  - technique: prune
    options: {sparsity: 0.75}
  - technique: quantize
    options: {mode: int8-weight}
"""


def test_compress_writes_json_and_archive_with_stage_metrics(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    out, report = tmp_path / "m.ndz", tmp_path / "r.json"
    code = main(["compress", "mlp", *MLP, "--recipe", str(recipe), "--out", str(out), "--json", str(report),
                 "--no-latency", "--seed", "1"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(report.read_text())
    assert doc["schema"] == "netdiet.compress/1"
    assert doc["model"] == {"spec": "mlp", "kwargs": MLP_KW} and doc["data"] == "digits" and doc["seed"] == 1
    assert [s["name"] for s in doc["stages"]] == ["prune", "quantize-int8-weight"]
    base, prune, quant = doc["baseline"], doc["stages"][0], doc["stages"][1]
    from safetensors.torch import save
    assert base["bytes_on_disk"] == len(save(create_model("mlp", **MLP_KW).state_dict()))  # the dense fp32 file itself
    assert base["params"] == 64 * 32 + 32 + 32 * 10 + 10 and base["macs"] == 64 * 32 + 32 * 10
    # per-layer one-shot pruning at 75 %: a quarter of every weight matrix survives, biases stay
    assert prune["nonzero_params"] == 2048 // 4 + 320 // 4 + 42
    assert quant["bytes_on_disk"] < prune["bytes_on_disk"] < base["bytes_on_disk"]
    assert quant["ratio"] == pytest.approx(base["bytes_on_disk"] / quant["bytes_on_disk"])
    size = out.stat().st_size
    assert doc["archive"] == {"path": str(out), "bytes": size, "dense_fp32_bytes": base["bytes_on_disk"],
                              "ratio": base["bytes_on_disk"] / size}
    # one figure, one producer: `evaluate` of the kept file gives the archive's ratio, to the last bit
    ev = tmp_path / "e.json"
    assert main(["evaluate", str(out), "--data", "digits", "--no-latency", "--json", str(ev)]) == 0
    assert json.loads(ev.read_text())["ratio"] == doc["archive"]["ratio"]
    assert "quantize-int8-weight" in doc["pareto"]
    printed = capsys.readouterr().out
    assert "baseline" in printed and "prune" in printed and f"({out.stat().st_size}" in printed.replace("\n", " ")


def test_compress_with_weights_skips_baseline_training(tmp_path, capsys):
    from netdiet.data import get_dataset
    digits = get_dataset("digits")
    torch.manual_seed(0)
    model = create_model("mlp", **MLP_KW)
    fit(model, digits.x_train, digits.y_train, TrainConfig(epochs=2, progress=False))
    weights = tmp_path / "w.safetensors"
    save_state_dict(weights, model.state_dict())
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - technique: lowrank\n    options: {rank: 4}\n")
    report = tmp_path / "r.json"
    code = main(["compress", "mlp", *MLP, "--recipe", str(recipe), "--weights", str(weights), "--json", str(report),
                 "--no-latency"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(report.read_text())
    assert doc["baseline"]["trained_by_netdiet"] is False and doc["baseline"]["train"] is None
    assert doc["baseline"]["accuracy"] == pytest.approx(evaluate_accuracy(model, digits.x_test, digits.y_test))
    assert doc["stages"][0]["params"] == 4 * (64 + 32) + 32 + 4 * (32 + 10) + 10


@pytest.mark.parametrize("recipe_text, fragment", [
    ("stages:\n  - technique: shrink\n", "line 2: unknown technique 'shrink'"),
    ("stages:\n  - technique: prune\n    options: {sparsity: 1.5}\n", "line 3: sparsity 1.5 is outside [0, 1)"),
    ("stages:\n  - technique: cluster\n    options: {bits: 0}\n", "line 3: bits 0 is outside 1..8"),
])
def test_bad_recipe_exits_2_with_one_line_naming_the_yaml_line(tmp_path, capsys, recipe_text, fragment):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(recipe_text)
    assert main(["compress", "mlp", *MLP, "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and fragment in err and "Traceback" not in err


def test_missing_recipe_file_exits_2(tmp_path, capsys):
    assert main(["compress", "mlp", *MLP, "--recipe", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_recipes_lists_the_builtins_as_json(tmp_path, capsys):
    out = tmp_path / "recipes.json"
    assert main(["recipes", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == "netdiet.recipes/1"
    by_name = {r["name"]: r["stages"] for r in doc["recipes"]}
    assert by_name["deep-compression"] == ["prune", "cluster"] and by_name["seed-incremental"] == ["prune", "quantize"]
