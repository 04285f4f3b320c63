"""One self-contained HTML page from any mix of netdiet JSON results.

Charts are inline SVG (the accuracy heatmap a PNG data URI), styles are inline: the file opens offline with no
CDN. Every number on the page is read from the JSON (a share is one stated division of two of them); the
sentences under each section are written from the results by reporting.story. Headline numbers carry
`data-source` and `data-path` so a test can check them against the JSON they came from; a headline timing or
timing ratio also names the `stable` flag it rests on (`data-stable-source`, `data-stable-path`), and an
unstable timing is never a headline. Colours come from one palette (plots.PALETTE), written into the page as a
JSON manifest (`#netdiet-palette`); each chart names the categories it drew in `data-legend`.

Sections: SECTIONS maps a result kind to its renderer, in page order; a new kind registers there.
"""
from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from netdiet.documents import describe as _json_type
from netdiet.documents import field_problems, read_result
from netdiet.errors import NetdietError
from netdiet.fileio import atomic_write_text
from netdiet.reporting import ensemble_tables, plan_tables, plots
from netdiet.reporting.story import (
    FIT_ROWS,
    MEMORY_NAMES,
    compress_story,
    continual_story,
    evaluate_story,
    is_number,
    pct,
    peak_shares,
    profile_story,
    stage_timing,
    sweep_story,
    timing,
    timing_text,
    train_story,
)
from netdiet.units import format_bytes, format_count

# The most rows (and columns) of an accuracy matrix drawn as a heatmap; larger matrices are summarised.
MAX_MATRIX = 50


# ------------------------------------------------------------------ small HTML helpers
def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def get(doc: Any, path: str, default: Any = None) -> Any:
    cur = doc
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return default
    return cur


