"""quantize: the b-bit grids worked out by hand, ONNX Runtime int8 checked against the ONNX file itself."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from netdiet.compression.base import CompressionState, StageContext, create_technique
from netdiet.data.registry import Dataset
from netdiet.compression.quantize import _FakeQuant, ort_predict, ort_session, quantize_tensor
from netdiet.errors import NetdietError
from netdiet.models import create_model
from netdiet.training import TrainConfig, evaluate_accuracy, fit


@pytest.fixture(scope="module")
def trained_mlp(mnist5k):
    torch.manual_seed(0)
    model = create_model("mlp", widths=[64])
    fit(model, mnist5k.x_train, mnist5k.y_train, TrainConfig(epochs=1, batch_size=64, lr=2e-3, progress=False))
    return model


def _copy(model: nn.Module) -> nn.Module:
    out = create_model("mlp", widths=[64])
    out.load_state_dict(model.state_dict())
    return out


def test_int8_weight_codes_are_per_channel_symmetric_as_worked_by_hand():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.1, 0.2, -0.4, 0.0]]))
    model = nn.Sequential(lin)
    state = CompressionState()
    create_technique("quantize", mode="int8-weight").apply(model, state, StageContext())
    enc = state.encodings["0.weight"]
    # row 0: scale 1/127, w*127 = [127, -63.5, 31.75, 0] -> round half to even -> [127, -64, 32, 0]
    # row 1: scale 0.4/127, w/scale = [31.75, 63.5, -127, 0] -> [32, 64, -127, 0]
    assert enc.q.tolist() == [[127, -64, 32, 0], [32, 64, -127, 0]]
    assert torch.allclose(enc.scale, torch.tensor([1 / 127, 0.4 / 127]))
    assert enc.bits == 8 and enc.zero_point is None
    # the model computes with exactly the stored values
    assert torch.equal(lin.weight.data, enc.dequantize())


def test_int4_weight_codes_stay_within_seven_levels_and_half_a_step_of_the_weight():
    torch.manual_seed(1)
    w = torch.randn(16, 32)
    q, scale, zp = quantize_tensor(w, 4)
    assert zp is None and q.dtype == torch.int8
    assert int(q.abs().max()) == 7  # each row's largest |w| lands exactly on +-7
    assert torch.allclose(scale, w.abs().amax(1) / 7)
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6)


def test_one_bit_codes_are_signs_scaled_by_mean_magnitude():
    w = torch.tensor([[0.5, -1.5, 1.0, -1.0]])
    q, scale, zp = quantize_tensor(w, 1)
    assert q.tolist() == [[1, 0, 1, 0]]
    # value = (q - 0.5) * 2 * mean|w| = +-1.0
    value = (q.float() - zp[:, None]) * scale[:, None]
    assert value.tolist() == [[1.0, -1.0, 1.0, -1.0]]


@pytest.mark.parametrize("options, word", [({"bits": 0}, "bits"), ({"bits": 9}, "bits"), ({"bits": 3.5}, "bits"),
                                            ({"mode": "int3"}, "mode"), ({"mode": "dynamic", "bits": 4}, "bits"),
                                            ({"calibration_method": "mse"}, "calibration_method")])
def test_bad_options_raise_one_line_error_naming_the_option(options, word):
    with pytest.raises(NetdietError) as err:
        create_technique("quantize", **options)
    assert word in str(err.value) and "\n" not in str(err.value)


def test_quantize_keeps_pruned_weights_zero(trained_mlp):
    model = _copy(trained_mlp)
    w = model[1].weight
    keep = w.abs() > w.abs().median()
    with torch.no_grad():
        w.mul_(keep)
    state = CompressionState(masks={"1.weight": keep})
    create_technique("quantize", mode="int4-weight").apply(model, state, StageContext())
    assert torch.all(model[1].weight[~keep] == 0)
    assert int((model[1].weight != 0).sum()) <= int(keep.sum())


def test_fp16_and_bf16_round_every_parameter_to_a_representable_value(trained_mlp):
    for mode, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        model = _copy(trained_mlp)
        state = CompressionState()
        create_technique("quantize", mode=mode).apply(model, state, StageContext())
        for name, p in model.named_parameters():
            assert torch.equal(p.to(dtype).float(), p), name
            assert state.encodings[name].kind == "dense" and state.encodings[name].dtype == str(dtype).split(".")[1]
        # round to nearest: bf16 keeps 8 significant bits (relative error <= 2^-8), fp16 11 bits (<= 2^-11) down to
        # its subnormals, whose spacing is 2^-24 (absolute error <= 2^-25)
        diff = (model[1].weight - trained_mlp[1].weight).abs()
        rel = trained_mlp[1].weight.abs() * (2 ** -8 if mode == "bf16" else 2 ** -11)
        bound = rel if mode == "bf16" else torch.clamp(rel, min=2 ** -25)
        assert torch.all(diff <= bound)


def test_fake_quant_forward_is_on_the_grid_and_gradient_is_straight_through():
    torch.manual_seed(0)
    w = torch.randn(3, 5, requires_grad=True)
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[0, 0] = False
    fq = _FakeQuant(2, keep)
    out = fq(w)
    q, scale, _ = quantize_tensor(w, 2, keep=keep)
    assert torch.allclose(out, q.float() * scale[:, None] * keep)
    assert set(torch.unique(torch.round(out / scale[:, None])).tolist()) <= {-1.0, 0.0, 1.0}
    out.sum().backward()
    expected = keep.float()  # identity gradient, none for the pruned weight
    assert torch.equal(w.grad, expected)


def test_two_bit_qat_recovers_accuracy_that_two_bit_ptq_loses(trained_mlp, mnist5k):
    ptq = _copy(trained_mlp)
    create_technique("quantize", mode="int8-weight", bits=2).apply(ptq, CompressionState(), StageContext())
    qat = _copy(trained_mlp)
    state = CompressionState()
    half = dataclasses.replace(mnist5k, x_train=mnist5k.x_train[:2000], y_train=mnist5k.y_train[:2000])
    ctx = StageContext(data=half, finetune=TrainConfig(epochs=1, batch_size=64, lr=1e-3, progress=False), seed=0)
    create_technique("quantize", mode="qat", bits=2).apply(qat, state, ctx)
    acc_ptq = evaluate_accuracy(ptq, mnist5k.x_test, mnist5k.y_test)
    acc_qat = evaluate_accuracy(qat, mnist5k.x_test, mnist5k.y_test)
    assert acc_qat > acc_ptq
    enc = state.encodings["1.weight"]
    assert enc.bits == 2 and int(enc.q.abs().max()) <= 1
    assert torch.equal(qat[1].weight.data, enc.dequantize())  # what is stored is what was evaluated
    assert not any("parametrizations" in n for n, _ in qat.named_parameters())


def test_dynamic_int8_runs_on_onnxruntime_with_the_codes_stored_in_the_encodings(trained_mlp, mnist5k):
    import onnx
    from onnx import numpy_helper

    model = _copy(trained_mlp)
    acc_fp32 = evaluate_accuracy(model, mnist5k.x_test, mnist5k.y_test)
    state = CompressionState()
    create_technique("quantize", mode="dynamic").apply(model, state, StageContext(data=mnist5k))
    art = state.artifacts["onnx_int8"]
    assert "MatMulInteger" in art["ops"] and art["mode"] == "dynamic"
    proto = onnx.load_from_string(art["model"])
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    # follow each MatMulInteger's weight input (by position, not by name) to the codes ORT chose
    weights = [n.input[1] for n in proto.graph.node if n.op_type == "MatMulInteger"]
    assert len(weights) == 2
    by_init = {r["init"]: r for r in art["fill"] if "param" in r}
    assert {by_init[w]["param"] for w in weights} == {"1.weight", "3.weight"}
    for w in weights:
        codes = inits[w]
        assert codes.dtype == np.int8
        enc = state.encodings[by_init[w]["param"]]
        stored = enc.q.numpy()
        assert np.array_equal(codes.T if by_init[w]["transpose"] else codes, stored)
        # the stored values are a rounding of the trained weight: within half a step of it everywhere
        step = enc.scale.numpy()[:, None]
        original = trained_mlp.get_parameter(by_init[w]["param"]).detach().numpy()
        assert np.all(np.abs(enc.dequantize().numpy() - original) <= 0.5001 * step + 1e-7)
    session = ort_session(art["model"])
    pred_ort = ort_predict(session, mnist5k.x_test).argmax(1)
    pred_pt = model(mnist5k.x_test).argmax(1)
    assert (pred_ort == pred_pt).float().mean() >= 0.98
    assert (pred_ort == mnist5k.y_test).float().mean() >= acc_fp32 - 0.01


def _rename_initializers(blob: bytes, rename) -> bytes:
    """The same int8 graph with every initializer renamed by `rename(old) -> new` (and every use of it)."""
    import onnx

    proto = onnx.load_from_string(blob)
    names = {i.name: rename(i.name) for i in proto.graph.initializer}
    for init in proto.graph.initializer:
        init.name = names[init.name]
    for node in proto.graph.node:
        for k, inp in enumerate(node.input):
            node.input[k] = names.get(inp, inp)
    return proto.SerializeToString()


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_harvest_reads_the_same_codes_under_every_initializer_naming_scheme(trained_mlp, mnist5k, mode):
    # ORT 1.31 named the codes '<w>_quantized', 1.32 '<w>_Transposed_quantized'; an exporter may name a weight
    # 'val_17'. Whatever the names, the harvest must find the same codes, scales and parameters.
    from netdiet.compression.onnxrt import harvest_onnx_weights

    model = _copy(trained_mlp)
    state = CompressionState()
    create_technique("quantize", mode=mode, calibration_samples=64).apply(model, state, StageContext(data=mnist5k))
    blob = state.artifacts["onnx_int8"]["model"]
    reference, _, _ = harvest_onnx_weights(model, blob)
    assert set(reference) == {"1.weight", "3.weight"}
    schemes = {
        "ort-1.31": lambda n: n.replace("_Transposed", ""),
        "ort-1.32": lambda n: n.replace(".weight_", ".weight_Transposed_") if "_Transposed" not in n else n,
        "opaque": lambda n: f"val_{abs(hash(n)) % 10**6}_{len(n)}",
    }
    for scheme, rename in schemes.items():
        encodings, fill, graph_only = harvest_onnx_weights(model, _rename_initializers(blob, rename))
        assert set(encodings) == set(reference), scheme
        assert graph_only == [], scheme
        for name, enc in encodings.items():
            assert torch.equal(enc.q, reference[name].q) and torch.equal(enc.scale, reference[name].scale), scheme
        assert {r["param"] for r in fill if "param" in r} == set(reference), scheme


def test_an_int8_node_netdiet_cannot_read_names_the_ort_version_and_the_node(trained_mlp, mnist5k):
    import onnx
    import onnxruntime

    from netdiet.compression.onnxrt import harvest_onnx_weights

    model = _copy(trained_mlp)
    state = CompressionState()
    create_technique("quantize", mode="dynamic").apply(model, state, StageContext(data=mnist5k))
    proto = onnx.load_from_string(state.artifacts["onnx_int8"]["model"])
    node = next(n for n in proto.graph.node if n.op_type == "MatMulInteger")
    node.op_type, node.name = "MatMulInteger2030", "future_node"  # an op a later ORT might write
    with pytest.raises(NetdietError) as err:
        harvest_onnx_weights(model, proto.SerializeToString())
    msg = str(err.value)
    assert f"onnxruntime {onnxruntime.__version__}" in msg and "MatMulInteger2030" in msg and "future_node" in msg
    assert "requirements.lock" in msg and "\n" not in msg


def test_an_onnxruntime_older_than_supported_is_one_line_naming_the_version(monkeypatch):
    from netdiet.compression import onnxrt

    monkeypatch.setattr(onnxrt, "ort_version", lambda: "1.16.3")
    with pytest.raises(NetdietError, match=r"onnxruntime 1\.16\.3 is older than netdiet supports \(>= 1\.18\)"):
        onnxrt.check_onnxruntime()


def test_static_int8_calibrates_the_input_scale_from_the_data_range(trained_mlp, mnist5k):
    import onnx
    from onnx import numpy_helper

    model = _copy(trained_mlp)
    state = CompressionState()
    create_technique("quantize", mode="static", calibration_samples=128, exporter="torchscript").apply(
        model, state, StageContext(data=mnist5k))
    proto = onnx.load_from_string(state.artifacts["onnx_int8"]["model"])
    first_q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    scale, zp = float(inits[first_q.input[1]]), int(inits[first_q.input[2]])
    lo, hi = float(mnist5k.x_train[:128].min()), float(mnist5k.x_train[:128].max())
    assert (lo, hi) == (0.0, 1.0)
    # uint8 min-max calibration of pixels in [0, 1]: scale (1 - 0) / 255, zero point 0
    assert scale == pytest.approx(1 / 255, rel=1e-6) and zp == 0
    acc = (ort_predict(ort_session(proto.SerializeToString()), mnist5k.x_test).argmax(1) == mnist5k.y_test).float().mean()
    assert acc >= evaluate_accuracy(trained_mlp, mnist5k.x_test, mnist5k.y_test) - 0.01


def test_static_without_calibration_data_is_bad_input(trained_mlp):
    with pytest.raises(NetdietError, match="calibration"):
        create_technique("quantize", mode="static").apply(_copy(trained_mlp), CompressionState(), StageContext())


@pytest.mark.parametrize("mode,exporter", [("dynamic", "torchscript"), ("dynamic", "dynamo"), ("static", "torchscript")])
def test_a_batchnorm_convnet_keeps_its_own_conv_codes_and_the_int8_archive_stores_each_weight_once(tmp_path, mode,
                                                                                                    exporter):
    # exporters fold eval-mode BatchNorm into the conv weight unless told not to; folded codes round
    # w * gamma / sqrt(var + eps), not w, and an archive then had to keep both (a user's BN CNN came out 0.8x
    # "smaller" than fp32). BatchNorm stays a node, so the conv's codes are a rounding of its own weight.
    import onnx

    from netdiet.compression import archive

    torch.manual_seed(0)
    model = create_model("cnn", channels=[8]).eval()
    with torch.no_grad():
        model[1].running_var.fill_(4.0)
        model[1].running_mean.fill_(0.5)
    conv = model[0].weight.detach().clone()
    state = CompressionState(spec={"spec": "cnn", "kwargs": {"channels": [8]}})
    x = torch.rand(16, 1, 28, 28)
    create_technique("quantize", mode=mode, exporter=exporter, calibration_samples=16).apply(
        model, state, StageContext(example_inputs=x[:1],
                                   data=Dataset(name="t", x_train=x, y_train=torch.zeros(16, dtype=torch.long),
                                                x_test=x, y_test=torch.zeros(16, dtype=torch.long),
                                                num_classes=10)))
    ops = {n.op_type for n in onnx.load_from_string(state.artifacts["onnx_int8"]["model"]).graph.node}
    assert "BatchNormalization" in ops
    enc = state.encodings["0.weight"]
    step = enc.scale.view(-1, 1, 1, 1)
    assert torch.all((model[0].weight - conv).abs() <= 0.5001 * step + 1e-7)  # its own weight, rounded
    assert "6.weight" in state.encodings  # the Linear head (after Flatten, Dropout) is int8 in both runtimes
    path = tmp_path / "cnn.ndz"
    archive.write(path, model, state)
    header = archive.read(path).header
    int8_fill = {r["param"] for r in header["artifacts"]["onnx_int8"]["fill"] if "param" in r}
    assert {"0.weight", "6.weight"} <= int8_fill  # the graph's codes are refilled from the archive's own
    assert header["dense_fp32_bytes"] / path.stat().st_size > 2.0


@pytest.mark.parametrize("release", ["1.31", "1.32"])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_harvest_reads_graphs_written_by_two_ort_releases(release, mode):
    # tests/data holds the int8 graphs ORT 1.31.1 and 1.32.0 wrote for this seeded MLP (1.32 renamed the codes
    # '<w>_Transposed_quantized'); whichever ORT is installed must read both, and run them
    import onnx

    from netdiet.compression.onnxrt import harvest_onnx_weights

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with open(f"tests/data/ort-{release}-{mode}.onnx", "rb") as fh:
        blob = fh.read()
    names = {i.name for i in onnx.load_from_string(blob).graph.initializer}
    assert ("0.weight_Transposed_quantized" in names) == (release == "1.32" and mode == "dynamic")
    encodings, fill, graph_only = harvest_onnx_weights(model, blob)
    assert set(encodings) == {"0.weight", "2.weight"} and graph_only == []
    for name, enc in encodings.items():
        w = model.get_parameter(name).detach()
        assert enc.q.shape == w.shape and enc.scale.shape == (w.shape[0],)
        # ORT's symmetric per-channel int8: scale = max|w| / 127 per output row, codes within half a step
        assert torch.allclose(enc.scale, w.abs().amax(1) / 127, rtol=1e-6)
        assert torch.all((enc.dequantize() - w).abs() <= 0.5001 * enc.scale[:, None])
    with torch.no_grad():
        for name, enc in encodings.items():
            model.get_parameter(name).copy_(enc.dequantize())
        x = torch.rand(64, 16, generator=torch.Generator().manual_seed(1))
        ref = model(x)
    out = ort_predict(ort_session(blob), x)
    # same weights in both runtimes; the activations' int8 rounding (and, static, clipping to the calibrated
    # range: up to 0.09 on single outputs) is ORT's alone
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    assert (out - ref).abs().mean() < 0.01


def test_a_bias_free_conv_keeps_no_fp32_copy_of_its_weight_in_the_int8_graph(tmp_path):
    # the dynamo export computes a bias-free conv's zero bias from Shape(weight); that read kept every fp32 conv
    # weight in ORT's int8 graph, and a ResNet's int8 archive was 0.9x "smaller" than fp32
    import onnx

    from netdiet.compression import archive

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval()
    state = CompressionState()
    create_technique("quantize", mode="dynamic", exporter="dynamo").apply(
        model, state, StageContext(example_inputs=torch.zeros(1, 1, 12, 12)))
    graph = onnx.load_from_string(state.artifacts["onnx_int8"]["model"]).graph
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4}
    assert floats == set()
    assert {"0.weight", "3.weight", "7.weight"} <= set(state.encodings)
    path = tmp_path / "m.ndz"
    archive.write(path, model, state)
    dense = archive.read_header(path.read_bytes())[0]["dense_fp32_bytes"]
    assert dense / path.stat().st_size > 2.5
