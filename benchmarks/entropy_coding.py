"""Huffman (as in Deep Compression) vs zstd on the symbol streams of a .ndz archive: which wins, by how much.

LeNet-300-100 trained by netdiet on mnist5k, magnitude-pruned to 8 % of its weights per matrix, quantized to
int4 / int8 per channel. For every symbol stream the archive writes (relative-index gaps, quantization codes) this
prints the bytes of each coding the archive can choose from, side by side: fixed-width bit packing, zstd of the
packed bits, zstd of one byte per symbol, canonical Huffman. The archive keeps the smallest per stream.

    .venv/bin/python benchmarks/entropy_coding.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from netdiet.compression import archive, codecs  # noqa: E402
from netdiet.compression.base import CompressionState, StageContext, create_technique  # noqa: E402
from netdiet.data import get_dataset  # noqa: E402
from netdiet.fileio import atomic_write_json  # noqa: E402
from netdiet.models import create_model  # noqa: E402
from netdiet.training import TrainConfig, evaluate_accuracy, fit  # noqa: E402


def codings(symbols: np.ndarray, bits: int) -> dict[str, int]:
    packed = codecs.pack_bits(symbols, bits)
    out = {"pack": len(packed), "pack+zstd": len(codecs.zstd_compress(packed))}
    if bits <= 8:
        out["byte+zstd"] = len(codecs.zstd_compress(symbols.astype(np.uint8).tobytes()))
    huff = codecs.huffman_encode(symbols, 1 << bits)
    out["huffman"] = len(huff) if huff is not None else None
    return out


def main() -> int:
    torch.set_num_threads(1)
    data = get_dataset("mnist5k")
    torch.manual_seed(0)
    dense = create_model("lenet300")
    fit(dense, data.x_train, data.y_train, TrainConfig(epochs=3, progress=False))
    rows, doc = [], {"schema": "netdiet.bench.entropy_coding/1", "model": "lenet300", "keep": 0.08, "streams": [],
                     "accuracy_dense": evaluate_accuracy(dense, data.x_test, data.y_test)}
    for bits in (4, 8):
        model = create_model("lenet300")
        model.load_state_dict(dense.state_dict())
        state = CompressionState(spec={"spec": "lenet300", "kwargs": {}})
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    keep = p.abs() >= p.abs().flatten().kthvalue(int(p.numel() * 0.92)).values
                    p.mul_(keep)
                    state.masks[name] = keep
        create_technique("quantize", mode="int8-weight", bits=bits).apply(model, state, StageContext())
        for name, keep in state.masks.items():
            positions = torch.nonzero(keep.reshape(-1)).reshape(-1).numpy()
            b, _ = codecs.best_relidx_bits(positions)
            gaps = codecs.relidx_codes(positions, b)
            codes = state.encodings[name].q.reshape(-1)[keep.reshape(-1)].long().numpy() + (1 << (bits - 1))
            for kind, sym, w in (("relidx gaps", gaps, b), (f"int{bits} codes", codes, bits)):
                sizes = codings(sym, w)
                best = min((k for k in sizes if sizes[k] is not None), key=lambda k: sizes[k])
                row = {"tensor": name, "stream": kind, "bits": w, "symbols": int(len(sym)), "bytes": sizes, "best": best}
                doc["streams"].append(row)
                rows.append(row)
        doc[f"archive_bytes_int{bits}"] = len(archive.encode(model, state))
        doc[f"accuracy_int{bits}"] = evaluate_accuracy(model, data.x_test, data.y_test)
    doc["dense_fp32_bytes"] = archive.dense_fp32_bytes(dense)
    wins: dict[str, int] = {}
    for r in rows:
        wins[r["best"]] = wins.get(r["best"], 0) + 1
    doc["wins"] = wins
    atomic_write_json(ROOT / "results" / "entropy_coding.json", doc)

    from rich.console import Console
    from rich.table import Table
    t = Table(title="symbol-stream coding on pruned (8 % kept) LeNet-300-100: bytes per coding, smallest wins")
    for c in ("tensor", "stream", "bits", "symbols", "pack", "pack+zstd", "byte+zstd", "huffman", "best"):
        t.add_column(c, justify="left" if c in ("tensor", "stream", "best") else "right")
    for r in rows:
        b = r["bytes"]
        t.add_row(r["tensor"], r["stream"], str(r["bits"]), f"{r['symbols']:,}",
                  *[("-" if b.get(k) is None else f"{b[k]:,}") for k in ("pack", "pack+zstd", "byte+zstd", "huffman")], r["best"])
    Console(width=140).print(t)
    print(f"wins: {wins}; archive int4 {doc['archive_bytes_int4']} B, int8 {doc['archive_bytes_int8']} B, "
          f"dense fp32 {doc['dense_fp32_bytes']} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
