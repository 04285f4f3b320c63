"""The sentence under each report section: what its figures mean and what to do with them, written from the
result itself (never a hand-written number). Each function takes a result document and returns plain-text
sentences (possibly none); the HTML page and the terminal both use them.

Timings enter a sentence only when stable (netdiet.analysis.latency); every memory figure says what it measures:
the *tensor peak* (bytes of tensors alive at once, estimated on the meta device or measured from allocator
events) or the *RSS increase* (the whole process's resident memory, as `train` records it).
"""
from __future__ import annotations

from typing import Any

from netdiet.units import format_bytes, format_count

MEMORY_NAMES = {"weights": "weights", "buffers": "buffers", "inputs": "inputs", "outputs": "outputs",
                "gradients": "gradients", "backward_buffers": "backward temporaries", "optimizer_state": "optimizer state",
                "optimizer_temporaries": "optimizer temporaries", "activations": "activations saved for backward",
                "recomputed": "recomputed activations", "workspace": "workspace",
                "communication_buffers": "communication buffers", "temporaries": "other temporaries"}

# The linear fits over batch sizes a profile can carry (key in scaling.fit, label, unit), in the order shown.
FIT_ROWS = [("memory_estimated", "training tensor peak (est.)", "bytes"), ("memory_measured", "training tensor peak (meas.)", "bytes"),
            ("inference_memory_estimated", "inference tensor peak (est.)", "bytes"), ("flops", "forward FLOPs", "count"),
            ("train_flops", "training-step FLOPs", "count")]


def format_seconds(s: float) -> str:
    """A duration in s, ms or µs with 3 significant digits (never an exponent)."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(s) >= scale or unit == "µs":
            return f"{s / scale:.3g} {unit}"
    return f"{s:.3g} s"


def pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.0f} %" if whole else "-"


def is_number(x: Any) -> bool:
    """A JSON number (a bool is not one)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def peak_shares(breakdown: dict | None) -> list[tuple[str, int]]:
    """(category, bytes) alive at the estimated peak, largest first, zeros left out; they add up to the peak."""
    if not isinstance(breakdown, dict):
        return []
    rows = [(k, int(v)) for k, v in breakdown.items() if is_number(v) and v > 0]
    return sorted(rows, key=lambda kv: -kv[1])


def timing(median: Any, ci: Any, stable: Any, threads: Any, repeats: Any = None) -> dict | None:
    """One timing in the report's terms (None when not measured). Results written before timings carried an
    interval (no `ci`, no `stable`) count as unstable: their spread is unknown."""
    if not is_number(median):
        return None
    ci = list(ci) if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(is_number(c) for c in ci) else None
    rel = max(median - ci[0], ci[1] - median) / median if ci and median > 0 else None
    return {"median": float(median), "ci": ci, "rel": rel, "stable": stable is True and ci is not None,
            "threads": threads if isinstance(threads, int) else None, "repeats": repeats if isinstance(repeats, int) else None}


def timing_text(t: dict | None) -> str:
    """'1.23 ms ±4 % · 1 thread' / '12.3 ms, unstable (±35 %)' / 'not measured'."""
    if t is None:
        return "not measured"
    th = f" · {t['threads']} thread{'s' if t['threads'] != 1 else ''}" if t.get("threads") else ""
    spread = f"±{100 * t['rel']:.0f} %" if t.get("rel") is not None else "spread unknown"
    if t["stable"]:
        return f"{t['median']:.3g} ms {spread}{th}"
    return f"{t['median']:.3g} ms, unstable ({spread}){th}"


