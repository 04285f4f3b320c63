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
"""
from __future__ import annotations

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

from netdiet import __version__
from netdiet.compression.base import CompressionState, Encoding, replay_structure
from netdiet.compression.codecs import (
    MAX_HEADER,
    Payload,
    best_relidx_bits,
    read_stream,
    read_symbols,
    relidx_codes,
    relidx_positions,
    zstd_compress,
)
from netdiet.errors import NetdietError
from netdiet.fileio import atomic_write_bytes, dumps_json
from netdiet.models import create_model

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


def _decode_tensor(entry: dict, payload: bytes, shape: tuple[int, ...]) -> tuple[torch.Tensor, Encoding | None, torch.Tensor]:
    numel = math.prod(shape)
    kind, nnz, pos = entry.get("kind"), entry.get("nnz"), entry.get("pos")
    if not isinstance(nnz, int) or not 0 <= nnz <= numel or not isinstance(pos, dict):
        raise ValueError("bad value count or positions")
    method = pos.get("method")
    if method == "all":
        if nnz != numel:
            raise ValueError("dense tensor with a partial value count")
        keep = torch.ones(numel, dtype=torch.bool)
    elif method == "bitmask":
        raw = read_stream(payload, pos.get("stream"), (numel + 7) // 8)
        keep = torch.from_numpy(np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little", count=numel).astype(bool))
        if int(keep.sum()) != nnz:
            raise ValueError("bitmask does not match the value count")
    elif method == "relidx":
        b = pos.get("bits")
        stream = pos.get("stream")
        if not isinstance(b, int) or not 1 <= b <= 16 or not isinstance(stream, dict):
            raise ValueError("bad relative-index width")
        n_codes = stream.get("n")
        if not isinstance(n_codes, int) or not nnz <= n_codes <= numel + nnz:
            raise ValueError("bad relative-index count")
        codes = read_symbols(payload, stream, b, n_codes)
        keep = torch.zeros(numel, dtype=torch.bool)
        keep[torch.from_numpy(relidx_positions(codes, b, numel, nnz))] = True
    else:
        raise ValueError(f"unknown position method {method!r}")

    enc: Encoding | None = None
    if kind == "dense":
        store = str(entry.get("store"))
        if store not in _DENSE_DTYPES:
            raise ValueError(f"unknown dtype {store!r}")
        item = torch.empty(0, dtype=_DENSE_DTYPES[store]).element_size()
        values = _tensor_from(read_stream(payload, entry.get("values"), nnz * item), store, nnz)
        if store in ("float16", "bfloat16"):
            enc = Encoding(kind="dense", bits=16, dtype=store)
        full = torch.zeros(numel, dtype=values.dtype)
        full[keep] = values
    elif kind in ("quant", "cluster"):
        bits = entry.get("bits")
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError("bits outside 1..8")
        symbols = torch.from_numpy(read_symbols(payload, entry.get("values"), bits, nnz))
        if kind == "quant":
            axis, channels = entry.get("axis"), entry.get("channels")
            if not isinstance(axis, int) or not 0 <= axis < max(len(shape), 1) or channels not in (1, shape[axis] if shape else 1):
                raise ValueError("bad quantization axis or channel count")
            scale = _tensor_from(read_stream(payload, entry.get("scale"), 4 * channels), "float32", channels)
            zp = None
            if "zero_point" in entry:
                zp = _tensor_from(read_stream(payload, entry["zero_point"], 4 * channels), "float32", channels)
                if entry.get("zp_dtype") == "int64":
                    zp = zp.long()
            offset = (1 << (bits - 1)) if bits >= 2 else 0
            q = torch.zeros(numel, dtype=torch.int64)
            q[keep] = symbols - offset
            enc = Encoding(kind="quant", bits=bits, q=q.to(torch.int8).reshape(shape), scale=scale, zero_point=zp, axis=axis)
        else:
            size = entry.get("codebook_size")
            if not isinstance(size, int) or not 1 <= size <= 256:
                raise ValueError("bad codebook size")
            codebook = _tensor_from(read_stream(payload, entry.get("codebook"), 4 * size), "float32", size)
            if symbols.numel() and int(symbols.max()) >= size:
                raise ValueError("cluster index beyond the codebook")
            idx = torch.zeros(numel, dtype=torch.int64)
            idx[keep] = symbols
            enc = Encoding(kind="cluster", bits=bits, codebook=codebook, indices=idx.reshape(shape))
        value = enc.dequantize().float().reshape(-1)
        full = torch.where(keep, value, torch.zeros_like(value))
    else:
        raise ValueError(f"unknown encoding kind {kind!r}")
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
def dense_fp32_bytes(model: nn.Module) -> int:
    """Bytes of the model's state_dict as a dense fp32 safetensors file (the denominator of every ratio)."""
    from safetensors.torch import save
    tensors = {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().clone()
               for k, v in model.state_dict().items()}
    return len(save(tensors))


