"""Rich tables for the terminal. Each function takes result rows/objects and returns a renderable."""
from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from netdiet.units import format_bytes, format_count


def models_table(rows: list[dict]) -> Table:
    t = Table(title="netdiet model zoo")
    t.add_column("name", style="bold")
    t.add_column("params", justify="right")
    t.add_column("default input")
    t.add_column("description")
    for r in rows:
        shape = "x".join(str(d) for d in r["input"]) + ("" if r["input_dtype"] == "float32" else f" ({r['input_dtype']})")
        t.add_row(r["name"], format_count(r["params"]), shape, escape(r["description"]))
    return t


def demo_summary_table(summary: dict) -> Table:
    t = Table(title="netdiet demo: headline figures")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_column("from", style="dim")
    for h in summary.get("headlines", []):
        v, unit = h["value"], h.get("unit")
        text = (f"{v:.1f}x" if unit == "ratio" else f"{100 * v:.2f} %" if unit == "pct" else format_bytes(v) if unit == "bytes"
                else f"{v:+.2f} pt" if unit == "pt" else format_count(v))
        band = h.get("interval")
        if isinstance(band, list) and len(band) == 2 and all(isinstance(b, (int, float)) for b in band):
            text += f" ({band[0]:.1f}-{band[1]:.1f})"      # a ratio of two stable timings, with its interval
        t.add_row(escape(h["label"]), text, h.get("source", ""))
    t.caption = "timing ratios appear only when both timings were stable; the interval is from the two medians' 95 % intervals"
    return t
