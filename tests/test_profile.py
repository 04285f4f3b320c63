"""`netdiet profile`: the API result, the JSON document, the CLI, and one-line errors for bad input."""
import json
import textwrap

import pytest
import torch
from torch import nn

import netdiet
from netdiet.analysis.profile import input_fit_check
from netdiet.cli import main
from netdiet.errors import NetdietError


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_exit_2(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("netdiet: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


# ------------------------------------------------------------------ bad input -> one line, exit 2
def test_unknown_zoo_name_suggests_the_closest(capsys):
    code, _, err = run_cli(capsys, "profile", "lenet3000")
    assert_one_line_exit_2(code, err, "unknown model 'lenet3000'", "did you mean 'lenet300'")


def test_import_error_in_a_users_module_is_one_line(capsys, tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("import torch\nimport no_such_package_xyz\ndef build():\n    return torch.nn.Linear(2, 2)\n")
    code, _, err = run_cli(capsys, "profile", f"{f}:build", "--input", "1,2")
    assert_one_line_exit_2(code, err, "broken.py", "no_such_package_xyz")


def test_factory_that_raises_is_one_line(capsys, tmp_path):
    f = tmp_path / "raising.py"
    f.write_text("def build():\n    raise RuntimeError('the width must be even')\n")
    code, _, err = run_cli(capsys, "profile", f"{f}:build", "--input", "1,2")
    assert_one_line_exit_2(code, err, "raised RuntimeError", "the width must be even")


def test_input_that_does_not_fit_names_the_layer_and_both_shapes(capsys):
    code, _, err = run_cli(capsys, "profile", "lenet5", "--input", "1,3,32,32")
    assert_one_line_exit_2(code, err, "input 1x3x32x32 does not fit layer 'conv1'",
                           "Conv2d expects 1 input channel, got 3", "weight 20x1x5x5")


def test_input_that_does_not_fit_a_linear_layer_names_features(capsys):
    code, _, err = run_cli(capsys, "profile", "lenet300", "--input", "2,1,20,20")
    # 20*20 = 400 features reach the first Linear (index 1 of the Sequential), which wants 784
    assert_one_line_exit_2(code, err, "input 2x1x20x20 does not fit layer '1'", "Linear expects 784 input features, got 400",
                           "layer input 2x400")


def test_unknown_dtype_is_one_line(capsys):
    code, _, err = run_cli(capsys, "profile", "lenet300", "--dtype", "fp8")
    assert_one_line_exit_2(code, err, "unknown dtype 'fp8'", "fp32, bf16 or fp16")


def test_unknown_optimizer_is_one_line(capsys):
    code, _, err = run_cli(capsys, "profile", "lenet300", "--optimizer", "rmsprop")
    assert_one_line_exit_2(code, err, "unknown optimizer 'rmsprop'")


def test_unparseable_size_is_one_line(capsys):
    code, _, err = run_cli(capsys, "profile", "lenet300", "--max-batch-for", "4 gigs")
    assert_one_line_exit_2(code, err, "cannot read size '4 gigs'")


def test_unparseable_batch_sizes_and_shapes_are_one_line(capsys):
    code, _, err = run_cli(capsys, "profile", "lenet300", "--batch-sizes", "1,eight")
    assert_one_line_exit_2(code, err, "--batch-sizes")
    code, _, err = run_cli(capsys, "profile", "lenet300", "--input", "1,0,28")
    assert_one_line_exit_2(code, err, "cannot read input shape")


def test_projection_needs_both_dataset_size_and_epochs(capsys):
    code, _, err = run_cli(capsys, "profile", "lenet300", "--dataset-size", "1000")
    assert_one_line_exit_2(code, err, "--dataset-size and --epochs")


def test_user_callable_without_input_asks_for_one(capsys, tmp_path):
    f = tmp_path / "net.py"
    f.write_text("import torch\ndef build():\n    return torch.nn.Linear(3, 2)\n")
    code, _, err = run_cli(capsys, "profile", f"{f}:build")
    assert_one_line_exit_2(code, err, "has no default input", "--input")


def test_measure_whose_estimate_exceeds_ram_is_refused_up_front(capsys, monkeypatch):
    import netdiet.analysis.memory as memory
    import netdiet.analysis.profile as prof
    measured = []
    monkeypatch.setattr(memory, "measure_memory", lambda *a, **k: measured.append(1) or {})
    # pretend the machine has 1 KiB available: the real check must refuse before anything is measured
    real_check = memory.check_fits_in_ram
    monkeypatch.setattr(memory, "check_fits_in_ram",
                        lambda estimate_bytes, override: real_check(estimate_bytes * 10**9, override))
    code, _, err = run_cli(capsys, "profile", "lenet300", "--measure")
    assert_one_line_exit_2(code, err, "--force")
    assert measured == []
    assert prof  # the module under test imports the check lazily, so the patch above is what it sees


def test_input_fit_check_finds_the_innermost_failing_module():
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Conv1d(3, 5, 3)))
    x = torch.zeros(2, 4)
    with pytest.raises(NetdietError) as info:
        with input_fit_check(model, (x,)):
            model(x)
    msg = str(info.value)
    assert "layer '1.1'" in msg and "Conv1d expects 3 input channels, got 2" in msg and "layer input 2x8" in msg
    # hooks are removed afterwards
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_input_fit_check_passes_other_errors_through_when_no_module_runs():
    model = nn.Linear(2, 2)
    with pytest.raises(KeyError):
        with input_fit_check(model, (torch.zeros(1, 2),)):
            raise KeyError("not a forward error")
