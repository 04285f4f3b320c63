"""The byte-level codecs of the .ndz archive: bit packing, canonical Huffman, zstd, the payload of streams (each
stored raw, zstd or Huffman, whichever is smallest), and Deep Compression's relative indices for sparse positions.

Everything here works on numpy arrays and bytes; archive.py decides what goes into which stream.
"""
from __future__ import annotations

import heapq
import struct
from typing import Any

import numpy as np

from netdiet.fileio import MAX_JSON_DEPTH, parse_json

MAX_HEADER = 8 * 1024 * 1024    # bytes a header may take, compressed or decompressed (a 1,000-tensor model needs ~0.3 MB)
MAX_HEADER_MEMORY = 64 << 20    # Python objects the parsed header may take (a 1,000-tensor model's: ~1.5 MB)
MAX_EXPANSION = 1 << 16         # zstd's ceiling is ~32,768:1 (RLE blocks of 128 KiB); a stream claiming more is forged
MAX_BLOB_EXPANSION = 64         # an untyped blob (the ONNX graph without its weights) inflates at most this much...
MIN_BLOB_CLAIM = 1 << 20        # ...or to 1 MiB, whichever is larger
HUFFMAN_MAX_LEN = 20
HUFFMAN_MAX_SYMBOLS = 1 << 22   # the encoder Huffman-codes no longer stream, so the decoder accepts none
_HUFFMAN_CHUNK = 1 << 16        # bits decoded per window table: the decoder's scratch stays ~3 MB whatever the stream
SYMBOL_CODECS = ("pack", "pack+zstd", "byte+zstd", "huffman")
BYTE_CODECS = ("raw", "zstd")


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
    # one bit plane at a time: bits + 16 bytes of scratch per symbol (an int64 matrix of all planes took 8 * bits)
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little", count=n * bits).reshape(n, bits)
    out = np.zeros(n, dtype=np.int64)
    for k in range(bits):
        out |= planes[:, k].astype(np.int64) << k
    return out


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


def huffman_bounds(n: int, length: int) -> None:
    """A Huffman stream of n symbols in `length` bytes: its table fits, and its bits are neither too few nor too many
    for n codes of 1..HUFFMAN_MAX_LEN bits (so junk after the last code, or a claim of more symbols, is refused)."""
    if not 0 < n <= HUFFMAN_MAX_SYMBOLS:
        raise ValueError(f"Huffman stream of {n} symbols (at most {HUFFMAN_MAX_SYMBOLS} are ever written)")
    body = length - 4 - 1   # at least one code-length byte
    if body < (n + 7) // 8 or length > 4 + 65536 + (n * HUFFMAN_MAX_LEN + 7) // 8:
        raise ValueError(f"Huffman stream of {length} bytes cannot hold {n} symbols")