def _versions() -> dict:
    out = {"netdiet": __version__, "torch": torch.__version__}
    try:
        import onnxruntime
        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def _dense_baseline_bytes(model: nn.Module, state: CompressionState) -> int:
    if not state.structure or not state.spec:
        return dense_fp32_bytes(model)
    try:
        return dense_fp32_bytes(create_model(state.spec["spec"], **(state.spec.get("kwargs") or {})))
    except NetdietError:
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
        "dense_fp32_bytes": _dense_baseline_bytes(model, state),
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
    head = zstd_compress(dumps_json(doc).encode("utf-8"))
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
    """(header, payload) after the magic, length and checksum checks."""
    if len(data) < len(MAGIC) + 4 + _DIGEST or data[:4] != MAGIC:
        raise NetdietError(f"{source} is not a netdiet archive (.ndz) or is truncated; give a file written by netdiet compress")
    if hashlib.sha256(data[:-_DIGEST]).digest() != data[-_DIGEST:]:
        raise NetdietError(f"{source} failed its checksum (truncated or corrupted); re-create it with netdiet compress")
    (hlen,) = struct.unpack_from("<I", data, 4)
    if hlen > MAX_HEADER or 8 + hlen > len(data) - _DIGEST:
        raise NetdietError(f"{source} has a malformed header length; re-create it with netdiet compress")
    try:
        header = json.loads(_zstd_decompress_any(data[8:8 + hlen]).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise NetdietError(f"{source} has an unreadable header ({exc}); re-create it with netdiet compress") from None
    payload = data[8 + hlen:-_DIGEST]
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise NetdietError(f"{source} is not a {FORMAT} archive (format {header.get('format') if isinstance(header, dict) else None!r}); "
                           "it may be from a newer netdiet")
    if header.get("payload_bytes") != len(payload) or header.get("payload_sha256") != hashlib.sha256(payload).hexdigest():
        raise NetdietError(f"{source}: the payload does not match the header's checksum; re-create it with netdiet compress")
    return header, payload


def _zstd_decompress_any(data: bytes) -> bytes:
    import io

    import zstandard
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
            out = reader.read(MAX_HEADER + 1)
    except zstandard.ZstdError as exc:
        raise ValueError(f"zstd: {exc}") from None
    if len(out) > MAX_HEADER:
        raise ValueError("header too large")
    return out


def read(path_or_bytes: str | Path | bytes, *, model_spec: str | None = None) -> LoadedArchive:
    """Rebuild the model and its CompressionState. Zoo models rebuild freely; a user's `pkg.mod:fn` or
    `file.py:fn` is imported only when the caller passes that same spec as `model_spec`."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, source = bytes(path_or_bytes), "archive"
    else:
        path = Path(path_or_bytes)
        if not path.is_file():
            raise NetdietError(f"archive {path} does not exist; check the path")
        data, source = path.read_bytes(), str(path)
    header, payload = read_header(data, source)
    model = _rebuild_model(header, model_spec, source)
    try:
        state = _load_tensors(model, header, payload)
    except NetdietError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, OverflowError, AttributeError, MemoryError,
            struct.error) as exc:
        raise NetdietError(f"{source} is corrupted ({type(exc).__name__}: {str(exc)[:160]}); re-create it with netdiet compress") from None
    return LoadedArchive(model=model, state=state, header=header, nbytes=len(data))


def _rebuild_model(header: dict, model_spec: str | None, source: str) -> nn.Module:
    spec = header.get("model")
    if not isinstance(spec, dict) or not isinstance(spec.get("spec"), str) or not isinstance(spec.get("kwargs", {}), dict):
        raise NetdietError(f"{source} records no model spec, so it cannot be rebuilt; write it with state.spec set")
    name, kwargs = spec["spec"], spec.get("kwargs") or {}
    user_code = ":" in name or name.endswith(".py")
    if model_spec is not None and model_spec != name:
        raise NetdietError(f"{source} holds model '{name}' but '{model_spec}' was given; pass the same model spec")
    if user_code and model_spec != name:
        raise NetdietError(f"{source} was made from user code '{name}'; netdiet imports it only if you name it: "
                           f"pass --model {name} (model_spec='{name}')")
    model = create_model(name, **kwargs)
    try:
        model = replay_structure(model, header.get("structure") or [])
    except NetdietError:
        raise
    except Exception as exc:  # noqa: BLE001 - a structure edit that does not fit this model
        raise NetdietError(f"{source}: its architecture edits do not apply to '{name}' ({type(exc).__name__}: {str(exc)[:120]})") from None
    return model


def _load_tensors(model: nn.Module, header: dict, payload: bytes) -> CompressionState:
    entries = header.get("tensors")
    if not isinstance(entries, list):
        raise ValueError("no tensor list")
    own = model.state_dict()
    by_name = {e.get("name"): e for e in entries if isinstance(e, dict)}
    if set(by_name) != set(own) or len(entries) != len(own):
        missing = sorted(set(own) - set(by_name))[:3]
        raise NetdietError(f"archive tensors do not fit the rebuilt model (missing {missing}); it was written for another model")
    params = dict(model.named_parameters())
    state_dict, encodings, keeps = {}, {}, {}
    for name, ref in own.items():
        e = by_name[name]
        shape = tuple(ref.shape)
        if e.get("shape") != list(shape) or e.get("dtype") != _dtype_name(ref):
            raise NetdietError(f"archive tensor {name} is {e.get('shape')} {e.get('dtype')} but the model has {list(shape)} "
                               f"{_dtype_name(ref)}; it was written for another model or model-kw")
        value, enc, keep = _decode_tensor(e, payload, shape)
        state_dict[name] = value.to(ref.dtype)
        keeps[name] = keep
        if enc is not None and name in params:
            encodings[name] = enc
    model.load_state_dict(state_dict, strict=True)
    masks = {n: keeps[n] for n in header.get("masks") or [] if isinstance(n, str) and n in keeps}
    stages = header.get("stages") if isinstance(header.get("stages"), list) else []
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
