"""The .ndz file: a compressed model that rebuilds without pickle and without importing code from the file.

Layout (all integers little-endian):

    b"NDZ\\x01" | u32 header length | header (zstd-compressed JSON) | payload (streams) | sha256 of all before it

The JSON header holds the model spec, the replayable structure edits, per tensor its shape, encoding and where its
streams are in the payload, the stages/recipe/metrics the caller passes, versions, and the payload's sha256. Any
changed byte fails the trailing checksum before anything is parsed.

Per tensor (the model's state_dict, in order):
- positions of the stored values: all of them, or (when it is smaller) a bitmask, or relative indices as in Deep
  Compression — gaps at a chosen bit width b, where the code 2^b-1 means "skip 2^b-1 positions" (filler);
- values: dense (float32 / float16 / bfloat16, or the integer buffer's own dtype), quant codes (q + 2^(b-1), packed
  at b bits) + per-channel scales (+ zero points), or cluster indices (packed at b bits) + codebook;
- every stream is stored in whichever of raw / zstd / canonical Huffman is smallest for it (symbol streams: bit-packed,
  byte-per-symbol + zstd, or Huffman); the choice is recorded per stream and summarised in header["entropy"].

Decoded weights are bit-identical to the model that was written (`encode` checks this and stores a tensor dense when
its recorded encoding no longer matches the live weight, noting it in header["warnings"]).

Reading is bounded in memory and time whatever the file says (issue 11): the header is at most MAX_HEADER bytes
and MAX_JSON_DEPTH deep with finite numbers, every field is type-checked (`check_header`), the model it describes
is built on the meta device and its tensor list checked against it, the bytes reading would take are compared with
`max_memory` (default: the RAM available) before anything real is allocated, and every stream decodes into exactly
its declared size (codecs.py). `dense_fp32_bytes` is worked out from shapes, never read back from the header.

Why this module is long: it is one file format's writer, reader and the reader's schema of the header, kept side by
side so that a field added to the writer is checked by the reader in the same change; the byte-level codecs, which
need no knowledge of tensors, are in codecs.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)

from netdiet import __version__
from netdiet.analysis.ram import available_ram
from netdiet.compression.base import CompressionState, Encoding, replay_structure
from netdiet.compression.codecs import (
    BYTE_CODECS,
    MAX_HEADER,
    SYMBOL_CODECS,
    Payload,
    best_relidx_bits,
    check_stream,
    check_symbols,
    load_header_json,
    read_stream,
    read_symbols,
    relidx_codes,
    relidx_positions,
    zstd_compress,
)
from netdiet.errors import NetdietError
from netdiet.fileio import atomic_write_bytes, dumps_json
from netdiet.models import create_model
from netdiet.models.registry import resolve
from netdiet.units import format_bytes

MAGIC = b"NDZ\x01"
FORMAT = "netdiet.ndz/1"
_DIGEST = 32
_DENSE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
                 "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}


@dataclass
class LoadedArchive:
    model: nn.Module
    state: CompressionState
    header: dict
    nbytes: int = 0           # bytes of the archive


# ================================================================== encoding tensors
_SEARCH_MAX_NUMEL = 1 << 21


def _relidx_neighbours(choice: tuple, positions: np.ndarray) -> list[int]:
    best = choice[2][0] if choice[0] == "relidx" else best_relidx_bits(positions)[0]
    return [b for b in (best - 1, best, best + 1, best + 2) if 1 <= b <= 16]


def _add_positions(payload: Payload, method: str, bits: int | None, keep: torch.Tensor, positions: np.ndarray) -> dict:
    if method == "bitmask":
        return payload.add_bytes(np.packbits(keep.numpy(), bitorder="little").tobytes())
    return payload.add_symbols(relidx_codes(positions, bits), bits)
def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _tensor_from(data: bytes, dtype_name: str, n: int) -> torch.Tensor:
    dtype = _DENSE_DTYPES.get(dtype_name)
    if dtype is None:
        raise ValueError(f"unknown dtype {dtype_name!r}")
    item = torch.empty(0, dtype=dtype).element_size()
    if len(data) != n * item:
        raise ValueError(f"{dtype_name} stream holds {len(data)} bytes, expected {n * item}")
    if n == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).clone()


def _value_of(enc: Encoding, shape: tuple[int, ...]) -> torch.Tensor:
    value = enc.dequantize().float()
    if tuple(value.shape) != tuple(shape):
        raise ValueError("encoding shape differs from the tensor")
    return value


def _encode_tensor(name: str, t: torch.Tensor, enc: Encoding | None, mask: torch.Tensor | None,
                   payload: Payload, warnings: list[str]) -> dict:
    t = t.detach().cpu()
    entry: dict[str, Any] = {"name": name, "shape": list(t.shape), "dtype": _dtype_name(t)}
    numel = t.numel()
    if not t.is_floating_point():
        entry.update(kind="dense", store=_dtype_name(t), pos={"method": "all"}, nnz=numel,
                     values=payload.add_bytes(_tensor_bytes(t)))
        return entry

    flat = t.float().reshape(-1)
    keep = flat != 0
    if mask is not None and tuple(mask.shape) == tuple(t.shape):
        keep |= mask.reshape(-1).bool()
    kind = enc.kind if enc is not None else "dense"
    if kind in ("quant", "cluster"):
        try:
            value = _value_of(enc, tuple(t.shape)).reshape(-1)
            value = torch.where(keep, value, torch.zeros_like(value))
            same = torch.equal(value, flat)
        except Exception:  # noqa: BLE001 - a malformed encoding is stored dense below, with a warning
            same = False
        if not same:
            warnings.append(f"{name}: its {kind} encoding no longer matches the weight (changed after encoding); stored dense fp32")
            kind, enc = "dense", None
    store = "float32"
    if kind == "dense":
        store = enc.dtype if enc is not None and enc.dtype in ("float16", "bfloat16", "float32") else "float32"
        if store != "float32" and not torch.equal(flat.to(_DENSE_DTYPES[store]).float(), flat):
            warnings.append(f"{name}: recorded as {store} but not representable in it; stored fp32")
            store = "float32"
        if t.dtype != torch.float32 and store == "float32":
            store = _dtype_name(t)

    # how many bits a stored value takes, to weigh sparse positions against storing the zeros
    value_bits = {"dense": 8 * torch.empty(0, dtype=_DENSE_DTYPES.get(store, torch.float32)).element_size(),
                  "quant": enc.bits if enc is not None else 32, "cluster": enc.bits if enc is not None else 32}[kind]
    positions = torch.nonzero(keep).reshape(-1).numpy()
    nnz = len(positions)
    dense_cost = numel * value_bits
    choice = ("all", dense_cost, None)
    if nnz < numel:
        choice = min(choice, ("bitmask", numel + nnz * value_bits, None), key=lambda c: c[1])
        if nnz:
            b, n_codes = best_relidx_bits(positions)
            choice = min(choice, ("relidx", n_codes * b + nnz * value_bits, (b, n_codes)), key=lambda c: c[1])
    method = choice[0]
    if method == "all" and kind != "dense" and nnz < numel and not torch.equal(_value_of(enc, tuple(t.shape)).reshape(-1), flat):
        # codes at pruned positions need not decode to 0 (1-bit grids, clusters without a zero centroid)
        method = "bitmask"
    if method == "all":
        sel = torch.arange(numel)
        entry["pos"] = {"method": "all"}
        nnz = numel
    else:
        sel = torch.from_numpy(positions)
        # the raw-size estimate picked the method; after entropy coding a neighbour can be smaller, so for
        # tensors of moderate size the candidates are coded and the smallest is kept (measured: ~1 % on LeNet)
        candidates = [("bitmask", None)] + ([("relidx", b) for b in _relidx_neighbours(choice, positions)] if nnz else [])
        if len(candidates) > 1 and numel <= _SEARCH_MAX_NUMEL:
            scratch = Payload()
            sizes = [(_add_positions(scratch, m, b, keep, positions)["len"], i) for i, (m, b) in enumerate(candidates)]
            method, b = candidates[min(sizes)[1]]
        else:
            method, b = (method, choice[2][0] if method == "relidx" else None)
        entry["pos"] = {"method": method, "stream": _add_positions(payload, method, b, keep, positions)}
        if method == "relidx":
            entry["pos"].update(bits=b, count=entry["pos"]["stream"]["n"])
    entry["nnz"] = int(nnz)

    if kind == "dense":
        entry.update(kind="dense", store=store, values=payload.add_bytes(_tensor_bytes(flat[sel].to(_DENSE_DTYPES[store]))))
    elif kind == "quant":
        offset = (1 << (enc.bits - 1)) if enc.bits >= 2 else 0
        q = enc.q.reshape(-1)[sel].long() + offset
        if q.numel() and (q.min() < 0 or q.max() >= (1 << enc.bits)):
            raise NetdietError(f"{name}: quant codes exceed {enc.bits} bits; the encoding is malformed")
        entry.update(kind="quant", bits=enc.bits, axis=int(enc.axis), values=payload.add_symbols(q.numpy(), enc.bits),
                     scale=payload.add_bytes(_tensor_bytes(enc.scale.float().reshape(-1))), channels=int(enc.scale.numel()))
        if enc.zero_point is not None:
            zp = enc.zero_point.reshape(-1)
            entry["zero_point"] = payload.add_bytes(_tensor_bytes(zp.float()))
            entry["zp_dtype"] = "float32" if zp.is_floating_point() else "int64"
    else:
        idx = enc.indices.reshape(-1)[sel].long()
        entry.update(kind="cluster", bits=enc.bits, values=payload.add_symbols(idx.numpy(), enc.bits),
                     codebook=payload.add_bytes(_tensor_bytes(enc.codebook.float().reshape(-1))),
                     codebook_size=int(enc.codebook.numel()))
    return entry


def _item_size(store: str) -> int:
    return torch.empty(0, dtype=_DENSE_DTYPES[store]).element_size()


def check_entry(entry: dict, shape: tuple[int, ...], payload: bytes) -> int:
    """Every count and stream size of one tensor entry against its shape, before any stream is decoded
    (ValueError otherwise); returns the number of relative-index codes (0 when positions are not relidx)."""
    numel = math.prod(shape)
    kind, nnz, pos = entry.get("kind"), entry.get("nnz"), entry.get("pos")
    if type(nnz) is not int or not 0 <= nnz <= numel or not isinstance(pos, dict):
        raise ValueError("bad value count or positions")
    method, n_codes = pos.get("method"), 0
    if method == "all":
        if nnz != numel:
            raise ValueError("dense tensor with a partial value count")
    elif method == "bitmask":
        check_stream(payload, pos.get("stream"), (numel + 7) // 8)
    elif method == "relidx":
        b, stream = pos.get("bits"), pos.get("stream")
        if type(b) is not int or not 1 <= b <= 16 or not isinstance(stream, dict):
            raise ValueError("bad relative-index width")
        n_codes = stream.get("n")
        if type(n_codes) is not int or not nnz <= n_codes <= numel + nnz:
            raise ValueError("bad relative-index count")
        check_symbols(payload, stream, b, n_codes)
    else:
        raise ValueError(f"unknown position method {method!r}")
    if kind == "dense":
        store = entry.get("store")
        if store not in _DENSE_DTYPES:
            raise ValueError(f"unknown dtype {store!r}")
        check_stream(payload, entry.get("values"), nnz * _item_size(store))
    elif kind in ("quant", "cluster"):
        bits = entry.get("bits")
        if type(bits) is not int or not 1 <= bits <= 8:
            raise ValueError("bits outside 1..8")
        check_symbols(payload, entry.get("values"), bits, nnz)
        if kind == "quant":
            axis, channels = entry.get("axis"), entry.get("channels")
            if type(axis) is not int or not 0 <= axis < max(len(shape), 1) or channels not in (1, shape[axis] if shape else 1):
                raise ValueError("bad quantization axis or channel count")
            check_stream(payload, entry.get("scale"), 4 * channels)
            if "zero_point" in entry:
                check_stream(payload, entry["zero_point"], 4 * channels)
        else:
            size = entry.get("codebook_size")
            if type(size) is not int or not 1 <= size <= 256:
                raise ValueError("bad codebook size")
            check_stream(payload, entry.get("codebook"), 4 * size)
    else:
        raise ValueError(f"unknown encoding kind {kind!r}")
    return n_codes


def _decode_tensor(entry: dict, payload: bytes, shape: tuple[int, ...]) -> tuple[torch.Tensor, Encoding | None, torch.Tensor]:
    n_codes = check_entry(entry, shape, payload)
    numel = math.prod(shape)
    kind, nnz, pos = entry["kind"], entry["nnz"], entry["pos"]
    method = pos["method"]
    if method == "all":
        keep = torch.ones(numel, dtype=torch.bool)
    elif method == "bitmask":
        raw = read_stream(payload, pos["stream"], (numel + 7) // 8)
        keep = torch.from_numpy(np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little", count=numel).astype(bool))
        if int(keep.sum()) != nnz:
            raise ValueError("bitmask does not match the value count")
    else:
        codes = read_symbols(payload, pos["stream"], pos["bits"], n_codes)
        keep = torch.zeros(numel, dtype=torch.bool)
        keep[torch.from_numpy(relidx_positions(codes, pos["bits"], numel, nnz))] = True
        del codes

    enc: Encoding | None = None
    if kind == "dense":
        store = entry["store"]
        values = _tensor_from(read_stream(payload, entry["values"], nnz * _item_size(store)), store, nnz)
        if store in ("float16", "bfloat16"):
            enc = Encoding(kind="dense", bits=16, dtype=store)
        full = torch.zeros(numel, dtype=values.dtype)
        full[keep] = values
    else:
        bits = entry["bits"]
        symbols = torch.from_numpy(read_symbols(payload, entry["values"], bits, nnz))
        if kind == "quant":
            axis, channels = entry["axis"], entry["channels"]
            scale = _tensor_from(read_stream(payload, entry["scale"], 4 * channels), "float32", channels)
            zp = None
            if "zero_point" in entry:
                zp = _tensor_from(read_stream(payload, entry["zero_point"], 4 * channels), "float32", channels)
                if entry.get("zp_dtype") == "int64":
                    zp = zp.long()
            offset = (1 << (bits - 1)) if bits >= 2 else 0
            q = torch.zeros(numel, dtype=torch.int8)
            q[keep] = (symbols - offset).to(torch.int8)
            enc = Encoding(kind="quant", bits=bits, q=q.reshape(shape), scale=scale, zero_point=zp, axis=axis)
        else:
            size = entry["codebook_size"]
            codebook = _tensor_from(read_stream(payload, entry["codebook"], 4 * size), "float32", size)
            if symbols.numel() and int(symbols.max()) >= size:
                raise ValueError("cluster index beyond the codebook")
            idx = torch.zeros(numel, dtype=torch.int64)
            idx[keep] = symbols
            enc = Encoding(kind="cluster", bits=bits, codebook=codebook, indices=idx.reshape(shape))
        del symbols
        value = enc.dequantize().float().reshape(-1)
        full = torch.where(keep, value, torch.zeros_like(value))
    return full.reshape(shape), enc, keep.reshape(shape)


# ================================================================== ONNX artefact
def _strip_onnx(art: dict, model: nn.Module, state: CompressionState) -> tuple[bytes, list[dict]]:
    """The int8 ONNX model with every initializer the model already stores emptied; fails if they disagree."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(art["model"])
    inits = {i.name: i for i in proto.graph.initializer}
    tensors = model.state_dict()
    fill = []
    for rec in art.get("fill", []):
        init = inits.get(rec["init"])
        if init is None:
            continue
        stored = numpy_helper.to_array(init)
        if "param" in rec:
            enc = state.encodings.get(rec["param"])
            if enc is None or enc.kind != "quant":
                raise NetdietError(f"the int8 ONNX model is stale: {rec['param']} is no longer int8-quantized; "
                                   "put the dynamic/static quantize stage last")
            codes = enc.q.t() if rec.get("transpose") else enc.q
            if tuple(codes.shape) != stored.shape or not np.array_equal(codes.numpy(), stored):
                raise NetdietError(f"the int8 ONNX model is stale: {rec['param']} changed after quantization; "
                                   "put the dynamic/static quantize stage last")
        else:
            t = tensors.get(rec["tensor"])
            if t is None or tuple(t.shape) != stored.shape or not np.array_equal(t.detach().float().numpy(), stored):
                continue  # keep this one inside the blob
        init.ClearField("raw_data")
        for f in ("float_data", "int32_data", "int64_data"):
            init.ClearField(f)
        fill.append(rec)
    return proto.SerializeToString(), fill


