"""Terminal tables for `netdiet train` and `netdiet sweep`. They render result documents; they compute nothing."""
from __future__ import annotations

import json

from rich.markup import escape
from rich.table import Table

from netdiet.units import format_bytes, format_count


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _num(v, fmt: str = "{:.4f}") -> str:
    return "-" if v is None else fmt.format(v)


def train_history_table(doc: dict) -> Table:
    """One row per epoch of a netdiet.train/1 document."""
    model = doc.get("model", {})
    t = Table(title=f"netdiet train {escape(str(model.get('spec', '')))} on {escape(str(doc.get('data', {}).get('name', '')))}"
                    f" ({doc.get('world_size', 1)} process{'es' if doc.get('world_size', 1) > 1 else ''})")
    # short headers and 3-4 significant digits: nine columns must fit an 80-column terminal without an ellipsis
    for col in ("ep", "loss", "train", "val", "s", "smp/s", "wait", "peak RSS", "+RSS"):
        t.add_column(col, justify="right", overflow="fold")
    t.show_edge = False
    pct1 = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for h in doc.get("history", []):
        t.add_row(str(h.get("epoch")), _num(h.get("loss"), "{:.3f}"), pct1(h.get("train_acc")), pct1(h.get("val_acc")),
                  _num(h.get("seconds"), "{:.1f}"), _num(h.get("samples_per_s"), "{:.0f}"),
                  pct1(h.get("data_wait_fraction")), format_bytes(h.get("peak_rss"), short=True), format_bytes(h.get("peak_rss_delta"), short=True))
    t.caption = ("ep = epoch; train/val = accuracy; s = seconds; smp/s = samples per second; wait = share of epoch time "
                 "waiting for the next batch; +RSS = peak RSS above the epoch's start")
    return t


def train_summary_lines(doc: dict) -> list[str]:
    """The few facts under the table: test accuracy, early stopping, recompute, budget, where files went."""
    lines = [f"test accuracy {_pct(doc.get('test_acc'))} after {doc.get('steps')} optimizer steps in {doc.get('seconds', 0):.1f} s; "
             f"{format_count(doc.get('params'))} parameters"]
    if doc.get("train_flops_per_sample"):
        lines.append(f"training FLOPs per sample {format_count(doc['train_flops_per_sample'])} ({doc.get('flops_method')})")
    if doc.get("resumed_from_epoch") is not None:
        lines.append(f"resumed after epoch {doc['resumed_from_epoch']}")
    es = doc.get("early_stopping")
    if es:
        stop = f"stopped after epoch {es['stopped_epoch']}" if es.get("stopped_epoch") else "ran all epochs"
        lines.append(f"early stopping on {es['monitor']} (patience {es['patience']}): {stop}; best {_num(es.get('best'))} "
                     f"at epoch {es.get('best_epoch')}{', best weights restored' if es.get('restored_best') else ''}")
    rc = doc.get("recompute")
    if rc:
        line = f"activation checkpointing on {rc['module']}: {len(rc['segments'])} segments over {rc['children']} blocks"
        if rc.get("activations_plain") is not None:
            line += (f"; activations kept for backward at batch {rc['batch']}: {format_bytes(rc['activations_plain'])} -> "
                     f"{format_bytes(rc['activations_checkpointed'])} ({_pct(rc['activations_saved_fraction'])} saved)")
        if rc.get("recompute_flops_per_sample") is not None:
            line += f"; recompute adds {format_count(rc['recompute_flops_per_sample'])} FLOPs per sample"
        lines.append(line)
    pe = doc.get("precision_effect")
    if pe:
        lines.append(f"{pe['precision']} autocast: activations kept for backward at batch {pe['batch']}: "
                     f"{format_bytes(pe['activations_fp32'])} in fp32 -> {format_bytes(pe['activations'])} "
                     f"(x{pe['activations_ratio']:.2f}; includes autocast's bf16 weight copies)")
    if doc.get("budget"):
        lines.append(doc["budget"].get("explanation", ""))
    lines.append(f"peak memory is {doc.get('memory_method')}: process peak RSS during the epoch, and that minus RSS at epoch start")
    dist = doc.get("distributed")
    if dist and dist.get("per_rank_peak_measured"):
        peaks = ", ".join(format_bytes(p) if p is not None else "n/a" for p in dist["per_rank_peak_measured"])
        lines.append(f"{dist['strategy']} on {dist['world_size']} processes: tensor peak of step {dist['measured_step']} "
                     f"per rank {peaks} (measured; {dist['peak_method']})")
    if doc.get("files"):
        lines.append("wrote " + ", ".join(doc["files"].values()))
    return lines


def sweep_table(doc: dict) -> Table:
    """Train and validation error against complexity, one row per knob value; the chosen row marked."""
    t = Table(title=f"netdiet sweep {escape(str(doc.get('model', {}).get('spec', '')))}: {doc.get('knob')} "
                    f"({doc.get('k')}-fold cross-validation)")
    for col, just in ((doc.get("knob", "value"), "left"), ("params", "right"), ("FLOPs", "right"),
                      ("train err", "right"), ("val err", "right"), ("val sd", "right"), ("", "left")):
        t.add_column(escape(str(col)), justify=just, overflow="fold")
    for i, p in enumerate(doc.get("points", [])):
        mark = "<- chosen" if i == doc.get("chosen_index") else ""
        t.add_row(escape(json.dumps(p.get("value"))), format_count(p.get("params")), format_count(p.get("flops")),
                  _pct(p.get("train_error")), _pct(p.get("val_error")), _pct(p.get("val_error_std")), mark,
                  style="bold" if mark else None)
    t.caption = "FLOPs = forward FLOPs per sample; err = error (mean over the folds); val sd = its standard deviation"
    return t