def fmt(value: Any, unit: str = "") -> str:
    """A value in the page's units: bytes in B/KiB/MiB/GiB, counts in K/M/G, never a raw exponent."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if unit == "bytes":
        return format_bytes(value)
    if unit == "count":
        return format_count(value)
    if unit == "pct":
        return f"{100 * value:.2f} %"
    if unit == "ratio":
        return f"{value:.1f}×"
    if unit == "pt":
        return f"{value:+.2f} pt"
    if unit == "ms":
        return f"{value:.3f} ms"
    if isinstance(value, float):
        return f"{value:.4g}" if 1e-3 <= abs(value) < 1e6 or value == 0 else format_count(value)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


class Page:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.timings: list[dict] = []     # every timing shown (threads, limits) for the page's note on timings
        self.legend: dict[str, str] = {}  # every chart category drawn, with its colour

    def add(self, s: str) -> None:
        self.parts.append(s)

    def story(self, sentences: list[str]) -> None:
        """What the section's figures mean, generated from the result (reporting.story)."""
        if sentences:
            self.add("<p class='story'>" + " ".join(esc(s) for s in sentences) + "</p>")

    def headline(self, source: str, doc: dict, items: list[tuple[str, str, str]]) -> None:
        """items: (label, json path, unit). Missing values are skipped, never invented."""
        cells = []
        for label, path, unit in items:
            value = get(doc, path)
            if value is None:
                continue
            cells.append(self._card(label, fmt(value, unit), source, path, value))
        self._cards(cells)

    @staticmethod
    def _card(label: str, text: str, source: str, path: str, value: Any, note: str = "", attrs: str = "") -> str:
        return (f'<div class="kpi"><div class="kpi-label">{esc(label)}</div>'
                f'<div class="kpi-value headline" data-source="{esc(source)}" data-path="{esc(path)}" '
                f'data-value="{esc(json.dumps(value))}" title="{esc(value)}"{attrs}>{esc(text)}</div>'
                + (f'<div class="kpi-note">{esc(note)}</div>' if note else "") + "</div>")

    def _cards(self, cells: list[str]) -> None:
        if cells:
            self.add('<div class="kpis">' + "".join(cells) + "</div>")

    def timing_cards(self, source: str, items: list[tuple[str, str, dict | None, str]]) -> None:
        """items: (label, json path of the median, story.timing(...) or None, json path of its `stable` flag).

        A stable timing is a headline with its interval and threads; an unstable one is a plain card marked
        'unstable' (never a headline); a missing one says 'not measured'."""
        cells = []
        for label, path, t, stable_path in items:
            if t is not None:
                self.timings.append(t)
            if t is not None and t["stable"]:
                cells.append(self._card(label, f"{t['median']:.3g} ms", source, path, t["median"],
                                        note=timing_text(t).split(" ", 2)[2],
                                        attrs=f' data-kind="timing" data-stable-source="{esc(source)}" '
                                              f'data-stable-path="{esc(stable_path)}"'))
            else:
                cls = "unstable" if t is not None else "not-measured"
                cells.append(f'<div class="kpi {cls}"><div class="kpi-label">{esc(label)}</div>'
                             f'<div class="kpi-value timing-{cls}">{esc(timing_text(t))}</div></div>')
        self._cards(cells)

    def chart(self, chart: plots.Chart, alt: str) -> None:
        self.legend.update(chart.legend)
        if chart.legend:
            self.add(f'<figure class="chart" data-legend="{esc(chart.legend_json())}" aria-label="{esc(alt)}">'
                     f"{chart.markup}</figure>")
        else:
            self.add(f'<figure aria-label="{esc(alt)}">{chart.markup}</figure>')

    def table(self, header: list[str], rows: list[list[Any]], *, cls: str = "") -> None:
        if not rows:
            return
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
        self.add(f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')


def _stage_latency(s: dict) -> dict | None:
    return timing(*stage_timing(s))


# ------------------------------------------------------------------ sections, one per result kind
def _section_profile(page: Page, src: str, doc: dict) -> None:
    spec = get(doc, "model.spec", "model")
    page.add(f"<h2>Profile · {esc(spec)}</h2>")
    inputs = ", ".join("×".join(str(d) for d in i.get("shape", [])) for i in doc.get("inputs", []) if isinstance(i, dict))
    if inputs:
        page.add(f"<p class='muted'>input {esc(inputs)} · optimizer {esc(get(doc, 'memory.optimizer', '–'))}</p>")
    page.story(profile_story(doc))
    page.headline(src, doc, [("parameters", "totals.params", "count"), ("weights", "totals.param_bytes", "bytes"),
                             ("MACs (forward)", "totals.macs", "count"), ("FLOPs (forward)", "totals.flops", "count"),
                             ("FLOPs (train step)", "totals.train_flops", "count"),
                             ("training tensor peak (estimated)", "memory.peak_estimated", "bytes"),
                             ("training tensor peak (measured)", "memory.peak_measured", "bytes"),
                             ("inference tensor peak (estimated)", "memory.inference_peak", "bytes")])
    lat = doc.get("latency") if isinstance(doc.get("latency"), dict) else {}   # without --measure: "not measured"
    page.timing_cards(src, [
        ("forward latency", "latency.forward_ms_median",
         timing(lat.get("forward_ms_median"), lat.get("forward_ms_ci"), lat.get("forward_stable"), lat.get("threads")),
         "latency.forward_stable"),
        ("training-step latency", "latency.train_step_ms_median",
         timing(lat.get("train_step_ms_median"), lat.get("train_step_ms_ci"), lat.get("train_step_stable"),
                lat.get("threads")), "latency.train_step_stable")])
    modules = [m for m in doc.get("modules", []) if isinstance(m, dict) and m.get("name")]
    top = [m for m in modules if m.get("depth", m["name"].count(".") + 1) == 1] or modules
    flops_rows = sorted(top, key=lambda m: -(m.get("flops") or 0))[:25]
    if flops_rows and any(m.get("flops") for m in flops_rows):
        page.chart(plots.hbar([f"{m['name']} ({m.get('type', '')})" for m in flops_rows], [m.get("flops") or 0 for m in flops_rows],
                              title="forward FLOPs per module", xlabel="FLOPs", category="flops"), "FLOPs per module")
    byte_rows = sorted(top, key=lambda m: -((m.get("param_bytes") or 0) + (m.get("activation_bytes") or 0)))[:25]
    if byte_rows and any(m.get("param_bytes") or m.get("activation_bytes") for m in byte_rows):
        page.chart(plots.stacked_bars([f"{m['name']} ({m.get('type', '')})" for m in byte_rows],
                                      {"weights": [m.get("param_bytes") or 0 for m in byte_rows],
                                       "activations": [m.get("activation_bytes") or 0 for m in byte_rows]},
                                      title="bytes per module: weights and activations saved for backward",
                                      ylabel="bytes"), "bytes per module")
    mem = doc.get("memory") or {}
    points = get(doc, "scaling.points") or []
    if points and all(isinstance(p, dict) for p in points) and all(isinstance(p.get("batch_size"), int) for p in points):
        if all(isinstance(p.get("peak_breakdown"), dict) for p in points):
            keys = sorted({k for p in points for k, v in p["peak_breakdown"].items() if v}, key=plots.memory_rank)
            series = {k: [p["peak_breakdown"].get(k) or 0 for p in points] for k in keys if k in plots.PALETTE}
            title = "training tensor peak vs batch size (what is alive at the peak)"
        else:
            keys = ["weights", "gradients", "optimizer_state", "activations", "temporaries"]
            series = {k: [p.get(k) or 0 for p in points] for k in keys if any(p.get(k) for p in points)}
            title = "training tensor memory vs batch size"
        fit = get(doc, "scaling.fit.memory_estimated")
        fit = (fit["fixed"], fit["per_sample"]) if isinstance(fit, dict) and is_number(fit.get("fixed")) and is_number(fit.get("per_sample")) else None
        measured = [p.get("peak_measured") for p in points]
        if series:
            page.chart(plots.batch_sweep([p["batch_size"] for p in points], series, title=title, fit=fit,
                                         measured=measured if all(is_number(m) for m in measured) else None,
                                         budget=get(doc, "scaling.budget_bytes")), "memory across batch sizes")
        _fit_table(page, get(doc, "scaling.fit") or {})
    elif isinstance(mem.get("peak_breakdown"), dict) and any(mem["peak_breakdown"].values()):
        keys = [k for k in sorted(mem["peak_breakdown"], key=plots.memory_rank) if mem["peak_breakdown"][k] and k in plots.PALETTE]
        page.chart(plots.stacked_bars([f"batch {mem.get('batch_size', '')}"], {k: [mem["peak_breakdown"][k]] for k in keys},
                                      title="training tensor peak: what is alive at the peak", ylabel="bytes"),
                   "memory breakdown")
    shares = peak_shares(mem.get("peak_breakdown"))
    if shares and is_number(mem.get("peak_estimated")):
        peak = mem["peak_estimated"]
        page.add(f"<h3>Alive at the estimated training tensor peak (batch {esc(mem.get('batch_size'))})</h3>")
        page.table(["part", "bytes", "share of the peak"],
                   [[MEMORY_NAMES.get(k, k), fmt(v, "bytes"), pct(v, peak)] for k, v in shares]
                   + [["training tensor peak (estimated)", fmt(peak, "bytes"), "100 %"]])
    ops = doc.get("operators") or {}
    if ops:
        def work(v: dict) -> int:
            return (v.get("flops") or 0) + (v.get("backward_flops") or 0)
        rows = sorted(ops.items(), key=lambda kv: -work(kv[1] or {}))
        page.add("<h3>Operators</h3>")
        page.table(["operator", "calls", "MACs", "FLOPs", "backward calls", "backward MACs", "backward FLOPs"],
                   [[op, fmt(v.get("count")), fmt(v.get("macs"), "count"), fmt(v.get("flops"), "count"),
                     fmt(v.get("backward_count")), fmt(v.get("backward_macs"), "count"), fmt(v.get("backward_flops"), "count")]
                    for op, v in rows if work(v)])
        free = [op for op, v in rows if not work(v)]
        if free:
            page.add("<p class='muted'>No arithmetic (views, copies, bookkeeping): " + esc(", ".join(free)) + "</p>")
    unc = doc.get("uncounted") or {}
    if unc:
        page.add("<p class='warn'>Operators without a formula (not counted): " +
                 esc(", ".join(f"{k} ×{v}" for k, v in unc.items())) + "</p>")


def _fit_table(page: Page, fit: dict) -> None:
    rows = []
    for key, label, unit in FIT_ROWS:
        f = fit.get(key)
        if isinstance(f, dict) and is_number(f.get("fixed")) and is_number(f.get("per_sample")):
            rows.append([label, fmt(f["fixed"], unit) if f["fixed"] >= 0 else "−" + fmt(-f["fixed"], unit),
                         fmt(f["per_sample"], unit), f"{f['r2']:.4f}" if is_number(f.get("r2")) else "n/a (constant)"])
    page.table(["linear fit over the batch sizes", "fixed", "per sample", "R²"], rows)


def _section_compress(page: Page, src: str, doc: dict) -> None:
    page.add(f"<h2>Compression · {esc(get(doc, 'model.spec', ''))} · recipe {esc(get(doc, 'recipe.name', ''))}</h2>")
    page.story(compress_story(doc))
    stages = [s for s in doc.get("stages", []) if isinstance(s, dict)]
    last = f"stages.{len(stages) - 1}" if stages else None
    items = [("baseline accuracy", "baseline.accuracy", "pct"), ("dense fp32 file", "baseline.bytes_on_disk", "bytes")]
    if last:
        items += [("final accuracy", f"{last}.accuracy", "pct")]
    if is_number(get(doc, "archive.ratio")):
        items += [("kept archive on disk", "archive.bytes", "bytes"), ("smaller than dense fp32", "archive.ratio", "ratio")]
    elif last:
        items += [("final bytes on disk", f"{last}.bytes_on_disk", "bytes"), ("smaller than dense fp32", f"{last}.ratio", "ratio")]
    page.headline(src, doc, items)
    pareto_names = set(doc.get("pareto") or [])
    pts = []
    base = doc.get("baseline") or {}
    if base.get("bytes_on_disk") and base.get("accuracy") is not None:
        pts.append({"label": "dense", "x": base["bytes_on_disk"], "y": base["accuracy"], "on_front": "baseline" in pareto_names})
    for s in stages:
        if s.get("bytes_on_disk") and s.get("accuracy") is not None:
            t = _stage_latency(s)
            pts.append({"label": s.get("name", s.get("technique", "?")), "x": s["bytes_on_disk"], "y": s["accuracy"],
                        "on_front": s.get("name") in pareto_names, "note": timing_text(t) if t and t["stable"] else ""})
    if pts:
        page.chart(plots.pareto(pts, title="accuracy × bytes on disk (stable latencies in the legend)"), "Pareto front")
    rows = []
    for s in stages:
        t = _stage_latency(s)
        rows.append([s.get("name", ""), s.get("technique", ""), fmt(s.get("accuracy"), "pct"), fmt(s.get("bytes_on_disk"), "bytes"),
                     fmt(s.get("ratio"), "ratio"), fmt(s.get("macs"), "count"), timing_text(t) if t else "not measured",
                     "yes" if s.get("name") in pareto_names else ""])
        page.timings += [t] if t else []
    if is_number(get(doc, "archive.ratio")):
        rows.append(["kept archive", get(doc, "archive.path", ""), fmt(get(doc, f"{last}.accuracy"), "pct") if last else "–",
                     fmt(get(doc, "archive.bytes"), "bytes"), fmt(get(doc, "archive.ratio"), "ratio"), "", "", ""])
    page.table(["stage", "technique", "accuracy", "bytes on disk", "smaller than dense fp32", "MACs", "latency (deployed runtime)",
                "Pareto"], rows)


def _section_evaluate(page: Page, src: str, doc: dict) -> None:
    page.add(f"<h2>Evaluation · {esc(doc.get('source') or get(doc, 'model.spec', ''))}</h2>")
    page.story(evaluate_story(doc))
    page.headline(src, doc, [("accuracy", "accuracy", "pct"), ("bytes on disk", "bytes_on_disk", "bytes"),
                             ("dense fp32 file", "dense_fp32_bytes", "bytes"), ("smaller than dense fp32", "ratio", "ratio"),
                             ("MACs", "macs", "count")])
    items = []
    for key, label in (("pytorch", "latency PyTorch"), ("onnxruntime", "latency ONNX Runtime")):
        d = get(doc, f"latency_detail.{key}") or {}
        t = timing(get(doc, f"latency_ms.{key}"), d.get("ci"), d.get("stable"), d.get("threads"), d.get("repeats"))
        if key == "pytorch" or t is not None:
            items.append((label, f"latency_ms.{key}", t, f"latency_detail.{key}.stable"))
    page.timing_cards(src, items)
    sp = doc.get("latency_speedup")
    if isinstance(sp, dict):
        if sp.get("stable") and is_number(sp.get("value")):
            band = f"interval {sp['low']:.2f}–{sp['high']:.2f}" if is_number(sp.get("low")) and is_number(sp.get("high")) else ""
            page._cards([page._card("ONNX Runtime vs PyTorch (speed-up)", fmt(sp["value"], "ratio"), src, "latency_speedup.value",
                                    sp["value"], note=band, attrs=f' data-kind="timing-ratio" data-stable-source="{esc(src)}" '
                                                               'data-stable-path="latency_speedup.stable"')])
        else:
            page.add("<div class='kpis'><div class='kpi unstable'><div class='kpi-label'>ONNX Runtime vs PyTorch (speed-up)"
                     "</div><div class='kpi-value timing-unstable'>not shown: a timing was unstable</div></div></div>")


def _section_train(page: Page, src: str, doc: dict) -> None:
    page.add(f"<h2>Training · {esc(get(doc, 'model.spec', ''))}</h2>")
    page.story(train_story(doc))
    hist = [h for h in (doc.get("history") or doc.get("epochs") or []) if isinstance(h, dict)]
    last = f"history.{len(hist) - 1}"
    items = [("final val accuracy", f"{last}.val_acc", "pct"), ("final train accuracy", f"{last}.train_acc", "pct")] if hist else []
    page.headline(src, doc, items + [("test accuracy", "test_acc", "pct"),
                                     ("peak RSS increase in an epoch (process, not tensors)", "peak_memory_bytes", "bytes")])
    if hist:
        x = [h.get("epoch", i + 1) for i, h in enumerate(hist)]
        page.chart(plots.lines(x, {"train": [h.get("train_acc") for h in hist], "validation": [h.get("val_acc") for h in hist]},
                               title="accuracy per epoch", xlabel="epoch", ylabel="accuracy", integer_x=True, yunit="pct"),
                   "accuracy curves")
        page.chart(plots.lines(x, {"train": [h.get("loss") for h in hist], "validation": [h.get("val_loss") for h in hist]},
                               title="loss per epoch", xlabel="epoch", ylabel="loss", integer_x=True), "loss curve")


def _section_sweep(page: Page, src: str, doc: dict) -> None:
    page.add(f"<h2>Model selection · {esc(get(doc, 'model.spec', ''))}</h2>")
    page.story(sweep_story(doc))
    pts = [p for p in doc.get("points", []) if isinstance(p, dict)]
    if pts:
        x = [p.get("params") for p in pts]
        page.chart(plots.lines(x, {"train": [p.get("train_error") for p in pts], "validation": [p.get("val_error") for p in pts]},
                               title="error vs complexity", xlabel="parameters (log scale)", ylabel="error", logx=True,
                               yunit="pct", xunit="count"), "under/over-fitting curve")
        page.table(["knob", "params", "FLOPs", "train error", "val error"],
                   [[json.dumps(p.get("value")), fmt(p.get("params"), "count"), fmt(p.get("flops"), "count"),
                     fmt(p.get("train_error"), "pct"), fmt(p.get("val_error"), "pct")] for p in pts])
    if doc.get("chosen") is not None:
        page.add(f"<p>chosen: <b>{esc(json.dumps(doc.get('chosen')))}</b></p>")


def _section_continual(page: Page, src: str, doc: dict) -> None:
    scenario = doc.get("scenario")
    scenario = get(scenario, "name", "") if isinstance(scenario, dict) else (scenario or "")
    page.add(f"<h2>Continual learning · {esc(scenario)} · {esc(doc.get('setting', ''))}-incremental"
             f"{' · budget ' + format_bytes(doc['budget']) if isinstance(doc.get('budget'), int) else ''}</h2>")
    page.story(continual_story(doc))
    strategies = [s for s in doc.get("strategies", []) if isinstance(s, dict)]
    rows = []
    for i, s in enumerate(strategies):
        page.add(f"<h3>{esc(s.get('name', ''))}</h3>")
        page.headline(src, doc, [("average accuracy", f"strategies.{i}.average_accuracy", "pct"),
                                 ("forgetting", f"strategies.{i}.forgetting", "pct"), ("BWT", f"strategies.{i}.bwt", "pct")])
        mat = s.get("accuracy_matrix")
        bytes_per_task = s.get("bytes_per_task") or []
        if mat is not None and not isinstance(mat, list):
            page.add(f"<p class='warn skipped'>{esc(s.get('name') or f'strategy {i + 1}')}: accuracy_matrix is "
                     f"{esc(_json_type(mat))}, not a list of rows; its heatmap is skipped</p>")
        if isinstance(mat, list) and mat:
            mat, rows_shown, cols_shown = _bounded_matrix(page, mat, s.get("name"))
            page.chart(plots.heatmap(mat, title=f"{s.get('name')}: accuracy after task i on task j", xlabel="evaluated on task j",
                                     ylabel="after training task i", row_labels=[str(i + 1) for i in rows_shown],
                                     col_labels=[str(j + 1) for j in cols_shown]), f"accuracy matrix {s.get('name')}")
        if bytes_per_task:
            page.chart(plots.hbar([f"after task {k + 1}" for k in range(len(bytes_per_task))], bytes_per_task,
                                  title=f"{s.get('name')}: bytes kept", xlabel="bytes", category="exemplars", unit="bytes"),
                       f"bytes {s.get('name')}")
        rows.append([s.get("name", ""), fmt(s.get("average_accuracy"), "pct"), fmt(s.get("forgetting"), "pct"),
                     fmt(s.get("bwt"), "pct"), fmt(max(bytes_per_task) if bytes_per_task else None, "bytes")])
    if rows:
        page.add("<h3>Accuracy vs bytes</h3>")
        page.table(["strategy", "average accuracy", "forgetting", "BWT", "max bytes kept"], rows)


def _bounded_matrix(page: Page, mat: list, name: Any) -> tuple[list[list[Any]], list[int], list[int]]:
    """(cells, row indexes, column indexes): at most MAX_MATRIX x MAX_MATRIX cells of `mat` (evenly spaced rows and
    columns, first and last kept), with a visible note when cut: a heatmap annotates every cell, so a
    3000 x 3000 matrix would take minutes."""
    if not all(isinstance(r, list) for r in mat) or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for r in mat for v in r):
        raise TypeError("accuracy_matrix must be a list of rows of numbers")
    n_rows, n_cols = len(mat), max((len(r) for r in mat), default=0)
    rows = _spread(n_rows, MAX_MATRIX)
    cols = _spread(n_cols, MAX_MATRIX)
    if len(rows) < n_rows or len(cols) < n_cols:
        page.add(f"<p class='muted'>{esc(name)}: the accuracy matrix is {n_rows}×{n_cols}; shown as {len(rows)}×"
                 f"{len(cols)} evenly spaced cells (rows {rows[0] + 1}…{rows[-1] + 1}, columns "
                 f"{cols[0] + 1}…{cols[-1] + 1}); the JSON holds every value</p>")
    return [[mat[i][j] if j < len(mat[i]) else None for j in cols] for i in rows], rows, cols


