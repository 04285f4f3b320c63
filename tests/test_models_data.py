"""The zoo builds what it says, the loader finds users' code, the datasets are what they claim."""
import textwrap

import pytest
import torch

from netdiet.data import get_dataset
from netdiet.errors import NetdietError
from netdiet.models import create_model, default_inputs, make_inputs, parse_model_kw


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_lenet300_has_266610_parameters():
    # 784*300+300 + 300*100+100 + 100*10+10
    assert n_params(create_model("lenet300")) == 266_610


def test_lenet5_is_the_431k_caffe_variant():
    # conv1 20*1*25+20, conv2 50*20*25+50, fc1 800*500+500, fc2 500*10+10
    assert n_params(create_model("lenet5")) == 520 + 25_050 + 400_500 + 5_010 == 431_080


def test_transformer_7b_preset_is_about_seven_billion_on_meta():
    with torch.device("meta"):
        m = create_model("transformer", preset="7b")
    assert 6.5e9 < n_params(m) < 7.0e9


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "mlp", "cnn", "resnet", "mobilenet", "transformer", "yolo"])
def test_every_zoo_model_runs_its_default_input(name):
    model = create_model(name)
    shape, dtype, high = default_inputs(name)
    out = model(make_inputs(shape, dtype, high=high))
    assert out is not None


def test_mobilenet_uses_depthwise_convolutions():
    m = create_model("mobilenet")
    assert any(isinstance(x, torch.nn.Conv2d) and x.groups == x.in_channels > 1 for x in m.modules())


def test_model_kw_parses_literals_and_words():
    assert parse_model_kw(["depth=32", "widths=[300,100]", "preset=7b", "dropout=0.5"]) == {
        "depth": 32, "widths": [300, 100], "preset": "7b", "dropout": 0.5}


def test_unknown_zoo_name_suggests_closest():
    with pytest.raises(NetdietError, match="did you mean 'lenet5'"):
        create_model("lenet6")


def test_user_file_callable_and_import_error(tmp_path):
    good = tmp_path / "net.py"
    good.write_text(textwrap.dedent("""
        import torch
        def build(width=4):
            return torch.nn.Linear(3, width)
        def broken():
            raise RuntimeError("boom")
    """))
    assert n_params(create_model(f"{good}:build", width=5)) == 3 * 5 + 5
    with pytest.raises(NetdietError, match="raised RuntimeError: boom"):
        create_model(f"{good}:broken")
    bad = tmp_path / "bad.py"
    bad.write_text("import not_a_module_anywhere\n")
    with pytest.raises(NetdietError, match="importing .* failed"):
        create_model(f"{bad}:build")
    with pytest.raises(NetdietError, match="cannot import module"):
        create_model("no_such_pkg.mod:build")


def test_mnist5k_is_a_fixed_stratified_4000_1000_split(mnist5k):
    assert mnist5k.x_train.shape == (4000, 1, 28, 28) and mnist5k.x_test.shape == (1000, 1, 28, 28)
    assert mnist5k.y_train.bincount().tolist() == [400] * 10
    assert mnist5k.y_test.bincount().tolist() == [100] * 10
    assert 0.0 <= mnist5k.x_train.min() and mnist5k.x_train.max() <= 1.0
    again = get_dataset("mnist5k", seed=123)  # the split does not depend on the training seed
    assert torch.equal(again.y_test, mnist5k.y_test)


def test_idx_reader_reads_torchvision_layout(tmp_path):
    import gzip
    import numpy as np
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    labels = np.array([3, 7], dtype=np.uint8)
    def idx(arr):
        return bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx(imgs))
        with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz", "wb") as fh:
            fh.write(idx(labels))
    d = get_dataset("mnist", data_dir=str(tmp_path))
    assert d.x_train.shape == (2, 1, 28, 28) and d.y_test.tolist() == [3, 7]
    assert d.x_train[1, 0, 0, 0].item() == pytest.approx(((28 * 28) % 256) / 255)
