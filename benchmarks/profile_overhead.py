"""What a profile costs: `netdiet.profile` as a ratio to one plain training step, beside FlopCounterMode and fvcore,
the cold CLI, `netdiet models`, and how the cost of a profile grows with the model (issue 13).

    python benchmarks/profile_overhead.py [--parts steps,cli,models,scaling] [--repeats 5] [--out PATH]

Run it with an interpreter that has fvcore (not in the lock: e.g. a venv with the torch wheel, fvcore, the lock's
other packages and `pip install -e . --no-deps`); without fvcore its column says why it is missing.

- steps: for lenet5, resnet, mobilenet, the zoo transformer's tiny / small / gpt2 presets (short sequences, so that
  one step on one thread takes seconds; gpt2 at batch 8 only) and a GPT-2-shaped Hugging Face config built here (no weights, nothing
  downloaded), at batch 8 and 64: the time of `netdiet.profile(model, x)`, of a FlopCounterMode forward + backward
  and of fvcore's FlopCountAnalysis (forward, JIT-traced), each divided by the time of one plain step (forward,
  netdiet's default loss, backward, Adam step, zero_grad) on the same model and input. One thread. After a warm-up
  round, every round times the four in a rotating order, each ratio is taken against the plain step of its own
  round, and the table shows the median ratio with its min-max over rounds (a slow case stops after 3 rounds once
  it has used --case-budget seconds). Targets: <= 3x at batch 8, <= 1.5x at 64.
- cli: a cold `netdiet profile lenet5` process against `python -c 'import torch; <one LeNet-5 fwd+bwd+Adam step>'`,
  interleaved, median of the per-pair ratios. Target <= 1.5x.
- models: a cold `netdiet models` process against `python -c 'import torch'`, interleaved. Target <= 1.2x.
- scaling: the transformer presets tiny -> small -> gpt2 -> 7b built on the meta device and profiled at batch 8 and
  their own sequence length, each in a fresh process: profile time and that process's peak RSS (VmHWM; getrusage's
  ru_maxrss would report the parent's peak, which it inherits over fork + exec).

Writes benchmarks/results/profile_overhead.json (pass/fail per target) and prints the tables. The machine is shared:
the load average before and after is recorded beside the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("NETDIET_PROGRESS", "0")

import torch  # noqa: E402

TARGETS = {"profile_b8": 3.0, "profile_b64": 1.5, "cold_cli": 1.5, "models_command": 1.2}
# (label, zoo spec or "hf", model kwargs, batches): sequences kept short so one step on one thread takes seconds
CASES = [
    ("lenet5", "lenet5", {}, (8, 64)),
    ("resnet", "resnet", {}, (8, 64)),
    ("mobilenet", "mobilenet", {}, (8, 64)),
    ("transformer tiny", "transformer", {"preset": "tiny"}, (8, 64)),
    ("transformer small (seq 16)", "transformer", {"preset": "small", "seq_len": 16}, (8, 64)),
    ("transformer gpt2 (seq 16)", "transformer", {"preset": "gpt2", "seq_len": 16}, (8,)),
    ("hf gpt2-shaped (4x256, seq 16)", "hf", {}, (8, 64)),
]
HF_CONFIG = dict(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=128, use_cache=False,
                 bos_token_id=0, eos_token_id=0, architectures=["GPT2LMHeadModel"])
HF_SEQ = 16
SCALING_PRESETS = ("tiny", "small", "gpt2", "7b")

STEP_SCRIPT = textwrap.dedent("""
    import torch
    from torch import nn
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    loss = nn.functional.cross_entropy(m(torch.randn(1, 1, 28, 28)), torch.zeros(1, dtype=torch.long))
    loss.backward()
    opt.step()
    opt.zero_grad()