def _refill_onnx(blob: bytes, fill: list, model: nn.Module, encodings: dict[str, Encoding]) -> bytes:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(blob)
    inits = {i.name: i for i in proto.graph.initializer}
    tensors = model.state_dict()
    for rec in fill:
        if not isinstance(rec, dict) or rec.get("init") not in inits:
            raise ValueError("ONNX fill record names no initializer")
        name = rec["init"]
        if "param" in rec:
            enc = encodings.get(rec["param"])
            if enc is None or enc.kind != "quant":
                raise ValueError("ONNX fill record names a tensor without int8 codes")
            arr = (enc.q.t() if rec.get("transpose") else enc.q).contiguous().numpy().astype(np.int8)
        else:
            t = tensors.get(rec.get("tensor"))
            if t is None:
                raise ValueError("ONNX fill record names an unknown tensor")
            arr = t.detach().float().numpy()
        if tuple(inits[name].dims) != arr.shape:
            raise ValueError("ONNX initializer shape differs from the stored tensor")
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))
    return proto.SerializeToString()


# ================================================================== public API
# safetensors orders tensors by dtype (this order, largest first) then name, and pads its JSON header to 8 bytes
_ST_DTYPES = {torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32", torch.bfloat16: "BF16",
              torch.float16: "F16", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_ST_ORDER = {name: i for i, name in enumerate(_ST_DTYPES.values())}


def dense_fp32_bytes(model: nn.Module) -> int:
    """Bytes of the model's state_dict as a dense fp32 safetensors file (the denominator of every ratio).

    Worked out from names, dtypes and shapes alone, as safetensors lays the file out, so a model on the meta
    device has its figure without allocating it (tests/test_archive.py checks it against safetensors' own bytes)."""
    rows = []
    for name, v in model.state_dict().items():
        dtype = torch.float32 if v.is_floating_point() else v.dtype
        if dtype not in _ST_DTYPES:
            raise NetdietError(f"tensor {name} has dtype {dtype}, which a dense fp32 safetensors file does not hold")
        rows.append((_ST_ORDER[_ST_DTYPES[dtype]], name, _ST_DTYPES[dtype], list(v.shape),
                     v.numel() * torch.empty(0, dtype=dtype).element_size()))
    entries, offset = [], 0
    for _, name, dt, shape, nbytes in sorted(rows, key=lambda r: (r[0], r[1].encode("utf-8"))):
        entries.append(f"{json.dumps(name, ensure_ascii=False)}:" + json.dumps(
            {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + nbytes]}, separators=(",", ":")))
        offset += nbytes
    head = len(("{" + ",".join(entries) + "}").encode("utf-8"))
    return 8 + head + (-head) % 8 + offset


