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
    import netdiet.analysis.ram as ram
    import netdiet.analysis.profile as prof
    measured = []
    monkeypatch.setattr(prof, "measure_memory", lambda *a, **k: measured.append(1) or {})
    # pretend the machine has 1 KiB available: the real check must refuse before anything is measured
    real_check = ram.check_fits_in_ram
    monkeypatch.setattr(prof, "check_fits_in_ram",
                        lambda estimate_bytes, override: real_check(estimate_bytes * 10**9, override))
    code, _, err = run_cli(capsys, "profile", "lenet300", "--measure")
    assert_one_line_exit_2(code, err, "--force")
    assert measured == []
    assert prof  # profile imports the check and the measurement by name, so the patches above are what it sees


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


# ------------------------------------------------------------------ real figures through the API and the CLI
LENET300_MACS = 784 * 300 + 300 * 100 + 100 * 10           # 266,200 multiply-accumulates per sample
LENET300_PARAMS = LENET300_MACS + 300 + 100 + 10             # weights + biases = 266,610


@pytest.fixture(scope="module")
def lenet300_doc():
    return netdiet.profile("lenet300", progress=False).to_dict()


def test_lenet300_totals_are_the_hand_counts(lenet300_doc):
    t = lenet300_doc["totals"]
    assert t["params"] == t["trainable_params"] == LENET300_PARAMS
    assert t["param_bytes"] == 4 * LENET300_PARAMS and t["buffer_bytes"] == 0
    assert t["macs"] == LENET300_MACS
    # training step = forward + backward + the optimizer step, the last by formula over every parameter
    assert t["train_flops"] == t["train_forward_flops"] + t["backward_flops"] + t["optimizer_flops"]
    # the training forward adds only the loss (sum over 10 logits: 9 adds) to the inference forward here
    assert t["train_forward_flops"] == t["flops"] + 9
    assert t["optimizer"] == "adam" and t["optimizer_flops"] > 0
    # backward of the three Linears: grad-input for the 2nd and 3rd (the 1st's input needs none) + grad-weight for all
    assert t["backward_macs"] == LENET300_MACS + (300 * 100 + 100 * 10)


def test_profile_document_has_the_design_schema(lenet300_doc):
    doc = lenet300_doc
    assert doc["schema"] == "netdiet.profile/1"
    assert doc["model"] == {"spec": "lenet300", "kwargs": {}, "class": "Sequential", "built_on": "meta"}
    assert doc["inputs"] == [{"shape": [1, 1, 28, 28], "dtype": "float32"}]
    assert doc["training_unavailable"] is None and doc["memory"]["not_estimated"] is None
    for key in ("params", "trainable_params", "param_bytes", "buffer_bytes", "macs", "flops", "train_flops"):
        assert isinstance(doc["totals"][key], int)
    for key in ("batch_size", "optimizer", "weights", "gradients", "optimizer_state", "activations", "temporaries",
                "peak_estimated", "peak_measured", "inference_peak"):
        assert key in doc["memory"]
    assert doc["memory"]["weights"] == 4 * LENET300_PARAMS and doc["memory"]["peak_measured"] is None
    row = next(m for m in doc["modules"] if m["name"] == "1")
    assert {k: row[k] for k in ("type", "params", "param_bytes", "macs", "output_shape")} == {
        "type": "Linear", "params": 784 * 300 + 300, "param_bytes": 4 * (784 * 300 + 300), "macs": 784 * 300,
        "output_shape": [1, 300]}
    assert {"activation_bytes", "flops", "backward_flops"} <= set(row)
    assert doc["operators"]["aten.addmm"]["count"] == 3 and doc["operators"]["aten.addmm"]["macs"] == LENET300_MACS
    assert doc["uncounted"] == {}
    assert doc["environment"]["torch"] == torch.__version__ and doc["environment"]["threads"] >= 1
    json.dumps(doc, allow_nan=False)  # plain JSON, no NaN


def test_root_activation_bytes_sum_every_module(lenet300_doc):
    rows = lenet300_doc["modules"]
    root = next(r for r in rows if r["name"] == "")
    assert root["activation_bytes"] == sum(r["activation_bytes_self"] for r in rows if not r["name"].startswith("<"))
    # with what the loss saved (outside the module tree) it is every activation byte of the estimate
    assert sum(r["activation_bytes_self"] for r in rows) == lenet300_doc["memory"]["activations"]
    # the ReLUs save their outputs (1x300 and 1x100 fp32) for backward
    assert next(r for r in rows if r["name"] == "2")["activation_bytes"] >= 300 * 4