def huffman_decode(data: bytes, n: int) -> np.ndarray:
    huffman_bounds(n, len(data))
    (size,) = struct.unpack_from("<I", data)
    if size == 0 or size > 65536 or len(data) < 4 + size:
        raise ValueError("Huffman table is malformed")
    lengths = np.frombuffer(data, dtype=np.uint8, count=size, offset=4).astype(np.int64)
    if lengths.max() == 0 or lengths.max() > HUFFMAN_MAX_LEN:
        raise ValueError("Huffman code lengths are malformed")
    # a prefix code must satisfy Kraft's inequality (<= 1); larger means the table was damaged
    if np.sum(np.ldexp(1.0, -lengths[lengths > 0])) > 1.0 + 1e-12:
        raise ValueError("Huffman code lengths violate Kraft's inequality")
    used = lengths[lengths > 0]
    stream = np.frombuffer(data, dtype=np.uint8, offset=4 + size)
    # every code takes between the shortest and the longest code length: the stream must be exactly that long
    if not (n * int(used.min()) + 7) // 8 <= len(stream) <= (n * int(used.max()) + 7) // 8:
        raise ValueError(f"Huffman stream of {len(stream)} bytes does not fit {n} symbols of its code lengths")
    width = int(lengths.max())
    codes = canonical_codes(lengths)
    sym_tab = np.full(1 << width, -1, dtype=np.int64)
    len_tab = np.zeros(1 << width, dtype=np.int64)
    for s in np.flatnonzero(lengths):
        lo = int(codes[s]) << (width - int(lengths[s]))
        hi = lo + (1 << (width - int(lengths[s])))
        sym_tab[lo:hi], len_tab[lo:hi] = s, lengths[s]
    bits = np.unpackbits(stream)
    end = len(bits)
    padded = np.concatenate([bits, np.zeros(width, dtype=np.uint8)])
    weights = 1 << np.arange(width - 1, -1, -1, dtype=np.int64)
    syms, lens = sym_tab.tolist(), len_tab.tolist()
    out = np.empty(n, dtype=np.int64)
    pos, i = 0, 0
    while i < n:
        if pos >= end:
            raise ValueError("Huffman stream ended early")
        # the width-bit window at every bit position of one chunk (a table of the whole stream took 44 bytes a bit)
        lo, hi = pos, min(pos + _HUFFMAN_CHUNK, end)
        win = (np.lib.stride_tricks.sliding_window_view(padded[lo:hi + width], width)[: hi - lo].astype(np.int64)
               @ weights).tolist()
        chunk = []
        while i < n and pos < hi:
            v = win[pos - lo]
            s = syms[v]
            if s < 0:
                raise ValueError("invalid Huffman code")
            chunk.append(s)
            pos += lens[v]
            i += 1
        out[i - len(chunk):i] = chunk
    if pos > end or (pos + 7) // 8 != len(stream) or bits[pos:].any():
        raise ValueError("Huffman stream has bytes after its last symbol")
    return out


def zstd_compress(data: bytes) -> bytes:
    import zstandard
    # level 19 where it is cheap (small models, where every byte counts); 9 for big streams keeps writes quick
    return zstandard.ZstdCompressor(level=19 if len(data) < (1 << 20) else 9).compress(data)


def zstd_decompress(data: bytes, size: int | None = None, *, limit: int | None = None) -> bytes:
    """One zstd frame, exactly `size` bytes (or at most `limit` when the size is not known); nothing after it.

    The frame header's content size is checked before anything is decoded, and libzstd refuses a frame that
    decodes past its content size, so no claim -- true or forged -- makes this allocate more than asked."""
    import zstandard
    claimed = _frame_size(data[:18])
    if claimed < 0:
        raise ValueError("zstd frame does not record its size (netdiet always writes it)")
    if size is not None and claimed != size:
        raise ValueError(f"zstd stream claims {claimed} bytes, expected {size}")
    if limit is not None and claimed > limit:
        raise ValueError(f"zstd stream claims {claimed} bytes, more than the {limit} allowed")
    if claimed > max(len(data), 1) * MAX_EXPANSION:
        raise ValueError(f"zstd stream of {len(data)} bytes claims {claimed}, beyond zstd's ratio")
    dobj = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = dobj.decompress(data)
    except zstandard.ZstdError as exc:
        raise ValueError(f"zstd: {exc}") from None
    if not dobj.eof or dobj.unused_data:
        raise ValueError("zstd stream is truncated or has bytes after its frame")
    if len(out) != claimed:
        raise ValueError(f"zstd stream decompressed to {len(out)} bytes, expected {claimed}")
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


def _span(payload_len: int, meta: Any) -> tuple[int, int, Any]:
    if not isinstance(meta, dict):
        raise ValueError("stream entry is not an object")
    off, length, codec = meta.get("off"), meta.get("len"), meta.get("codec")
    if not (type(off) is int and type(length) is int and 0 <= off and 0 <= length and off + length <= payload_len):
        raise ValueError("stream lies outside the payload")
    return off, length, codec


def _frame_size(head: bytes) -> int:
    """The content size a zstd frame header declares (-1 when it declares none), from its first bytes."""
    import zstandard
    try:
        return zstandard.frame_content_size(head)
    except zstandard.ZstdError as exc:
        raise ValueError(f"zstd: {exc}") from None


