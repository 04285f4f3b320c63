"""`netdiet plan` in the terminal and in the HTML report: the feasible layouts ranked by projected throughput, why
each infeasible one fails, and (HTML) each ranked layout's per-rank memory stack against the device memory.
Renders a netdiet.plan/1 document; computes nothing.

`plan_section` takes the report's page object (its `add`, `story`, `headline`, `table` and `chart` methods), as
ensemble_tables does, so html.py needs only a hook.
"""
from __future__ import annotations

import html
from typing import Any

from rich import box
from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from netdiet.reporting import plots
from netdiet.reporting.story import format_seconds, plan_story
from netdiet.units import format_bytes, format_count

# the per-rank parts drawn in a stack (parallel.per_rank's keys), in the report's stacking order
STACK_PARTS = ("weights", "gradients", "optimizer_state", "activations", "communication_buffers", "temporaries")
HTML_ROWS = 12      # ranked layouts drawn and tabled in the report (the JSON keeps every one)


def _variant(r: dict) -> str:
    acc = f" x{r['accumulation']} accum" if r.get("accumulation", 1) > 1 else ""
    return f"mb {r['micro_batch']}{acc}" + (" · ckpt" if r.get("checkpointing") else "")


def _rate(r: dict) -> str:
    unit = str(r.get("throughput_unit") or "samples/s")
    return f"{format_count(r['throughput'])} {unit}" if isinstance(r.get("throughput"), (int, float)) else "-"


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "-"


def plan_rows(doc: dict, top: int) -> list[list[str]]:
    """The ranked table's cells (strings), best first."""
    mem = doc["devices"]["device"]["memory_bytes"]
    out = []
    for r in doc.get("ranked", [])[:top]:
        out.append([str(r["rank"]), r["layout"], _variant(r), format_bytes(r["peak"]), format_bytes(mem - r["peak"]),
                    format_seconds(r["step_time_s"]), _rate(r), _pct(r.get("mfu"))])
    return out


def plan_report(doc: dict, top: int = 15) -> Group:
    dev = doc["devices"]
    model = doc.get("model") or {}
    title = (f"netdiet plan: {escape(str(model.get('spec') or model.get('class')))} on {dev['count']}x {dev['name']} "
             f"({format_bytes(dev['device']['memory_bytes'])} each) · global batch {doc['global_batch']}"
             + (f" x {doc['seq_len']} tokens" if doc.get("seq_len") else ""))
    t = Table(box=box.SIMPLE_HEAD, title=title,
              caption=f"projected (roofline + ring collectives, {doc.get('compute_dtype')} dense peak), not measured; "
                      f"MFU = {'6N per token' if doc.get('samples_unit') == 'tokens' else 'counted FLOPs'} / peak")
    for col in ("#", "layout", "micro-batch", "per-rank peak", "headroom", "step", "throughput", "MFU"):
        t.add_column(col, justify="left" if col in ("layout", "micro-batch") else "right")
    for row in plan_rows(doc, top):
        t.add_row(*map(escape, row))
    parts: list[Any] = [t]
    shown = min(top, len(doc.get("ranked", [])))
    more = len(doc.get("ranked", [])) - shown
    if more > 0:
        parts.append(Text(f"  ... and {more} more feasible variants in the JSON (--json PATH)", style="dim"))
    bad = doc.get("infeasible") or []
    if bad:
        parts.append(Text("layouts that do not fit:", style="bold"))
        parts.extend(Text(f"  {b['layout']}: {b['why']}") for b in bad)
    reasons: dict[str, list[str]] = {}
    for u in doc.get("unavailable") or []:
        reasons.setdefault(u["why"], []).append(u["layout"] + (" (checkpointing)" if u["checkpointing"] else ""))
    for why, names in reasons.items():
        parts.append(Text(f"not projected ({len(names)}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): "
                          f"{why}", style="yellow"))
    sim = doc.get("simulation") or {}
    parts.append(Text(f"{sim.get('distinct', 0)} distinct steps simulated on the meta device ({sim.get('method')}); "
                      f"{doc.get('seconds', 0):.1f} s", style="dim"))
    for note in doc.get("notes") or []:
        parts.append(Text(note, style="dim"))
    return Group(*parts)


# ------------------------------------------------------------------ HTML
def plan_section(page: Any, src: str, doc: dict) -> None:
    """The HTML section of a netdiet.plan/1 document."""
    dev, model = doc.get("devices") or {}, doc.get("model") or {}
    page.add(f"<h2>Plan · {_esc(model.get('spec') or model.get('class'))} on {_esc(dev.get('count'))}× "
             f"{_esc(dev.get('name'))}</h2>")
    page.story(plan_story(doc))
    ranked = [r for r in doc.get("ranked") or [] if isinstance(r, dict)]
    if ranked:
        page.headline(src, doc, [(f"fastest layout: projected {ranked[0].get('throughput_unit', 'samples/s')}",
                                  "ranked.0.throughput", "count"),
                                 ("its per-rank peak", "ranked.0.peak", "bytes"), ("its MFU", "ranked.0.mfu", "pct")])
    shown = ranked[:HTML_ROWS]
    mem = (dev.get("device") or {}).get("memory_bytes")
    if shown:
        labels = [f"{r['rank']}. {r['layout']} · {_variant(r)}" for r in shown]
        series = {k: [int((r.get("at_peak") or r.get("per_rank") or {}).get(k) or 0) for r in shown]
                  for k in STACK_PARTS}
        page.chart(plots.stacked_bars(labels, {k: v for k, v in series.items() if any(v)}, limit=mem,
                                      limit_label=f"{dev.get('name')} memory", ylabel="bytes per rank",
                                      title="per-rank memory alive at the estimated tensor peak, ranked layouts"),
                   "per-rank memory stacks")
        page.table(["#", "layout", "micro-batch", "per-rank peak", "headroom", "step", "throughput", "MFU"],
                   plan_rows(doc, HTML_ROWS))
    bad = [b for b in doc.get("infeasible") or [] if isinstance(b, dict)]
    if bad:
        page.add("<h3>Layouts that do not fit</h3>")
        page.table(["layout", "why"], [[b.get("layout", ""), b.get("why", "")] for b in bad])


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)
