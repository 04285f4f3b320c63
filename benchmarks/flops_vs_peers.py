"""netdiet's MAC counts beside the tools users would pick instead, on the zoo and on the layers peers miss.

    .venv/bin/python benchmarks/flops_vs_peers.py          # writes benchmarks/results/flops_vs_peers.json

Peers (the [bench] extra; any missing one is skipped): PyTorch FlopCounterMode, fvcore, ptflops (both its
module-hook "pytorch" backend and its "aten" backend), thop, torchinfo. Everything is reported in MACs:
FlopCounterMode's number is divided by 2 (it counts 2 FLOPs per MAC), fvcore/ptflops/thop/torchinfo already count
one per multiply-accumulate. Every count is of one forward pass at batch 1 in eval mode, plus the backward of
one training step for the two counters that can see it (netdiet and FlopCounterMode). Peers run on a deep copy of
the model (thop adds buffers to the modules it profiles). Wall times are single runs on a shared, loaded 2-core
machine: noisy, shown only to say "seconds, not minutes".
"""
from __future__ import annotations

import copy
import io
import logging
import os
import sys
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from netdiet.analysis.counter import count_ops
from netdiet.fileio import atomic_write_json
from netdiet.models import create_model, default_inputs, list_models, make_inputs

RESULTS = Path(__file__).resolve().parent / "results" / "flops_vs_peers.json"


# ------------------------------------------------------------------ extra cases: the layers peers miss
class CausalBlock(nn.Module):
    """Functional attention: qkv Linear, F.scaled_dot_product_attention(is_causal=True), torch.matmul output proj."""

    def __init__(self, d: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.w_out = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        return torch.matmul(y, self.w_out)


class MHAModel(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4):
        super().__init__()
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class LSTMModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(32, 64, num_layers=2, batch_first=True)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(x)[0][:, -1])


class Decoder(nn.Module):
    """ConvTranspose2d upsampler with a grouped transposed conv."""

    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1, groups=4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up2(self.act(self.up1(x)))


def cases() -> list[tuple[str, nn.Module, torch.Tensor]]:
    out = []
    for entry in list_models():
        torch.manual_seed(0)
        model = create_model(entry.name)
        shape, dtype, high = default_inputs(entry.name, {})
        out.append((entry.name, model, make_inputs(shape, dtype, high=high)))
    torch.manual_seed(0)
    out.append(("sdpa_causal_block", CausalBlock(), torch.randn(1, 128, 64)))
    out.append(("multihead_attention", MHAModel(), torch.randn(1, 128, 64)))
    out.append(("lstm_2layer", LSTMModel(), torch.randn(1, 50, 32)))
    out.append(("conv_transpose", Decoder(), torch.randn(1, 32, 16, 16)))
    return out


# ------------------------------------------------------------------ peers (each returns forward MACs)
def quiet(fn):
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        try:
            return fn()
        finally:
            logging.disable(logging.NOTSET)


def peer_flop_counter_mode(model, x):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    fwd = fc.get_total_flops() // 2
    train_model = copy.deepcopy(model).train()
    with FlopCounterMode(display=False) as fc2:
        out = train_model(x)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor))
        params = [p for p in train_model.parameters() if p.requires_grad]
        fwd_train = fc2.get_total_flops()
        torch.autograd.grad(loss, params, allow_unused=True)
    return fwd, (fc2.get_total_flops() - fwd_train) // 2


def peer_fvcore(model, x):
    from fvcore.nn import FlopCountAnalysis
    analysis = FlopCountAnalysis(model, (x,))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    total = analysis.total()
    return int(total), dict(analysis.unsupported_ops())


def _ptflops(model, x, backend):
    from ptflops import get_model_complexity_info
    macs, _ = get_model_complexity_info(model, tuple(x.shape), input_constructor=lambda _shape: x, as_strings=False,
                                        print_per_layer_stat=False, backend=backend, verbose=False)
    return int(macs) if macs is not None else None


def peer_ptflops(model, x):
    return _ptflops(model, x, "pytorch")


def peer_ptflops_aten(model, x):
    return _ptflops(model, x, "aten")


def peer_thop(model, x):
    import thop
    macs, _ = thop.profile(model, inputs=(x,), verbose=False)
    return int(macs)


def peer_torchinfo(model, x):
    import torchinfo
    stats = torchinfo.summary(model, input_data=[x], verbose=0)
    return int(stats.total_mult_adds)