def _versions() -> dict:
    out = {"netdiet": __version__, "torch": torch.__version__}
    try:
        import onnxruntime
        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def dense_baseline_bytes(spec: Any, structure: Any, model: nn.Module) -> int:
    """dense_fp32_bytes of the model before its architecture edits: the spec's dense model, built on the meta
    device (so it costs no memory), or `model` itself when nothing was edited or the spec cannot be built."""
    if not structure or not isinstance(spec, dict) or not isinstance(spec.get("spec"), str):
        return dense_fp32_bytes(model)
    try:
        with torch.device("meta"):
            return dense_fp32_bytes(create_model(spec["spec"], **(spec.get("kwargs") or {})))
    except (NetdietError, TypeError, RuntimeError):
        return dense_fp32_bytes(model)


def _build(model: nn.Module, state: CompressionState, header: dict | None) -> tuple[bytes, list[dict], dict]:

    payload, warnings = Payload(), []
    params = dict(model.named_parameters())
    entries = []
    for name, t in model.state_dict().items():
        enc = state.encodings.get(name) if name in params else None
        entries.append(_encode_tensor(name, t, enc, state.masks.get(name), payload, warnings))
    artifacts = {}
    art = state.artifacts.get("onnx_int8")
    if art is not None:
        blob, fill = _strip_onnx(art, model, state)
        artifacts["onnx_int8"] = {"stream": payload.add_bytes(blob), "fill": fill, "mode": art.get("mode"),
                                  "input_shape": art.get("input_shape"), "input_dtype": art.get("input_dtype"),
                                  "ops": art.get("ops")}
    body = payload.blob()
    doc = dict(header or {})
    doc.update({
        "format": FORMAT,
        "model": state.spec,
        "structure": state.structure,
        "dense_fp32_bytes": dense_baseline_bytes(state.spec, state.structure, model),
        "tensors": entries,
        "masks": sorted(n for n in state.masks if n in params),
        "stages": state.stages,
        "artifacts": artifacts,
        "entropy": {"streams_by_codec": dict(sorted(payload.codecs.items()))},
        "warnings": warnings,
        "versions": _versions(),
        "payload_bytes": len(body),
        "payload_sha256": hashlib.sha256(body).hexdigest(),
    })
    text = dumps_json(doc).encode("utf-8")
    if len(text) > MAX_HEADER:  # the reader refuses larger headers, so the writer never makes one
        raise NetdietError(f"the archive header would take {format_bytes(len(text))} (at most {format_bytes(MAX_HEADER)}); "
                           "pass a smaller header (recipe, metrics) to archive.write")
    head = zstd_compress(text)
    try:  # the writer never makes a file its reader refuses (a caller's header nested too deep, say)
        check_header(load_header_json(head), "the archive being written")
    except ValueError as exc:
        raise NetdietError(f"the archive header cannot be read back ({exc}); pass a plainer header to archive.write") from None
    data = MAGIC + struct.pack("<I", len(head)) + head + body
    return data + hashlib.sha256(data).digest(), entries, artifacts


