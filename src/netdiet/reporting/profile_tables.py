"""Terminal rendering of a profile document (ProfileResult.to_dict()). Renders; computes nothing."""
from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from netdiet.reporting.parallel_tables import distributed_report
from netdiet.reporting.story import FIT_ROWS, MEMORY_NAMES, pct, peak_shares, timing, timing_text
from netdiet.units import format_bytes, format_count


def _shape(shape: Any) -> str:
    if shape is None:
        return "-"
    if isinstance(shape, list) and shape and isinstance(shape[0], list):
        return ", ".join(_shape(s) for s in shape)
    if isinstance(shape, list):
        return "x".join(str(d) for d in shape)
    return str(shape)


def _table(title: str) -> Table:
    # compact: the module table must stay readable in an 80-column terminal
    return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1), title_justify="left")


def _pct(part: float | None, whole: float | None) -> str:
    if not part or not whole:
        return ""
    return f"{100.0 * part / whole:.1f}%"


def header(doc: dict) -> str:
    m = doc["model"]
    kw = ", ".join(f"{k}={v}" for k, v in (m.get("kwargs") or {}).items())
    name = m.get("spec") or m.get("class")
    inputs = "; ".join(f"{i['name'] + '=' if i.get('name') else ''}{_shape(i['shape'])} {i['dtype']}" for i in doc["inputs"])
    where = " [meta device: nothing allocated]" if doc.get("device") == "meta" else ""
    if m.get("built_on") == "cpu":
        where += " [built on the CPU: its constructor cannot run on the meta device]"
    return f"[bold]{escape(str(name))}[/bold]{escape(f'({kw})') if kw else ''} ({escape(m.get('class') or '')}) input {inputs}{where}"


