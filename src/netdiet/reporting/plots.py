"""Charts for the HTML report, in one visual language. Plots draw numbers they are given; they compute none.

- One fixed colour per category (PALETTE): weights are the same blue in every chart, the budget line is the only
  red, and so on. Every chart returns a `Chart` whose `legend` names the categories it drew and their colours;
  each drawn element carries the SVG id `nd-<chart>-<category>-<n>`, so a test can read the colour a category
  really got from the SVG itself and check it against the legend and against every other chart.
- Axes on the scale of the data: batch sweeps on a log2 axis (a linear fit is drawn as the curve it is there),
  integer epochs, bar charts from zero, a budget far above the bars is written as a note instead of a line that
  would squash them; bytes in KiB/MiB/GiB and counts in K/M/G (netdiet.units) on every axis.
- Labels never sit on the data: point names go into the legend, not next to the points.

Charts are inline SVG (text kept as text, DejaVu Sans, so the browser lays it out as matplotlib measured it);
the accuracy-matrix heatmap stays a PNG (thousands of cells). Nothing is fetched from a network.
"""
from __future__ import annotations

import base64
import functools
import html
import io
import json
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Sequence

from netdiet.reporting.story import MEMORY_NAMES
from netdiet.units import byte_unit, format_bytes, format_count

# The one colour of each category, in every chart. Keys are the names used in the JSON results.
PALETTE: dict[str, str] = {
    "weights": "#1f77b4", "buffers": "#aec7e8", "inputs": "#7f7f7f", "outputs": "#c7c7c7",
    "gradients": "#ff7f0e", "backward_buffers": "#ffbb78",
    "optimizer_state": "#2ca02c", "optimizer_temporaries": "#98df8a",
    "activations": "#9467bd", "recomputed": "#c5b0d5",
    "workspace": "#8c564b", "temporaries": "#c49c94",
    "budget": "#d62728", "fitted": "#17becf", "measured": "#000000",
    "train": "#e377c2", "validation": "#bcbd22", "flops": "#393b79",
    "pytorch": "#8c6d31", "onnxruntime": "#637939",
    "pareto": "#7b4173", "dominated": "#a5a5a5", "exemplars": "#e7ba52",
    "communication_buffers": "#dbdb8d",
}
# What each category is called on the page: the memory parts as the report's sentences name them (story.MEMORY_NAMES,
# whose order is also the stacking order), then the other categories.
LABELS: dict[str, str] = {
    **MEMORY_NAMES,
    "budget": "budget", "fitted": "fit: fixed + per-sample x batch", "measured": "measured peak",
    "train": "train", "validation": "validation", "flops": "forward FLOPs", "pytorch": "PyTorch",
    "onnxruntime": "ONNX Runtime", "pareto": "on the Pareto front", "dominated": "dominated",
    "exemplars": "exemplar bytes kept",
}
MEMORY_ORDER = list(MEMORY_NAMES)
# distinct markers for the points of a Pareto chart (their names are legend entries)
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]

def memory_rank(key: str) -> int:
    """Position of a memory category in MEMORY_ORDER (unknown keys last): the one stacking order of every chart."""
    return MEMORY_ORDER.index(key) if key in MEMORY_ORDER else len(MEMORY_ORDER)


@functools.cache
def _mpl() -> SimpleNamespace:
    """matplotlib (Agg, this page's rcParams), imported at the first chart: every command imports this module through
    the API, and only report and demo draw (pyplot alone is ~0.3 s of start-up)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker
    plt.rcParams.update({"svg.fonttype": "none", "font.family": "DejaVu Sans", "svg.hashsalt": "netdiet",
                         "axes.formatter.useoffset": False, "font.size": 9})

    class BinaryLocator(ticker.Locator):
        """Ticks at round numbers of the binary unit the axis top is written in (0, 2, 4, 6 MiB; not 1.91 MiB)."""

        def __call__(self):
            lo, hi = self.axis.get_view_interval()
            return self.tick_values(lo, hi)

        def tick_values(self, vmin, vmax):
            _unit, scale = byte_unit(max(abs(vmin), abs(vmax)))
            ticks = ticker.MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(vmin / scale, vmax / scale)
            return [t * scale for t in ticks]

    return SimpleNamespace(plt=plt, ticker=ticker, BinaryLocator=BinaryLocator)


def byte_axis(ax, axis: str = "y") -> None:
    """Bytes in KiB/MiB/GiB at round binary values (a log axis keeps its powers of ten, labelled in units)."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    if target.get_scale() == "linear":
        target.set_major_locator(_mpl().BinaryLocator())
    target.set_major_formatter(_mpl().ticker.FuncFormatter(lambda v, _pos: format_bytes(v, short=True) if v >= 0 else ""))