def encode(model: nn.Module, state: CompressionState, *, header: dict | None = None) -> bytes:
    """The archive bytes for `model` with the encodings, masks, structure edits and artefacts in `state`."""
    return _build(model, state, header)[0]


def write(path: str | Path, model: nn.Module, state: CompressionState, *, header: dict | None = None) -> int:
    """Write the archive atomically; returns its size in bytes."""
    data = encode(model, state, header=header)
    atomic_write_bytes(path, data)
    return len(data)


def breakdown(model: nn.Module, state: CompressionState) -> list[dict]:
    """Per tensor: encoding, bits, elements, nonzero, bytes in the archive, position method and stream codecs;
    then one row per artefact and one for the header and framing, so the rows add up to the file size."""
    data, entries, artifacts = _build(model, state, None)
    rows = []
    for e in entries:
        streams = [e.get("values"), e.get("scale"), e.get("zero_point"), e.get("codebook"), e["pos"].get("stream")]
        streams = [s for s in streams if s]
        bits = e.get("bits") or 8 * torch.empty(0, dtype=_DENSE_DTYPES.get(e.get("store", "float32"), torch.float32)).element_size()
        rows.append({"name": e["name"], "encoding": e["kind"] if e["kind"] != "dense" else f"dense-{e.get('store')}",
                     "bits": bits, "numel": math.prod(e["shape"]), "nonzero": e["nnz"],
                     "positions": e["pos"]["method"], "bytes": sum(s["len"] for s in streams),
                     "codecs": sorted({s["codec"] for s in streams})})
    for name, art in artifacts.items():  # e.g. the int8 ONNX graph (its weights are the tensors above)
        rows.append({"name": f"artifact:{name}", "encoding": "onnx", "bits": None, "numel": 0, "nonzero": 0,
                     "positions": "-", "bytes": art["stream"]["len"], "codecs": [art["stream"]["codec"]]})
    rows.append({"name": "header+framing", "encoding": "json+zstd", "bits": None, "numel": 0, "nonzero": 0,
                 "positions": "-", "bytes": len(data) - sum(r["bytes"] for r in rows), "codecs": ["zstd"]})
    return rows