def module_table(doc: dict, depth: int | None = None) -> Table:
    """The module tree as an indented table: params, forward MACs/FLOPs, backward FLOPs, saved activations."""
    t = _table("modules: forward MACs/FLOPs, backward FLOPs (bwd), activations saved for backward (inclusive)")
    t.add_column("module (type)", overflow="fold", max_width=34)  # folded, never cut to '…'
    for col in ("params", "MACs", "FLOPs", "bwd", "saved"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("output", overflow="fold", min_width=11)
    hidden = 0
    for row in doc["modules"]:
        if depth is not None and row["depth"] > depth:
            hidden += 1
            continue
        indent = " " * row["depth"]
        name = row["name"] or "(model)"
        short = name.rsplit(".", 1)[-1] if row["depth"] > 1 else name
        cell = Text(indent + short, overflow="fold")
        cell.append(" " + row["type"], style="dim")
        t.add_row(cell, format_count(row["params"]),
                  format_count(row["macs"]), format_count(row["flops"]), format_count(row["backward_flops"]),
                  format_bytes(row["activation_bytes"], short=True) if row.get("activation_bytes") is not None else "-",
                  escape(_shape(row["output_shape"])))
    if hidden:
        t.caption = f"{hidden} deeper modules not shown: --depth {depth + 1} or more shows them, --json keeps them all"
    return t


def operator_table(doc: dict) -> Table:
    t = _table("operators (forward + backward)")
    for col, just in (("op", "left"), ("calls", "right"), ("MACs", "right"), ("FLOPs", "right"), ("bwd calls", "right"),
                      ("bwd MACs", "right"), ("bwd FLOPs", "right")):
        # op names must stay whole (two attention ops differ only at the end): fold, never ellipsis
        t.add_column(col, justify=just, overflow="fold", no_wrap=(col != "op"))
    rows = sorted(doc["operators"].items(), key=lambda kv: -(kv[1].get("flops", 0) + kv[1].get("backward_flops", 0)))
    for op, r in rows:
        t.add_row(escape(op), str(r.get("count", 0)), format_count(r.get("macs")), format_count(r.get("flops")),
                  str(r.get("backward_count", "-")), format_count(r.get("backward_macs")), format_count(r.get("backward_flops")))
    return t


def uncounted_table(doc: dict) -> Table | None:
    if not doc.get("uncounted"):
        return None
    t = _table("uncounted ops (no formula: NOT in the totals)")
    t.add_column("op")
    t.add_column("calls", justify="right")
    for op, n in sorted(doc["uncounted"].items(), key=lambda kv: -kv[1]):
        t.add_row(escape(op), str(n))
    return t


def training_line(doc: dict) -> str | None:
    """Why the training figures are missing, in one line (None when they are all there)."""
    why = doc.get("training_unavailable")
    return f"[bold]training figures unavailable[/bold]: {escape(why)}" if why else None


def memory_table(doc: dict) -> Table | str:
    m = doc["memory"]
    if m.get("inference_peak") is None and m.get("peak_estimated") is None:
        return f"memory {escape(m.get('not_estimated') or 'not estimated')}"
    extras = [f"batch {m.get('batch_size')}", f"optimizer {m.get('optimizer')}"]
    if m.get("dtype"):
        extras.append(f"dtype {m['dtype']}")
    if m.get("amp"):
        extras.append("amp")
    if m.get("checkpointing"):
        extras.append("checkpointing")
    t = _table(f"memory: tensor bytes ({', '.join(str(e) for e in extras)})")
    t.add_column("part")
    t.add_column("bytes", justify="right")
    t.add_column("", justify="right")
    t.add_column("share of peak", justify="right")
    peak = m.get("peak_estimated")
    shares = peak_shares(m.get("peak_breakdown"))
    if shares and peak:
        # what is alive at the estimated peak: these add up to the peak (a part's own maximum may come at another time)
        phase = f" ({m['peak_phase']})" if m.get("peak_phase") else ""
        t.add_row(f"[dim]alive at the peak{escape(phase)}:[/dim]", "", "", "")
        for key, size in shares:
            t.add_row(f" {MEMORY_NAMES.get(key, key)}", str(size), format_bytes(size), pct(size, peak))
    else:
        for key in ("weights", "buffers", "gradients", "optimizer_state", "activations", "temporaries"):
            if m.get(key) is not None:
                t.add_row(key.replace("_", " "), str(m[key]), format_bytes(m[key]), "")
    if peak is None:
        t.add_row("[bold]training tensor peak (estimated)[/bold]", "-", "not estimated", "")
        if not doc.get("training_unavailable"):  # otherwise the reason stands under the header already
            t.caption = escape(m.get("not_estimated") or "")
    else:
        t.add_row("[bold]training tensor peak (estimated)[/bold]", str(peak), format_bytes(peak), "100 %" if shares else "")
    if m.get("peak_measured") is not None:
        err = m.get("estimate_error")
        t.add_row("[bold]training tensor peak (measured)[/bold]", str(m["peak_measured"]), format_bytes(m["peak_measured"]),
                  f"estimate {err:+.1%}" if err is not None else "")
    t.add_row("inference tensor peak (estimated)", str(m.get("inference_peak")), format_bytes(m.get("inference_peak")), "")
    if m.get("inference_peak_measured") is not None:
        t.add_row("inference tensor peak (measured)", str(m["inference_peak_measured"]), format_bytes(m["inference_peak_measured"]), "")
    if m.get("recompute_flops"):
        t.add_row("recompute FLOPs (checkpointing)", str(m["recompute_flops"]), format_count(m["recompute_flops"]), "")
    return t


def totals_table(doc: dict) -> Table:
    tt = doc["totals"]
    t = _table("totals")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("", justify="right")
    rows = [("params", tt["params"], format_count(tt["params"])),
            ("trainable params", tt["trainable_params"], format_count(tt["trainable_params"])),
            ("param bytes", tt["param_bytes"], format_bytes(tt["param_bytes"])),
            ("buffer bytes", tt["buffer_bytes"], format_bytes(tt["buffer_bytes"])),
            ("forward MACs", tt["macs"], format_count(tt["macs"])),
            ("forward FLOPs", tt["flops"], format_count(tt["flops"])),
            ("backward FLOPs", tt.get("backward_flops"), format_count(tt.get("backward_flops"))),
            (f"optimizer step FLOPs ({tt.get('optimizer')})", tt.get("optimizer_flops"), format_count(tt.get("optimizer_flops"))),
            ("training step FLOPs", tt["train_flops"], format_count(tt["train_flops"]))]
    for name, raw, human in rows:
        t.add_row(escape(name), "-" if raw is None else str(raw), human)
    return t


def latency_table(doc: dict) -> Table | None:
    lat = doc.get("latency")
    if not lat:
        return None
    th = lat.get("threads")
    t = _table(f"latency (batch {lat.get('batch_size')}, {th} thread{'s' if th != 1 else ''}; each repeated until the 95 % "
               f"interval of its median is within ±{100 * lat.get('target', 0.1):.0f} % or {lat.get('time_limit_s', '?')} s)")
    t.add_column("step")
    for col in ("median", "runs", "p95", "samples/s"):
        t.add_column(col, justify="right")

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} ms"

    def rate(v: float | None, stable: bool) -> str:
        return "-" if v is None else f"{v:,.1f}" if stable else f"~{v:,.1f}"

    fwd = timing(lat.get("forward_ms_median"), lat.get("forward_ms_ci"), lat.get("forward_stable"), None)
    t.add_row("forward (eval, no grad)", timing_text(fwd), str(lat.get("forward_repeats") or lat.get("repeats")),
              ms(lat.get("forward_ms_p95")), rate(lat.get("throughput_samples_per_s"), bool(fwd and fwd["stable"])))
    if lat.get("train_step_ms_median") is not None:
        step = timing(lat.get("train_step_ms_median"), lat.get("train_step_ms_ci"), lat.get("train_step_stable"), None)
        t.add_row(f"training step ({lat.get('optimizer')})", timing_text(step),
                  str(lat.get("train_step_repeats") or lat.get("repeats")), ms(lat.get("train_step_ms_p95")),
                  rate(lat.get("train_throughput_samples_per_s"), bool(step and step["stable"])))
    if not (fwd and fwd["stable"]) or (lat.get("train_step_stable") is False):
        t.caption = "unstable: the interval stayed wider than the target within the time limit; ~ marks figures built on it"
    return t


