"""The byte-level codecs of the .ndz archive: bit packing, canonical Huffman, zstd, the payload of streams (each
stored raw, zstd or Huffman, whichever is smallest), and Deep Compression's relative indices for sparse positions.

Everything here works on numpy arrays and bytes; archive.py decides what goes into which stream.
"""
from __future__ import annotations

import heapq
import struct
from typing import Any

import numpy as np

MAX_HEADER = 64 * 1024 * 1024   # bytes a header (and the floor of any stream's claimed size) may take
HUFFMAN_MAX_LEN = 20
HUFFMAN_MAX_SYMBOLS = 1 << 22


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Unsigned ints < 2**bits packed at `bits` bits each, least significant bit first."""
    v = np.asarray(values, dtype=np.uint32)
    if v.size == 0:
        return b""
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, n: int) -> np.ndarray:
    need = (n * bits + 7) // 8
    if len(data) != need:
        raise ValueError(f"packed stream has {len(data)} bytes, expected {need}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little", count=n * bits)
    return flat.reshape(n, bits).astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))


def huffman_lengths(counts: np.ndarray) -> np.ndarray | None:
    """Code length per symbol (0 = unused) of a Huffman code for these frequencies; None when longer than allowed."""
    used = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths
    heap = [(int(counts[s]), i, [int(s)]) for i, s in enumerate(used)]
    heapq.heapify(heap)
    tie = len(heap)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return None if lengths.max() > HUFFMAN_MAX_LEN else lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical Huffman: symbols sorted by (length, symbol) get consecutive codes."""
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        codes[s] = code
        code += 1
        prev = int(lengths[s])
    return codes


def huffman_encode(symbols: np.ndarray, n_symbols: int) -> bytes | None:
    """[u32 alphabet size][one byte code length per symbol][bit stream, MSB first]; None if not encodable."""
    if symbols.size == 0 or symbols.size > HUFFMAN_MAX_SYMBOLS or n_symbols > 65536:
        return None
    counts = np.bincount(symbols, minlength=n_symbols)
    lengths = huffman_lengths(counts)
    if lengths is None:
        return None
    size = int(np.flatnonzero(lengths).max()) + 1
    codes = canonical_codes(lengths)
    lens, vals = lengths[symbols], codes[symbols]
    width = int(lens.max())
    shifts = lens[:, None] - 1 - np.arange(width)[None, :]
    bits = (vals[:, None] >> np.clip(shifts, 0, None)) & 1
    stream = np.packbits(bits[shifts >= 0].astype(np.uint8)).tobytes()
    return struct.pack("<I", size) + lengths[:size].astype(np.uint8).tobytes() + stream