def read_header(data: bytes, source: str = "archive") -> tuple[dict, bytes]:
    """(header, payload) after the magic, length and checksum checks, with the header checked against the schema."""
    if len(data) < len(MAGIC) + 4 + _DIGEST or data[:4] != MAGIC:
        raise NetdietError(f"{source} is not a netdiet archive (.ndz) or is truncated; give a file written by netdiet compress")
    if hashlib.sha256(data[:-_DIGEST]).digest() != data[-_DIGEST:]:
        raise NetdietError(f"{source} failed its checksum (truncated or corrupted); re-create it with netdiet compress")
    (hlen,) = struct.unpack_from("<I", data, 4)
    if hlen > MAX_HEADER or 8 + hlen > len(data) - _DIGEST:
        raise NetdietError(f"{source} has a malformed header length; re-create it with netdiet compress")
    try:
        header = load_header_json(data[8:8 + hlen])
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise NetdietError(f"{source} has an unreadable header ({str(exc)[:160]}); re-create it with netdiet compress") from None
    payload = data[8 + hlen:-_DIGEST]
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise NetdietError(f"{source} is not a {FORMAT} archive (format {str(found)[:40]!r}); it may be from a newer netdiet")
    check_header(header, source)
    if header["payload_bytes"] != len(payload) or header["payload_sha256"] != hashlib.sha256(payload).hexdigest():
        raise NetdietError(f"{source}: the payload does not match the header's checksum; re-create it with netdiet compress")
    return header, payload


# ================================================================== the header's schema
class _Bad(Exception):
    """A header field that is not what netdiet writes: its path and what was wrong."""


def _need(ok: bool, where: str, what: str, value: Any = None) -> None:
    if not ok:
        shown = json.dumps(value)[:40] if value is not None else "nothing"
        raise _Bad(f"{where} {what}, got {shown}")


def _int(v: Any, where: str, lo: int = 0, hi: int = 1 << 62, optional: bool = False) -> None:
    if not (optional and v is None):
        _need(type(v) is int and lo <= v <= hi, where, f"must be an integer in {lo}..{hi}", v)


def _num(v: Any, where: str) -> None:
    _need(v is None or type(v) in (int, float), where, "must be a number or null", v)


def _str(v: Any, where: str, optional: bool = False) -> None:
    _need((optional and v is None) or isinstance(v, str), where, "must be a string", v)


def _choice(v: Any, where: str, allowed) -> None:
    _need(v in allowed if isinstance(v, str) else False, where, f"must be one of {', '.join(allowed)}", v)


def _obj(v: Any, where: str, optional: bool = False) -> dict:
    _need((optional and v is None) or isinstance(v, dict), where, "must be an object", v)
    return v or {}


def _list(v: Any, where: str, optional: bool = False) -> list:
    _need((optional and v is None) or isinstance(v, list), where, "must be a list", v)
    return v or []


def _ints(v: Any, where: str, lo: int = 0, optional: bool = False) -> None:
    for i, d in enumerate(_list(v, where, optional)):
        _int(d, f"{where}[{i}]", lo, 1 << 40)


def _stream(v: Any, where: str, codecs: tuple[str, ...]) -> None:
    meta = _obj(v, where)
    _int(meta.get("off"), f"{where}.off")
    _int(meta.get("len"), f"{where}.len")
    _choice(meta.get("codec"), f"{where}.codec", codecs)
    _int(meta.get("raw"), f"{where}.raw", optional=True)
    _int(meta.get("n"), f"{where}.n", optional=True)
    _int(meta.get("bits"), f"{where}.bits", 1, 16, optional=True)


def _check_tensor_entry(e: Any, w: str) -> None:
    _obj(e, w)
    _str(e.get("name"), f"{w}.name")
    _ints(e.get("shape"), f"{w}.shape")
    _choice(e.get("dtype"), f"{w}.dtype", tuple(_DENSE_DTYPES))
    _choice(e.get("kind"), f"{w}.kind", ("dense", "quant", "cluster"))
    _int(e.get("nnz"), f"{w}.nnz")
    pos = _obj(e.get("pos"), f"{w}.pos")
    _choice(pos.get("method"), f"{w}.pos.method", ("all", "bitmask", "relidx"))
    if pos["method"] != "all":
        _stream(pos.get("stream"), f"{w}.pos.stream", BYTE_CODECS if pos["method"] == "bitmask" else SYMBOL_CODECS)
    _int(pos.get("bits"), f"{w}.pos.bits", 1, 16, optional=pos["method"] != "relidx")
    _int(pos.get("count"), f"{w}.pos.count", optional=True)
    if e["kind"] == "dense":
        _choice(e.get("store"), f"{w}.store", tuple(_DENSE_DTYPES))
        _stream(e.get("values"), f"{w}.values", BYTE_CODECS)
        return
    _int(e.get("bits"), f"{w}.bits", 1, 8)
    _stream(e.get("values"), f"{w}.values", SYMBOL_CODECS)
    if e["kind"] == "quant":
        _int(e.get("axis"), f"{w}.axis", 0, 64)
        _int(e.get("channels"), f"{w}.channels", 1)
        _stream(e.get("scale"), f"{w}.scale", BYTE_CODECS)
        if "zero_point" in e:
            _stream(e.get("zero_point"), f"{w}.zero_point", BYTE_CODECS)
            _choice(e.get("zp_dtype"), f"{w}.zp_dtype", ("float32", "int64"))
    else:
        _stream(e.get("codebook"), f"{w}.codebook", BYTE_CODECS)
        _int(e.get("codebook_size"), f"{w}.codebook_size", 1, 256)


