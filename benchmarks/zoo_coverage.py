"""Coverage over the models people bring: every torchvision classification model and timm's common families.

    /tmp/tv/bin/python benchmarks/zoo_coverage.py            # writes benchmarks/results/zoo_coverage.json
    ... --only torchvision|timm, --models a,b  (a subset), --fresh (redo finished rows), --no-fvcore

Needs torchvision and timm (PyPI's torchvision does not import beside the project's torch 2.13.0 CPU file; run it in
a venv with torch 2.14.1 + torchvision 0.29.1 + timm + fvcore and netdiet installed). Per model, in one run:
  - loaded / profiled: the model built through netdiet's own spec (`torchvision.models:NAME`, `timm:NAME`) and
    profiled by `netdiet.api.profile` at batch 1 (224x224; inception_v3 299; timm: the model's own input size);
    `built_on` says meta or cpu, `training_unavailable` why a training figure could not be had (inference stays).
  - uncounted: aten ops without a formula, forward (the profile) and training step (count_ops at batch 2, so
    BatchNorm can train), from the counter.
  - exact: torchvision — netdiet's forward MACs at the weights' own resolution against the published figure
    (weights.meta["_ops"], GMACs to 3 decimals; exact = equal at that rounding); timm (which publishes none in
    the package) — against an analytic count from shapes at the function level (F.conv*, F.linear, matmul,
    einsum, scaled_dot_product_attention; no aten formula involved): exact = equal to the MAC.
  - peers: PyTorch FlopCounterMode (meta device; forward and the backward of a step, MACs = FLOPs / 2) and fvcore
    (real CPU tensors: its JIT trace does not run on meta), each as a ratio to netdiet, from flops_vs_peers.py.
Rows are written as they finish (atomically), so an interrupted run resumes where it stopped. Wall times are single
runs on a shared, loaded 2-core machine: noisy, shown only for scale.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from flops_vs_peers import available, peer_flop_counter_mode, peer_fvcore, quiet
from torch.overrides import TorchFunctionMode

from netdiet.analysis.counter import count_ops
from netdiet.fileio import atomic_write_json, read_json

RESULTS = Path(__file__).resolve().parent / "results" / "zoo_coverage.json"
SCHEMA = "netdiet.bench.zoo_coverage/1"

TIMM_MODELS = {  # family -> models (the family's common sizes and its variants with other layers)
    "convnext": ["convnext_atto", "convnext_tiny", "convnext_small", "convnext_base", "convnextv2_tiny"],
    "efficientnet": ["efficientnet_b0", "efficientnet_b3", "tf_efficientnet_b0", "efficientnetv2_rw_s", "mixnet_s",
                     "mobilenetv2_100"],
    "vit": ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_base_patch32_224",
            "vit_large_patch16_224", "vit_base_patch16_clip_224"],
    "swin": ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
             "swinv2_tiny_window8_256"],
    "mobilenetv3": ["mobilenetv3_small_100", "mobilenetv3_large_100", "tf_mobilenetv3_small_100", "lcnet_100",
                    "fbnetv3_b"],
    "regnet": ["regnetx_002", "regnety_002", "regnety_040", "regnety_160", "regnetz_b16"],
    "resnet": ["resnet18", "resnet50", "resnet50d", "resnext50_32x4d", "seresnet50", "resnetblur50",
               "wide_resnet50_2", "ecaresnet50d"],
}


# ------------------------------------------------------------------ the analytic reference (function level)
def _pairs(lq: int, lk: int, causal: bool) -> int:
    return sum(min(i + 1, lk) for i in range(lq)) if causal else lq * lk


class AnalyticMacs(TorchFunctionMode):
    """MACs from the shapes of the calls that multiply-accumulate, seen as torch functions (not aten ops).

    conv: N·prod(weight)·prod(out spatial) (transposed: in spatial); linear: rows·in·out; matmul/bmm/mm: numel(out)·K;
    einsum of two operands: product of every index size; attention: B·H·Lq·Lk·(E + Ev) (causal: unmasked pairs).
    A function mode does not see inside the functions it is handed, so nn.MultiheadAttention (one call of
    F.multi_head_attention_forward or of the fused eval op) is counted by a forward hook from its shapes:
    in-projections B·(Lq·D + Lk·kdim + Lk·vdim)·D, attention 2·B·Lq·Lk·D, out-projection B·Lq·D².
    """

    CONV = {F.conv1d, F.conv2d, F.conv3d}
    CONV_T = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
    MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.mm,
              torch.Tensor.mm, torch.bmm, torch.Tensor.bmm}

    def __init__(self):
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.CONV or func in self.CONV_T or func is F.linear or func in self.MATMUL \
                or func in (torch.addmm, torch.baddbmm, torch.einsum, F.scaled_dot_product_attention):
            out = func(*args, **kwargs)
            self.macs += self._count(func, args, kwargs, out)
            return out
        return func(*args, **kwargs)

    def mha_hook(self, mod: torch.nn.MultiheadAttention, args: tuple, kwargs: dict, out) -> None:
        q = args[0] if args else kwargs["query"]
        k = args[1] if len(args) > 1 else kwargs["key"]
        if q.dim() == 3 and not mod.batch_first:
            q, k = q.transpose(0, 1), k.transpose(0, 1)
        b, lq, d = (q.shape[0], q.shape[-2], q.shape[-1]) if q.dim() == 3 else (1, q.shape[0], q.shape[1])
        lk = k.shape[-2]
        self.macs += int(b * (lq * d + lk * mod.kdim + lk * mod.vdim) * d + 2 * b * lq * lk * d + b * lq * d * d)

    def _count(self, func, args, kwargs, out) -> int:
        if func in self.CONV or func in self.CONV_T:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            spatial = x.shape[2:] if func in self.CONV_T else out.shape[2:]
            return int(x.shape[0] * w.numel() * torch.Size(spatial).numel())
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            return int(x.numel() // x.shape[-1] * w.numel())
        if func in (torch.addmm, torch.baddbmm):
            a = args[1]
            return int(out.numel() * a.shape[-1])
        if func in self.MATMUL:
            a = args[1] if func is torch.Tensor.__rmatmul__ else args[0]
            return int(out.numel() * a.shape[-1])
        if func is torch.einsum:
            eq, operands = args[0], args[1:]
            if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
                operands = tuple(operands[0])
            if len(operands) != 2:
                return 0
            sizes: dict[str, int] = {}
            for spec, t in zip(eq.replace(" ", "").split("->")[0].split(","), operands):
                for letter, size in zip(spec, t.shape):
                    sizes[letter] = int(size)
            return int(torch.Size(list(sizes.values())).numel())
        q, k, v = args[:3]
        causal = bool(kwargs.get("is_causal", args[5] if len(args) > 5 else False))
        return int(q.numel() // (q.shape[-2] * q.shape[-1]) * _pairs(q.shape[-2], k.shape[-2], causal)
                   * (q.shape[-1] + v.shape[-1]))


def analytic_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    mode = AnalyticMacs()
    hooks = [m.register_forward_hook(mode.mha_hook, with_kwargs=True) for m in model.modules()
             if isinstance(m, torch.nn.MultiheadAttention)]
    try:
        with torch.no_grad(), mode:
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return mode.macs


# ------------------------------------------------------------------ what to run
def cases(only: str | None, models: set[str] | None) -> list[dict]:
    out = []
    if only in (None, "torchvision"):
        import torchvision
        for name in torchvision.models.list_models(module=torchvision.models):
            out.append({"source": "torchvision", "family": _tv_family(name), "model": name,
                        "spec": f"torchvision.models:{name}", "side": 299 if name == "inception_v3" else 224})
    if only in (None, "timm"):
        for family, names in TIMM_MODELS.items():
            out += [{"source": "timm", "family": family, "model": n, "spec": f"timm:{n}", "side": None} for n in names]
    return [c for c in out if models is None or c["model"] in models]


def _tv_family(name: str) -> str:
    for prefix in ("convnext", "densenet", "efficientnet", "inception", "maxvit", "mnasnet", "mobilenet", "regnet",
                   "resnext", "wide_resnet", "resnet", "shufflenet", "squeezenet", "swin", "vgg", "vit"):
        if name.startswith(prefix):
            return prefix
    return name


def build(case: dict, device: str) -> torch.nn.Module:
    """The model as netdiet's spec builds it (create_model), on `device` (meta falls back to cpu, then moved)."""
    from netdiet.models import create_model
    torch.manual_seed(0)
    if device == "meta":
        try:
            with torch.device("meta"):
                return create_model(case["spec"])
        except Exception:
            return create_model(case["spec"]).to("meta")
    return create_model(case["spec"])