def profile_story(doc: dict) -> list[str]:
    name = str((doc.get("model") or {}).get("spec") or (doc.get("model") or {}).get("class") or "the model")
    mem = doc.get("memory") if isinstance(doc.get("memory"), dict) else {}
    out = []
    peak, batch = mem.get("peak_estimated"), mem.get("batch_size")
    shares = peak_shares(mem.get("peak_breakdown"))
    if is_number(peak) and peak > 0:
        s = f"{name}'s estimated training tensor peak is {format_bytes(peak)} at batch {batch}"
        if mem.get("peak_phase"):
            s += f", reached in the {mem['peak_phase']} phase"
        if shares:
            top, size = shares[0]
            s += f"; the largest part alive then is {MEMORY_NAMES.get(top, top)} ({pct(size, peak)} of it)"
        out.append(s + ".")
        if is_number(mem.get("peak_measured")):
            err = mem.get("estimate_error")
            out.append(f"Measured tensor peak of real steps: {format_bytes(mem['peak_measured'])}"
                       + ("." if not is_number(err) else " (the estimate matches it within 0.1 %)." if abs(err) < 5e-4
                          else f" (the estimate is {100 * err:+.1f} % off)."))
    fit = ((doc.get("scaling") or {}).get("fit") or {}).get("memory_estimated") if isinstance(doc.get("scaling"), dict) else None
    if isinstance(fit, dict) and is_number(fit.get("per_sample")) and is_number(fit.get("fixed")):
        r2 = f", R² {fit['r2']:.3f}" if is_number(fit.get("r2")) else ""
        out.append(f"Each sample adds {format_bytes(fit['per_sample'])} to the training peak on top of "
                   f"{format_bytes(fit['fixed'])} fixed (fit over {fit.get('n', '?')} batch sizes{r2}): memory grows "
                   f"linearly with the batch, so the batch is the knob for a memory budget.")
    mb = doc.get("max_batch") if isinstance(doc.get("max_batch"), dict) else None
    if mb and is_number(mb.get("budget")):
        if mb.get("fits"):
            out.append(f"Training-budget decision: batch {mb.get('batch_size')} is the largest whose estimated peak "
                       f"({format_bytes(mb.get('peak_estimated'))}) fits {format_bytes(mb['budget'])}"
                       f"{' (the search cap, not the budget, stopped it)' if mb.get('capped') else ''}.")
        else:
            out.append(f"Training-budget decision: no batch fits {format_bytes(mb['budget'])}; batch 1 needs "
                       f"{format_bytes(mb.get('peak_estimated'))}. Lower precision, checkpointing or a smaller model is needed.")
    lat = doc.get("latency") if isinstance(doc.get("latency"), dict) else None
    if lat:
        step = timing(lat.get("train_step_ms_median"), lat.get("train_step_ms_ci"), lat.get("train_step_stable"),
                      lat.get("threads"))
        if step and step["stable"] and is_number(lat.get("train_throughput_samples_per_s")):
            out.append(f"One training step at batch {lat.get('batch_size')} takes {timing_text(step)} "
                       f"({lat['train_throughput_samples_per_s']:,.0f} samples/s).")
        elif step:
            out.append("The training-step time did not settle within its time limit on this machine (marked unstable); "
                       "rerun on a quieter machine before using it.")
    return out


def train_story(doc: dict) -> list[str]:
    name = str((doc.get("model") or {}).get("spec") or "the model")
    hist = [h for h in doc.get("history") or [] if isinstance(h, dict)]
    out = []
    if is_number(doc.get("test_acc")) and hist:
        s = f"{name} reached {100 * doc['test_acc']:.2f} % test accuracy after {len(hist)} epochs"
        vals = [(h.get("val_acc"), h.get("epoch", i + 1)) for i, h in enumerate(hist) if is_number(h.get("val_acc"))]
        if vals:
            best, epoch = max(vals, key=lambda v: v[0])
            s += f"; validation accuracy peaked at {100 * best:.2f} % in epoch {epoch}"
            if epoch != hist[-1].get("epoch", len(hist)):
                s += " (later epochs did not improve it: fewer epochs or early stopping would do)"
        out.append(s + ".")
    if is_number(doc.get("peak_memory_bytes")):
        out.append(f"Memory here is the process's RSS increase during an epoch ({format_bytes(doc['peak_memory_bytes'])} "
                   "at most), not the tensor peak: the profile section shows that one.")
    budget = doc.get("budget") if isinstance(doc.get("budget"), dict) else None
    if budget and budget.get("explanation"):
        out.append(f"Training-budget decision: {budget['explanation']}")
    return out


