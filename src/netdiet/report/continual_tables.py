"""Rich tables for `netdiet continual`. They render a ContinualResult dict; they compute no figures."""
from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from netdiet.units import format_bytes, format_count


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _signed_pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.2f}"


def summary_table(doc: dict) -> Table:
    """Accuracy vs bytes: one row per strategy."""
    sc = doc["scenario"]
    budget = doc.get("budget")
    title = (f"continual: {sc['name']} {sc['dataset']}, {doc['setting']}-incremental, {sc['num_tasks']} tasks"
             + (f", budget {format_bytes(budget)} ({budget} B)" if budget is not None else ", no budget"))
    t = Table(title=title)
    for col, just in (("strategy", "left"), ("avg acc %", "right"), ("BWT %", "right"), ("forgetting %", "right"),
                      ("FWT %", "right"), ("bytes kept (last task)", "right"), ("max bytes", "right"),
                      ("exemplars", "right"), ("train FLOPs", "right")):
        t.add_column(col, justify=just)
    for s in doc["strategies"]:
        if s["status"] != "ok":
            t.add_row(s["name"], "[red]stopped[/red]", "", "", "", "over budget: see below", "", "", "")
            continue
        flops = s["train_flops_per_task"]
        total_flops = None if not flops or any(f is None for f in flops) else sum(flops)
        ex = s.get("exemplars_per_task")
        t.add_row(s["name"], _pct(s["average_accuracy"]), _signed_pct(s["bwt"]), _pct(s["forgetting"]), _signed_pct(s["fwt"]),
                  format_bytes(s["bytes_per_task"][-1]), format_bytes(max(s["bytes_per_task"])),
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
