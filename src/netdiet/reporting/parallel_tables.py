"""Terminal rendering of a profile's `distributed` section (analysis/parallel.py). Renders; computes nothing."""
from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Group
from rich.markup import escape
from rich.table import Table

from netdiet.units import format_bytes

_ROWS = [("weights", "weights"), ("gradients", "gradients"), ("optimizer_state", "optimizer state"),
         ("activations", "activations"), ("communication_buffers", "communication buffers"),
         ("temporaries", "temporaries"), ("peak_estimated", "peak (estimated)"), ("peak_measured", "peak (measured)")]
_KINDS = [("all_reduce", "all-reduce"), ("all_gather", "all-gather"), ("reduce_scatter", "reduce-scatter")]


def _table(title: str) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1), title_justify="left",
                 min_width=72)


def _layout_text(sec: dict) -> str:
    tp = f", tp {sec['tp']} x dp {sec['dp']}" if sec.get("tp", 1) > 1 else ""
    return (f"{sec['strategy']}, {sec['world_size']} ranks{tp}, micro-batch {sec.get('micro_batch')} of "
            f"{sec.get('global_batch', '?')}")


def memory_table(sec: dict) -> Table:
    pr = sec["per_rank"]
    t = _table(f"per-rank memory: {_layout_text(sec)}, peak in {sec.get('peak_phase', '?')}")
    t.add_column("what")
    t.add_column("per rank", justify="right")
    t.add_column("one device, same micro-batch", justify="right")
    single = sec.get("single_device") or {}
    for key, label in _ROWS:
        if pr.get(key) is None:
            continue
        one = single.get(key)
        t.add_row(label, format_bytes(pr[key]), format_bytes(one) if one is not None else "")
    measured = pr.get("peak_measured_per_rank")
    if measured:
        t.caption = "measured per rank: " + ", ".join(format_bytes(p) for p in measured) + " (estimate: rank 0)"
    return t


def collectives_table(sec: dict) -> Table:
    c = sec["collectives"]
    t = _table("collectives per step (ring algorithms; sent = bytes each rank sends)")
    t.add_column("kind")
    t.add_column("message", justify="right")
    t.add_column("sent per rank", justify="right")
    for key, label in _KINDS:
        if c["messages"].get(key):
            t.add_row(label, format_bytes(c["messages"][key]), format_bytes(c.get(key, 0)))
    if not any(c["messages"].values()):
        t.add_row("none", "-", "-")
    return t


def projection_line(sec: dict) -> str | None:
    if sec.get("projection_unavailable"):
        return f"step time: {escape(sec['projection_unavailable'])}"
    if sec.get("step_time_s") is None:
        return None
    rate = sec.get("tokens_or_samples_per_s")
    mfu = sec.get("mfu")
    parts = [f"projected step {sec['step_time_s'] * 1e3:.3g} ms on {escape(str(sec.get('device') or 'the device'))}"]
    if rate:
        parts.append(f"{rate:,.0f} /s")
    if mfu is not None:
        parts.append(f"MFU {100 * mfu:.1f} %")
    return "; ".join(parts)


def distributed_report(doc: dict) -> list[Any]:
    """The parts the profile report shows for a `distributed` section (empty without one)."""
    sec = doc.get("distributed")
    if not sec:
        return []
    if sec.get("unavailable"):
        return [f"distributed ({escape(sec['strategy'])} x {sec['world_size']}): {escape(sec['unavailable'])}"]
    parts: list[Any] = [memory_table(sec), collectives_table(sec)]
    line = projection_line(sec)
    if line:
        parts.append(line)
    parts += [f"[dim]{escape(n)}[/dim]" for n in sec.get("notes", [])]
    return [Group(*parts)]