STORAGE_ROWS = 20


def storage_table(doc: dict) -> Table | None:
    """Weight tensors (2-D and up) with their sparsity and bytes in each layout; biases and norms only in the total."""
    st = doc.get("storage")
    if not st:
        return None
    rows = [r for r in st.get("parameters", []) if len(r.get("shape") or []) >= 2]
    t = _table("weight storage: dense vs sparse layouts")
    t.add_column("parameter", overflow="fold")
    for col in ("numel", "sparsity", "dense", "CSR", "bitmask", "best"):
        t.add_column(col, justify="right", no_wrap=True)
    for row in rows[:STORAGE_ROWS]:
        t.add_row(escape(str(row["name"])), format_count(row["numel"]), f"{row['sparsity']:.1%}",
                  format_bytes(row["dense_bytes"]), format_bytes(row["csr_bytes"]), format_bytes(row["bitmask_bytes"]),
                  row.get("best", ""))
    if len(rows) > STORAGE_ROWS:
        t.add_row(f"[dim](+{len(rows) - STORAGE_ROWS} more)[/dim]", "", "", "", "", "", "")
    tot = st.get("totals")
    if tot:
        t.add_row("[bold]all parameters[/bold]", format_count(tot["numel"]), f"{tot['sparsity']:.1%}",
                  format_bytes(tot["dense_bytes"]), format_bytes(tot["csr_bytes"]), format_bytes(tot["bitmask_bytes"]),
                  f"{format_bytes(tot['best_bytes'])}")
    return t


def scaling_table(doc: dict) -> Table | None:
    sc = doc.get("scaling")
    if not sc:
        return None
    measured = any(p.get("peak_measured") is not None for p in sc["points"])
    t = _table("batch sweep")
    cols = ["batch", "train peak (est.)"] + (["train peak (meas.)"] if measured else []) + ["inference peak (est.)", "FLOPs", "train FLOPs"]
    for c in cols:
        t.add_column(c, justify="right")
    for p in sc["points"]:
        row = [str(p["batch_size"]), format_bytes(p["peak_estimated"])]
        if measured:
            row.append(format_bytes(p.get("peak_measured")))
        row += [format_bytes(p["inference_peak"]), format_count(p.get("flops")), format_count(p.get("train_flops"))]
        t.add_row(*row)
    return t


def fit_lines(doc: dict) -> list[str]:
    sc = doc.get("scaling")
    lines = []
    if sc:
        fit = sc["fit"]
        for key, label, unit in FIT_ROWS:     # the bytes fits, then the counts
            f = fit.get(key)
            if f and unit == "bytes":
                lines.append(f"{label} = {format_bytes(f['fixed'])} fixed + {format_bytes(f['per_sample'])} x batch"
                             f"   R^2 {_r2(f['r2'])}")
            elif f:
                sign = "-" if f["fixed"] < 0 else "+"
                lines.append(f"{label} = {format_count(f['per_sample'])} x batch {sign} {format_count(abs(f['fixed']))}"
                             f"   R^2 {_r2(f['r2'])}")
    mb = doc.get("max_batch")
    if mb:
        if mb["fits"]:
            cap = " (the search cap: the budget is not the limit)" if mb.get("capped") else ""
            lines.append(f"largest batch within {format_bytes(mb['budget'])}: {mb['batch_size']} "
                         f"(estimated training peak {format_bytes(mb['peak_estimated'])}){cap}")
        else:
            lines.append(f"no batch fits in {format_bytes(mb['budget'])}: batch 1 needs {format_bytes(mb['peak_estimated'])}")
    pj = doc.get("projection")
    if pj:
        line = (f"{pj['dataset_size']} samples x {pj['epochs']} epochs = {format_count(pj['total_train_flops'])} training FLOPs "
                f"({format_count(pj['train_flops_per_sample'])} per sample)")
        if pj.get("projected_seconds") is not None:
            line += f"; at the measured {pj['samples_per_second']:.1f} samples/s: {_duration(pj['projected_seconds'])}"
        else:
            line += "; add --measure for the projected time"
        lines.append(line)
    return lines


def _r2(r2: float | None) -> str:
    return "n/a (constant)" if r2 is None else f"{r2:.4f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def profile_report(doc: dict, depth: int | None = None) -> Group:
    """All tables of a profile document, in reading order."""
    parts: list[Any] = [header(doc)]
    why = training_line(doc)
    if why:
        parts.append(why)
    parts += [module_table(doc, depth), operator_table(doc)]
    unc = uncounted_table(doc)
    if unc is not None:
        parts.append(unc)
    parts += [memory_table(doc), totals_table(doc)]
    for extra in (storage_table(doc), latency_table(doc), scaling_table(doc)):
        if extra is not None:
            parts.append(extra)
    parts += fit_lines(doc)
    parts += distributed_report(doc)
    return Group(*parts)
