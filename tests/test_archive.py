"""The .ndz archive: exact round trips, sizes worked out by hand, and a fuzz of >= 1,000 damaged archives."""
from __future__ import annotations

import hashlib
import json
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from netdiet.compression import archive, codecs
from netdiet.compression.base import CompressionState, Encoding, StageContext, create_technique
from netdiet.errors import NetdietError
from netdiet.models import create_model

SPEC = {"spec": "mlp", "kwargs": {"widths": [8], "in_features": 16, "num_classes": 4}}


def _small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(SPEC["spec"], **SPEC["kwargs"])


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


def _pruned_small(fraction: float = 0.75) -> tuple[nn.Module, CompressionState]:
    model = _small_model()
    state = CompressionState(spec=SPEC)
    with torch.no_grad():
        for name in ("1.weight", "3.weight"):
            p = model.get_parameter(name)
            keep = p.abs() > p.abs().flatten().kthvalue(int(p.numel() * fraction)).values
            p.mul_(keep)
            state.masks[name] = keep
    return model, state


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("mode", [None, "int8-weight", "int4-weight", "fp16", "bf16"])
def test_round_trip_is_bit_exact_for_every_weight_encoding(mode):
    model, state = _pruned_small()
    if mode:
        options = {"mode": mode}
        create_technique("quantize", **options).apply(model, state, StageContext())
    loaded = archive.read(archive.encode(model, state, header={"recipe": "test", "metrics": {"accuracy": 0.5}}))
    assert _states_equal(model, loaded.model)
    assert loaded.header["recipe"] == "test" and loaded.header["metrics"] == {"accuracy": 0.5}
    for name, mask in state.masks.items():
        assert torch.equal(loaded.state.masks[name], mask)
    for name, enc in state.encodings.items():
        got = loaded.state.encodings[name]
        assert got.kind == enc.kind and got.bits == enc.bits
        if enc.kind == "quant":
            keep = state.masks.get(name, torch.ones_like(enc.q, dtype=torch.bool))
            assert torch.equal(got.q[keep], enc.q[keep]) and torch.equal(got.scale, enc.scale)