def reference(case: dict, model_meta: torch.nn.Module, side: int) -> dict:
    """Published figure (torchvision) at the weights' resolution, and the analytic count at the benchmark's."""
    ref: dict = {"analytic_macs": analytic_macs(model_meta, torch.empty(1, 3, side, side, device="meta"))}
    if case["source"] == "torchvision":
        import torchvision
        weights = torchvision.models.get_model_weights(case["model"]).DEFAULT
        res = int(weights.transforms().crop_size[0])
        ours = ref_macs = None
        ours = None              # at the benchmark's resolution: filled by the caller from the profile
        if res != side:
            at_res = model_meta
            if hasattr(model_meta, "image_size"):    # a ViT is built for one size (vit_h_14's weights are 518)
                with torch.device("meta"):
                    at_res = torchvision.models.get_model(case["model"], image_size=res)
            ours = count_ops(at_res, torch.empty(1, 3, res, res, device="meta")).macs
        ref_macs = weights.meta.get("_ops")
        ref.update({"published_gmacs": ref_macs, "published_weights": str(weights).split(".", 1)[-1],
                    "published_resolution": res, "netdiet_macs_at_published_resolution": ours})
    return ref


def run_case(case: dict, use_fvcore: bool) -> dict:
    import netdiet.api as api

    t0 = time.perf_counter()
    row: dict = {**case, "loaded": False, "profiled": False}
    try:
        model = build(case, "meta")
        row["loaded"] = True
    except Exception as exc:
        row["error"] = f"load: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return row
    side = case["side"]
    if side is None:
        side = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
        row["side"] = side
    row["input"] = [1, 3, side, side]
    try:
        prof = quiet(lambda: api.profile(case["spec"], (1, 3, side, side), progress=False)).to_dict()
        row.update({"profiled": True, "built_on": prof["model"].get("built_on"),
                    "training_unavailable": prof.get("training_unavailable"),
                    "netdiet_macs": prof["totals"]["macs"], "netdiet_flops": prof["totals"]["flops"],
                    "netdiet_backward_macs": prof["totals"]["backward_macs"],
                    "inference_peak_estimated": prof["memory"].get("inference_peak"),
                    "training_peak_estimated": prof["memory"].get("peak_estimated"),
                    "uncounted_forward": prof.get("uncounted", {})})
    except Exception as exc:
        row["error"] = f"profile: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    x = torch.empty(1, 3, side, side, device="meta")
    if "netdiet_macs" not in row:
        row["netdiet_macs"] = count_ops(model, x).macs
    try:
        train = count_ops(model, torch.empty(2, 3, side, side, device="meta"), train=True)
        row["uncounted_training"] = train.uncounted
    except Exception as exc:
        row["uncounted_training"] = None
        row["training_count_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    try:
        ref = reference(case, model, side)
    except Exception as exc:
        ref = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", "exact": False}
    if "error" not in ref and case["source"] == "torchvision":
        at_res = ref["netdiet_macs_at_published_resolution"] or row["netdiet_macs"]
        ref["netdiet_macs_at_published_resolution"] = at_res
        pub = ref["published_gmacs"]
        ref["exact"] = pub is not None and abs(round(at_res / 1e9, 3) - pub) < 1e-9
        ref["ratio"] = round(at_res / (pub * 1e9), 4) if pub else None
    elif "error" not in ref:
        ref["exact"] = ref["analytic_macs"] == row["netdiet_macs"]
    ref["analytic_exact"] = ref.get("analytic_macs") == row["netdiet_macs"]
    row["reference"] = ref
    row["uncounted"] = sorted(set(row.get("uncounted_forward") or {}) | set(row.get("uncounted_training") or {}))
    row["peers"] = peers(model, case, side, use_fvcore, row["netdiet_macs"], row.get("netdiet_backward_macs"))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def peers(model_meta, case: dict, side: int, use_fvcore: bool, ours: int, ours_bwd: int | None) -> dict:
    out: dict = {}
    x = torch.empty(1, 3, side, side, device="meta")
    try:
        fwd, bwd = quiet(lambda: peer_flop_counter_mode(copy.deepcopy(model_meta).eval(), x))
        out["flop_counter_mode"] = {"macs": fwd, "ratio_to_netdiet": round(fwd / ours, 4), "backward_macs": bwd,
                                    "backward_ratio_to_netdiet": round(bwd / ours_bwd, 4) if ours_bwd else None}
    except Exception as exc:     # its training step failed (batch-1 BatchNorm): keep its forward count
        out["flop_counter_mode"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        try:
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                copy.deepcopy(model_meta).eval()(x)
            fwd = fc.get_total_flops() // 2
            out["flop_counter_mode"].update({"macs": fwd, "ratio_to_netdiet": round(fwd / ours, 4)})
        except Exception:
            pass
    if use_fvcore and available("fvcore"):
        try:
            real = build(case, "cpu").eval()
            xr = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
            macs, unsupported = quiet(lambda: peer_fvcore(real, xr))
            out["fvcore"] = {"macs": macs, "ratio_to_netdiet": round(macs / ours, 4),
                             "unsupported_ops": dict(sorted(unsupported.items()))}
            del real
        except Exception as exc:
            out["fvcore"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    return out


# ------------------------------------------------------------------ summary and table
def summarise(rows: list[dict]) -> dict:
    fams: dict[str, dict] = {}
    for r in rows:
        key = f"{r['source']}:{r['family']}"
        f = fams.setdefault(key, {"models": 0, "loaded": 0, "profiled": 0, "exact": 0, "with_uncounted": 0,
                                  "fcm_within_1pct": 0, "fvcore_within_1pct": 0})
        f["models"] += 1
        f["loaded"] += bool(r.get("loaded"))
        f["profiled"] += bool(r.get("profiled"))
        f["exact"] += bool(r.get("reference", {}).get("exact"))
        f["with_uncounted"] += bool(r.get("uncounted"))
        for peer in ("flop_counter_mode", "fvcore"):
            ratio = r.get("peers", {}).get(peer, {}).get("ratio_to_netdiet")
            f[f"{'fcm' if peer == 'flop_counter_mode' else peer}_within_1pct"] += ratio is not None and abs(ratio - 1) <= 0.01
    total = {k: sum(f[k] for f in fams.values()) for k in next(iter(fams.values()))} if fams else {}
    return {"families": fams, "total": total}


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from netdiet.units import format_count

    t = Table(title=f"zoo coverage (torch {doc['torch']}): forward MACs at batch 1; ratio = peer / netdiet")
    for col in ("model", "loaded", "profiled", "netdiet", "reference", "exact", "uncounted", "FlopCounterMode",
                "fvcore", "training"):
        t.add_column(col, justify="right" if col in ("netdiet", "reference", "FlopCounterMode", "fvcore") else "left")

    def peer(r, p):
        e = r.get("peers", {}).get(p, {})
        return "error" if "error" in e else "-" if "macs" not in e else f"{format_count(e['macs'])} ({e['ratio_to_netdiet']:.3f})"

    for r in doc["rows"]:
        ref = r.get("reference", {})
        if r["source"] == "torchvision":
            refcell = f"{ref.get('published_gmacs')}G pub @{ref.get('published_resolution')}"
        else:
            refcell = f"{format_count(ref.get('analytic_macs', 0))} analytic"
        t.add_row(f"{r['source']}:{r['model']}", "yes" if r.get("loaded") else "NO", "yes" if r.get("profiled") else "NO",
                  format_count(r.get("netdiet_macs") or 0), refcell, "yes" if ref.get("exact") else "NO",
                  ", ".join(r.get("uncounted", [])) or "0", peer(r, "flop_counter_mode"), peer(r, "fvcore"),
                  "ok" if not r.get("training_unavailable") else "n/a (batch 1)")
    console = Console(width=200)
    console.print(t)
    s = Table(title="per family: models / loaded / profiled / exact / with uncounted ops / peers within 1 %")
    for col in ("family", "models", "loaded", "profiled", "exact", "uncounted", "FlopCounterMode ±1 %", "fvcore ±1 %"):
        s.add_column(col)
    for fam, f in list(doc["summary"]["families"].items()) + [("total", doc["summary"]["total"])]:
        s.add_row(fam, *(str(f[k]) for k in ("models", "loaded", "profiled", "exact", "with_uncounted",
                                              "fcm_within_1pct", "fvcore_within_1pct")))
    console.print(s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["torchvision", "timm"])
    ap.add_argument("--models", help="comma-separated subset")
    ap.add_argument("--fresh", action="store_true", help="redo the selected rows already in the results file")
    ap.add_argument("--no-fvcore", action="store_true", help="skip fvcore (it runs each model on real tensors)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("NETDIET_PROGRESS", "0")
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    done: dict[tuple, dict] = {}
    if out.exists():
        prev = read_json(out)
        if prev.get("schema") == SCHEMA and prev.get("torch") == torch.__version__:
            done = {(r["source"], r["model"]): r for r in prev["rows"]}
    todo = cases(args.only, set(args.models.split(",")) if args.models else None)
    if args.fresh:
        done = {k: r for k, r in done.items() if k not in {(c["source"], c["model"]) for c in todo}}
    rows = list(done.values())
    for i, case in enumerate(todo, 1):
        if (case["source"], case["model"]) in done:
            continue
        row = run_case(case, not args.no_fvcore)
        rows.append(row)
        print(f"[{i}/{len(todo)}] {case['source']}:{case['model']} {row.get('seconds')} s "
              f"exact={row.get('reference', {}).get('exact')} uncounted={row.get('uncounted')} "
              f"{row.get('error', '')}", file=sys.stderr, flush=True)
        write(out, rows)
    doc = write(out, rows)
    print_table(doc)
    print(f"results: {out}")
    return 0


def write(out: Path, rows: list[dict]) -> dict:
    import torchvision
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__}
    for mod in ("timm", "fvcore", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    order = {"torchvision": 0, "timm": 1}
    rows = sorted(rows, key=lambda r: (order[r["source"]], r["family"], r["model"]))
    doc = {"schema": SCHEMA, **versions, "unit": "MACs", "rows": rows, "summary": summarise(rows),
           "note": "batch 1; torchvision 224x224 (inception_v3 299), timm at its pretrained input size; exact: "
                   "torchvision vs weights.meta['_ops'] at the weights' resolution (3 decimals of GMACs), timm vs "
                   "the function-level analytic count; uncounted = forward (profile) + training step (batch 2); "
                   "peers as ratio to netdiet; seconds are single noisy runs"}
    atomic_write_json(out, doc)
    return doc


if __name__ == "__main__":
    sys.exit(main())