def test_batch_size_replaces_dim0_and_scales_macs():
    r = netdiet.profile("lenet300", batch_size=8, progress=False)
    assert r.inputs[0]["shape"] == [8, 1, 28, 28] and r.memory["batch_size"] == 8
    assert r.totals["macs"] == 8 * LENET300_MACS


def test_inputs_as_tensor_tuple_shape_and_list_of_shapes_agree():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 3)
            self.b = nn.Linear(7, 3)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    model = TwoInputs()
    by_shapes = netdiet.profile(model, [(2, 5), (2, 7)], progress=False)
    by_tensors = netdiet.profile(model, (torch.randn(2, 5), torch.randn(2, 7)), progress=False)
    assert by_shapes.totals["macs"] == by_tensors.totals["macs"] == 2 * (5 * 3 + 7 * 3)
    assert by_shapes.model == {"spec": None, "kwargs": {}, "class": "TwoInputs", "built_on": None}
    single = netdiet.profile(nn.Linear(6, 4), (3, 6), progress=False)
    assert single.totals["macs"] == 3 * 6 * 4
    assert netdiet.profile(nn.Linear(6, 4), torch.randn(3, 6), progress=False).totals["macs"] == 3 * 6 * 4


def test_depth_limits_the_module_rows():
    r = netdiet.profile("resnet", model_kw={"depth": 8}, depth=1, progress=False)
    assert max(m["depth"] for m in r.modules) == 1
    names = {m["name"] for m in r.modules}
    assert {"", "conv1", "layers", "fc"} <= names and "layers.0" not in names
    # inclusive costs: the children of the root add up to it (forward)
    root = next(m for m in r.modules if m["name"] == "")
    assert sum(m["macs"] for m in r.modules if m["depth"] == 1) == root["macs"]