""")

SCALING_CHILD = textwrap.dedent("""
    import json, os, resource, sys, time
    os.environ["NETDIET_PROGRESS"] = "0"
    import torch
    torch.set_num_threads(1)
    import netdiet
    import netdiet.api  # the API and the engines it imports, before the clock starts
    from netdiet.models.zoo import TRANSFORMER_PRESETS

    def peak_rss() -> int:
        # this process's own high-water mark: ru_maxrss would carry the parent's peak over fork + exec
        try:
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    preset, batch = sys.argv[1], int(sys.argv[2])
    seq = TRANSFORMER_PRESETS[preset]["seq_len"]
    rss_before = peak_rss()
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = netdiet.create_model("transformer", preset=preset)
    x = torch.empty(batch, seq, dtype=torch.long, device="meta")
    res = netdiet.profile(model, x, optimizer="adam", progress=False)
    seconds = time.perf_counter() - t0
    doc = res.to_dict()
    print(json.dumps({"preset": preset, "batch": batch, "seq_len": seq, "params": doc["totals"]["params"],
                      "train_flops": doc["totals"]["train_flops"], "peak_estimated": doc["memory"]["peak_estimated"],
                      "profile_s": seconds, "rss_after_imports_bytes": rss_before,
                      "max_rss_bytes": peak_rss()}))
