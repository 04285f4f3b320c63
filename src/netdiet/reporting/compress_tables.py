"""Terminal tables for `netdiet compress`: one row per stage, the baseline first. Renders; computes nothing."""
from __future__ import annotations

from rich import box
from rich.markup import escape
from rich.table import Table

from netdiet.reporting.story import stage_timing, timing
from netdiet.units import format_bytes, format_count


def _acc(a: float | None) -> str:
    return "-" if a is None else f"{100 * a:.2f}"


def _delta(a: float | None, base: float | None) -> str:
    if a is None or base is None:
        return "-"
    d = 100 * (a - base)
    return f"{d:+.2f}"


def _ms(row: dict) -> str:
    """The latency of the runtime that deploys the file (ORT when it was measured); '~' marks an unstable timing."""
    median, ci, stable, _threads = stage_timing(row)
    t = timing(median, ci, stable, None)
    if t is None:
        return "-"
    ort = " ort" if isinstance(row.get("latency_ms"), dict) and row["latency_ms"].get("onnxruntime") is not None else ""
    return f"{'' if t['stable'] else '~'}{t['median']:.2f}{ort}"


def _threads(doc: dict) -> str:
    found = {stage_timing(r)[3] for r in [doc.get("baseline") or {}, *(doc.get("stages") or [])]} - {None}
    return f", {', '.join(map(str, sorted(found)))} thread{'s' if found != {1} else ''}" if found else ""


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}x"


def compress_table(doc: dict) -> Table:
    """`doc` is CompressResult.to_dict() (schema netdiet.compress/1)."""
    model = doc["model"]["spec"]
    recipe = doc["recipe"].get("name", "")
    t = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, collapse_padding=True, title=f"netdiet compress: {escape(model)} with recipe {escape(recipe)} on {escape(str(doc.get('data', '')))}",
              caption=f"bytes = archive on disk; ratio = dense fp32 safetensors bytes / bytes; ms = median latency of one forward "
                      f"pass, batch {doc.get('latency_batch', '-')}{_threads(doc)}, repeated until its 95 % interval is within "
                      "±10 % or 1 s; ~ = unstable (it was not): do not compare; * = Pareto set (accuracy up, bytes down)")
    for col, justify in (("stage", "left"), ("acc %", "right"), ("Δ pt", "right"),
                         ("bytes", "right"), ("ratio", "right"), ("params", "right"), ("nonzero", "right"),
                         ("MACs", "right"), ("ms", "right")):
        if col == "stage":  # long stage names fold; the numbers never do
            t.add_column(col, justify=justify, style="bold", overflow="fold", min_width=8)
        else:
            t.add_column(col, justify=justify, no_wrap=True, min_width=len(col))
    pareto = set(doc.get("pareto", []))
    base = doc["baseline"]
    t.add_row("baseline *" if "baseline" in pareto else "baseline", _acc(base["accuracy"]), "", format_bytes(base["bytes_on_disk"]), "1.0x",
              format_count(base["params"]), format_count(base["nonzero_params"]), format_count(base["macs"]),
              _ms(base))
    for s in doc["stages"]:
        t.add_row(escape(s["name"]) + (" *" if s["name"] in pareto else ""), _acc(s["accuracy"]), _delta(s["accuracy"], base["accuracy"]),
                  format_bytes(s["bytes_on_disk"]), _ratio(s["ratio"]), format_count(s["params"]),
                  format_count(s["nonzero_params"]), format_count(s["macs"]), _ms(s))
    kept = doc.get("archive") if isinstance(doc.get("archive"), dict) else None
    if kept and kept.get("ratio") is not None:   # the file written: the ratio `evaluate` of it gives
        t.add_row("kept archive", "", "", format_bytes(kept["bytes"]), _ratio(kept["ratio"]), "", "", "", "")
    return t


def recipes_table(rows: list[dict]) -> Table:
    """rows: {name, description, stages: [technique names]}."""
    t = Table(title="built-in compression recipes (netdiet compress MODEL --recipe NAME)")
    t.add_column("name", style="bold")
    t.add_column("stages")
    t.add_column("description")
    for r in rows:
        t.add_row(escape(r["name"]), escape(" -> ".join(r["stages"])), escape(r.get("description", "")))
    return t
