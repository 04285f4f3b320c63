"""Rich tables for `netdiet continual`. They render a ContinualResult dict; they compute no figures."""
from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from netdiet.units import format_bytes, format_count


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _signed_pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.1f}"


def summary_table(doc: dict) -> Table:
    """Accuracy vs bytes: one row per strategy."""
    sc = doc["scenario"]
    budget = doc.get("budget")
    title = (f"continual: {sc['name']} {sc['dataset']}, {doc['setting']}-incremental, {sc['num_tasks']} tasks"
             + (f", budget {format_bytes(budget)} ({budget} B)" if budget is not None else ", no budget"))
    # short headers, one decimal and the maximum folded under the last-task bytes: fits 80 columns with no ellipsis
    t = Table(title=title, caption="acc = average accuracy after the last task; fgt = forgetting; kept = bytes kept "
                                   "after the last task (and the maximum over tasks when larger); ex = exemplars kept; "
                                   "FLOPs = training FLOPs over all tasks")
    for col, just in (("strategy", "left"), ("acc %", "right"), ("BWT %", "right"), ("fgt %", "right"),
                      ("FWT %", "right"), ("kept", "right"), ("ex", "right"), ("FLOPs", "right")):
        t.add_column(col, justify=just, overflow="fold")
    for s in doc["strategies"]:
        if s["status"] != "ok":
            t.add_row(f"{escape(s['name'])}\n[red]stopped[/red]", "-", "-", "-", "-", "over budget (below)", "-", "-")
            continue
        flops = s["train_flops_per_task"]
        total_flops = None if not flops or any(f is None for f in flops) else sum(flops)
        ex = s.get("exemplars_per_task")
        t.add_row(s["name"], _pct(s["average_accuracy"]), _signed_pct(s["bwt"]), _pct(s["forgetting"]), _signed_pct(s["fwt"]),
                  format_bytes(s["bytes_per_task"][-1]) + (f"\nmax {format_bytes(max(s['bytes_per_task']))}"
                                                           if max(s["bytes_per_task"]) > s["bytes_per_task"][-1] else ""),
                  "-" if not ex else str(ex[-1]), format_count(total_flops))
    return t


def matrix_table(strategy: dict) -> Table:
    """R[i][j]: accuracy on task j after training task i, with the bytes kept after task i."""
    R = strategy["accuracy_matrix"]
    t = Table(title=f"{strategy['name']}: accuracy % after task i (rows) on task j (columns)")
    t.add_column("after", justify="right")
    for j in range(len(R)):
        t.add_column(f"T{j + 1}", justify="right")
    t.add_column("bytes kept", justify="right")
    t.add_column("ledger")
    for i, row in enumerate(R):
        ledger = ", ".join(f"{k} {v}" for k, v in strategy["ledger_per_task"][i].items())
        t.add_row(f"T{i + 1}", *[f"{100 * a:.1f}" for a in row], str(strategy["bytes_per_task"][i]), ledger)
    return t


def stopped_lines(doc: dict) -> list[str]:
    """One line per strategy that stopped, with its full reason."""
    return [f"{s['name']} stopped: {escape(s['message'])}" for s in doc["strategies"] if s["status"] != "ok"]


def decision_lines(doc: dict) -> list[str]:
    """What the automatic budget split chose for each strategy that made a decision, predicted vs actual bytes."""
    lines = []
    for s in doc["strategies"]:
        d = s.get("decision") if s.get("status") == "ok" else None
        if not d:
            continue
        c = d["chosen"]
        lines.append(f"{escape(s['name'])} chose: weights {c['model']}, exemplars {c['bits']}-bit at 1/{c['downsample']} "
                     f"resolution x {c['exemplars']} (coverage {100 * c['coverage']:.0f} % of old-class samples); "
                     f"predicted {d['predicted_bytes']} B, actual max {d['actual_bytes']} B of {d['budget']} B")
    return lines
