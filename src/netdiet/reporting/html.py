"""One self-contained HTML page from any mix of netdiet JSON results.

Plots are PNG data URIs, styles are inline: the file opens offline with no CDN. Every number on the page is
read from the JSON; the page computes nothing. Headline numbers carry `data-source` and `data-path` so a test
can check them against the JSON they came from.
"""
from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from netdiet.errors import NetdietError
from netdiet.fileio import atomic_write_text
from netdiet.reporting import plots
from netdiet.units import format_bytes, format_count

# The most rows (and columns) of an accuracy matrix drawn as a heatmap; larger matrices are summarised.
MAX_MATRIX = 50
KNOWN_SCHEMAS = {"profile": {1}, "compress": {1}, "evaluate": {1}, "train": {1}, "sweep": {1}, "continual": {1},
                 "data": {1}, "models": {1}, "demo": {1}, "datasets": {1}, "recipes": {1}, "report": {1}}


# ------------------------------------------------------------------ loading
def load_result(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise NetdietError(f"result file {path} does not exist; give JSON files written with --json")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise NetdietError(f"{path} is not JSON; give a file written by a netdiet command with --json") from None
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if not isinstance(schema, str) or not schema.startswith("netdiet.") or "/" not in schema:
        raise NetdietError(f"{path} is not a netdiet result (no 'schema': 'netdiet.<command>/<version>'); "
                           "give a file written by a netdiet command with --json")
    kind, _, version = schema[len("netdiet."):].partition("/")
    if kind not in KNOWN_SCHEMAS or not version.isdigit() or int(version) not in KNOWN_SCHEMAS[kind]:
        raise NetdietError(f"{path} has schema {schema!r}, which this netdiet ({_known_list()}) cannot render; "
                           "upgrade netdiet or regenerate the result")
    return doc


def _known_list() -> str:
    return ", ".join(f"{k}/{max(v)}" for k, v in sorted(KNOWN_SCHEMAS.items()))


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
    if value is None:
        return "–"
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
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


class Page:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, s: str) -> None:
        self.parts.append(s)

    def headline(self, source: str, doc: dict, items: list[tuple[str, str, str]]) -> None:
        """items: (label, json path, unit). Missing values are skipped, never invented."""
        cells = []
        for label, path, unit in items:
            value = get(doc, path)
            if value is None:
                continue
            cells.append(
                f'<div class="kpi"><div class="kpi-label">{esc(label)}</div>'
                f'<div class="kpi-value headline" data-source="{esc(source)}" data-path="{esc(path)}" '
                f'data-value="{esc(json.dumps(value))}" title="{esc(value)}">{esc(fmt(value, unit))}</div></div>')
        if cells:
            self.add('<div class="kpis">' + "".join(cells) + "</div>")

    def image(self, uri: str, alt: str) -> None:
        self.add(f'<figure><img src="{uri}" alt="{esc(alt)}"></figure>')

    def table(self, header: list[str], rows: list[list[Any]], *, cls: str = "") -> None:
        if not rows:
            return
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
        self.add(f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')


# ------------------------------------------------------------------ sections, one per result kind
def _section_profile(page: Page, src: str, doc: dict) -> None:
    spec = get(doc, "model.spec", "model")
    page.add(f"<h2>Profile · {esc(spec)}</h2>")
    inputs = ", ".join("×".join(str(d) for d in i.get("shape", [])) for i in doc.get("inputs", []) if isinstance(i, dict))
    if inputs:
        page.add(f"<p class='muted'>input {esc(inputs)} · optimizer {esc(get(doc, 'memory.optimizer', '–'))}</p>")
    page.headline(src, doc, [("parameters", "totals.params", "count"), ("weights", "totals.param_bytes", "bytes"),
                             ("MACs (forward)", "totals.macs", "count"), ("FLOPs (forward)", "totals.flops", "count"),
                             ("FLOPs (train step)", "totals.train_flops", "count"),
                             ("training peak (est.)", "memory.peak_estimated", "bytes"),
                             ("training peak (measured)", "memory.peak_measured", "bytes")])
    modules = [m for m in doc.get("modules", []) if isinstance(m, dict) and m.get("name")]
    top = [m for m in modules if m.get("depth", m["name"].count(".") + 1) == 1] or modules
    flops_rows = sorted(top, key=lambda m: -(m.get("flops") or 0))[:25]
    if flops_rows and any(m.get("flops") for m in flops_rows):
        page.image(plots.hbar([f"{m['name']} ({m.get('type', '')})" for m in flops_rows], [m.get("flops") or 0 for m in flops_rows],
                              title="forward FLOPs per module", xlabel="FLOPs"), "FLOPs per module")
    byte_rows = sorted(top, key=lambda m: -((m.get("param_bytes") or 0) + (m.get("activation_bytes") or 0)))[:25]
    if byte_rows and any(m.get("param_bytes") or m.get("activation_bytes") for m in byte_rows):
        page.image(plots.stacked_bars([m["name"] for m in byte_rows],
                                      {"parameters": [m.get("param_bytes") or 0 for m in byte_rows],
                                       "activations saved for backward": [m.get("activation_bytes") or 0 for m in byte_rows]},
                                      title="bytes per module", ylabel="bytes"), "bytes per module")
    mem = doc.get("memory") or {}
    parts = ["weights", "gradients", "optimizer_state", "activations", "temporaries"]
    points = get(doc, "scaling.points") or []
    if points and all(isinstance(p, dict) for p in points):
        cats = [str(p.get("batch_size")) for p in points]
        if all(isinstance(p.get("peak_breakdown"), dict) for p in points):
            # what is alive at the estimated peak: the stack's height is the peak itself
            order = ["weights", "buffers", "inputs", "gradients", "optimizer_state", "activations"]
            seen = [k for p in points for k in p["peak_breakdown"]]
            keys = [k for k in order + sorted(set(seen) - set(order)) if any(p["peak_breakdown"].get(k) for p in points)]
            series = {k.replace("_", " "): [p["peak_breakdown"].get(k) or 0 for p in points] for k in keys}
        else:
            series = {k: [p.get(k) or 0 for p in points] for k in parts if any(p.get(k) for p in points)}
        fitted = [p.get("peak_fitted") for p in points]
        line = (fitted, "fitted fixed + per-sample") if all(v is not None for v in fitted) else None
        if series:
            measured = [p.get("peak_measured") for p in points]
            page.image(plots.stacked_bars(cats, series, title="training peak vs batch size (alive at the peak)", ylabel="bytes",
                                          line=line, points=(measured, "measured peak") if all(measured) else None,
                                          budget=get(doc, "scaling.budget_bytes")), "memory across batch sizes")
        fit = get(doc, "scaling.fit") or {}
        if fit:
            page.table(["fit", "value"], [[k, fmt(v)] for k, v in fit.items() if not isinstance(v, (dict, list))])
    elif any(mem.get(k) for k in parts):
        page.image(plots.stacked_bars([str(mem.get("batch_size", ""))], {k: [mem.get(k) or 0] for k in parts},
                                      title="training memory breakdown", ylabel="bytes"), "memory breakdown")
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


def _section_compress(page: Page, src: str, doc: dict) -> None:
    page.add(f"<h2>Compression · {esc(get(doc, 'model.spec', ''))} · recipe {esc(get(doc, 'recipe.name', ''))}</h2>")
    stages = [s for s in doc.get("stages", []) if isinstance(s, dict)]
    last = f"stages.{len(stages) - 1}" if stages else None
    items = [("baseline accuracy", "baseline.accuracy", "pct"), ("baseline bytes", "baseline.bytes_on_disk", "bytes")]
    if last:
        items += [("final accuracy", f"{last}.accuracy", "pct"), ("final bytes on disk", f"{last}.bytes_on_disk", "bytes"),
                  ("size reduction", f"{last}.ratio", "ratio")]
    page.headline(src, doc, items)
    pareto_names = set(doc.get("pareto") or [])
    pts = []
    base = doc.get("baseline") or {}
    if base.get("bytes_on_disk") and base.get("accuracy") is not None:
        pts.append({"label": "dense", "x": base["bytes_on_disk"], "y": base["accuracy"], "on_front": "baseline" in pareto_names})
    for s in stages:
        if s.get("bytes_on_disk") and s.get("accuracy") is not None:
            lat = get(s, "latency_ms.pytorch") if isinstance(s.get("latency_ms"), dict) else s.get("latency_ms")
            pts.append({"label": s.get("name", s.get("technique", "?")), "x": s["bytes_on_disk"], "y": s["accuracy"],
                        "on_front": s.get("name") in pareto_names, "note": f"{lat:.2f} ms" if isinstance(lat, (int, float)) else ""})
    if pts:
        page.image(plots.pareto(pts, title="accuracy × bytes on disk (latency annotated)"), "Pareto front")
    rows = []
    for s in stages:
        lat = s.get("latency_ms")
        lat = get(lat, "pytorch") if isinstance(lat, dict) else lat
        rows.append([s.get("name", ""), s.get("technique", ""), fmt(s.get("accuracy"), "pct"), fmt(s.get("bytes_on_disk"), "bytes"),
                     fmt(s.get("ratio"), "ratio"), fmt(s.get("macs"), "count"), fmt(lat, "ms") if lat is not None else "–",
                     "yes" if s.get("name") in pareto_names else ""])
    page.table(["stage", "technique", "accuracy", "bytes on disk", "vs dense fp32", "MACs", "latency", "Pareto"], rows)


def _section_evaluate(page: Page, src: str, doc: dict) -> None:
    page.add(f"<h2>Evaluation · {esc(doc.get('source') or get(doc, 'model.spec', ''))}</h2>")
    page.headline(src, doc, [("accuracy", "accuracy", "pct"), ("bytes on disk", "bytes_on_disk", "bytes"),
                             ("dense fp32 file", "dense_fp32_bytes", "bytes"), ("reduction", "ratio", "ratio"),
                             ("MACs", "macs", "count"), ("latency PyTorch", "latency_ms.pytorch", "ms"),
                             ("latency ONNX Runtime", "latency_ms.onnxruntime", "ms")])


def _section_train(page: Page, src: str, doc: dict) -> None:
    page.add(f"<h2>Training · {esc(get(doc, 'model.spec', ''))}</h2>")
    hist = [h for h in (doc.get("history") or doc.get("epochs") or []) if isinstance(h, dict)]
    last = f"history.{len(hist) - 1}"
    items = [("final val accuracy", f"{last}.val_acc", "pct"), ("final train accuracy", f"{last}.train_acc", "pct")] if hist else []
    page.headline(src, doc, items + [("test accuracy", "test_acc", "pct"), ("peak memory", "peak_memory_bytes", "bytes")])
    if hist:
        x = [h.get("epoch", i + 1) for i, h in enumerate(hist)]
        page.image(plots.lines(x, {"train accuracy": [h.get("train_acc") for h in hist],
                                   "validation accuracy": [h.get("val_acc") for h in hist]},
                               title="accuracy per epoch", xlabel="epoch", ylabel="accuracy"), "accuracy curves")
        page.image(plots.lines(x, {"training loss": [h.get("loss") for h in hist]}, title="loss per epoch",
                               xlabel="epoch", ylabel="loss"), "loss curve")


def _section_sweep(page: Page, src: str, doc: dict) -> None:
    page.add(f"<h2>Model selection · {esc(get(doc, 'model.spec', ''))}</h2>")
    pts = [p for p in doc.get("points", []) if isinstance(p, dict)]
    if pts:
        x = [p.get("params") for p in pts]
        page.image(plots.lines(x, {"train error": [p.get("train_error") for p in pts],
                                   "validation error": [p.get("val_error") for p in pts]},
                               title="error vs complexity", xlabel="parameters", ylabel="error", logx=True), "under/over-fitting curve")
        page.table(["knob", "params", "FLOPs", "train error", "val error"],
                   [[json.dumps(p.get("value")), fmt(p.get("params"), "count"), fmt(p.get("flops"), "count"),
                     fmt(p.get("train_error")), fmt(p.get("val_error"))] for p in pts])
    if doc.get("chosen") is not None:
        page.add(f"<p>chosen: <b>{esc(json.dumps(doc.get('chosen')))}</b></p>")


def _section_continual(page: Page, src: str, doc: dict) -> None:
    scenario = doc.get("scenario")
    scenario = get(scenario, "name", "") if isinstance(scenario, dict) else (scenario or "")
    page.add(f"<h2>Continual learning · {esc(scenario)} · {esc(doc.get('setting', ''))}-incremental"
             f"{' · budget ' + format_bytes(doc['budget']) if isinstance(doc.get('budget'), int) else ''}</h2>")
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
            page.image(plots.heatmap(mat, title=f"{s.get('name')}: accuracy after task i on task j", xlabel="evaluated on task j",
                                     ylabel="after training task i", row_labels=[str(i + 1) for i in rows_shown],
                                     col_labels=[str(j + 1) for j in cols_shown]), f"accuracy matrix {s.get('name')}")
        if bytes_per_task:
            page.image(plots.hbar([f"after task {k + 1}" for k in range(len(bytes_per_task))], bytes_per_task,
                                  title=f"{s.get('name')}: bytes kept", xlabel="bytes", color=plots.PALETTE[2]), f"bytes {s.get('name')}")
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
    rows = doc.get("headlines") or []
    page.headline(src, doc, [(r.get("label", ""), f"headlines.{i}.value", r.get("unit", "")) for i, r in enumerate(rows)
                             if isinstance(r, dict)])


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
}
ORDER = list(SECTIONS)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #3b6ea8;padding-bottom:.2em;margin-top:2em} h3{margin-top:1.4em}
.muted{color:#666} .warn{color:#a0522d}
.kpis{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}
.kpi{border:1px solid #ddd;border-radius:6px;padding:.5em .8em;min-width:9em;background:#fafbfd}
.kpi-label{font-size:.8em;color:#666} .kpi-value{font-size:1.25em;font-weight:600}
table{border-collapse:collapse;margin:1em 0;font-size:.9em} th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f0f3f8} td:first-child,th:first-child{text-align:left}
figure{margin:1em 0} img{max-width:100%;height:auto}
"""


# The fields a section reads, by kind, and the JSON type each must have when present (None is "absent");
# "rows" is a list whose items are all objects.
FIELD_TYPES: dict[str, dict[str, str]] = {
    "profile": {"model": "object", "inputs": "rows", "totals": "object", "memory": "object", "modules": "rows",
                "operators": "object", "uncounted": "object", "scaling": "object"},
    "compress": {"model": "object", "recipe": "object", "baseline": "object", "stages": "rows", "pareto": "list"},
    "train": {"model": "object", "history": "rows"},
    "sweep": {"model": "object", "points": "rows"},
    "continual": {"strategies": "rows"},
    "models": {"models": "rows"},
    "demo": {"headlines": "rows"},
}


def _wrong_type(value: Any, expected: str) -> str | None:
    """What is wrong with `value` for `expected` ("object", "list" or "rows"), or None when it fits."""
    if value is None:
        return None
    if expected == "object":
        return None if isinstance(value, dict) else f"is {_json_type(value)}, not an object"
    if not isinstance(value, list):
        return f"is {_json_type(value)}, not a list"
    if expected == "rows":
        bad = [v for v in value if not isinstance(v, dict)]
        if bad:
            return f"holds {_json_type(bad[0])}, not objects"
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def _skip_note(page: Page, kind: str, src: str, why: str) -> None:
    page.add(f"<h2>{esc(kind.capitalize())} · {esc(src)}</h2>")
    page.add(f"<p class='warn skipped'>This section was skipped: in {esc(src)}, {esc(why)}; "
             "regenerate the result with netdiet.</p>")


def _render_section(page: Page, kind: str, src: str, doc: dict) -> None:
    """One section; a field of the wrong type (e.g. `memory: "x"`, `stages: {}`) skips the section with a
    visible note instead of failing the whole report: the JSON may come from anywhere."""
    for key, expected in FIELD_TYPES.get(kind, {}).items():
        wrong = _wrong_type(doc.get(key), expected)
        if wrong:
            _skip_note(page, kind, src, f"'{key}' {wrong}")
            return
    part = Page()
    try:
        SECTIONS[kind](part, src, doc)
    except (TypeError, AttributeError, ValueError, KeyError, IndexError) as exc:  # a wrong type deeper down
        _skip_note(page, kind, src, f"a field has the wrong type ({type(exc).__name__}: {str(exc)[:200]})")
        return
    page.parts.extend(part.parts)


def render_html(docs: list[tuple[str, dict]], title: str = "netdiet report") -> str:
    """docs: (source name, parsed JSON) pairs, rendered in a fixed order of kinds."""
    page = Page()
    for kind in ORDER:
        for src, doc in docs:
            if doc["schema"].split("/")[0] == f"netdiet.{kind}":
                _render_section(page, kind, src, doc)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sources = ", ".join(esc(s) for s, _ in docs)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class='muted'>from {sources} · rendered {stamp}</p>"
            + "\n".join(page.parts) + "</body></html>\n")


def write_report(paths: list[str], out: str, title: str = "netdiet report") -> dict:
    if not paths:
        raise NetdietError("no result files given; pass one or more JSON files written with --json")
    docs = [(Path(p).name, load_result(p)) for p in paths]
    text = render_html(docs, title)
    atomic_write_text(out, text)
    return {"schema": "netdiet.report/1", "out": str(out), "bytes": len(text.encode("utf-8")),
            "sources": [{"path": str(p), "schema": d["schema"]} for p, (_, d) in zip(paths, docs)]}
