"""Ensembles in the terminal and in the HTML report: members alone and combined, the K x cost, latency (loop and
vmap-batched, with spread), and one model -> K models -> one distilled student on the accuracy x bytes x latency
plane. Renders netdiet.train-ensemble/1 and netdiet.compress/1 documents; computes nothing.

The HTML functions take the report's page object (its `add`, `table`, `headline` and `chart` methods) so that
html.py needs only a hook: `ensemble_section` renders a train-ensemble document, `student_plane` adds the three
points of a compress document whose distill stage had an ensemble as its teacher (nothing otherwise).
"""
from __future__ import annotations

import html
from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

from netdiet.reporting import plots
from netdiet.units import format_bytes, format_count


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _x(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _latency_text(stats: dict | None) -> str:
    """Median with its spread; an unstable timing says so (it is never a headline)."""
    if not stats:
        return "-"
    text = f"{stats['median_ms']:.3f} ms"
    if stats.get("p95_ms") is not None:
        text += f" (p95 {stats['p95_ms']:.3f}"
        if stats.get("ci_rel") is not None:
            text += f", ±{100 * stats['ci_rel']:.0f}%"
        text += ")"
    return text + ("" if stats.get("stable") else " unstable")


def _get(doc: Any, *path: str) -> Any:
    for p in path:
        doc = doc.get(p) if isinstance(doc, dict) else None
    return doc


# ------------------------------------------------------------------ terminal
def ensemble_tables(doc: dict) -> list[Table]:
    """Members and combined accuracy, the cost one member vs K, and the latencies of a netdiet.train-ensemble/1 doc."""
    acc, k = doc["accuracy"], doc["k"]
    spec = escape(str(_get(doc, "model", "spec")))
    t = Table(box=box.SIMPLE_HEAD, title=f"netdiet train {spec} --ensemble {k} ({doc['mode']}) on "
                                          f"{escape(str(_get(doc, 'data', 'name')))}",
              caption=f"mean = mean of the members' probabilities; vote = majority vote ({doc['tie_rule']}); "
                      f"* = --combine; disagreement = share of test samples two members label differently (mean over pairs)")
    for col in ("member", "seed", "test acc", "epochs", "train s"):
        t.add_column(col, justify="right" if col != "member" else "left")
    for m in doc["members"]:
        t.add_row(str(m["index"]), str(m["seed"]), _pct(m["test_acc"]), str(m["epochs"]), f"{m['seconds']:.1f}")
    t.add_section()
    t.add_row("members", "mean ± sd", f"{_pct(acc['members_mean'])} ± {100 * acc['members_std']:.2f}", "", "")
    for name in ("mean", "vote"):
        t.add_row("combined", name + (" *" if name == doc["combine"] else ""), _pct(acc[name]), "", "")
    t.add_row("gain", "mean - members", f"{100 * acc['gain_over_members_mean']:+.2f} pt", "", "")
    t.add_row("disagreement", "pairs", _pct(acc["disagreement"]), "", "")

    cost, train = doc["cost"], doc["training"]
    c = Table(box=box.SIMPLE_HEAD, title=f"what the {k} members cost (netdiet's counter and parameter totals)",
              caption="per sample, inference (eval mode); the combination's FLOPs are the softmax and the mean")
    for col in ("figure", "one member", f"ensemble of {k}", "ratio"):
        c.add_column(col, justify="left" if col == "figure" else "right")
    one, all_, ratio = cost["single"], cost["ensemble"], cost["ratio"]
    c.add_row("params", format_count(one["params"]), format_count(all_["params"]), _x(ratio["params"]))
    c.add_row("param bytes", format_bytes(one["param_bytes"]), format_bytes(all_["param_bytes"]), _x(ratio["param_bytes"]))
    files = cost.get("file_bytes")
    if files:
        c.add_row("weights on disk (safetensors)", format_bytes(files["single"]), format_bytes(files["ensemble"]),
                  _x(files["ensemble"] / files["single"]))
    c.add_row("MACs / sample", format_count(one["macs"]), format_count(all_["macs"]), _x(ratio["macs"]))
    c.add_row("FLOPs / sample", format_count(one["flops"]),
              f"{format_count(all_['flops'])} ({format_count(all_['combine_flops'])} combine)", _x(ratio["flops"]))
    per_member = train.get("flops_per_member") or [None]
    c.add_row("training FLOPs", format_count(per_member[0]) if per_member[0] is not None else "-",
              format_count(train["flops"]) if train.get("flops") is not None else "-",
              _x(train["flops"] / per_member[0]) if train.get("flops") and per_member[0] else "-")
    secs = train["seconds_per_member"]
    c.add_row("training seconds (measured)", f"{secs[0]:.1f}", f"{train['seconds']:.1f}",
              _x(train["seconds"] / secs[0]) if secs[0] else "-")
    tables = [t, c]
    lat = doc.get("latency")
    if lat:
        t_lat = Table(box=box.SIMPLE_HEAD, title=f"latency of one forward, batch {lat['batch']}",
                      caption="median (p95, ±: half-width of the 95% interval of the median / median); "
                              "unstable: that interval is wider than the engine's target, and no ratio is drawn from it")
        t_lat.add_column("how", justify="left")
        t_lat.add_column("latency", justify="right")
        t_lat.add_column("vs one member", justify="right")
        base = lat.get("single") or {}
        for name, label in (("single", "one member"), ("loop", f"{k} members, a loop"),
                            ("vmap", f"{k} members, stack_module_state + vmap")):
            stats = lat.get(name)
            if stats is None:
                if name == "vmap":
                    t_lat.add_row(label, f"not measured: {escape(str(lat.get('vmap_unavailable')))}", "")
                continue
            both = base.get("stable") and stats.get("stable")        # a ratio only of two stable timings
            t_lat.add_row(label, _latency_text(stats), _x(stats["median_ms"] / base["median_ms"]) if both else "-")
        tables.append(t_lat)
    return tables


# ------------------------------------------------------------------ HTML (the page object comes from html.py)
def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def ensemble_section(page: Any, src: str, doc: dict) -> None:
    """The HTML section of a netdiet.train-ensemble/1 document."""
    k = doc.get("k")
    page.add(f"<h2>Ensemble · {_esc(_get(doc, 'model', 'spec'))} × {_esc(k)} ({_esc(doc.get('mode'))}) · "
             f"{_esc(_get(doc, 'data', 'name'))}</h2>")
    page.headline(src, doc, [("combined accuracy", "accuracy.combined", "pct"),
                             ("members' mean accuracy", "accuracy.members_mean", "pct"),
                             ("ensemble param bytes", "cost.ensemble.param_bytes", "bytes"),
                             ("ensemble MACs / sample", "cost.ensemble.macs", "count")])
    acc = doc.get("accuracy") or {}
    rows = [[m.get("index"), m.get("seed"), _pct(m.get("test_acc")), m.get("epochs"), f"{m.get('seconds', 0):.1f}"]
            for m in doc.get("members") or []]
    rows += [["mean of probabilities", "", _pct(acc.get("mean")), "", ""], ["majority vote", "", _pct(acc.get("vote")), "", ""]]
    page.table(["member", "seed", "test accuracy", "epochs", "train s"], rows)
    one, all_ = _get(doc, "cost", "single") or {}, _get(doc, "cost", "ensemble") or {}
    train = doc.get("training") or {}
    per_member = (train.get("seconds_per_member") or [None])[0]
    page.table(["figure", "one member", f"ensemble of {k}"],
               [["params", format_count(one.get("params")), format_count(all_.get("params"))],
                ["param bytes", format_bytes(one.get("param_bytes")), format_bytes(all_.get("param_bytes"))],
                ["MACs / sample", format_count(one.get("macs")), format_count(all_.get("macs"))],
                ["FLOPs / sample", format_count(one.get("flops")), format_count(all_.get("flops"))],
                ["training FLOPs", format_count((train.get("flops_per_member") or [None])[0]), format_count(train.get("flops"))],
                ["training seconds (measured)", f"{per_member:.1f}" if per_member is not None else "–",
                 f"{train['seconds']:.1f}" if train.get("seconds") is not None else "–"]])
    lat = doc.get("latency") or {}
    page.table(["latency, batch " + str(lat.get("batch", "")), "median (spread)"],
               [[name, _latency_text(lat.get(name))] for name in ("single", "loop", "vmap") if lat.get(name)])
    pts = []
    for label, a, b, stats in (("one member", (acc.get("members") or [None])[0], one.get("param_bytes"), lat.get("single")),
                               (f"{k} members", acc.get("mean"), all_.get("param_bytes"), lat.get("loop"))):
        if a is not None and b:
            pts.append({"label": label, "x": b, "y": a, "on_front": True, "note": _latency_text(stats) if stats else ""})
    if pts:
        page.chart(plots.pareto(pts, title="accuracy × param bytes (latency in the legend)"), "ensemble trade-off")


def plane_points(doc: dict) -> list[dict] | None:
    """(label, accuracy, bytes, latency ms, stable) of one model, the K-member teacher and the student, from a
    netdiet.compress/1 document whose distill stage had an ensemble teacher; None when it had none."""
    for stage in doc.get("stages") or []:
        teacher = _get(stage, "report", "teacher")
        if not isinstance(teacher, dict) or teacher.get("kind") != "ensemble":
            continue
        base = doc.get("baseline") or {}
        files = teacher.get("file_bytes") or {}
        lat, stable = teacher.get("latency_ms") or {}, teacher.get("latency_stable") or {}
        best = "vmap" if lat.get("vmap") is not None and (lat.get("loop") is None or lat["vmap"] < lat["loop"]) else "loop"
        return [
            {"label": "one model", "accuracy": base.get("accuracy"), "bytes": base.get("bytes_on_disk"),
             "latency_ms": _get(base, "latency_ms", "pytorch"), "stable": None},
            {"label": f"{teacher.get('k')} models ({best})", "accuracy": teacher.get("accuracy"), "bytes": files.get("ensemble"),
             "latency_ms": lat.get(best), "stable": stable.get(best)},
            {"label": "distilled student", "accuracy": stage.get("accuracy"), "bytes": stage.get("bytes_on_disk"),
             "latency_ms": _get(stage, "latency_ms", "pytorch"), "stable": None}]
    return None


def student_plane(page: Any, src: str, doc: dict) -> None:
    """The three points (one model, the ensemble, the student) of a compress document with an ensemble teacher."""
    pts = plane_points(doc) if str(doc.get("schema", "")).startswith("netdiet.compress/") else None
    if not pts:
        return
    page.add(f"<h2>One model → ensemble → one student · {_esc(src)}</h2>")
    page.add("<p class='muted'>bytes: the dense safetensors file (one model), the members' safetensors files "
             "(ensemble), the student's archive; latency: one forward of a batch, median.</p>")
    drawn = [{"label": p["label"], "x": p["bytes"], "y": p["accuracy"], "on_front": True,
              "note": f"{p['latency_ms']:.2f} ms" if isinstance(p["latency_ms"], (int, float)) else ""}
             for p in pts if p["bytes"] and p["accuracy"] is not None]
    if drawn:
        page.chart(plots.pareto(drawn, title="accuracy × bytes (latency in the legend)"), "one model, ensemble, student")
    page.table(["point", "accuracy", "bytes", "latency"],
               [[p["label"], _pct(p["accuracy"]), format_bytes(p["bytes"]) if p["bytes"] else "-",
                 (f"{p['latency_ms']:.3f} ms" + (" unstable" if p["stable"] is False else ""))
                 if isinstance(p["latency_ms"], (int, float)) else "-"] for p in pts])