def count_axis(ax, axis: str = "y") -> None:
    fmt = _mpl().ticker.FuncFormatter(lambda v, _pos: format_count(v, short=True) if v >= 0 else "")
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(fmt)


def percent_axis(ax, axis: str = "y") -> None:
    fmt = _mpl().ticker.FuncFormatter(lambda v, _pos: f"{100 * v:.3g} %")
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(fmt)


@dataclass
class Chart:
    """One chart: its markup (inline <svg> or <img>) and the categories it drew with their colours."""
    markup: str
    legend: dict[str, str] = field(default_factory=dict)
    title: str = ""

    def legend_json(self) -> str:
        return json.dumps(self.legend, sort_keys=True)


class _Figure:
    """A matplotlib figure whose artists are tagged with their category (SVG ids) as they are drawn."""
    count = 0

    def __init__(self, size: tuple[float, float]) -> None:
        _Figure.count += 1
        self.key = f"c{_Figure.count}"
        self.fig, self.ax = _mpl().plt.subplots(figsize=size)
        self.legend: dict[str, str] = {}
        self._n = 0

    def tag(self, artists, category: str) -> None:
        self.legend[category] = PALETTE[category]
        items = artists if isinstance(artists, (list, tuple)) or hasattr(artists, "patches") else [artists]
        for a in getattr(items, "patches", items):
            self._n += 1
            a.set_gid(f"nd-{self.key}-{category}-{self._n}")

    def svg(self, title: str) -> Chart:
        buf = io.StringIO()
        self.fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})  # reproducible bytes
        _mpl().plt.close(self.fig)
        text = buf.getvalue()
        text = text[text.index("<svg"):]          # drop the XML prologue and doctype: the SVG sits inside HTML
        return Chart(text, dict(self.legend), title)


def _finish(f: _Figure, title: str, legend_outside: bool = True) -> None:
    f.ax.set_title(title)
    handles, labels = f.ax.get_legend_handles_labels()
    if handles:
        if legend_outside:
            f.ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        else:
            f.ax.legend(fontsize=7, frameon=False)


def hbar(labels: Sequence[str], values: Sequence[float], *, title: str, xlabel: str, category: str,
         unit: str = "count") -> Chart:
    """Horizontal bars from zero, one category; `unit` "bytes" or "count" formats the axis."""
    height = max(2.0, 0.28 * len(labels) + 1.0)
    f = _Figure((7.5, height))
    bars = f.ax.barh(range(len(labels)), values, color=PALETTE[category], label=LABELS[category])
    f.tag(bars, category)
    f.ax.set_yticks(range(len(labels)), labels=labels, fontsize=7)
    f.ax.invert_yaxis()
    f.ax.set_xlim(0, max(max(values, default=0), 1) * 1.05)
    (byte_axis if unit == "bytes" else count_axis)(f.ax, "x")
    f.ax.set_xlabel(xlabel)
    f.ax.grid(axis="x", alpha=0.3)
    f.ax.set_title(title)
    return f.svg(title)


def stacked_bars(categories: Sequence[str], series: dict[str, Sequence[float]], *, title: str, ylabel: str,
                 limit: float | None = None, limit_label: str = "budget") -> Chart:
    """Stacked bars (bytes) from zero; `series` keys are PALETTE categories, stacked in MEMORY_ORDER. `limit`
    (a device's memory, a budget) is drawn as the one red line, labelled `limit_label` with its size."""
    f = _Figure((7.5, max(2.4, 0.34 * len(categories) + 1.2)))
    left = [0.0] * len(categories)
    y = list(range(len(categories)))
    for key in sorted(series, key=memory_rank):
        vals = series[key]
        bars = f.ax.barh(y, vals, left=left, label=LABELS[key], color=PALETTE[key])
        f.tag(bars, key)
        left = [a + b for a, b in zip(left, vals)]
    if limit is not None:
        line = f.ax.axvline(limit, color=PALETTE["budget"], linewidth=2, label=f"{limit_label} {format_bytes(limit)}")
        f.tag(line, "budget")
    f.ax.set_yticks(y, labels=categories, fontsize=7)
    f.ax.invert_yaxis()
    f.ax.set_xlim(0, max(max(left, default=0), limit or 0, 1) * 1.05)
    byte_axis(f.ax, "x")
    f.ax.set_xlabel(ylabel)
    f.ax.grid(axis="x", alpha=0.3)
    _finish(f, title)
    return f.svg(title)