def test_round_trip_of_one_bit_and_cluster_encodings_is_bit_exact():
    model, state = _pruned_small(0.5)
    create_technique("quantize", mode="int8-weight", bits=1).apply(model, state, StageContext())
    # a 2-bit cluster encoding on the last layer, without a zero centroid (pruned zeros come from the positions)
    w = model[3].weight
    codebook = torch.tensor([-0.3, -0.1, 0.2, 0.4])
    idx = torch.randint(0, 4, w.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        w.copy_(codebook[idx] * state.masks["3.weight"])
    state.encodings["3.weight"] = Encoding(kind="cluster", bits=2, codebook=codebook, indices=idx)
    data = archive.encode(model, state)
    loaded = archive.read(data)
    assert _states_equal(model, loaded.model)
    assert loaded.header["warnings"] == []
    assert loaded.state.encodings["1.weight"].bits == 1 and loaded.state.encodings["3.weight"].kind == "cluster"
    assert torch.equal(loaded.state.encodings["3.weight"].codebook, codebook)


def test_stale_encoding_is_stored_dense_with_a_warning_so_the_file_still_holds_the_evaluated_weights():
    model, state = _pruned_small()
    create_technique("quantize", mode="int4-weight").apply(model, state, StageContext())
    with torch.no_grad():
        model[1].weight.mul_(1.01)  # e.g. fine-tuned after quantization without re-encoding
    loaded = archive.read(archive.encode(model, state))
    assert _states_equal(model, loaded.model)
    assert any("1.weight" in w for w in loaded.header["warnings"])
    assert "1.weight" not in loaded.state.encodings


def test_dense_fp32_bytes_is_the_size_of_the_safetensors_file(tmp_path):
    from netdiet.fileio import save_state_dict
    model = create_model("lenet300")
    save_state_dict(tmp_path / "m.safetensors", model.state_dict())
    assert archive.dense_fp32_bytes(model) == (tmp_path / "m.safetensors").stat().st_size
    # 266,610 fp32 values + a JSON header of a few hundred bytes
    assert 4 * 266_610 < archive.dense_fp32_bytes(model) < 4 * 266_610 + 1024


def test_write_is_atomic_and_returns_the_bytes_on_disk(tmp_path):
    model, state = _pruned_small()
    n = archive.write(tmp_path / "m.ndz", model, state)
    assert n == (tmp_path / "m.ndz").stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["m.ndz"]  # no temp file left behind


# ------------------------------------------------------------------ the pieces, by hand
def test_relative_indices_insert_filler_codes_for_long_gaps():
    # positions 0, 3, 20 at 3 bits (skip code 7): gaps 0, 2, 16 = 7 + 7 + 2 -> codes 0, 2, 7, 7, 2
    codes = codecs.relidx_codes(np.array([0, 3, 20]), 3)
    assert codes.tolist() == [0, 2, 7, 7, 2]
    assert codecs.relidx_positions(codes, 3, 21, 3).tolist() == [0, 3, 20]


def test_bit_packing_stores_each_code_in_exactly_its_bit_width():
    values = np.array([5, 0, 7, 1, 2, 3, 4, 6, 5])
    packed = codecs.pack_bits(values, 3)
    assert len(packed) == math.ceil(9 * 3 / 8) == 4
    assert codecs.unpack_bits(packed, 3, 9).tolist() == values.tolist()


def test_huffman_code_is_optimal_on_a_dyadic_distribution_and_decodes_back():
    # frequencies 8:4:2:1:1 -> code lengths 1, 2, 3, 4, 4; 16 symbols take 8+8+6+4+4 = 30 bits
    symbols = np.array([0] * 8 + [1] * 4 + [2] * 2 + [3] + [4])
    rng = np.random.default_rng(0)
    rng.shuffle(symbols)
    assert codecs.huffman_lengths(np.bincount(symbols)).tolist() == [1, 2, 3, 4, 4]
    blob = codecs.huffman_encode(symbols, 8)
    assert len(blob) == 4 + 5 + math.ceil(30 / 8)  # alphabet size, 5 code lengths, the bit stream
    assert codecs.huffman_decode(blob, len(symbols)).tolist() == symbols.tolist()


def test_pruned_int4_lenet300_is_as_small_as_its_codes_and_positions_say():
    model = create_model("lenet300")
    state = CompressionState(spec={"spec": "lenet300", "kwargs": {}})
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:  # keep 8 % of each weight matrix at random positions
                keep = torch.rand(p.shape) < 0.08
                p.mul_(keep)
                state.masks[name] = keep
    create_technique("quantize", mode="int4-weight").apply(model, state, StageContext())
    size = len(archive.encode(model, state))
    # upper bound by hand: per weight matrix 4-bit codes + a bitmask + fp32 scales; fp32 biases; 2 KiB header
    bound = 0
    for name, p in model.named_parameters():
        if p.dim() == 2:
            bound += math.ceil(int(state.masks[name].sum()) * 4 / 8) + math.ceil(p.numel() / 8) + 4 * p.shape[0]
        else:
            bound += 4 * p.numel()
    assert size <= bound + 2048
    assert archive.dense_fp32_bytes(model) / size > 25
    rows = archive.breakdown(model, state)
    assert {r["name"]: r["encoding"] for r in rows}["1.weight"] == "quant"
    assert sum(r["nonzero"] for r in rows if r["name"].endswith("weight")) == sum(int(m.sum()) for m in state.masks.values())


def test_int8_onnx_artefact_round_trips_without_storing_its_weights_twice(mnist5k):
    from netdiet.compression.quantize import ort_predict, ort_session
    model = create_model("lenet300")
    state = CompressionState(spec={"spec": "lenet300", "kwargs": {}})
    create_technique("quantize", mode="dynamic", exporter="torchscript").apply(model, state, StageContext(data=mnist5k))
    original = state.artifacts["onnx_int8"]["model"]
    data = archive.encode(model, state)
    loaded = archive.read(data)
    stream = loaded.header["artifacts"]["onnx_int8"]["stream"]
    assert stream["len"] < 0.05 * len(original)          # graph + small constants only; codes come from the tensors
    assert len(data) < 0.3 * archive.dense_fp32_bytes(model)  # int8 once, not twice
    x = mnist5k.x_test[:64]
    assert torch.equal(ort_predict(ort_session(original), x), ort_predict(ort_session(loaded.state.artifacts["onnx_int8"]["model"]), x))


def test_onnx_artefact_that_no_longer_matches_the_weights_is_refused():
    model = create_model("lenet300")
    state = CompressionState(spec={"spec": "lenet300", "kwargs": {}})
    create_technique("quantize", mode="dynamic", exporter="torchscript").apply(
        model, state, StageContext(example_inputs=torch.zeros(1, 1, 28, 28)))
    state.encodings["1.weight"].q[0, 0] += 1
    with pytest.raises(NetdietError, match="stale"):
        archive.encode(model, state)


# ------------------------------------------------------------------ no code from the file
def test_user_code_model_is_imported_only_when_the_caller_names_it(tmp_path):
    flag = tmp_path / "imported.txt"
    src = tmp_path / "mymodel.py"
    src.write_text("import pathlib, torch.nn as nn\n"
                   f"pathlib.Path({str(flag)!r}).write_text('yes')\n"
                   "def build():\n    return nn.Sequential(nn.Linear(3, 2))\n")
    spec = f"{src}:build"
    from netdiet.models import create_model as make
    model = make(spec)
    flag.unlink()
    data = archive.encode(model, CompressionState(spec={"spec": spec, "kwargs": {}}))
    with pytest.raises(NetdietError, match="user code"):
        archive.read(data)
    assert not flag.exists()
    with pytest.raises(NetdietError, match="holds model"):
        archive.read(data, model_spec="lenet300")
    loaded = archive.read(data, model_spec=spec)
    assert _states_equal(model, loaded.model)


def test_missing_truncated_and_foreign_files_are_clean_errors(tmp_path):
    model, state = _pruned_small()
    data = archive.encode(model, state)
    with pytest.raises(NetdietError, match="does not exist"):
        archive.read(tmp_path / "missing.ndz")
    with pytest.raises(NetdietError, match="checksum"):
        archive.read(data[:-1])
    with pytest.raises(NetdietError, match="not a netdiet archive"):
        archive.read(b"PK\x03\x04" + data[4:])
    with pytest.raises(NetdietError, match="checksum"):
        archive.read(data[:40] + bytes([data[40] ^ 1]) + data[41:])


# ------------------------------------------------------------------ fuzz
def _seal(header: dict, payload: bytes) -> bytes:
    """An archive with valid checksums around a (possibly damaged) header and payload."""
    import zstandard
    header = dict(header, payload_bytes=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest())
    head = zstandard.ZstdCompressor().compress(json.dumps(header).encode())
    data = archive.MAGIC + struct.pack("<I", len(head)) + head + payload
    return data + hashlib.sha256(data).digest()


@pytest.fixture(scope="module")
def small_archive() -> bytes:
    model, state = _pruned_small()
    create_technique("quantize", mode="int4-weight").apply(model, state, StageContext())
    with torch.no_grad():
        model[1].bias.copy_(model[1].bias.half().float())
    state.encodings["1.bias"] = Encoding(kind="dense", bits=16, dtype="float16")
    return archive.encode(model, state)


def _expect_clean(data: bytes, original: bytes) -> None:
    try:
        loaded = archive.read(data)
    except NetdietError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(loaded.model, nn.Module)  # an accepted archive must rebuild a usable model
    loaded.model(torch.zeros(1, 16))


_FUZZ = settings(max_examples=600, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow], derandomize=True)


