"""Rich tables for `netdiet data` and for memory / storage results. Renders result dicts; computes nothing."""
from __future__ import annotations

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from netdiet.units import format_bytes, format_count


def datasets_table(rows: list[tuple[str, str]]) -> Table:
    t = Table(title="netdiet datasets")
    t.add_column("name", style="bold")
    t.add_column("description")
    for name, desc in rows:
        t.add_row(name, escape(desc))
    return t


def data_tables(doc: dict) -> Group:
    """The `netdiet data NAME` view of a netdiet.data/1 document."""
    s = doc["summary"]
    head = Table(title=f"dataset {escape(s['name'])}: {escape(doc.get('description', ''))}", show_header=False)
    head.add_column("key", style="bold")
    head.add_column("value")
    head.add_row("samples", f"{s['train_samples']:,} train / {s['test_samples']:,} test")
    head.add_row("sample shape", "x".join(str(d) for d in s["input_shape"]) + f" ({s['dtype']})")
    head.add_row("classes", f"{s['num_classes']}: " + escape(", ".join(s["classes"])))
    for split, info in doc["splits"].items():
        head.add_row(f"{split} per class", ", ".join(str(c) for c in info["class_counts"]))

    store = Table(title="storage of the images as a (samples x features) matrix")
    for col, just in (("split", "left"), ("density", "right"), ("dense", "right"), ("CSR", "right"),
                      ("bitmask", "right"), ("best", "left"), ("CSR / dense", "right")):
        store.add_column(col, justify=just)
    for split, info in doc["splits"].items():
        st = info["storage"]
        if not st:
            continue
        store.add_row(split, f"{st['density']:.1%}", format_bytes(st["dense_bytes"]), format_bytes(st["csr_bytes"]),
                      format_bytes(st["bitmask_bytes"]), st["best"], f"{st['csr_bytes'] / st['dense_bytes']:.2f}x")

    samples = Table(title="first samples (train)")
    for col in ("index", "label", "class", "min", "max", "mean", "non-zero"):
        samples.add_column(col, justify="right" if col not in ("class",) else "left")
    for r in doc["samples"]:
        samples.add_row(str(r["index"]), str(r["label"]), escape(r["class"]), f"{r['min']:.3f}", f"{r['max']:.3f}",
                        f"{r['mean']:.3f}", f"{r['density']:.1%}")

    prep = Table(title="preprocessing cost per sample (measured; wall-clock, noisy)")
    for col, just in (("step", "left"), ("ns / sample", "right"), ("FLOPs / sample", "right"), ("total ms", "right"),
                      ("threads", "right")):
        prep.add_column(col, justify=just)
    for r in doc["preprocessing"]:
        prep.add_row(escape(r["step"]), f"{r['ns_per_sample']:.1f}", format_count(r["flops_per_sample"]),
                     f"{r['total_ms']:.2f}", str(r["threads"]))
    parts = [head, store, samples, prep]
    if doc.get("preview"):
        parts.insert(3, preview_text(doc["preview"]))
    return Group(*parts)


_SHADES = " .:-=+*#%@"


def preview_text(preview: dict) -> Text:
    """The first image as text: ten shades between the image's own minimum and maximum, two characters a pixel."""
    pixels = preview["pixels"]
    lo = min(min(r) for r in pixels)
    hi = max(max(r) for r in pixels)
    span = (hi - lo) or 1.0
    lines = [f"sample {preview['index']} (label {preview['label']}):"]
    for row in pixels:
        lines.append("".join(_SHADES[min(9, int((v - lo) / span * 9.999))] * 2 for v in row))
    return Text("\n".join(lines))


def memory_table(est: dict) -> Table:
    """One memory estimate (MemoryEstimate.to_dict()), optionally with the measured peak."""
    t = Table(title=f"memory: batch {est.get('batch_size')}, {est['optimizer']}, {est['dtype']}"
                    + (", amp" if est.get("amp") else "") + (", checkpointing" if est.get("checkpointing") else ""))
    t.add_column("part", style="bold")
    t.add_column("bytes", justify="right")
    for key in ("weights", "buffers", "inputs", "gradients", "optimizer_state", "activations", "temporaries",
                "peak_estimated", "peak_measured", "inference_peak"):
        if key in est and est[key] is not None:
            t.add_row(key.replace("_", " "), format_bytes(est[key]))
    return t


def weight_storage_table(doc: dict, limit: int = 30) -> Table:
    """Per-parameter sparsity and dense / CSR / bitmask bytes (analysis.storage.weight_storage)."""
    t = Table(title="weight storage: dense vs sparse layouts")
    for col in ("parameter", "shape", "sparsity", "dense", "CSR", "bitmask", "best"):
        t.add_column(col, justify="left" if col in ("parameter", "shape", "best") else "right")
    for r in doc["parameters"][:limit]:
        t.add_row(escape(r["name"]), "x".join(str(d) for d in r["shape"]), f"{1 - r['density']:.1%}",
                  format_bytes(r["dense_bytes"]), format_bytes(r["csr_bytes"]), format_bytes(r["bitmask_bytes"]), r["best"])
    tot = doc["totals"]
    t.add_row("[bold]total[/bold]", "", f"{tot['sparsity']:.1%}", format_bytes(tot["dense_bytes"]),
              format_bytes(tot["csr_bytes"]), format_bytes(tot["bitmask_bytes"]),
              f"{tot['best_single_layout']} (per-tensor best {format_bytes(tot['best_bytes'])})")
    return t