""")


# ------------------------------------------------------------------ warm, in-process: one step and its profilers
def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _hf_folder(root: Path) -> str:
    import transformers
    folder = root / "hf-gpt2-shaped"
    transformers.GPT2Config(**HF_CONFIG).save_pretrained(folder)
    return f"hf:{folder}"


def _fvcore():
    try:
        from fvcore.nn import FlopCountAnalysis
    except Exception as exc:  # noqa: BLE001 - any failure to import is recorded as the reason
        return None, f"fvcore does not import here ({type(exc).__name__}: {exc}); run with a venv that has it"
    return FlopCountAnalysis, None


def _case(label: str, spec: str, kw: dict, batch: int, hf_spec: str | None, repeats: int, fvcore_cls,
          case_budget_s: float) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    import netdiet
    from netdiet.analysis.step import default_loss
    from netdiet.models import default_inputs, make_inputs

    torch.manual_seed(0)
    if spec == "hf":
        model = netdiet.create_model(hf_spec)
        x = (torch.randint(0, HF_CONFIG["vocab_size"], (batch, HF_SEQ), generator=torch.Generator().manual_seed(0)),)
    else:
        model = netdiet.create_model(spec, **kw)
        shape, dtype, high = default_inputs(spec, kw)
        x = (make_inputs((batch, *shape[1:]), dtype, high=high, seed=0),)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def plain():
        default_loss(model(*x)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def profile():
        netdiet.profile(model, x, optimizer="adam", progress=False)

    def flop_counter():
        with FlopCounterMode(display=False):
            default_loss(model(*x)).backward()
        model.zero_grad(set_to_none=True)

    tools = {"plain_step": plain, "netdiet_profile": profile, "flop_counter_mode": flop_counter}
    fvcore_note = None
    if fvcore_cls is not None:
        def fvcore():
            fvcore_cls(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()
        try:
            fvcore()
            tools["fvcore"] = fvcore
        except Exception as exc:  # noqa: BLE001 - a model fvcore cannot trace is recorded, not fatal
            fvcore_note = f"fvcore failed on this model: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    names = list(tools)
    for name in names:       # warm-up round: allocator, lazy initialisation, first-call dispatch caches
        tools[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    t0 = time.perf_counter()
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]   # rotate, so no tool always runs first
        for name in order:
            times[name].append(_timed(tools[name]))
        if r >= 2 and time.perf_counter() - t0 > case_budget_s:   # a slow case stops at 3 rounds or more
            break
    ratios = {n: [t / p for t, p in zip(times[n], times["plain_step"])] for n in names if n != "plain_step"}
    target = TARGETS["profile_b8"] if batch <= 8 else TARGETS["profile_b64"]
    row = {"case": label, "spec": hf_spec if spec == "hf" else spec, "model_kw": kw, "batch": batch,
           "input": list(x[0].shape), "params": sum(p.numel() for p in model.parameters()),
           "rounds": len(times["plain_step"]),
           "plain_step_s": {"median": statistics.median(times["plain_step"]), "min": min(times["plain_step"]),
                            "max": max(times["plain_step"])},
           "seconds": {n: times[n] for n in names},
           "ratio": {n: {"median": statistics.median(v), "min": min(v), "max": max(v)} for n, v in ratios.items()},
           "target": target}
    row["pass"] = row["ratio"]["netdiet_profile"]["median"] <= target
    if fvcore_note:
        row["fvcore_note"] = fvcore_note
    print(f"{label} b{batch}: step {row['plain_step_s']['median'] * 1e3:.1f} ms, profile "
          f"{row['ratio']['netdiet_profile']['median']:.2f}x, FlopCounterMode "
          f"{row['ratio']['flop_counter_mode']['median']:.2f}x"
          + (f", fvcore {row['ratio']['fvcore']['median']:.2f}x" if "fvcore" in row["ratio"] else ""), file=sys.stderr)
    return row


def steps_part(repeats: int, only: list[str] | None, batches: list[int], case_budget_s: float) -> dict:
    torch.set_num_threads(1)
    fvcore_cls, fvcore_missing = _fvcore()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_spec = _hf_folder(Path(tmp))
        for label, spec, kw, case_batches in CASES:
            if only and not any(o in label for o in only):
                continue
            for b in case_batches:
                if b in batches:
                    rows.append(_case(label, spec, kw, b, hf_spec, repeats, fvcore_cls, case_budget_s))
    return {"threads": 1, "repeats": repeats, "case_budget_s": case_budget_s, "fvcore_missing": fvcore_missing,
            "rows": rows,
            "pass": all(r["pass"] for r in rows),
            "skipped": "transformer gpt2 at batch 64: one plain step of 1024 tokens on one thread takes about a "
                       "minute here, so it runs at batch 8 only"}


# ------------------------------------------------------------------ cold processes
def _pairs(cmd: list[str], baseline: list[str], repeats: int) -> dict:
    def run(c: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run(c, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        return time.perf_counter() - t0
    run(cmd)
    run(baseline)   # one warm-up each: the page cache holds both sets of files afterwards
    cmd_s, base_s = [], []
    for r in range(repeats):
        first, second = (cmd, baseline) if r % 2 == 0 else (baseline, cmd)
        a, b = run(first), run(second)
        cmd_s.append(a if first is cmd else b)
        base_s.append(b if first is cmd else a)
    ratios = [c / b for c, b in zip(cmd_s, base_s)]
    return {"command_s": cmd_s, "baseline_s": base_s, "command_median_s": statistics.median(cmd_s),
            "baseline_median_s": statistics.median(base_s),
            "ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}


def _netdiet_command() -> list[str]:
    """The `netdiet` console script beside this interpreter (what a user runs), else `python -m netdiet`."""
    script = Path(sys.executable).parent / "netdiet"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "netdiet"]


def cli_part(repeats: int) -> dict:
    out = _pairs([*_netdiet_command(), "profile", "lenet5"], [sys.executable, "-c", STEP_SCRIPT], repeats)
    out.update(command="netdiet profile lenet5", baseline="python -c 'import torch; <one LeNet-5 fwd+bwd+Adam step>'",
               target=TARGETS["cold_cli"])
    out["pass"] = out["ratio"]["median"] <= out["target"]
    print(f"cold CLI: {out['command_median_s']:.2f} s vs {out['baseline_median_s']:.2f} s = "
          f"{out['ratio']['median']:.2f}x", file=sys.stderr)
    return out


def models_part(repeats: int) -> dict:
    out = _pairs([*_netdiet_command(), "models"], [sys.executable, "-c", "import torch"], repeats)
    out.update(command="netdiet models", baseline="python -c 'import torch'", target=TARGETS["models_command"])
    out["pass"] = out["ratio"]["median"] <= out["target"]
    print(f"netdiet models: {out['command_median_s']:.2f} s vs {out['baseline_median_s']:.2f} s = "
          f"{out['ratio']['median']:.2f}x", file=sys.stderr)
    return out


def scaling_part(batch: int = 8) -> dict:
    rows = []
    for preset in SCALING_PRESETS:
        done = subprocess.run([sys.executable, "-c", SCALING_CHILD, preset, str(batch)], capture_output=True,
                              text=True, timeout=900)
        if done.returncode != 0:
            rows.append({"preset": preset, "batch": batch, "error": done.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"scaling {preset}: " + (f"{r['profile_s']:.1f} s, peak RSS {r['max_rss_bytes'] / 2**20:.0f} MiB"
                                       if "error" not in r else f"failed: {r['error']}"), file=sys.stderr)
    return {"device": "meta", "threads": 1, "optimizer": "adam", "rows": rows,
            "note": "each preset in a fresh process, timed from building the model on meta to the finished profile "
                    "(imports before); max_rss_bytes is that process's peak RSS, imports included "
                    "(rss_after_imports_bytes: the peak before the model), read from /proc/self/status VmHWM "
                    "because getrusage's ru_maxrss carries the parent's peak over fork + exec"}


def _table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    con = Console(width=200)
    if "steps" in doc:
        t = Table(title="netdiet.profile vs one plain fwd+bwd+Adam step (1 thread; median ratio, min-max over rounds)")
        for col in ("model", "batch", "plain step", "netdiet.profile", "target", "FlopCounterMode fwd+bwd", "fvcore"):
            t.add_column(col, justify="left" if col == "model" else "right")

        def cell(r, n):
            v = r["ratio"].get(n)
            return f"{v['median']:.2f}x ({v['min']:.2f}-{v['max']:.2f})" if v else "-"
        for r in doc["steps"]["rows"]:
            t.add_row(r["case"], str(r["batch"]), f"{r['plain_step_s']['median'] * 1e3:.1f} ms",
                      cell(r, "netdiet_profile"), f"<= {r['target']}x {'pass' if r['pass'] else 'FAIL'}",
                      cell(r, "flop_counter_mode"), cell(r, "fvcore"))
        con.print(t)
    for key in ("cold_cli", "models_command"):
        if key in doc:
            c = doc[key]
            con.print(f"{c['command']}: {c['command_median_s']:.2f} s vs {c['baseline']}: {c['baseline_median_s']:.2f} s"
                      f" = {c['ratio']['median']:.2f}x ({c['ratio']['min']:.2f}-{c['ratio']['max']:.2f}); target <= "
                      f"{c['target']}x: {'pass' if c['pass'] else 'FAIL'}")
    if "scaling" in doc:
        t = Table(title="profile of the transformer presets on the meta device (batch 8, own seq len, fresh process)")
        for col in ("preset", "params", "tokens", "profile", "peak RSS"):
            t.add_column(col, justify="left" if col == "preset" else "right")
        for r in doc["scaling"]["rows"]:
            if "error" in r:
                t.add_row(r["preset"], "-", "-", "failed", "-")
            else:
                t.add_row(r["preset"], f"{r['params'] / 1e6:,.1f}M", f"{r['batch']}x{r['seq_len']}",
                          f"{r['profile_s']:.1f} s", f"{r['max_rss_bytes'] / 2**20:,.0f} MiB")
        con.print(t)


def markdown(doc: dict) -> str:
    """The README's tables, from a results document."""
    lines = []
    if "steps" in doc:
        lines += ["| model | batch | plain step | `netdiet.profile` | target | FlopCounterMode fwd+bwd | fvcore (fwd) |",
                  "|---|---|---|---|---|---|---|"]

        def cell(r, n):
            v = r["ratio"].get(n)
            return f"{v['median']:.2f}× ({v['min']:.2f}–{v['max']:.2f})" if v else "—"
        for r in doc["steps"]["rows"]:
            lines.append(f"| {r['case']} | {r['batch']} | {r['plain_step_s']['median'] * 1e3:,.0f} ms | "
                         f"**{cell(r, 'netdiet_profile')}** | ≤ {r['target']}× {'pass' if r['pass'] else 'FAIL'} | "
                         f"{cell(r, 'flop_counter_mode')} | {cell(r, 'fvcore')} |")
        lines.append("")
    for key in ("cold_cli", "models_command"):
        if key in doc:
            c = doc[key]
            lines.append(f"- `{c['command']}` cold: {c['command_median_s']:.2f} s vs {c['baseline']} "
                         f"{c['baseline_median_s']:.2f} s: **{c['ratio']['median']:.2f}×** "
                         f"({c['ratio']['min']:.2f}–{c['ratio']['max']:.2f}; target ≤ {c['target']}×: "
                         f"{'pass' if c['pass'] else 'FAIL'})")
    if "scaling" in doc:
        lines += ["", "| transformer preset (meta) | params | batch × seq | profile | peak RSS |", "|---|---|---|---|---|"]
        for r in doc["scaling"]["rows"]:
            if "error" not in r:
                lines.append(f"| {r['preset']} | {r['params'] / 1e6:,.1f} M | {r['batch']} × {r['seq_len']} | "
                             f"{r['profile_s']:.1f} s | {r['max_rss_bytes'] / 2**20:,.0f} MiB |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="steps,cli,models,scaling")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per case after the warm-up (default 5)")
    ap.add_argument("--case-budget", type=float, default=45.0, metavar="S",
                    help="a case stops adding rounds once its timed rounds took S seconds (3 rounds at least)")
    ap.add_argument("--process-repeats", type=int, default=7, help="interleaved pairs of cold processes (default 7)")
    ap.add_argument("--cases", default=None, help="only the cases whose label contains one of these (comma-separated)")
    ap.add_argument("--batches", default="8,64")
    ap.add_argument("--label", default=None, help="a note stored with the results (e.g. the commit measured)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "profile_overhead.json"))
    ap.add_argument("--markdown", default=None, metavar="PATH", help="also write the README's tables to PATH")
    ap.add_argument("--from-json", default=None, metavar="PATH", help="measure nothing: print the tables of PATH")
    args = ap.parse_args(argv)
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        _table(doc)
        print(markdown(doc))
        return 0
    parts = args.parts.split(",")
    import netdiet
    doc: dict = {"schema": "netdiet.bench.profile_overhead/2", "torch": torch.__version__,
                 "python": platform.python_version(), "cpus": os.cpu_count(), "label": args.label,
                 "netdiet_source": str(Path(netdiet.__file__).parent), "targets": TARGETS,
                 "load_average_before": list(os.getloadavg())}
    t0 = time.perf_counter()
    if "steps" in parts:
        doc["steps"] = steps_part(args.repeats, args.cases.split(",") if args.cases else None,
                                  [int(b) for b in args.batches.split(",")], args.case_budget)
    if "cli" in parts:
        doc["cold_cli"] = cli_part(args.process_repeats)
    if "models" in parts:
        doc["models_command"] = models_part(args.process_repeats)
    if "scaling" in parts:
        doc["scaling"] = scaling_part()
    doc["load_average_after"] = list(os.getloadavg())
    doc["wall_s"] = time.perf_counter() - t0
    doc["pass"] = {k: doc[k]["pass"] for k in ("steps", "cold_cli", "models_command") if k in doc}
    from netdiet.fileio import atomic_write_json
    atomic_write_json(args.out, doc)
    if args.markdown:
        Path(args.markdown).write_text(markdown(doc))
    _table(doc)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