@_FUZZ
@given(st.data())
def test_fuzz_random_byte_damage_always_gives_a_clean_netdiet_error(small_archive, data):
    raw = bytearray(small_archive)
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
    pos = data.draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        raw = raw[:pos]
    elif kind == "insert":
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    elif kind == "delete":
        del raw[pos:pos + data.draw(st.integers(1, 8))]
    else:
        chunk = data.draw(st.binary(min_size=1, max_size=16))
        raw[pos:pos + len(chunk)] = chunk
    if bytes(raw) == small_archive:
        return
    with pytest.raises(NetdietError):
        archive.read(bytes(raw))


_JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 40), 2 ** 40), st.text(max_size=6),
                         st.lists(st.integers(-3, 40), max_size=4),
                         st.dictionaries(st.sampled_from(["off", "len", "codec", "raw", "n", "bits", "method"]),
                                         st.one_of(st.integers(-2, 1 << 20), st.sampled_from(["raw", "zstd", "pack", "huffman", "relidx", "bitmask", "all"])),
                                         max_size=4))


@_FUZZ
@given(st.data())
def test_fuzz_resealed_damage_past_the_checksum_is_caught_by_the_decoder(small_archive, data):
    header, payload = archive.read_header(small_archive)
    header = json.loads(json.dumps(header))
    payload = bytearray(payload)
    target = data.draw(st.sampled_from(["payload", "tensor-field", "stream-field", "top-field"]))
    if target == "payload":
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(0, len(payload) - 1))
            payload[pos] = data.draw(st.integers(0, 255))
    elif target == "tensor-field":
        entry = data.draw(st.sampled_from(header["tensors"]))
        key = data.draw(st.sampled_from(sorted(entry) + ["extra"]))
        entry[key] = data.draw(_JSON_VALUES)
    elif target == "stream-field":
        entry = data.draw(st.sampled_from(header["tensors"]))
        streams = [v for v in entry.values() if isinstance(v, dict) and "off" in v]
        stream = data.draw(st.sampled_from(streams))
        stream[data.draw(st.sampled_from(["off", "len", "codec", "raw", "n", "bits"]))] = data.draw(
            st.one_of(st.integers(-5, 5000), st.sampled_from(["raw", "zstd", "pack", "pack+zstd", "byte+zstd", "huffman"])))
    else:
        key = data.draw(st.sampled_from(["tensors", "masks", "structure", "artifacts", "format", "model"]))
        header[key] = data.draw(_JSON_VALUES)
    _expect_clean(_seal(header, bytes(payload)), small_archive)