def test_uncounted_operators_are_listed_not_zeroed(capsys):
    class Spectral(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return torch.fft.fft(self.fc(x)).abs()

    r = netdiet.profile(Spectral(), (1, 8), progress=False)
    assert r.uncounted.get("aten._fft_r2c", 0) >= 1
    from netdiet.reporting.profile_tables import profile_report
    from rich.console import Console
    Console(width=120).print(profile_report(r.to_dict()))
    assert "aten._fft_r2c" in capsys.readouterr().out


def test_batch_sweep_fits_memory_and_flops_against_independent_estimates():
    from netdiet.analysis.memory import estimate_memory
    r = netdiet.profile("lenet300", batch_sizes=[1, 4, 16], progress=False)
    pts = r.scaling.points
    assert [p.batch_size for p in pts] == [1, 4, 16]
    # each point's estimate is the memory engine's own figure at that batch
    x16 = (torch.randn(16, 1, 28, 28),)
    assert pts[2].peak_estimated == estimate_memory(netdiet.create_model("lenet300"), x16, optimizer="adam").peak_estimated
    # forward MACs are exactly linear in the batch
    assert [p.macs for p in pts] == [LENET300_MACS * b for b in (1, 4, 16)]
    fit = r.scaling.fit
    assert fit["flops"]["r2"] == pytest.approx(1.0)
    assert fit["memory_estimated"]["r2"] > 0.99
    # the fixed term is at least what does not grow: weights + gradients + Adam's two moments
    assert fit["memory_estimated"]["fixed"] >= 4 * 4 * LENET300_PARAMS * 0.95
    doc = r.to_dict()
    assert doc["scaling"]["points"][0]["batch_size"] == 1 and "memory_estimated" in doc["scaling"]["fit"]


def test_max_batch_for_is_exact_for_the_memory_estimate():
    from netdiet.analysis.memory import estimate_memory
    budget = 16 * 1024 * 1024
    r = netdiet.profile("lenet300", max_batch_for="16MiB", progress=False)
    b = r.max_batch["batch_size"]
    assert r.max_batch["budget"] == budget and b > 1
    model = netdiet.create_model("lenet300")
    at = estimate_memory(model, (torch.randn(b, 1, 28, 28),), optimizer="adam").peak_estimated
    above = estimate_memory(model, (torch.randn(b + 1, 1, 28, 28),), optimizer="adam").peak_estimated
    assert at <= budget < above
    assert r.max_batch["peak_estimated"] == at


def test_largest_batch_within_is_exported_for_the_trainer():
    b, est = netdiet.largest_batch_within(lambda: netdiet.create_model("lenet300"), (1, 1, 28, 28), "fp32", "8MiB",
                                          optimizer="sgd")
    assert b > 0 and est.peak_estimated <= 8 * 1024 * 1024 and est.optimizer == "sgd"


def test_projection_multiplies_the_counted_step_by_dataset_and_epochs():
    r = netdiet.profile("lenet300", batch_size=4, dataset_size=60_000, epochs=3, progress=False)
    pj = r.projection
    assert pj.total_train_flops == round(r.totals["train_flops"] / 4 * 60_000 * 3)
    assert pj.projected_seconds is None  # no throughput without --measure


def test_large_spec_is_profiled_on_the_meta_device(monkeypatch):
    import netdiet.analysis.profile as prof
    monkeypatch.setattr(prof, "META_THRESHOLD_BYTES", 1024)
    r = netdiet.profile("transformer", progress=False)  # tiny preset, treated as "too large to hold"
    assert r.device == "meta" and r.storage is None
    # 2 layers x 12 d^2 + d*vocab MACs per token (d=128, vocab=1000, 64 tokens) + attention 2 x 64^2 x 128 per layer
    d, v, t, layers = 128, 1000, 64, 2
    linear = t * (layers * 12 * d * d + d * v)
    assert linear <= r.totals["macs"] <= linear + layers * 2 * t * t * d


def test_measure_adds_measured_peak_latency_and_projected_time():
    r = netdiet.profile("lenet300", batch_size=8, measure=True, repeats=3, warmup=1, dataset_size=800, epochs=1,
                        progress=False)
    m = r.memory
    assert m["peak_measured"] > m["weights"] and m["measure_method"]
    assert abs(m["peak_estimated"] - m["peak_measured"]) / m["peak_measured"] < 0.10
    assert r.latency is not None
    assert r.projection.projected_seconds is not None and r.projection.projected_seconds > 0
    assert r.storage is not None


def test_cli_prints_tables_and_writes_the_same_numbers_as_json(capsys, tmp_path):
    out = tmp_path / "p.json"
    code, stdout, err = run_cli(capsys, "profile", "lenet300", "--json", str(out), "--optimizer", "sgd",
                                "--batch-size", "2")
    assert code == 0, err
    doc = json.loads(out.read_text())
    api_doc = netdiet.profile("lenet300", optimizer="sgd", batch_size=2, progress=False).to_dict()
    assert doc["totals"] == api_doc["totals"] and doc["memory"]["peak_estimated"] == api_doc["memory"]["peak_estimated"]
    assert doc["memory"]["optimizer_state"] == 0  # plain SGD keeps no state
    for needle in ("modules", "operators", "memory", "totals", "aten.addmm", "Linear"):
        assert needle in stdout


def test_weights_file_shows_the_real_sparsity_in_storage(tmp_path, capsys):
    from netdiet.fileio import save_state_dict
    model = netdiet.create_model("lenet300")
    with torch.no_grad():
        model[1].weight[:150] = 0.0          # half of the 300 output rows of the first Linear
    path = tmp_path / "pruned.safetensors"
    save_state_dict(path, model.state_dict())
    r = netdiet.profile("lenet300", weights=str(path), progress=False)
    row = next(p for p in r.storage["parameters"] if p["name"] == "1.weight")
    assert row["nonzero"] == 150 * 784 and row["sparsity"] == pytest.approx(0.5)
    assert r.model["weights"] == str(path)
    # weights of another model: one line, exit 2
    other = tmp_path / "other.safetensors"
    save_state_dict(other, netdiet.create_model("lenet5").state_dict())
    code, _, err = run_cli(capsys, "profile", "lenet300", "--weights", str(other))
    assert_one_line_exit_2(code, err, "does not fit model 'lenet300'")


def test_sweep_points_carry_memory_parts_and_the_fitted_line():
    r = netdiet.profile("lenet300", batch_sizes=[2, 6], max_batch_for="64MiB", progress=False)
    doc = r.to_dict()["scaling"]
    fit = doc["fit"]["memory_estimated"]
    for p in doc["points"]:
        assert p["weights"] == 4 * LENET300_PARAMS and p["gradients"] == 4 * LENET300_PARAMS
        assert p["peak_fitted"] == fit["fixed"] + fit["per_sample"] * p["batch_size"]
    # two points: the line passes through both (up to the rounding of the two terms to whole bytes)
    assert abs(doc["points"][1]["peak_fitted"] - doc["points"][1]["peak_estimated"]) <= 6
    assert doc["budget_bytes"] == 64 * 1024 * 1024


@pytest.mark.slow
def test_7b_preset_profiles_on_meta_with_hand_counted_macs():
    # 32 layers x 12 d^2 per token + the d x vocab head, plus causal attention: QK^T and AV over seq(seq+1)/2 scores
    b, t, d, layers, vocab = 8, 2048, 4096, 32, 32000
    r = netdiet.profile("transformer", model_kw={"preset": "7b"}, batch_size=b, progress=False)
    assert r.device == "meta" and r.storage is None and r.inputs == [{"shape": [b, t], "dtype": "int64"}]
    linear = b * t * (layers * 12 * d * d + d * vocab)
    attention = b * layers * 2 * d * t * (t + 1) // 2
    assert r.totals["macs"] == linear + attention
    assert r.totals["params"] == 6_714_695_680
    m = r.memory
    assert m["weights"] == 4 * r.totals["params"] and m["gradients"] == m["weights"]
    assert m["optimizer_state"] >= 2 * m["weights"]  # Adam's two moments


def test_dtype_and_optimizer_reach_the_memory_and_flop_figures():
    bf16 = netdiet.profile("lenet300", dtype="bf16", optimizer="none", progress=False)
    assert bf16.memory["dtype"] == "bf16" and bf16.memory["weights"] == 2 * LENET300_PARAMS
    assert bf16.totals["param_bytes"] == 4 * LENET300_PARAMS  # totals describe the model as given (fp32)
    assert bf16.totals["optimizer_flops"] == 0 and bf16.memory["optimizer_state"] == 0
    assert bf16.totals["train_flops"] == bf16.totals["train_forward_flops"] + bf16.totals["backward_flops"]


def test_error_raised_by_the_models_own_forward_is_one_line(capsys):
    code, _, err = run_cli(capsys, "profile", "transformer", "--input", "1,100")
    assert_one_line_exit_2(code, err, "input 1x100 does not fit model TransformerLM",
                           "sequence length 100 exceeds the model's seq_len 64")


def test_import_error_of_a_package_module_is_one_line(capsys):
    code, _, err = run_cli(capsys, "profile", "no_such_pkg_xyz.nets:build", "--input", "1,2")
    assert_one_line_exit_2(code, err, "cannot import module 'no_such_pkg_xyz.nets'")


def test_non_integer_options_are_one_line(capsys):
    code, _, err = run_cli(capsys, "profile", "lenet300", "--batch-size", "eight")
    assert_one_line_exit_2(code, err, "--batch-size 'eight' is not an integer >= 1")
    code, _, err = run_cli(capsys, "profile", "lenet300", "--depth", "-1")
    assert_one_line_exit_2(code, err, "--depth '-1' is not an integer >= 0")


def test_measure_ram_check_adds_the_deep_copy_of_the_weights_to_the_estimated_peak(capsys, monkeypatch, tmp_path):
    # regression: the check used the estimated peak alone, but measure_memory trains a deep copy, so the
    # caller's weights stay allocated too. lenet300: (784·300 + 300 + 300·100 + 100 + 100·10 + 10) floats
    import netdiet.analysis.profile as prof
    code, _, err = run_cli(capsys, "profile", "lenet300", "--json", str(tmp_path / "p.json"))
    assert code == 0, err
    peak = json.loads((tmp_path / "p.json").read_text())["memory"]["peak_estimated"]
    asked = []
    monkeypatch.setattr(prof, "check_fits_in_ram", lambda estimate_bytes, override: asked.append(estimate_bytes))

    def stop(*_a, **_k):
        raise NetdietError("stopped after the RAM check; nothing to measure in this test")
    monkeypatch.setattr(prof, "measure_memory", stop)
    code, _, err = run_cli(capsys, "profile", "lenet300", "--measure")
    assert code == 2 and "stopped after the RAM check" in err
    assert asked and set(asked) == {peak + 266_610 * 4}   # checked before materialising and before measuring


def test_profile_json_carries_the_cpu_rules_and_the_kernels_no_rule_covers():
    # a transposed conv has no CPU scratch rule: the estimate lists it as unmodelled, and the profile says so
    import netdiet
    from torch import nn

    model = nn.Sequential(nn.ConvTranspose2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 10 * 10, 3))
    doc = netdiet.profile(model, (1, 1, 8, 8), progress=False).to_dict()
    mem = doc["memory"]
    assert isinstance(mem["cpu_rules"], str) and mem["cpu_rules"]
    ops = {u["op"] for u in mem["unmodelled"]}
    assert any(op.startswith("aten.convolution") for op in ops), mem["unmodelled"]
    assert mem["warnings"] and all(isinstance(w, str) for w in mem["warnings"])