def batch_sweep(batches: Sequence[int], series: dict[str, Sequence[float]], *, title: str,
                fit: tuple[float, float] | None = None, measured: Sequence[float | None] | None = None,
                budget: float | None = None) -> Chart:
    """Memory (stacked by category) against batch size on a log2 axis, from zero.

    `fit` = (fixed, per_sample) bytes is drawn as the curve fixed + per_sample x batch; `measured` as points; a
    `budget` within 1.5x the tallest bar as a line, above that as a note (a line far above squashes the bars)."""
    f = _Figure((7.5, 4.0))
    xs = [math.log2(b) for b in batches]
    distinct = sorted(set(xs))
    gaps = [b - a for a, b in zip(distinct, distinct[1:])]
    width = min(0.9, 0.6 * min(gaps)) if gaps else 0.6
    bottom = [0.0] * len(xs)
    for key in sorted(series, key=memory_rank):
        vals = series[key]
        bars = f.ax.bar(xs, vals, width=width, bottom=bottom, label=LABELS[key], color=PALETTE[key])
        f.tag(bars, key)
        bottom = [a + b for a, b in zip(bottom, vals)]
    top = max(bottom + [v for v in (measured or []) if v is not None], default=1.0) or 1.0
    if fit is not None and len(xs) > 1:
        steps = 64
        lo, hi = min(xs), max(xs)
        grid = [lo + (hi - lo) * i / steps for i in range(steps + 1)]
        (line,) = f.ax.plot(grid, [fit[0] + fit[1] * 2 ** g for g in grid], "--", color=PALETTE["fitted"],
                            label=LABELS["fitted"], linewidth=1.5)
        f.tag(line, "fitted")
        top = max(top, fit[0] + fit[1] * 2 ** hi)
    if measured is not None and all(v is not None for v in measured):
        pts = f.ax.scatter(xs, measured, marker="D", s=22, color=PALETTE["measured"], zorder=4, label=LABELS["measured"])
        f.tag(pts, "measured")
    ymax = top * 1.12
    if budget is not None:
        if budget <= 1.5 * top:
            line = f.ax.axhline(budget, color=PALETTE["budget"], linewidth=2, label=f"budget {format_bytes(budget)}")
            f.tag(line, "budget")
            ymax = max(ymax, budget * 1.08)
        else:
            f.ax.text(0.01, 0.97, f"budget {format_bytes(budget)}: above the chart ({budget / top:.0f}x the tallest bar)",
                      transform=f.ax.transAxes, va="top", fontsize=7, color=PALETTE["budget"])
            f.legend["budget"] = PALETTE["budget"]
    f.ax.set_ylim(0, ymax)
    f.ax.set_xticks(xs, labels=[str(b) for b in batches])
    f.ax.set_xlim(min(xs) - 0.7, max(xs) + 0.7)
    f.ax.set_xlabel("batch size (log2 scale)")
    byte_axis(f.ax)
    f.ax.set_ylabel("bytes")
    f.ax.grid(axis="y", alpha=0.3)
    _finish(f, title)
    return f.svg(title)