def _check_structure(edits: Any) -> None:
    for i, edit in enumerate(_list(edits, "structure", optional=True)):
        w = f"structure[{i}]"
        _str(_obj(edit, w).get("op"), f"{w}.op")
        if edit["op"] == "structured":
            for name, change in _obj(edit.get("modules"), f"{w}.modules").items():
                m = f"{w}.modules.{name[:40]}"
                _str(_obj(change, m).get("type"), f"{m}.type")
                for key, value in _obj(change.get("attrs"), f"{m}.attrs", optional=True).items():
                    _need(not key.startswith("_"), f"{m}.attrs", "names a private attribute", key)
                    if isinstance(value, list):
                        _ints(value, f"{m}.attrs.{key}", -(1 << 40))
                    else:
                        _int(value, f"{m}.attrs.{key}", -(1 << 40), 1 << 40)
                for part in ("params", "buffers"):
                    for key, shape in _obj(change.get(part), f"{m}.{part}", optional=True).items():
                        _ints(shape, f"{m}.{part}.{key}")
        elif edit["op"] == "lowrank":
            for j, item in enumerate(_list(edit.get("layers"), f"{w}.layers")):
                _str(_obj(item, f"{w}.layers[{j}]").get("name"), f"{w}.layers[{j}].name")
                _int(item.get("rank"), f"{w}.layers[{j}].rank", 1, 1 << 40)


def _check_stage(st: Any, w: str) -> None:
    _obj(st, w)
    for key in ("name", "technique", "runtime"):
        _str(st.get(key), f"{w}.{key}", optional=True)
    for key in ("accuracy", "accuracy_pytorch", "accuracy_onnxruntime", "ratio"):
        _num(st.get(key), f"{w}.{key}")
    for key in ("bytes_on_disk", "macs", "params", "nonzero_params"):
        _int(st.get(key), f"{w}.{key}", optional=True)
    _obj(st.get("options"), f"{w}.options", optional=True)
    _need(st.get("evaluated") in (None, True, False), f"{w}.evaluated", "must be true or false", st.get("evaluated"))


def _check_document(h: dict) -> None:
    spec = _obj(h.get("model"), "model", optional=True)
    if spec:
        _str(spec.get("spec"), "model.spec")
        _obj(spec.get("kwargs"), "model.kwargs", optional=True)
    _check_structure(h.get("structure"))
    _int(h.get("dense_fp32_bytes"), "dense_fp32_bytes", optional=True)
    for i, e in enumerate(_list(h.get("tensors"), "tensors")):
        _check_tensor_entry(e, f"tensors[{i}]")
    for i, name in enumerate(_list(h.get("masks"), "masks", optional=True)):
        _str(name, f"masks[{i}]")
    for i, st in enumerate(_list(h.get("stages"), "stages", optional=True)):
        _check_stage(st, f"stages[{i}]")
    for name, art in _obj(h.get("artifacts"), "artifacts", optional=True).items():
        w = f"artifacts.{name[:40]}"
        _stream(_obj(art, w).get("stream"), f"{w}.stream", BYTE_CODECS)
        for i, rec in enumerate(_list(art.get("fill"), f"{w}.fill")):
            for key in ("init", "param", "tensor"):
                _str(_obj(rec, f"{w}.fill[{i}]").get(key), f"{w}.fill[{i}].{key}", optional=key != "init")
        _str(art.get("mode"), f"{w}.mode", optional=True)
        _str(art.get("input_dtype"), f"{w}.input_dtype", optional=True)
        _ints(art.get("input_shape"), f"{w}.input_shape", optional=True)
    counts = _obj(_obj(h.get("entropy"), "entropy", optional=True).get("streams_by_codec"), "entropy.streams_by_codec", optional=True)
    for codec, n in counts.items():
        _choice(codec, "entropy.streams_by_codec", BYTE_CODECS + SYMBOL_CODECS)
        _int(n, f"entropy.streams_by_codec.{codec}")
    for i, w in enumerate(_list(h.get("warnings"), "warnings", optional=True)):
        _str(w, f"warnings[{i}]")
    for key, v in _obj(h.get("versions"), "versions", optional=True).items():
        _str(v, f"versions.{key[:40]}")
    _int(h.get("payload_bytes"), "payload_bytes")
    _str(h.get("payload_sha256"), "payload_sha256")


def check_header(header: dict, source: str = "archive") -> dict:
    """Every field the reader, evaluate or a renderer uses has the type and range netdiet writes (fields a caller
    added -- recipe, metrics -- are free-form JSON, already finite and shallow); otherwise one NetdietError."""
    try:
        _check_document(header)
    except _Bad as exc:
        raise NetdietError(f"{source}: header field {exc}; re-create it with netdiet compress") from None
    return header