def huffman_decode(data: bytes, n: int) -> np.ndarray:
    if len(data) < 4:
        raise ValueError("Huffman stream too short")
    (size,) = struct.unpack_from("<I", data)
    if size == 0 or size > 65536 or len(data) < 4 + size:
        raise ValueError("Huffman table is malformed")
    lengths = np.frombuffer(data, dtype=np.uint8, count=size, offset=4).astype(np.int64)
    if lengths.max() == 0 or lengths.max() > HUFFMAN_MAX_LEN:
        raise ValueError("Huffman code lengths are malformed")
    # a prefix code must satisfy Kraft's inequality (<= 1); larger means the table was damaged
    if np.sum(np.ldexp(1.0, -lengths[lengths > 0])) > 1.0 + 1e-12:
        raise ValueError("Huffman code lengths violate Kraft's inequality")
    width = int(lengths.max())
    codes = canonical_codes(lengths)
    sym_tab = np.full(1 << width, -1, dtype=np.int64)
    len_tab = np.zeros(1 << width, dtype=np.int64)
    for s in np.flatnonzero(lengths):
        lo = int(codes[s]) << (width - int(lengths[s]))
        hi = lo + (1 << (width - int(lengths[s])))
        sym_tab[lo:hi], len_tab[lo:hi] = s, lengths[s]
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, offset=4 + size))
    if n > len(bits):
        raise ValueError("Huffman stream is shorter than its symbol count")
    padded = np.concatenate([bits, np.zeros(width, dtype=np.uint8)]).astype(np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(padded, width)[: len(bits)] @ (1 << np.arange(width - 1, -1, -1))
    win, syms, lens = windows.tolist(), sym_tab.tolist(), len_tab.tolist()
    out = [0] * n
    pos, end = 0, len(bits)
    for i in range(n):
        if pos >= end:
            raise ValueError("Huffman stream ended early")
        v = win[pos]
        s = syms[v]
        if s < 0:
            raise ValueError("invalid Huffman code")
        out[i] = s
        pos += lens[v]
    return np.asarray(out, dtype=np.int64)


def zstd_compress(data: bytes) -> bytes:
    import zstandard
    # level 19 where it is cheap (small models, where every byte counts); 9 for big streams keeps writes quick
    return zstandard.ZstdCompressor(level=19 if len(data) < (1 << 20) else 9).compress(data)


def zstd_decompress(data: bytes, size: int) -> bytes:
    """Exactly `size` bytes; reads at most size + 1, whatever the frame header claims (it may be corrupted)."""
    import io

    import zstandard
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
            out = reader.read(size + 1)
    except zstandard.ZstdError as exc:
        raise ValueError(f"zstd: {exc}") from None
    if len(out) != size:
        raise ValueError(f"zstd stream decompressed to {len(out)} bytes, expected {size}")
    return out


class Payload:
    """Collects streams; each `add_*` returns the stream's header entry."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.offset = 0
        self.codecs: dict[str, int] = {}

    def _put(self, data: bytes, meta: dict) -> dict:
        meta = {"off": self.offset, "len": len(data), **meta}
        self.parts.append(data)
        self.offset += len(data)
        self.codecs[meta["codec"]] = self.codecs.get(meta["codec"], 0) + 1
        return meta

    def add_bytes(self, raw: bytes) -> dict:
        z = zstd_compress(raw) if raw else raw
        if len(z) < len(raw):
            return self._put(z, {"codec": "zstd", "raw": len(raw)})
        return self._put(raw, {"codec": "raw", "raw": len(raw)})

    def add_symbols(self, symbols: np.ndarray, bits: int) -> dict:
        """Unsigned ints < 2**bits: the smallest of bit-packed, zstd of it, byte-per-symbol zstd, Huffman."""
        symbols = np.asarray(symbols, dtype=np.int64)
        packed = pack_bits(symbols, bits)
        options = [(packed, {"codec": "pack"})]
        if packed:
            options.append((zstd_compress(packed), {"codec": "pack+zstd", "raw": len(packed)}))
            if bits <= 8:
                as_bytes = symbols.astype(np.uint8).tobytes()
                options.append((zstd_compress(as_bytes), {"codec": "byte+zstd", "raw": len(as_bytes)}))
            huff = huffman_encode(symbols, 1 << bits)
            if huff is not None:
                options.append((huff, {"codec": "huffman"}))
        data, meta = min(options, key=lambda o: len(o[0]))
        return self._put(data, {**meta, "bits": bits, "n": int(symbols.size)})

    def blob(self) -> bytes:
        return b"".join(self.parts)


def read_stream(payload: bytes, meta: Any, expect_raw: int | None = None) -> bytes:
    if not isinstance(meta, dict):
        raise ValueError("stream entry is not an object")
    off, length, codec = meta.get("off"), meta.get("len"), meta.get("codec")
    if not (isinstance(off, int) and isinstance(length, int) and 0 <= off and 0 <= length and off + length <= len(payload)):
        raise ValueError("stream lies outside the payload")
    data = payload[off:off + length]
    if codec == "raw":
        out = data
    elif codec == "zstd":
        raw = meta.get("raw")
        if not isinstance(raw, int) or raw < 0 or (expect_raw is not None and raw != expect_raw):
            raise ValueError("stream size is inconsistent")
        if expect_raw is None and raw > max(MAX_HEADER, 64 * length):
            raise ValueError("stream claims an implausible size")
        out = zstd_decompress(data, raw)
    else:
        raise ValueError(f"unknown byte-stream codec {codec!r}")
    if expect_raw is not None and len(out) != expect_raw:
        raise ValueError(f"stream holds {len(out)} bytes, expected {expect_raw}")
    return out


def read_symbols(payload: bytes, meta: Any, bits: int, n: int) -> np.ndarray:
    if not isinstance(meta, dict) or meta.get("bits") != bits or meta.get("n") != n:
        raise ValueError("symbol stream does not match its tensor")
    off, length, codec = meta.get("off"), meta.get("len"), meta.get("codec")
    if not (isinstance(off, int) and isinstance(length, int) and 0 <= off and 0 <= length and off + length <= len(payload)):
        raise ValueError("stream lies outside the payload")
    data = payload[off:off + length]
    need = (n * bits + 7) // 8
    if codec == "pack":
        out = unpack_bits(data, bits, n)
    elif codec == "pack+zstd":
        out = unpack_bits(zstd_decompress(data, need), bits, n)
    elif codec == "byte+zstd" and bits <= 8:
        out = np.frombuffer(zstd_decompress(data, n), dtype=np.uint8).astype(np.int64)
    elif codec == "huffman":
        out = huffman_decode(data, n)
    else:
        raise ValueError(f"unknown symbol codec {codec!r}")
    if out.size and (out.min() < 0 or out.max() >= (1 << bits)):
        raise ValueError("symbol out of range")
    return out


# ================================================================== sparse positions
def relidx_codes(positions: np.ndarray, bits: int) -> np.ndarray:
    """Deep Compression's relative indices: gap to the previous stored position; code 2^b-1 = skip 2^b-1."""
    skip = (1 << bits) - 1
    gaps = np.diff(np.concatenate([[-1], positions])) - 1
    fillers = gaps // skip
    out = np.full(int(len(positions) + fillers.sum()), skip, dtype=np.int64)
    out[np.cumsum(fillers + 1) - 1] = gaps % skip
    return out


def relidx_positions(codes: np.ndarray, bits: int, numel: int, nnz: int) -> np.ndarray:
    skip = (1 << bits) - 1
    is_elem = codes != skip
    steps = np.where(is_elem, codes + 1, skip)
    pos = np.cumsum(steps)[is_elem] - 1
    if len(pos) != nnz or (len(pos) and pos[-1] >= numel):
        raise ValueError("relative indices do not fit the tensor")
    return pos


def best_relidx_bits(positions: np.ndarray) -> tuple[int, int]:
    """(bits, number of codes) minimising the relative-index stream."""
    gaps = np.diff(np.concatenate([[-1], positions])) - 1
    best = None
    for b in range(1, 17):
        n = int(len(positions) + (gaps // ((1 << b) - 1)).sum())
        if best is None or n * b < best[1] * best[0]:
            best = (b, n)
    return best