def test_fuzz_reseal_helper_reproduces_a_readable_archive(small_archive):
    header, payload = archive.read_header(small_archive)
    loaded = archive.read(_seal(header, payload))
    assert loaded.header["tensors"] == header["tensors"]


def test_breakdown_rows_add_up_to_the_archive_size():
    model, state = _pruned_small()
    create_technique("quantize", mode="int4-weight").apply(model, state, StageContext())
    rows = archive.breakdown(model, state)
    assert sum(r["bytes"] for r in rows) == len(archive.encode(model, state))
    assert rows[-1]["name"] == "header+framing" and 0 < rows[-1]["bytes"] < 2048


# ------------------------------------------------------------------ hostile headers (issue 11): bounded memory and time
@pytest.fixture(scope="module")
def lenet_archive() -> bytes:
    """A real pruned int4 LeNet-300-100 archive (its header is rewritten and resealed by the tests below)."""
    torch.manual_seed(0)
    model = create_model("lenet300")
    state = CompressionState(spec={"spec": "lenet300", "kwargs": {}})
    create_technique("prune", sparsity=0.9).apply(model, state, StageContext())
    create_technique("quantize", mode="int4-weight").apply(model, state, StageContext())
    return archive.encode(model, state)


def _lenet_parts(lenet_archive: bytes) -> tuple[dict, bytes]:
    header, payload = archive.read_header(lenet_archive)
    return json.loads(json.dumps(header)), payload


def _seal_text(text: str, payload: bytes) -> bytes:
    """Like _seal, for header JSON that json.dumps would not write (1e999, deep nesting)."""
    import zstandard
    head = zstandard.ZstdCompressor().compress(text.encode())
    data = archive.MAGIC + struct.pack("<I", len(head)) + head + payload
    return data + hashlib.sha256(data).digest()


@pytest.mark.parametrize("model, structure, match", [
    # before: RSS 7.7 GB, 2.5 GB and 6.4 GB building these models; now they are built on the meta device
    ({"spec": "transformer", "kwargs": {"preset": "7b"}}, None, "do not fit the rebuilt model"),
    ({"spec": "lenet300", "kwargs": {"in_features": 2000000}}, None, r"model has \[300, 2000000\]"),
    ({"spec": "lenet300", "kwargs": {}},
     [{"op": "structured", "modules": {"1": {"type": "Linear", "attrs": {"in_features": 40000, "out_features": 40000},
                                              "params": {"weight": [40000, 40000], "bias": [40000]}}}}],
     r"model has \[40000, 40000\]"),
])
def test_a_header_describing_a_huge_model_is_refused_before_it_is_built(lenet_archive, model, structure, match):
    import resource
    header, payload = _lenet_parts(lenet_archive)
    header["model"] = model
    if structure is not None:
        header["structure"] = structure
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(NetdietError, match=match):
        archive.read(_seal(header, payload))
    # the peak of this whole process grew by less than 400 MB (ru_maxrss is in KiB); the real models take GBs
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 400 * 1024


def test_the_memory_budget_names_the_size_and_is_checked_before_any_tensor(lenet_archive):
    with pytest.raises(NetdietError, match=r"describes a model of 1\.02 MiB \(reading it needs about \d+\.\d+ MiB\) but max_memory is 97\.66 KiB") as info:
        archive.read(lenet_archive, max_memory=100_000)
    assert "\n" not in str(info.value)
    assert archive.read(lenet_archive, max_memory=1 << 30).model is not None


