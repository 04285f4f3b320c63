"""Terminal tables for `netdiet evaluate`: they render an EvaluateResult document, they compute nothing."""
from __future__ import annotations

from rich.console import Group
from rich.markup import escape
from rich.table import Table

from netdiet.reporting.story import timing, timing_text
from netdiet.units import format_bytes, format_count


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} ms"


def evaluate_table(doc: dict) -> Table:
    model = (doc.get("model") or {}).get("spec") or "model"
    t = Table(title=f"netdiet evaluate: {escape(str(doc.get('source')))} ({escape(str(model))})", show_header=True)
    t.add_column("figure", style="bold")
    t.add_column("value", justify="right")
    t.add_column("note")
    runtime = doc.get("runtime")
    t.add_row("accuracy", _pct(doc.get("accuracy")), f"{runtime}, {doc.get('dataset')} test split ({doc.get('samples')} samples)")
    if doc.get("accuracy_onnxruntime") is not None or runtime != "pytorch":
        t.add_row("accuracy (PyTorch)", _pct(doc.get("accuracy_pytorch")), "the rebuilt PyTorch model, same weights")
        t.add_row("accuracy (ONNX Runtime)", _pct(doc.get("accuracy_onnxruntime")), "")
    t.add_row("bytes on disk", f"{doc['bytes_on_disk']:,} B", format_bytes(doc["bytes_on_disk"]))
    t.add_row("dense fp32 safetensors", f"{doc['dense_fp32_bytes']:,} B", format_bytes(doc["dense_fp32_bytes"]))
    t.add_row("ratio", f"{doc['ratio']:.1f}x", "smaller than dense fp32: its bytes / bytes on disk (as compress reports it)")
    t.add_row("parameters", format_count(doc.get("params")),
              f"{format_count(doc.get('nonzero_params'))} nonzero ({100 * doc.get('sparsity', 0):.1f} % sparse)")
    t.add_row("MACs / sample", format_count(doc.get("macs")), "dense count of the stored architecture")
    lat = doc.get("latency_ms") or {}
    batch = doc.get("latency_batch")
    for key, label in (("pytorch", "latency PyTorch"), ("onnxruntime", "latency ONNX Runtime")):
        if lat.get(key) is not None:
            d = (doc.get("latency_detail") or {}).get(key, {})
            tm = timing(lat[key], d.get("ci"), d.get("stable"), d.get("threads"))
            runs = f", {d['repeats']} runs in {d.get('seconds', 0):.1f} s" if d.get("repeats") else ""
            value = _ms(lat[key]) if tm["stable"] else f"~{_ms(lat[key])}"
            t.add_row(label, value, f"median, batch {batch}: {timing_text(tm).split(' ', 2)[2]}{runs}; p95 {_ms(d.get('p95'))}")
    sp = doc.get("latency_speedup")
    if isinstance(sp, dict):
        if sp.get("stable") and sp.get("value") is not None:
            t.add_row("ONNX Runtime speed-up", f"{sp['value']:.2f}x",
                      f"PyTorch / ORT median, timed interleaved; interval {sp['low']:.2f}-{sp['high']:.2f}")
        else:
            t.add_row("ONNX Runtime speed-up", "-", "not shown: a timing was unstable (~); rerun on a quieter machine")
    return t


def tensors_table(doc: dict) -> Table:
    # short headers and folding cells: eight columns at 80 characters without cutting a name or number to '…'
    t = Table(title="storage per tensor", caption="numel = elements; nnz = nonzero elements; pos = how the nonzero "
                                                  "positions are stored; bytes = bytes in the archive")
    for col, just in (("tensor", "left"), ("encoding", "left"), ("bits", "right"), ("numel", "right"),
                      ("nnz", "right"), ("pos", "left"), ("bytes", "right"), ("codecs", "left")):
        t.add_column(col, justify=just, overflow="fold")
    for r in doc.get("tensors") or []:
        t.add_row(escape(str(r["name"])), str(r["encoding"]), str(r["bits"] or "-"), f"{r['numel']:,}", f"{r['nonzero']:,}",
                  str(r["positions"]), f"{r['bytes']:,}", ", ".join(r["codecs"]))
    return t


def evaluate_report(doc: dict, *, tensors: bool = False) -> Group:
    parts = [evaluate_table(doc)]
    if tensors and doc.get("tensors"):
        parts.append(tensors_table(doc))
    for w in doc.get("warnings") or []:
        parts.append(f"[yellow]note:[/yellow] {escape(str(w))}")
    return Group(*parts)