def _spread(n: int, most: int) -> list[int]:
    if n <= most:
        return list(range(n))
    return sorted({round(k * (n - 1) / (most - 1)) for k in range(most)})


def _section_data(page: Page, src: str, doc: dict) -> None:
    page.add(f"<h2>Dataset · {esc(doc.get('name', get(doc, 'dataset.name', '')))}</h2>")
    flat = {k: v for k, v in doc.items() if not isinstance(v, (dict, list)) and k != "schema"}
    page.table(["field", "value"], [[k, fmt(v)] for k, v in flat.items()])


def _section_models(page: Page, src: str, doc: dict) -> None:
    page.add("<h2>Model zoo</h2>")
    page.table(["name", "params", "default input", "description"],
               [[m.get("name"), fmt(m.get("params"), "count"), "×".join(map(str, m.get("input", []))), m.get("description", "")]
                for m in doc.get("models", []) if isinstance(m, dict)])


def _section_demo(page: Page, src: str, doc: dict) -> None:
    page.add("<h2>Summary</h2>")
    page.story(["Each figure comes from the result file named under it; the sections below show where and how. "
                "A timing ratio appears here only when both of its timings were stable."])
    cells = []
    for i, r in enumerate(doc.get("headlines") or []):
        if not isinstance(r, dict) or r.get("value") is None:
            continue
        path, origin = f"headlines.{i}.value", str(r.get("source", ""))
        note = f"from {origin}"
        attrs = ""
        if isinstance(r.get("interval"), list) and isinstance(r.get("path"), str):   # a ratio of two timings
            lo, hi = (r["interval"] + [None, None])[:2]
            note = (f"interval {lo:.2f}–{hi:.2f} · " if is_number(lo) and is_number(hi) else "") + note
            attrs = (f' data-kind="timing-ratio" data-stable-source="{esc(origin)}" '
                     f'data-stable-path="{esc(r["path"].rsplit(".", 1)[0] + ".stable")}"')
        cells.append(page._card(str(r.get("label", "")), fmt(r["value"], str(r.get("unit", ""))), src, path, r["value"],
                                note=note, attrs=attrs))
    page._cards(cells)