def check_stream(payload: bytes, meta: Any, expect_raw: int | None = None) -> int:
    """The bytes a byte stream will decode to, from its entry and its zstd frame header (nothing is decoded):
    its declared size must be the one expected, and no larger than its stored length allows."""
    off, length, codec = _span(len(payload), meta)
    if codec == "raw":
        raw = length
    elif codec == "zstd":
        raw = meta.get("raw")
        if type(raw) is not int or raw < 0:
            raise ValueError("stream size is inconsistent")
        if raw > max(length, 1) * MAX_EXPANSION:
            raise ValueError(f"stream of {length} bytes claims {raw}, beyond zstd's ratio")
        if expect_raw is None and raw > max(MIN_BLOB_CLAIM, MAX_BLOB_EXPANSION * length):
            raise ValueError("stream claims an implausible size")
        if _frame_size(payload[off:off + min(length, 18)]) != raw:   # a frame header takes at most 18 bytes
            raise ValueError(f"zstd frame does not hold the {raw} bytes its entry declares")
    else:
        raise ValueError(f"unknown byte-stream codec {codec!r}")
    if expect_raw is not None and raw != expect_raw:
        raise ValueError(f"stream holds {raw} bytes, expected {expect_raw}")
    return raw


def check_symbols(payload: bytes, meta: Any, bits: int, n: int) -> None:
    """A symbol stream's entry matches its tensor (width, count) and its length can hold exactly n symbols."""
    if not isinstance(meta, dict) or meta.get("bits") != bits or meta.get("n") != n:
        raise ValueError("symbol stream does not match its tensor")
    off, length, codec = _span(len(payload), meta)
    need = (n * bits + 7) // 8
    if codec == "pack":
        if length != need:
            raise ValueError(f"packed stream has {length} bytes, expected {need}")
    elif codec == "pack+zstd" or (codec == "byte+zstd" and bits <= 8):
        raw = need if codec == "pack+zstd" else n
        if raw > max(length, 1) * MAX_EXPANSION:
            raise ValueError(f"stream of {length} bytes claims {n} symbols, beyond zstd's ratio")
        if _frame_size(payload[off:off + min(length, 18)]) != raw:
            raise ValueError(f"zstd frame does not hold the {raw} bytes {n} symbols take")
    elif codec == "huffman":
        huffman_bounds(n, length)
    else:
        raise ValueError(f"unknown symbol codec {codec!r}")


def read_stream(payload: bytes, meta: Any, expect_raw: int | None = None) -> bytes:
    raw = check_stream(payload, meta, expect_raw)
    off, length, codec = _span(len(payload), meta)
    data = payload[off:off + length]
    return data if codec == "raw" else zstd_decompress(data, raw)


def read_symbols(payload: bytes, meta: Any, bits: int, n: int) -> np.ndarray:
    check_symbols(payload, meta, bits, n)
    off, length, codec = _span(len(payload), meta)
    data = payload[off:off + length]
    need = (n * bits + 7) // 8
    if codec == "pack":
        out = unpack_bits(data, bits, n)
    elif codec == "pack+zstd":
        out = unpack_bits(zstd_decompress(data, need), bits, n)
    elif codec == "byte+zstd":
        out = np.frombuffer(zstd_decompress(data, n), dtype=np.uint8).astype(np.int64)
    else:
        out = huffman_decode(data, n)
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




# ================================================================== the header's JSON
def load_header_json(blob: bytes) -> Any:
    """The header's zstd-compressed JSON, decoded into at most MAX_HEADER bytes, nested at most MAX_JSON_DEPTH
    deep, holding at most MAX_HEADER_MEMORY of parsed objects, with every number finite (NaN, Infinity and 1e999
    are refused): ValueError otherwise."""
    return parse_json(zstd_decompress(blob, limit=MAX_HEADER), max_depth=MAX_JSON_DEPTH, max_memory=MAX_HEADER_MEMORY)