def pareto(points: list[dict], *, title: str) -> Chart:
    """points: {label, x (bytes), y (accuracy), on_front (bool), note}; names and notes go into the legend."""
    f = _Figure((7.5, 4.0))
    for i, p in enumerate(points):
        cat = "pareto" if p.get("on_front") else "dominated"
        label = p["label"] + (f" ({p['note']})" if p.get("note") else "")
        pt = f.ax.scatter(p["x"], p["y"], s=42, marker=_MARKERS[i % len(_MARKERS)], color=PALETTE[cat], zorder=3,
                          label=label)
        f.tag(pt, cat)
    front = sorted((p for p in points if p.get("on_front")), key=lambda p: p["x"])
    if len(front) > 1:
        (line,) = f.ax.plot([p["x"] for p in front], [p["y"] for p in front], color=PALETTE["pareto"], linewidth=1.2,
                            label=LABELS["pareto"])
        f.tag(line, "pareto")
    f.ax.set_xscale("log", base=2)              # ticks at powers of two: 256 KiB, 512 KiB, 1 MiB
    xs = [p["x"] for p in points]
    f.ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
    f.ax.xaxis.set_major_locator(_mpl().ticker.LogLocator(base=2, numticks=12))
    byte_axis(f.ax, "x")
    f.ax.xaxis.set_minor_formatter(_mpl().ticker.FuncFormatter(lambda v, _p: ""))
    f.ax.set_xlabel("bytes on disk (log2 scale)")
    ys = [p["y"] for p in points]
    lo, hi = min(ys), max(ys)
    pad = max(0.01, (hi - lo) * 0.15)            # at least +-1 point: a 0.2-point spread is not stretched to full height
    f.ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad) if hi + pad <= 1.0 else hi + pad)
    percent_axis(f.ax)
    f.ax.set_ylabel("accuracy")
    f.ax.grid(alpha=0.3)
    _finish(f, title)
    return f.svg(title)


def lines(x: Sequence[float], series: dict[str, Sequence[float | None]], *, title: str, xlabel: str, ylabel: str,
          logx: bool = False, integer_x: bool = False, yunit: str | None = None, xunit: str | None = None) -> Chart:
    """One line per category of `series` (PALETTE keys); None values are gaps. `integer_x` ticks whole numbers
    only (epochs); `yunit`/`xunit` "pct", "count" or "bytes" format the axis."""
    f = _Figure((7.5, 3.4))
    for key, vals in series.items():
        pts = [(a, b) for a, b in zip(x, vals) if b is not None]
        if pts:
            (line,) = f.ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", markersize=3, label=LABELS[key],
                                color=PALETTE[key])
            f.tag(line, key)
    if logx:
        f.ax.set_xscale("log")
        f.ax.xaxis.set_minor_formatter(_mpl().ticker.FuncFormatter(lambda v, _p: ""))
    if integer_x:
        f.ax.xaxis.set_major_locator(_mpl().ticker.MaxNLocator(integer=True))
    for axis, unit in (("y", yunit), ("x", xunit)):
        if unit == "pct":
            percent_axis(f.ax, axis)
        elif unit == "count":
            count_axis(f.ax, axis)
        elif unit == "bytes":
            byte_axis(f.ax, axis)
    f.ax.set_xlabel(xlabel)
    f.ax.set_ylabel(ylabel)
    f.ax.grid(alpha=0.3)
    _finish(f, title, legend_outside=False)
    return f.svg(title)


def heatmap(matrix: list[list[float | None]], *, title: str, xlabel: str, ylabel: str,
            row_labels: list[str] | None = None, col_labels: list[str] | None = None) -> Chart:
    """Accuracy matrix as a PNG <img> (viridis, 0..1, every cell annotated in percent)."""
    import numpy as np
    arr = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    fig, ax = _mpl().plt.subplots(figsize=(1.0 + 0.7 * arr.shape[1], 0.8 + 0.6 * arr.shape[0]))
    im = ax.imshow(arr, vmin=0, vmax=1, cmap="viridis")
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            if not np.isnan(arr[i, j]):
                ax.text(j, i, f"{100 * arr[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if arr[i, j] < 0.6 else "black")
    ax.set_xticks(range(arr.shape[1]), labels=col_labels or [str(j + 1) for j in range(arr.shape[1])])
    ax.set_yticks(range(arr.shape[0]), labels=row_labels or [str(i + 1) for i in range(arr.shape[0])])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046)
    cbar.ax.yaxis.set_major_formatter(_mpl().ticker.FuncFormatter(lambda v, _p: f"{100 * v:.0f} %"))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _mpl().plt.close(fig)
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return Chart(f'<img src="{uri}" alt="{html.escape(title, quote=True)}">', {}, title)