# Why a peer differs, worked out by hand on the rows of this benchmark (see docs/flops.md). Attached to a cell only
# when that cell's ratio is off by more than 1 %.
CONV_NETS = ("cnn", "lenet300", "lenet5", "mlp", "mobilenet", "resnet", "yolo")
NO_CPU_SDPA = "no formula for the CPU SDPA op (_scaled_dot_product_flash_attention_for_cpu): attention counted as 0"
_WHY = {
    "flop_counter_mode": {
        "transformer": NO_CPU_SDPA, "sdpa_causal_block": NO_CPU_SDPA,
        "multihead_attention": "no formula for _native_multi_head_attention (the eval fast path): 0; "
                               "backward: no formula for the CPU SDPA op",
        "lstm_2layer": "no formula for mkldnn_rnn_layer (CPU LSTM): only the final Linear",
        "backward:mobilenet": "grouped-conv weight gradient counted once per group (groups x too much)",
        "backward:conv_transpose": "grouped transposed-conv weight gradient counted once per group",
    },
    "fvcore": {
        **{n: "counts BatchNorm work in its MAC total" for n in CONV_NETS},
        "transformer": "JIT trace skips aten::scaled_dot_product_attention (reported unsupported): attention 0",
        "sdpa_causal_block": "JIT trace skips aten::scaled_dot_product_attention (reported unsupported): attention 0",
        "multihead_attention": "only the projections: the attention inside MHA is unsupported",
        "lstm_2layer": "JIT trace skips aten::lstm (reported unsupported): only the final Linear",
    },
    "ptflops": {
        **{n: "counts BatchNorm, activations, pooling and bias adds as MACs" for n in CONV_NETS},
        "transformer": "no rule for F.scaled_dot_product_attention (attention 0); adds LayerNorm/GELU/bias work",
        "sdpa_causal_block": "no rule for F.scaled_dot_product_attention: attention 0",
        "multihead_attention": "its MHA hook adds Q scaling, bias adds and 1 per softmax score to the MACs",
        "lstm_2layer": "its RNN hook adds the gates' elementwise work and bias adds to the MACs",
        "conv_transpose": "adds bias and ReLU work to the MACs",
    },
    "ptflops_aten": {
        **{n: "counts bias adds as MACs" for n in CONV_NETS},
        "transformer": NO_CPU_SDPA, "sdpa_causal_block": NO_CPU_SDPA,
        "multihead_attention": "no rule for the attention op inside MHA: only the projections",
        "lstm_2layer": "no rule for mkldnn_rnn_layer: only the final Linear",
        "conv_transpose": "counts bias adds as MACs",
    },
    "thop": {
        **{n: "counts BatchNorm, activations and pooling as MACs" for n in CONV_NETS},
        "transformer": "module hooks only: F.scaled_dot_product_attention is invisible (attention 0)",
        "sdpa_causal_block": "module hooks only: F.scaled_dot_product_attention and torch.matmul are invisible",
        "multihead_attention": "no rule for nn.MultiheadAttention: 0",
        "lstm_2layer": "adds the LSTM's elementwise gate work to the MACs",
        "conv_transpose": "transposed conv counted per output pixel (stride^2 = 4x too much)",
    },
    "torchinfo": {
        **{n: "counts bias adds" for n in CONV_NETS},
        "transformer": "Linear on 3-D input multiplied by the batch only, not the sequence; Embedding priced at its "
                       "parameter count; functional attention invisible",
        "sdpa_causal_block": "Linear on 3-D input multiplied by the batch only; F.scaled_dot_product_attention and "
                             "torch.matmul invisible",
        "multihead_attention": "no rule for nn.MultiheadAttention: 0",
        "lstm_2layer": "LSTM priced as its parameter count (biases included) x time steps",
        "conv_transpose": "transposed conv counted per output pixel (stride^2 = 4x too much)",
    },
}


def why(peer: str, case: str, backward: bool = False) -> str:
    table = _WHY.get(peer, {})
    if backward:
        return table.get(f"backward:{case}") or table.get(case, "")
    return table.get(case, "")


PEERS = {
    "flop_counter_mode": ("torch.utils.flop_counter", peer_flop_counter_mode),
    "fvcore": ("fvcore", peer_fvcore),
    "ptflops": ("ptflops", peer_ptflops),
    "ptflops_aten": ("ptflops", peer_ptflops_aten),
    "thop": ("thop", peer_thop),
    "torchinfo": ("torchinfo", peer_torchinfo),
}


