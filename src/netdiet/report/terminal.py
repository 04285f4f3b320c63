"""Rich tables for the terminal. Each function takes result rows/objects and returns a renderable."""
from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from netdiet.units import format_count


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
