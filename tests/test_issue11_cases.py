"""Issue 11's numbered cases 1, 2 and 4 from the command line, with the issue's exact inputs: each is exit 2 and
one line (before: exit 1, a hang, or gigabytes of RSS). The engine-level tests of the same inputs are in
test_archive.py and test_recipe.py; cases 3, 5, 6 and 7 are run from the CLI in test_train_hostile.py,
test_train_resume.py, test_cli_contract.py, test_report_html.py and test_faults.py."""
from __future__ import annotations

import hashlib
import json
import resource
import struct
import time

import pytest
import torch
import zstandard

from netdiet.cli import main
from netdiet.compression import archive
from netdiet.compression.base import CompressionState, StageContext, create_technique
from netdiet.models import create_model


def _lenet300(technique: str, **options) -> bytes:
    torch.manual_seed(0)
    model = create_model("lenet300")
    state = CompressionState(spec={"spec": "lenet300", "kwargs": {}})
    create_technique("prune", sparsity=0.9).apply(model, state, StageContext())
    create_technique(technique, **options).apply(model, state, StageContext())
    return archive.encode(model, state)


@pytest.fixture(scope="module")
def bases():
    """Real pruned LeNet-300-100 archives: int4 (scales, Huffman-coded streams) and 4-bit clustered (codebooks)."""
    return {"int4": _lenet300("quantize", mode="int4-weight"), "cluster": _lenet300("cluster", bits=4)}


def _seal_text(text: str, payload: bytes) -> bytes:
    head = zstandard.ZstdCompressor().compress(text.encode())
    data = archive.MAGIC + struct.pack("<I", len(head)) + head + payload
    return data + hashlib.sha256(data).digest()


def _seal(header: dict, payload: bytes, raw=lambda t: t) -> bytes:
    text = json.dumps(dict(header, payload_bytes=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest()))
    return _seal_text(raw(text), payload)


def _structured_40000(h, p):
    h["structure"] = [{"op": "structured", "modules": {"1": {
        "type": "Linear", "attrs": {"in_features": 40000, "out_features": 40000},
        "params": {"weight": [40000, 40000], "bias": [40000]}}}}]
    return _seal(h, p)


def _huffman_and_junk(h, p):
    stream = next(s for e in h["tensors"] for s in (e.get("values"), e["pos"].get("stream"))
                  if s and s["codec"] == "huffman")
    seg = p[stream["off"]:stream["off"] + stream["len"]]
    junk = bytes(range(256)) * (1 << 16)              # 16 MB after a valid Huffman table and its codes
    stream.update(off=len(p), len=len(seg) + len(junk))
    return _seal(h, p + seg + junk)


def _codebook(h):
    return next(e for e in h["tensors"] if e["kind"] == "cluster")["codebook"]


CASES = [
    # (id, base archive, (header, payload) -> archive bytes, a phrase of the one line, RSS it may add in MB)
    # 1. memory spent before the archive was checked (before: 7.7 GB, 2.5 GB, 6.4 GB of RSS)
    ("1-transformer-7b", "int4", lambda h, p: _seal(dict(h, model={"spec": "transformer", "kwargs": {"preset": "7b"}}), p),
     "do not fit the rebuilt model", 400),
    ("1-lenet300-in_features-2000000", "int4",
     lambda h, p: _seal(dict(h, model={"spec": "lenet300", "kwargs": {"in_features": 2000000}}), p),
     "[300, 2000000]", 400),
    ("1-structured-40000x40000", "int4", _structured_40000, "[40000, 40000]", 400),
    # 4. streams and headers (before: 3.5 GB accepted; 1.6 GB and exit 0; the rest exit 1)
    ("4-huffman-then-16MB-junk", "int4", _huffman_and_junk, "cannot hold", 200),
    ("4-24KB-archive-64MB-header", "int4", lambda h, p: _seal(dict(h, recipe="a" * (64 << 20)), p),
     "more than the 8388608 allowed", 100),
    ("4-dense_fp32_bytes-1e40", "int4", lambda h, p: _seal(dict(h, dense_fp32_bytes=1e40), p),
     "dense_fp32_bytes must be an integer", 100),
    ("4-warnings-5", "int4", lambda h, p: _seal(dict(h, warnings=5), p), "warnings must be a list", 100),
    ("4-nan-in-stages", "int4", lambda h, p: _seal(dict(h, stages=[{"name": "x", "accuracy": "__NAN__"}]), p,
                                                   lambda t: t.replace('"__NAN__"', "NaN")), "NaN is not a number", 100),
    ("4-codebook-len-abc", "cluster", lambda h, p: (_codebook(h).update(len="abc"), _seal(h, p))[1],
     "codebook.len must be an integer", 100),
    ("4-codebook-len-1e999", "cluster", lambda h, p: (_codebook(h).update(len="__BIG__"), _seal(h, p, lambda t: t.replace(
        '"__BIG__"', "1e999")))[1], "1e999 is not finite", 100),
    ("4-codec-rich-markup", "int4", lambda h, p: (h["tensors"][0]["values"].update(codec="[/]"), _seal(h, p))[1],
     "codec must be one of", 100),
    ("4-json-nested-5000-deep", "int4", lambda h, p: _seal(dict(h, deep="__DEEP__"), p, lambda t: t.replace(
        '"__DEEP__"', "[" * 5000 + "]" * 5000)), "nested 5001 deep", 100),
]


@pytest.mark.parametrize("base,make,phrase,mb", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_archive_is_exit_2_and_one_line_from_evaluate(tmp_path, capsys, bases, base, make, phrase, mb):
    header, payload = archive.read_header(bases[base])
    path = tmp_path / "hostile.ndz"
    path.write_bytes(make(json.loads(json.dumps(header)), payload))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    capsys.readouterr()
    code = main(["evaluate", str(path), "--data", "synthetic", "--no-latency"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("netdiet: error: "), err
    assert phrase in err, err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < mb * 1024   # ru_maxrss: KiB


BOMB = "\n".join(['x0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
                 + [f"x{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]) + "\n"


@pytest.mark.parametrize("where", [
    "name: *a8\nstages: [{technique: prune}]\n",
    "description: *a8\nstages: [{technique: prune}]\n",
    "stages:\n  - technique: prune\n    options: {layers: *a8}\n",
    "stages:\n  - technique: prune\n    name: *a8\n",
], ids=["name", "description", "options.layers", "stage-name"])
def test_2_billion_laughs_in_a_recipe_is_exit_2_at_once(tmp_path, capsys, where):
    # before: it hung, growing RSS by ~27 MB/s until MemoryError (exit 1)
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(BOMB + where)
    assert recipe.stat().st_size < 700
    capsys.readouterr()
    start = time.perf_counter()
    code = main(["compress", "mlp", "--recipe", str(recipe), "--data", "digits"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "bomb.yaml line 1: YAML anchors (&a0) are not allowed" in err
    assert time.perf_counter() - start < 5