def available(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False


def main() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("NETDIET_PROGRESS", "0")
    peers = {name: fn for name, (mod, fn) in PEERS.items() if available(mod)}
    skipped = sorted(set(PEERS) - set(peers))
    rows = []
    for name, model, x in cases():
        model.eval()
        t0 = time.perf_counter()
        ours = count_ops(model, x)
        ours_train = count_ops(model, x, train=True)
        row = {"model": name, "input": list(x.shape), "netdiet_macs": ours.macs, "netdiet_flops": ours.flops,
               "netdiet_backward_macs": ours_train.backward_macs, "netdiet_uncounted": ours.uncounted,
               "netdiet_seconds": round(time.perf_counter() - t0, 3), "peers": {}}
        for peer, fn in peers.items():
            t0 = time.perf_counter()
            try:
                result = quiet(lambda: fn(copy.deepcopy(model).eval(), x))
            except Exception as exc:  # a peer that crashes is a finding, not a benchmark failure
                row["peers"][peer] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
                continue
            entry: dict = {"seconds": round(time.perf_counter() - t0, 3)}
            if peer == "flop_counter_mode":
                entry["macs"], entry["backward_macs"] = result
            elif peer == "fvcore":
                entry["macs"], entry["unsupported_ops"] = result
            else:
                entry["macs"] = result
            if entry.get("macs") is not None and ours.macs:
                entry["ratio_to_netdiet"] = round(entry["macs"] / ours.macs, 4)
            if entry.get("backward_macs") is not None and ours_train.backward_macs:
                entry["backward_ratio_to_netdiet"] = round(entry["backward_macs"] / ours_train.backward_macs, 4)
            if abs(entry.get("ratio_to_netdiet", 1.0) - 1.0) > 0.01:
                entry["why"] = why(peer, name)
            if abs(entry.get("backward_ratio_to_netdiet", 1.0) - 1.0) > 0.01:
                entry["backward_why"] = why(peer, name, backward=True)
            row["peers"][peer] = entry
        rows.append(row)
        print(f"  counted {name}", file=sys.stderr)

    doc = {"schema": "netdiet.bench.flops_vs_peers/1", "torch": torch.__version__, "unit": "MACs",
           "peers_skipped": skipped, "rows": rows,
           "note": "forward MACs at batch 1, eval mode; backward_* = the backward of one training step "
                   "(sum of outputs as loss); ratio = peer / netdiet; times are single noisy runs"}
    atomic_write_json(RESULTS, doc)
    print_table(doc)


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from netdiet.units import format_count

    peers = [p for p in PEERS if p not in doc["peers_skipped"]]
    table = Table(title="forward MACs (ratio to netdiet)")
    table.add_column("model")
    table.add_column("netdiet", justify="right")
    for p in peers:
        table.add_column(p, justify="right")
    for row in doc["rows"]:
        cells = [row["model"], format_count(row["netdiet_macs"])]
        for p in peers:
            e = row["peers"].get(p, {})
            if "error" in e:
                cells.append("error")
            elif e.get("macs") is None:
                cells.append("-")
            else:
                cells.append(f"{format_count(e['macs'])} ({e.get('ratio_to_netdiet', 0):.2f})")
        table.add_row(*cells)
    console = Console()
    console.print(table)
    bw = Table(title="backward MACs of one training step")
    bw.add_column("model")
    bw.add_column("netdiet", justify="right")
    bw.add_column("flop_counter_mode", justify="right")
    for row in doc["rows"]:
        e = row["peers"].get("flop_counter_mode", {})
        cell = "-" if "backward_macs" not in e else f"{format_count(e['backward_macs'])} ({e['backward_ratio_to_netdiet']:.2f})"
        bw.add_row(row["model"], format_count(row["netdiet_backward_macs"]), cell)
    console.print(bw)
    reasons = Table(title="where a peer differs by more than 1 %, and why")
    for col in ("model", "peer", "ratio", "why"):
        reasons.add_column(col)
    for row in doc["rows"]:
        for p in peers:
            e = row["peers"].get(p, {})
            if e.get("why"):
                reasons.add_row(row["model"], p, f"{e['ratio_to_netdiet']:.2f}", e["why"])
            if e.get("backward_why"):
                reasons.add_row(row["model"], p + " (backward)", f"{e['backward_ratio_to_netdiet']:.2f}", e["backward_why"])
    console.print(reasons)
    if doc["peers_skipped"]:
        console.print(f"skipped (not installed): {', '.join(doc['peers_skipped'])}")
    console.print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