def test_a_huge_model_whose_tensor_list_fits_it_is_refused_by_the_budget(lenet_archive):
    # a consistent header for a 2.4 GB LeNet (in_features=2,000,000): streams claim zstd-sized weights
    header, payload = _lenet_parts(lenet_archive)
    header["model"] = {"spec": "lenet300", "kwargs": {"in_features": 2000000}}
    w = next(e for e in header["tensors"] if e["name"] == "1.weight")
    blob = bytes(range(256)) * 160  # 40 KB: enough stored bytes for zstd's ratio, but no zstd frame
    w.update(shape=[300, 2000000], kind="dense", store="float32", nnz=600_000_000, pos={"method": "all"},
             values={"off": len(payload), "len": len(blob), "codec": "zstd", "raw": 2_400_000_000})
    for key in ("bits", "axis", "channels", "scale"):
        w.pop(key, None)
    with pytest.raises(NetdietError, match=r"describes a model of 2\.24 GiB"):
        archive.read(_seal(header, payload + blob), max_memory=1 << 30)
    with pytest.raises(NetdietError, match="zstd"):  # past the budget, the frame header gives it away, still unbuilt
        archive.read(_seal(header, payload + blob), max_memory=1 << 40)


def test_a_structured_archive_whose_dense_model_is_huge_is_refused_before_it_is_built():
    # found by the long fuzz: the tensor list fits the edited (structured) model, but the rebuild first builds the
    # factory's dense model whole (mlp widths [2^31]: 2^31 x (40 in + 1 bias + 4 out) fp32, 360 GiB) before the
    # edits replace its layers; it was refused only by the allocator (a NetdietError wrapping "can't allocate")
    import resource

    from netdiet.compression.base import CompressionState, StageContext, create_technique
    from netdiet.models import create_model
    spec = {"spec": "mlp", "kwargs": {"widths": [24], "in_features": 40, "num_classes": 4}}
    torch.manual_seed(0)
    state = CompressionState(spec=spec)
    model = create_technique("structured", ratio=0.5).apply(create_model("mlp", **spec["kwargs"]), state,
                                                            StageContext(example_inputs=torch.randn(32, 40)))
    header, payload = archive.read_header(archive.encode(model, state))
    header = json.loads(json.dumps(header))
    header["model"]["kwargs"]["widths"] = [2 ** 31]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(NetdietError, match=r"reading it needs about 360\.00 GiB: the dense model before its "
                                           r"architecture edits\) but max_memory is 1\.00 GiB") as info:
        archive.read(_seal(header, payload), max_memory=1 << 30)
    assert "\n" not in str(info.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024
    assert archive.read(archive.encode(model, state), max_memory=1 << 30).model is not None   # the real one reads


def test_junk_after_a_valid_huffman_stream_is_refused_without_decoding_it(lenet_archive):
    import resource
    header, payload = _lenet_parts(lenet_archive)
    stream = next(s for e in header["tensors"] for s in (e.get("values"), e["pos"].get("stream"))
                  if s and s["codec"] == "huffman")
    seg = payload[stream["off"]:stream["off"] + stream["len"]]
    for junk, match in ((bytes(range(256)) * (1 << 16), "cannot hold"), (b"\x01", "after its last symbol")):
        h = json.loads(json.dumps(header))
        s = next(s for e in h["tensors"] for s in (e.get("values"), e["pos"].get("stream")) if s == stream)
        s.update(off=len(payload), len=len(seg) + len(junk))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(NetdietError, match=match):  # before: 16 MB of junk was accepted, at 3.5 GB of RSS
            archive.read(_seal(h, payload + seg + junk))
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024


def test_junk_after_a_zstd_frame_and_a_frame_claiming_another_size_are_refused():
    import zstandard
    frame = zstandard.ZstdCompressor().compress(bytes(1000))
    assert codecs.zstd_decompress(frame, 1000) == bytes(1000)
    with pytest.raises(ValueError, match="after its frame"):
        codecs.zstd_decompress(frame + b"junk", 1000)
    with pytest.raises(ValueError, match="claims 1000 bytes, expected 999"):
        codecs.zstd_decompress(frame, 999)
    with pytest.raises(ValueError, match="beyond zstd's ratio"):
        codecs.check_stream(frame, {"off": 0, "len": len(frame), "codec": "zstd", "raw": len(frame) * (1 << 17)})


def test_a_header_that_inflates_past_the_limit_is_refused_while_decompressing(lenet_archive):
    import resource
    header, payload = _lenet_parts(lenet_archive)
    data = _seal(dict(header, recipe="a" * (64 << 20)), payload)
    assert len(data) < 64 * 1024  # 24 KB on disk, 64 MB of header (before: 1.6 GB RSS and exit 0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(NetdietError, match="more than the 8388608 allowed"):
        archive.read(data)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024


def test_the_writer_refuses_a_header_the_reader_would_refuse():
    model, state = _pruned_small()
    with pytest.raises(NetdietError, match="header would take"):
        archive.encode(model, state, header={"recipe": "a" * (9 << 20)})


@pytest.mark.parametrize("edit, match", [
    (lambda h: h.update(warnings=5), "warnings must be a list"),
    (lambda h: h.update(stages=[{"name": "x", "accuracy": "__NAN__"}]), "NaN is not a number"),
    (lambda h: h["tensors"][0]["scale"].update(len="abc"), r"tensors\[0\]\.scale\.len must be an integer"),
    (lambda h: h["tensors"][0]["scale"].update(len="__BIG__"), "1e999 is not finite"),
    (lambda h: h["tensors"][0]["values"].update(codec="[/]"), r"tensors\[0\]\.values\.codec must be one of"),
    (lambda h: h.update(deep="__DEEP__"), "nested 5001 deep"),
    (lambda h: h.update(dense_fp32_bytes=1e40), "dense_fp32_bytes must be an integer"),
    (lambda h: h["tensors"][0].update(kind="[red]"), r"tensors\[0\]\.kind must be one of"),
    (lambda h: h.update(stages=[{"name": "x", "bytes_on_disk": "many"}]), r"stages\[0\]\.bytes_on_disk"),
    (lambda h: h.update(structure=[{"op": "structured", "modules": {"1": {"type": "Linear", "attrs": {"_x": 1}}}}]),
     "private attribute"),
    (lambda h: h.update(versions={"torch": [1]}), "versions.torch must be a string"),
])
def test_every_crafted_header_field_is_a_one_line_netdiet_error(lenet_archive, edit, match):
    header, payload = _lenet_parts(lenet_archive)
    edit(header)
    text = json.dumps(dict(header, payload_bytes=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest()))
    text = (text.replace('"__NAN__"', "NaN").replace('"__BIG__"', "1e999")
            .replace('"__DEEP__"', "[" * 5000 + "]" * 5000))
    with pytest.raises(NetdietError, match=match) as info:
        archive.read(_seal_text(text, payload))
    assert "\n" not in str(info.value)


def test_dense_fp32_bytes_is_worked_out_exactly_as_safetensors_lays_the_file_out():
    from safetensors.torch import save
    for spec, kwargs in [("lenet300", {}), ("resnet", {}), ("transformer", {}), ("mobilenet", {}),
                         ("mlp", {"widths": [3], "in_features": 5, "batchnorm": True})]:
        model = create_model(spec, **kwargs)
        tensors = {k: (v.float() if v.is_floating_point() else v).contiguous().clone() for k, v in model.state_dict().items()}
        assert archive.dense_fp32_bytes(model) == len(save(tensors)), spec
        with torch.device("meta"):
            assert archive.dense_fp32_bytes(create_model(spec, **kwargs)) == len(save(tensors)), spec


def test_the_writer_refuses_a_caller_header_nested_deeper_than_the_reader_reads():
    model, state = _pruned_small()
    deep: list = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(NetdietError, match="cannot be read back .*nested"):
        archive.encode(model, state, header={"metrics": deep})


def test_a_user_factory_that_cannot_run_on_the_meta_device_is_still_read(tmp_path):
    src = tmp_path / "valued.py"
    src.write_text("import torch.nn as nn\n"
                   "def build():\n    m = nn.Sequential(nn.Linear(3, 2))\n"
                   "    assert float(m[0].weight.detach().abs().sum()) >= 0  # reads a value: fails on the meta device\n"
                   "    return m\n")
    spec = f"{src}:build"
    model = create_model(spec)
    data = archive.encode(model, CompressionState(spec={"spec": spec, "kwargs": {}}))
    assert _states_equal(model, archive.read(data, model_spec=spec).model)