def _section_listing(page: Page, src: str, doc: dict) -> None:
    """Listings (datasets, recipes) and report receipts: shown as a small table, nothing to plot."""
    kind = doc["schema"].split("/")[0].split(".", 1)[1]
    page.add(f"<h2>{esc(kind.capitalize())} · {esc(src)}</h2>")
    rows = next((v for v in doc.values() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)), None)
    if rows:
        keys = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))][:5]
        page.table(keys, [[fmt(r.get(k)) for k in keys] for r in rows])
    else:
        page.table(["field", "value"], [[k, fmt(v)] for k, v in doc.items() if not isinstance(v, (dict, list)) and k != "schema"])


SECTIONS: dict[str, Callable[[Page, str, dict], None]] = {
    "demo": _section_demo, "profile": _section_profile, "train": _section_train, "sweep": _section_sweep,
    "compress": _section_compress, "evaluate": _section_evaluate, "continual": _section_continual,
    "data": _section_data, "models": _section_models,
    "datasets": _section_listing, "recipes": _section_listing, "report": _section_listing,
    "train-ensemble": ensemble_tables.ensemble_section, "plan": plan_tables.plan_section,
}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #3b6ea8;padding-bottom:.2em;margin-top:2em} h3{margin-top:1.4em}
.muted{color:#666} .warn{color:#a0522d}
.kpis{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}
.kpi{border:1px solid #ddd;border-radius:6px;padding:.5em .8em;min-width:9em;background:#fafbfd}
.kpi-label{font-size:.8em;color:#666} .kpi-value{font-size:1.25em;font-weight:600}
table{border-collapse:collapse;margin:1em 0;font-size:.9em} th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f0f3f8} td:first-child,th:first-child{text-align:left}
figure{margin:1em 0} img{max-width:100%;height:auto} figure svg{max-width:100%;height:auto}
.kpi-note{font-size:.75em;color:#666} .kpi.unstable{border-style:dashed;background:#fff} .kpi.not-measured{background:#fff}
.timing-unstable,.timing-not-measured{font-size:1em;font-weight:400;color:#a0522d} .timing-not-measured{color:#888}
.story{background:#f5f8fc;border-left:3px solid #3b6ea8;padding:.5em .8em}
.colour-key{font-size:.8em;display:flex;flex-wrap:wrap;gap:.3em 1em} .key i{display:inline-block;width:.9em;height:.9em;
margin-right:.3em;vertical-align:-.1em;border-radius:2px}
"""


def _skip_note(page: Page, kind: str, src: str, why: str) -> None:
    page.add(f"<h2>{esc(kind.capitalize())} · {esc(src)}</h2>")
    page.add(f"<p class='warn skipped'>This section was skipped: in {esc(src)}, {esc(why)}; "
             "regenerate the result with netdiet.</p>")


def _render_section(page: Page, kind: str, src: str, doc: dict, render: Any = None) -> None:
    """One section (`render`, default SECTIONS[kind]); a field of the wrong type (e.g. `memory: "x"`, `stages: {}`)
    skips the section with a visible note instead of failing the whole report: the JSON may come from anywhere."""
    problems = field_problems(doc, kind)        # netdiet.documents.SCHEMAS: every field a section reads, typed
    if problems:
        _skip_note(page, kind, src, problems[0])
        return
    part = Page()
    try:
        (render or SECTIONS[kind])(part, src, doc)
    except (TypeError, AttributeError, ValueError, KeyError, IndexError) as exc:  # a wrong type deeper down
        _skip_note(page, kind, src, f"a field has the wrong type ({type(exc).__name__}: {str(exc)[:200]})")
        return
    page.parts.extend(part.parts)
    page.timings.extend(part.timings)
    page.legend.update(part.legend)


def _timing_note(page: Page) -> str:
    """One line on how the page's timings were taken, from the timings themselves."""
    if not page.timings:
        return ""
    threads = sorted({t["threads"] for t in page.timings if t.get("threads")})
    stable = sum(1 for t in page.timings if t["stable"])
    th = ", ".join(str(t) for t in threads) or "unknown"
    return (f"<p class='muted timing-note'>Timings: each repeated until the 95 % interval of its median was within "
            f"±10 % or its time limit passed, on {th} thread{'s' if threads != [1] else ''} "
            f"(<code>--threads N</code> changes it); {stable} of {len(page.timings)} stable. Unstable timings are "
            "marked and never used as headlines or in ratios.</p>")


def _colour_key(page: Page) -> str:
    """The palette manifest (every category's one colour, machine-readable) and a visible key of those used."""
    manifest = json.dumps({"colours": plots.PALETTE, "labels": plots.LABELS}, sort_keys=True)
    used = [k for k in plots.PALETTE if k in page.legend]
    key = "".join(f"<span class='key'><i style='background:{plots.PALETTE[k]}'></i>{esc(plots.LABELS[k])}</span>"
                  for k in used)
    return (f"<script type='application/json' id='netdiet-palette'>{manifest}</script>"
            + (f"<p class='colour-key'>{key}</p>" if key else ""))


def render_html(docs: list[tuple[str, dict]], title: str = "netdiet report") -> str:
    """docs: (source name, parsed JSON) pairs, rendered in a fixed order of kinds."""
    page = Page()
    for kind in SECTIONS:       # a new kind of result registers its section in SECTIONS (its position is its order)
        for src, doc in docs:
            if doc["schema"].split("/")[0] == f"netdiet.{kind}":
                _render_section(page, kind, src, doc)
    for src, doc in docs:       # one model -> K models -> one student: a compress run whose distill teacher was an ensemble
        # under the same guards as every section (a document the field checks refuse was noted by its section)
        if doc["schema"].split("/")[0] == "netdiet.compress" and not field_problems(doc, "compress"):
            _render_section(page, "compress", src, doc, ensemble_tables.student_plane)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sources = ", ".join(esc(s) for s, _ in docs)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class='muted'>from {sources} · rendered {stamp}</p>"
            + _timing_note(page) + _colour_key(page) + "\n".join(page.parts) + "</body></html>\n")


def write_report(paths: list[str], out: str, title: str = "netdiet report") -> dict:
    if not paths:
        raise NetdietError("no result files given; pass one or more JSON files written with --json")
    docs = [(Path(p).name, read_result(p)) for p in paths]   # netdiet.documents: the one validating reader
    text = render_html(docs, title)
    atomic_write_text(out, text)
    return {"schema": "netdiet.report/1", "out": str(out), "bytes": len(text.encode("utf-8")),
            "sources": [{"path": str(p), "schema": d["schema"]} for p, (_, d) in zip(paths, docs)]}
