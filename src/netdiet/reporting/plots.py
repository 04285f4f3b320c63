"""Matplotlib figures as embedded PNG data URIs. Plots draw numbers they are given; they compute none."""
from __future__ import annotations

import base64
import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PALETTE = ["#3b6ea8", "#e07b39", "#5aa469", "#c94f5d", "#8c6bb1", "#b0894f", "#4fb0b0", "#7f7f7f"]


def _to_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def hbar(labels: Sequence[str], values: Sequence[float], *, title: str, xlabel: str, color: str = PALETTE[0]) -> str:
    height = max(2.0, 0.32 * len(labels) + 1.0)
    fig, ax = plt.subplots(figsize=(7.5, height))
    ax.barh(range(len(labels)), values, color=color)
    ax.set_yticks(range(len(labels)), labels=labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return _to_data_uri(fig)


def stacked_bars(categories: Sequence[str], series: dict[str, Sequence[float]], *, title: str, ylabel: str,
                 line: tuple[Sequence[float], str] | None = None, budget: float | None = None,
                 points: tuple[Sequence[float], str] | None = None) -> str:
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    bottom = [0.0] * len(categories)
    x = list(range(len(categories)))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x, vals, bottom=bottom, label=name, color=PALETTE[i % len(PALETTE)])
        bottom = [b + v for b, v in zip(bottom, vals)]
    if line is not None:
        ax.plot(x, line[0], "k--", marker="o", label=line[1])
    if points is not None:
        ax.scatter(x, points[0], marker="D", color="black", zorder=4, label=points[1])
    if budget is not None:
        ax.axhline(budget, color="#c94f5d", linewidth=2, label="budget")
    ax.set_xticks(x, labels=categories)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _to_data_uri(fig)


def pareto(points: list[dict], *, title: str) -> str:
    """points: {label, x (bytes), y (accuracy), on_front (bool), note}."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for p in points:
        ax.scatter(p["x"], p["y"], s=60, color=PALETTE[1] if p.get("on_front") else PALETTE[7], zorder=3)
        ax.annotate(p["label"] + (f"\n{p['note']}" if p.get("note") else ""), (p["x"], p["y"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    front = sorted((p for p in points if p.get("on_front")), key=lambda p: p["x"])
    if front:
        ax.plot([p["x"] for p in front], [p["y"] for p in front], color=PALETTE[1], linewidth=1.5, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk (log)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _to_data_uri(fig)


def lines(x: Sequence[float], series: dict[str, Sequence[float]], *, title: str, xlabel: str, ylabel: str,
          logx: bool = False, marker: str = "o") -> str:
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for i, (name, vals) in enumerate(series.items()):
        pts = [(a, b) for a, b in zip(x, vals) if b is not None]
        if pts:
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker=marker, label=name, color=PALETTE[i % len(PALETTE)])
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _to_data_uri(fig)


def heatmap(matrix: list[list[float | None]], *, title: str, xlabel: str, ylabel: str,
            row_labels: list[str] | None = None, col_labels: list[str] | None = None) -> str:
    import numpy as np
    arr = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * arr.shape[1], 0.8 + 0.6 * arr.shape[0]))
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
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _to_data_uri(fig)