def compress_story(doc: dict) -> list[str]:
    stages = [s for s in doc.get("stages") or [] if isinstance(s, dict)]
    base = doc.get("baseline") if isinstance(doc.get("baseline"), dict) else {}
    kept = doc.get("archive") if isinstance(doc.get("archive"), dict) else {}
    out = []
    last = stages[-1] if stages else {}
    ratio = kept.get("ratio") if is_number(kept.get("ratio")) else last.get("ratio")
    size = kept.get("bytes") if is_number(kept.get("bytes")) else last.get("bytes_on_disk")
    if is_number(ratio) and is_number(size):
        s = (f"The {'kept archive' if kept.get('ratio') is not None else 'last stage'} holds the model in "
             f"{format_bytes(size)}, {ratio:.1f}× smaller than its dense fp32 file ({format_bytes(base.get('bytes_on_disk'))})")
        if is_number(last.get("accuracy")) and is_number(base.get("accuracy")):
            s += (f", at {100 * last['accuracy']:.2f} % accuracy ({100 * (last['accuracy'] - base['accuracy']):+.2f} pt "
                  f"vs the dense baseline)")
        out.append(s + ".")
    front = [n for n in doc.get("pareto") or [] if isinstance(n, str)]
    if front:
        out.append(f"On the Pareto front (no other step is both smaller and more accurate): {', '.join(front)}.")
    timed = [timing(*(stage_timing(s))) for s in stages]
    unstable = [s.get("name") for s, t in zip(stages, timed) if t is not None and not t["stable"]]
    if unstable:
        out.append(f"Latencies of {', '.join(str(u) for u in unstable)} did not settle within their time limit and are "
                   "marked unstable: compare stages by bytes and accuracy, not by those times.")
    return out


def stage_timing(stage: dict) -> tuple:
    """(median, ci, stable, threads) of the runtime that deploys a stage's file (ORT when measured)."""
    lat = stage.get("latency_ms") if isinstance(stage.get("latency_ms"), dict) else {}
    detail = stage.get("latency_detail") if isinstance(stage.get("latency_detail"), dict) else {}
    key = "onnxruntime" if is_number(lat.get("onnxruntime")) else "pytorch"
    d = detail.get(key) if isinstance(detail.get(key), dict) else {}
    return lat.get(key), d.get("ci"), d.get("stable"), d.get("threads")


def evaluate_story(doc: dict) -> list[str]:
    out = []
    if is_number(doc.get("ratio")) and is_number(doc.get("bytes_on_disk")):
        out.append(f"Measured from the file itself: {format_bytes(doc['bytes_on_disk'])} on disk, {doc['ratio']:.1f}× "
                   f"smaller than dense fp32 ({format_bytes(doc.get('dense_fp32_bytes'))})"
                   + (f", {100 * doc['accuracy']:.2f} % accuracy on {doc.get('runtime')}." if is_number(doc.get("accuracy")) else "."))
    sp = doc.get("latency_speedup") if isinstance(doc.get("latency_speedup"), dict) else None
    if sp:
        if sp.get("stable") and is_number(sp.get("value")):
            band = (f" (interval {sp['low']:.2f}–{sp['high']:.2f})" if is_number(sp.get("low")) and is_number(sp.get("high")) else "")
            faster = "faster" if sp["value"] >= 1 else "slower"
            out.append(f"ONNX Runtime runs this file {sp['value']:.2f}× {faster} than PyTorch{band}, both timed interleaved "
                       f"on {sp.get('threads')} thread{'s' if sp.get('threads') != 1 else ''}.")
        else:
            out.append("PyTorch and ONNX Runtime timings did not both settle within their time limit, so no speed ratio "
                       "is given; rerun on a quieter machine or with --threads 1.")
    return out