# ================================================================== reading
def read(path_or_bytes: str | Path | bytes, *, model_spec: str | None = None, max_memory: int | None = None) -> LoadedArchive:
    """Rebuild the model and its CompressionState. Zoo models rebuild freely; a user's `pkg.mod:fn` or
    `file.py:fn` is imported only when the caller passes that same spec as `model_spec`.

    Memory is budgeted before it is spent: the model the header describes is built on the meta device first,
    its tensor list checked against it, and the bytes reading would take (weights, codes, the largest tensor's
    scratch) compared with `max_memory` (default: the RAM available now, netdiet.analysis.ram.available_ram)."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, source = bytes(path_or_bytes), "archive"
    else:
        path = Path(path_or_bytes)
        if not path.is_file():
            raise NetdietError(f"archive {path} does not exist; check the path")
        limit = max_memory if max_memory is not None else available_ram()
        if limit is not None and path.stat().st_size > limit:
            raise NetdietError(f"{path} is {format_bytes(path.stat().st_size)}, more than the {format_bytes(limit)} of memory "
                               "it may use; free memory or pass a larger max_memory")
        data, source = path.read_bytes(), str(path)
    header, payload = read_header(data, source)
    skeleton, dense_bytes = _build_skeleton(header, model_spec, source)
    _check_tensor_list(skeleton, header, source)
    _check_budget(skeleton, header, max_memory, source, dense_bytes)
    _check_streams(skeleton, header, payload, source)
    del skeleton
    model = _rebuild_model(header, model_spec, source)
    try:
        state = _load_tensors(model, header, payload)
    except NetdietError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, OverflowError, AttributeError, MemoryError,
            struct.error) as exc:
        raise NetdietError(f"{source} is corrupted ({type(exc).__name__}: {str(exc)[:160]}); re-create it with netdiet compress") from None
    return LoadedArchive(model=model, state=state, header=header, nbytes=len(data))


@contextlib.contextmanager
def _tensor_count_limit(limit: int, source: str):
    """Stop a model build that registers far more parameters and buffers than the header lists: on the meta device
    a tensor costs nothing, but a million modules (mlp widths=[1] * 10**6) still cost Python objects and time."""
    count = 0

    def hook(module: nn.Module, name: str, value: Any) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise NetdietError(f"{source} describes a model with more than {limit} parameters and buffers, far more "
                               "than its tensor list holds; it was written for another model or is forged")
    handles = [register_module_parameter_registration_hook(hook), register_module_buffer_registration_hook(hook)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _factory_model(header: dict, model_spec: str | None, source: str) -> tuple[nn.Module, bool]:
    """(the factory's dense model the header names, on the current default device; whether it is user code)."""
    spec = header.get("model")
    if not isinstance(spec, dict) or not isinstance(spec.get("spec"), str) or not isinstance(spec.get("kwargs") or {}, dict):
        raise NetdietError(f"{source} records no model spec, so it cannot be rebuilt; write it with state.spec set")
    name, kwargs = spec["spec"], spec.get("kwargs") or {}
    user_code = ":" in name or name.endswith(".py")
    if model_spec is not None and model_spec != name:
        raise NetdietError(f"{source} holds model '{name}' but '{model_spec}' was given; pass the same model spec")
    if user_code and model_spec != name:
        raise NetdietError(f"{source} was made from user code '{name}'; netdiet imports it only if you name it: "
                           f"pass --model {name} (model_spec='{name}')")
    if user_code and not name.endswith(".py") and torch.empty(0).is_meta:
        with torch.device("cpu"):  # import the user's module outside the meta device: its globals stay real
            resolve(name)
    return create_model(name, **kwargs), user_code


def _replay(model: nn.Module, header: dict, source: str) -> nn.Module:
    try:
        return replay_structure(model, header.get("structure") or [])
    except NetdietError:
        raise
    except Exception as exc:  # noqa: BLE001 - a structure edit that does not fit this model
        raise NetdietError(f"{source}: its architecture edits do not apply to '{header['model']['spec']}' "
                           f"({type(exc).__name__}: {str(exc)[:120]})") from None


def _rebuild_model(header: dict, model_spec: str | None, source: str) -> nn.Module:
    """The model the header describes, on the current default device."""
    return _replay(_factory_model(header, model_spec, source)[0], header, source)


def _build_skeleton(header: dict, model_spec: str | None, source: str) -> tuple[nn.Module, int]:
    """The model the header describes on the meta device, and the bytes of the factory's dense model, which the
    real rebuild holds whole before the header's structure edits replace its layers. A user's factory that cannot
    run there (it reads a value, say) is run for real -- the caller named that code -- and its model moved to meta
    before the header's structure edits are replayed."""
    most = 4 * len(header["tensors"]) + 1024
    try:
        with torch.device("meta"), _tensor_count_limit(most, source):
            dense = _factory_model(header, model_spec, source)[0]
            dense_bytes = _storage_bytes(dense)
            return _replay(dense, header, source), dense_bytes
    except NetdietError as exc:
        spec = str((header.get("model") or {}).get("spec"))
        if not (":" in spec or spec.endswith(".py")) or not str(exc).startswith("model factory"):
            raise
    model = _factory_model(header, model_spec, source)[0].to("meta")
    dense_bytes = _storage_bytes(model)
    with torch.device("meta"), _tensor_count_limit(most, source):
        return _replay(model, header, source), dense_bytes


def rebuild_model(spec: Any, structure: Any, *, expect: dict[str, tuple[int, ...]], model_spec: str | None = None,
                  max_memory: int | None = None, source: str = "checkpoint") -> nn.Module:
    """The model a file describes by `spec` + `structure` edits (a compress stage checkpoint, say), with the same
    guards as an archive: the edits type-checked, the model built on the meta device first (with at most a few more
    parameters and buffers than `expect` lists), its state_dict names and shapes checked against `expect` (the
    tensors the file holds), its weights twice over (the model and the file's copy) compared with `max_memory`
    (default: the RAM available), and only then built for real."""
    try:
        _check_structure(structure)
    except _Bad as exc:
        raise NetdietError(f"{source}: field {exc}; the file is damaged") from None
    header = {"model": spec, "structure": structure, "tensors": range(len(expect) + 8)}
    skeleton, dense_bytes = _build_skeleton(header, model_spec, source)
    own = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if own != {k: tuple(v) for k, v in expect.items()}:
        odd = sorted(set(own) ^ set(expect)) or sorted(k for k in own if own[k] != tuple(expect[k]))
        raise NetdietError(f"{source}: its tensors do not fit the model it describes (first difference: {odd[0]!r}); "
                           "the file is damaged or was written for another model")
    limit = max_memory if max_memory is not None else available_ram()
    need = max(2 * _storage_bytes(skeleton), dense_bytes)   # the rebuild holds the dense model before the edits
    if limit is not None and need > limit:
        raise NetdietError(f"{source} describes a model of {format_bytes(_storage_bytes(skeleton))} (loading it needs "
                           f"about {format_bytes(need)}{_dense_note(dense_bytes, need)}) but only "
                           f"{format_bytes(limit)} may be used; load it on a bigger machine")
    del skeleton
    return _rebuild_model(header, model_spec, source)


def _check_tensor_list(skeleton: nn.Module, header: dict, source: str) -> None:
    """The header's tensor names, dtypes and shapes against the (meta) model."""
    entries, own = header["tensors"], skeleton.state_dict()
    by_name = {e["name"]: e for e in entries}
    if set(by_name) != set(own) or len(entries) != len(own):
        missing = sorted(set(own) - set(by_name))[:3]
        extra = sorted(set(by_name) - set(own))[:3]
        raise NetdietError(f"{source}: its tensors do not fit the rebuilt model (missing {missing}, extra {extra}); "
                           "it was written for another model")
    for name, ref in own.items():
        e = by_name[name]
        if e["shape"] != list(ref.shape) or e["dtype"] != _dtype_name(ref):
            raise NetdietError(f"{source}: tensor {name} is {e['shape']} {e['dtype']} but the model has {list(ref.shape)} "
                               f"{_dtype_name(ref)}; it was written for another model or model-kw")


def _check_streams(skeleton: nn.Module, header: dict, payload: bytes, source: str) -> None:
    """Every tensor's counts and every stream's declared size (zstd frame headers included), before decoding."""
    by_name = {e["name"]: e for e in header["tensors"]}
    for name, ref in skeleton.state_dict().items():
        try:
            check_entry(by_name[name], tuple(ref.shape), payload)
        except ValueError as exc:
            raise NetdietError(f"{source} is corrupted (tensor {name}: {str(exc)[:160]}); re-create it with netdiet compress") from None


def _storage_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


_DECODER_TABLES = 48 << 20   # a Huffman decoder's tables at the widest code (2**20 entries, as arrays and lists)


def reading_bytes(skeleton: nn.Module, header: dict) -> int:
    """Bytes reading the archive takes at its peak: the model's parameters and buffers, the codes and masks the
    CompressionState keeps, the decoding scratch of the largest tensor (~40 bytes an element, plus ~48 a stored
    code; measured on a 2048x2048 int4 MLP: 156 MiB for an estimate of 292 MiB), the Huffman decoder's tables
    -- and the int8 ONNX graph, refilled with a copy of the weights, when there is one."""
    own, masks = skeleton.state_dict(), set(header.get("masks") or [])
    kept = scratch = 0
    for e in header["tensors"]:
        numel = own[e["name"]].numel()
        kept += numel * ((e["name"] in masks) + {"quant": 1, "cluster": 8}.get(e["kind"], 0))
        codes = (e["pos"].get("stream") or {}).get("n") or 0 if e["pos"]["method"] == "relidx" else 0
        # counts are clamped to what the shape allows (check_entry refuses more, after this estimate)
        scratch = max(scratch, 40 * numel + 48 * (min(e["nnz"], numel) + min(codes, 2 * numel)))
    need = _storage_bytes(skeleton) + kept + scratch + _DECODER_TABLES
    for art in (header.get("artifacts") or {}).values():
        need += 3 * int(art["stream"].get("raw") or art["stream"]["len"]) + 2 * _storage_bytes(skeleton)
    return need


def _dense_note(dense_bytes: int, need: int) -> str:
    return ": the dense model before its architecture edits" if dense_bytes >= need and dense_bytes else ""


def _check_budget(skeleton: nn.Module, header: dict, max_memory: int | None, source: str, dense_bytes: int = 0) -> None:
    """The bytes reading takes (reading_bytes), or the factory's dense model the rebuild holds before the header's
    structure edits replace its layers when that is more, against `max_memory` or the RAM available."""
    limit = max_memory if max_memory is not None else available_ram()
    need = max(reading_bytes(skeleton, header), dense_bytes)
    if limit is not None and need > limit:
        weights = _storage_bytes(skeleton)
        where = f"max_memory is {format_bytes(limit)}" if max_memory is not None else f"only {format_bytes(limit)} of RAM is available"
        raise NetdietError(f"{source} describes a model of {format_bytes(weights)} (reading it needs about {format_bytes(need)}"
                           f"{_dense_note(dense_bytes, need)}) but {where}; read it on a bigger machine or pass a larger "
                           "max_memory")


def _load_tensors(model: nn.Module, header: dict, payload: bytes) -> CompressionState:
    entries = header["tensors"]
    own = model.state_dict()   # detached views of the model's own storage: each tensor is decoded into place
    by_name = {e["name"]: e for e in entries}
    params = dict(model.named_parameters())
    mask_names = {n for n in header.get("masks") or [] if n in own}
    encodings, masks = {}, {}
    for name, ref in own.items():
        value, enc, keep = _decode_tensor(by_name[name], payload, tuple(ref.shape))
        ref.copy_(value)
        del value
        if name in mask_names:
            masks[name] = keep
        if enc is not None and name in params:
            encodings[name] = enc
    stages = header.get("stages") or []
    state = CompressionState(spec=header.get("model"), structure=list(header.get("structure") or []),
                             encodings=encodings, masks=masks, stages=stages)
    art = (header.get("artifacts") or {}).get("onnx_int8")
    if art is not None:
        if not isinstance(art, dict) or not isinstance(art.get("fill"), list):
            raise ValueError("bad ONNX artefact entry")
        blob = read_stream(payload, art.get("stream"))
        try:
            full = _refill_onnx(blob, art["fill"], model, encodings)
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
            raise ValueError(f"ONNX artefact: {type(exc).__name__}") from None
        state.artifacts["onnx_int8"] = {"model": full, "fill": art["fill"], "mode": art.get("mode"),
                                        "ops": art.get("ops"), "input_shape": art.get("input_shape"),
                                        "input_dtype": art.get("input_dtype")}
    return state
