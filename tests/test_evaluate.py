"""`netdiet evaluate`: the figures of the stored model, and exit 2 for missing or damaged archives."""
from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
import zstandard

from netdiet import api
from netdiet.cli import main
from netdiet.compression import archive
from netdiet.compression.evaluate import evaluate
from netdiet.errors import NetdietError
from netdiet.compression.base import CompressionState, StageContext, create_technique
from netdiet.models import create_model
from netdiet.training import evaluate_accuracy


def _int4_lenet300(tmp_path):
    torch.manual_seed(0)
    model = create_model("lenet300")
    state = CompressionState(spec={"spec": "lenet300", "kwargs": {}})
    create_technique("quantize", mode="int4-weight").apply(model, state, StageContext())
    path = tmp_path / "m.ndz"
    size = archive.write(path, model, state, header={"recipe": "int4"})
    return model, path, size


def test_evaluate_cli_reports_the_stored_models_accuracy_bytes_ratio_and_macs(tmp_path, capsys):
    from netdiet.data import get_dataset
    torch.manual_seed(0)
    spec = {"spec": "mlp", "kwargs": {"widths": [32], "in_features": 64}}
    model = create_model("mlp", **spec["kwargs"])
    state = CompressionState(spec=spec)
    create_technique("quantize", mode="int4-weight").apply(model, state, StageContext())
    path = tmp_path / "m.ndz"
    size = archive.write(path, model, state)
    out = tmp_path / "ev.json"
    assert main(["evaluate", str(path), "--data", "digits", "--no-latency", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    digits = get_dataset("digits")
    assert doc["schema"] == "netdiet.evaluate/1"
    assert doc["bytes_on_disk"] == size == path.stat().st_size
    assert doc["dense_fp32_bytes"] == archive.dense_fp32_bytes(create_model("mlp", **spec["kwargs"]))
    assert doc["ratio"] == doc["dense_fp32_bytes"] / size
    assert doc["accuracy"] == evaluate_accuracy(model, digits.x_test, digits.y_test)
    assert doc["samples"] == len(digits.y_test)
    assert doc["macs"] == 64 * 32 + 32 * 10  # multiply-accumulates per 8x8 image
    assert doc["runtime"] == "pytorch" and doc["latency_ms"] == {"pytorch": None, "onnxruntime": None}
    assert {t["name"]: t["bits"] for t in doc["tensors"]}["1.weight"] == 4
    assert "ratio" in capsys.readouterr().out


def test_evaluate_api_times_both_runtimes_of_an_int8_onnx_archive(tmp_path, mnist5k):
    from netdiet import api
    model = create_model("mlp", widths=[32])
    state = CompressionState(spec={"spec": "mlp", "kwargs": {"widths": [32]}})
    create_technique("quantize", mode="dynamic", exporter="torchscript").apply(model, state, StageContext(data=mnist5k))
    path = tmp_path / "q.ndz"
    archive.write(path, model, state)
    result = api.evaluate(str(path), mnist5k, repeats=3, warmup=1, latency_batch=16)
    assert result.runtime == "onnxruntime-int8" and result.accuracy == result.accuracy_onnxruntime
    assert result.accuracy_pytorch == evaluate_accuracy(model, mnist5k.x_test, mnist5k.y_test)
    assert result.latency_ms["pytorch"] > 0 and result.latency_ms["onnxruntime"] > 0
    assert result.latency_batch == 16


def test_evaluate_on_data_that_does_not_fit_the_model_exits_2(tmp_path, capsys):
    model = create_model("mlp", widths=[8], in_features=64)
    archive.write(tmp_path / "d.ndz", model, CompressionState(spec={"spec": "mlp", "kwargs": {"widths": [8], "in_features": 64}}))
    assert main(["evaluate", str(tmp_path / "d.ndz"), "--data", "synthetic", "--no-latency"]) == 2
    assert "cannot run on synthetic inputs" in capsys.readouterr().err


def test_evaluate_missing_or_corrupted_archive_exits_2_with_one_line(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing.ndz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    _, path, _ = _int4_lenet300(tmp_path)
    data = path.read_bytes()
    (tmp_path / "bad.ndz").write_bytes(data[: len(data) // 2])
    assert main(["evaluate", str(tmp_path / "bad.ndz"), "--no-latency"]) == 2
    err = capsys.readouterr().err
    assert "checksum" in err and err.count("\n") == 1


def test_evaluate_works_out_the_dense_size_instead_of_repeating_the_headers_claim(tmp_path):
    # before: a header saying dense_fp32_bytes = 1e40 was reported as a 5.2e35x ratio
    model, path, size = _int4_lenet300(tmp_path)
    header, payload = archive.read_header(path.read_bytes())
    header = dict(header, dense_fp32_bytes=10 ** 18)
    head = zstandard.ZstdCompressor().compress(json.dumps(header).encode())
    data = archive.MAGIC + struct.pack("<I", len(head)) + head + payload
    (tmp_path / "claim.ndz").write_bytes(data + hashlib.sha256(data).digest())
    result = api.evaluate(str(tmp_path / "claim.ndz"), None, latency=False)
    assert result.dense_fp32_bytes == archive.dense_fp32_bytes(create_model("lenet300"))
    assert 5 < result.ratio < 10  # int4: about 7.6x, not 10 ** 18 / size


def test_evaluate_passes_max_memory_to_the_reader(tmp_path):
    _, path, _ = _int4_lenet300(tmp_path)
    with pytest.raises(NetdietError, match="max_memory is 1.00 MiB"):
        evaluate(path, None, latency=False, max_memory=1 << 20)
    assert evaluate(path, None, latency=False, max_memory=1 << 30).params == 266_610


def test_evaluate_cli_max_memory_refuses_an_archive_above_it_in_one_line(tmp_path, capsys):
    _, path, _ = _int4_lenet300(tmp_path)
    assert main(["evaluate", str(path), "--data", "mnist5k", "--no-latency", "--max-memory", "1MiB"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "max_memory is 1.00 MiB" in err
    assert main(["evaluate", str(path), "--data", "mnist5k", "--no-latency", "--max-memory", "a lot"]) == 2
    assert "cannot read size 'a lot'" in capsys.readouterr().err