def continual_story(doc: dict) -> list[str]:
    out = []
    budget = doc.get("budget")
    for s in doc.get("strategies") or []:
        if not isinstance(s, dict):
            continue
        kept = [b for b in s.get("bytes_per_task") or [] if is_number(b)]
        mat = s.get("accuracy_matrix") if isinstance(s.get("accuracy_matrix"), list) else []
        line = f"{s.get('name')}: average accuracy {100 * s['average_accuracy']:.2f} % after {len(mat)} tasks" \
            if is_number(s.get("average_accuracy")) else f"{s.get('name')}:"
        if is_number(s.get("forgetting")):
            line += f", forgetting {100 * s['forgetting']:.2f} %"
        if kept:
            line += f"; it kept at most {format_bytes(max(kept))}"
            if is_number(budget) and budget > 0:
                line += f" of the {format_bytes(budget)} budget ({pct(max(kept), budget)})"
        out.append(line + ".")
    return out


def sweep_story(doc: dict) -> list[str]:
    pts = [p for p in doc.get("points") or [] if isinstance(p, dict)]
    i = doc.get("chosen_index")
    if isinstance(i, int) and 0 <= i < len(pts) and is_number(pts[i].get("val_error")):
        p = pts[i]
        return [f"The lowest mean validation error, {100 * p['val_error']:.2f} %, is at {doc.get('knob')} = "
                f"{p.get('value')} ({format_count(p.get('params'))} parameters); larger models past it overfit or "
                "cost more for nothing."]
    return []


def plan_story(doc: dict) -> list[str]:
    """netdiet plan: the fastest feasible layout, what it costs per rank, and how far the closest misfit is off."""
    dev = doc.get("devices") if isinstance(doc.get("devices"), dict) else {}
    memory = (dev.get("device") or {}).get("memory_bytes") if isinstance(dev.get("device"), dict) else None
    ranked = [r for r in doc.get("ranked") or [] if isinstance(r, dict)]
    where = f"{dev.get('count')}× {dev.get('name')}" + (f" ({format_bytes(memory)} each)" if is_number(memory) else "")
    out = []
    if ranked and is_number(ranked[0].get("step_time_s")) and is_number(ranked[0].get("peak")):
        best = ranked[0]
        mb = f"micro-batch {best.get('micro_batch')}" + (f" × {best['accumulation']} accumulated"
                                                           if (best.get("accumulation") or 1) > 1 else "")
        rate = (f", {format_count(best['throughput'])} {best.get('throughput_unit', 'samples/s')}"
                if is_number(best.get("throughput")) else "")
        mfu = f", MFU {100 * best['mfu']:.0f} %" if is_number(best.get("mfu")) else ""
        out.append(f"On {where}, the fastest of {len(ranked)} feasible layout variants is {best.get('layout')} at {mb}"
                   f"{' with checkpointing' if best.get('checkpointing') else ''}: a projected step of "
                   f"{format_seconds(best['step_time_s'])}{rate}{mfu}, with a per-rank peak of "
                   f"{format_bytes(best['peak'])}.")
    bad = [b for b in doc.get("infeasible") or [] if isinstance(b, dict) and is_number(b.get("over_by"))]
    if bad:
        near = min(bad, key=lambda b: b["over_by"])
        out.append(f"{len(bad)} layout{'s do' if len(bad) != 1 else ' does'} not fit at any micro-batch; the closest, "
                   f"{near.get('layout')}, needs {format_bytes(near['over_by'])} more per rank than the device has.")
    if ranked:
        out.append("Step times are roofline projections from the counted work and the links' bandwidth (an upper bound "
                   "on speed a tuned run approaches), not measurements; memory is the estimated per-rank tensor peak.")
    return out
