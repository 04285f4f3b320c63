"""The op-cost registry: one small formula per aten operator, each with its unit declared.

A formula is a pure function of shapes and arguments (never of tensor values), so it gives the same answer on
real tensors and on the meta device. It receives an `OpCall` (the operator, its arguments bound to their schema
names, and its output) and returns an `OpCost`. The counter (`counter.py`) knows no formula; adding an operator
is adding one function here:

    @register_formula([aten.mm], unit="macs", macs="m·k·n", flops="2·m·k·n")
    def _mm(call): ...

Why this module is long: it is the one table of formulas (about 50, covering about 380 aten ops) that the README's
formula table is generated from; each entry is a few lines, and splitting the table would scatter the conventions
it is checked against.

Conventions (the README's formula table is generated from these registrations by `formula_table()`):
- `macs` exists only for multiply-accumulate ops (matmul, linear, conv, bmm, einsum, attention, recurrent cells).
- `flops` = 2 per MAC + every other floating-point op. Transcendentals (exp, log, erf, tanh, sqrt) count 1.
  Pointwise work on integer/bool tensors only (counters, index maths) is not floating-point: 0.
  Selection and data movement (where, masked_fill, cat, copies, views, embedding lookup) count 0 FLOPs.
- `bytes_read` / `bytes_written`: unless a formula sets them, the counter fills them with the bytes of the
  tensor arguments / outputs; operators registered with `moves_data=False` (views) move no bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

aten = torch.ops.aten

UNITS = ("macs", "flops", "bytes")


@dataclass
class OpCost:
    macs: int = 0
    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    def __add__(self, other: "OpCost") -> "OpCost":
        return OpCost(self.macs + other.macs, self.flops + other.flops,
                      self.bytes_read + other.bytes_read, self.bytes_written + other.bytes_written)


# per-operator facts read once (keyed by id: OpOverload's __hash__ is Python, and torch keeps every overload alive)
_ARG_NAMES: dict[int, tuple[str, ...]] = {}   # the schema's argument names


@dataclass
class OpCall:
    """One operator call as a formula sees it: arguments by schema name, plus the output."""

    func: Any
    args: tuple
    kwargs: dict
    out: Any
    _bound: dict | None = field(default=None, repr=False)

    def _bind(self) -> dict:
        if self._bound is None:
            names = _ARG_NAMES.get(id(self.func))
            if names is None:
                schema = getattr(self.func, "_schema", None)
                names = _ARG_NAMES[id(self.func)] = tuple(a.name for a in schema.arguments) if schema is not None else ()
            bound: dict[str, Any] = dict(zip(names, self.args))
            for i in range(len(names), len(self.args)):
                bound[f"_{i}"] = self.args[i]
            bound.update(self.kwargs)
            self._bound = bound
        return self._bound

    def arg(self, name: str, default: Any = None, index: int | None = None) -> Any:
        bound = self._bind()
        if name in bound:
            return bound[name]
        if index is not None and index < len(self.args):
            return self.args[index]
        return default

    def shape(self, name: str, index: int | None = None) -> tuple[int, ...] | None:
        t = self.arg(name, None, index)
        return tuple(int(d) for d in t.shape) if isinstance(t, torch.Tensor) else None

    def out_tensors(self) -> list[torch.Tensor]:
        return [t for t in _flatten(self.out) if isinstance(t, torch.Tensor)]

    def out_numel(self) -> int:
        outs = self.out_tensors()
        return int(outs[0].numel()) if outs else 0

    def in_numel(self, index: int = 0) -> int:
        t = self.args[index] if index < len(self.args) else None
        return int(t.numel()) if isinstance(t, torch.Tensor) else 0


def _flatten(x: Any) -> list:
    if not isinstance(x, (list, tuple)):
        return [x]
    out: list = []
    for item in x:
        if isinstance(item, (list, tuple)):
            out.extend(_flatten(item))
        else:
            out.append(item)
    return out


def prod(xs: Iterable[int]) -> int:
    return int(math.prod(int(x) for x in xs))


@dataclass(frozen=True)
class Formula:
    fn: Callable[[OpCall], OpCost]
    unit: str
    ops: tuple
    macs: str
    flops: str
    note: str
    moves_data: bool


_BY_OVERLOAD: dict[Any, Formula] = {}
_BY_PACKET: dict[Any, Formula] = {}
_FORMULAS: list[Formula] = []


def register_formula(ops: Sequence[Any], *, unit: str, macs: str = "0", flops: str = "0", note: str = "",
                     moves_data: bool = True):
    """Decorator registering `fn(call) -> OpCost` for aten ops (packets like aten.mm or overloads like aten.add.Tensor).

    `unit` says what the formula is about: "macs" (multiply-accumulate ops; flops = 2 per MAC + extras),
    "flops" (no MACs, only floating-point work) or "bytes" (data movement: 0 MACs, 0 FLOPs).
    `macs` / `flops` / `note` are the human-readable formula for the README table.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")

    def wrap(fn: Callable[[OpCall], OpCost]) -> Callable[[OpCall], OpCost]:
        formula = Formula(fn, unit, tuple(ops), macs, flops, note, moves_data)
        for op in ops:
            if isinstance(op, torch._ops.OpOverload):
                _BY_OVERLOAD[op] = formula
            else:
                _BY_PACKET[op] = formula
        _FORMULAS.append(formula)
        return fn

    return wrap


def lookup(func: Any) -> Formula | None:
    """The formula for an OpOverload (exact overload first, then its packet), or None."""
    formula = _BY_OVERLOAD.get(func)
    if formula is None:
        formula = _BY_PACKET.get(getattr(func, "overloadpacket", func))
    return formula


def op_cost(func: Any, args: tuple, kwargs: dict | None, out: Any) -> OpCost | None:
    """Cost of one call, or None when no formula is registered (the counter reports it as uncounted)."""
    formula = lookup(func)
    if formula is None:
        return None
    cost = formula.fn(OpCall(func, tuple(args), dict(kwargs or {}), out))
    if formula.unit != "macs" and cost.macs:
        raise AssertionError(f"formula for {func} declares unit {formula.unit!r} but returned MACs")
    if formula.unit == "bytes" and cost.flops:
        raise AssertionError(f"formula for {func} declares unit 'bytes' but returned FLOPs")
    inputs = None
    if formula.unit == "flops" and cost.flops:
        inputs = _flatten(list(args) + list((kwargs or {}).values()))
        if not _any_floating_in(inputs + _flatten(out)):
            cost.flops = 0  # integer/bool arithmetic (step counters, index maths) is not floating-point work
    if formula.moves_data and not (cost.bytes_read or cost.bytes_written):
        if inputs is None:
            inputs = _flatten(list(args) + list((kwargs or {}).values()))
        cost.bytes_read = sum(_nbytes(t) for t in inputs)
        cost.bytes_written = sum(_nbytes(t) for t in _flatten(_written(func, args, kwargs, out)))
    return cost


def is_free(func: Any) -> bool:
    """The call costs nothing and moves no bytes whatever its arguments (a view, a metadata query, a profiler
    marker): the counter tallies its count only."""
    formula = lookup(func)
    return formula is not None and formula.fn is _view


_WRITE_RULES: dict[int, tuple[int | None, int | None]] = {}   # id(func) -> (output_mask index, batch-norm training index)


def _write_rule(func: Any) -> tuple[int | None, int | None]:
    rule = _WRITE_RULES.get(id(func))
    if rule is None:
        schema = getattr(func, "_schema", None)
        names = [a.name for a in schema.arguments] if schema is not None else []
        mask = names.index("output_mask") if "output_mask" in names else None
        packet = getattr(func, "overloadpacket", None)
        if packet is aten._native_batch_norm_legit_no_training:
            bn = -1
        elif packet is aten.native_batch_norm and "training" in names:
            bn = names.index("training")
        else:
            bn = None
        rule = _WRITE_RULES[id(func)] = (mask, bn)
    return rule


def _written(func: Any, args: tuple, kwargs: dict | None, out: Any) -> Any:
    """The outputs an op writes, as the CPU kernel returns them: those an `output_mask` leaves out are None there
    (the meta kernels allocate them anyway), and batch norm in eval mode returns empty saved statistics (meta:
    one per channel), so meta and CPU counts agree."""
    if not isinstance(out, (tuple, list)):
        return out
    mask_at, bn_at = _write_rule(func)
    if mask_at is not None:
        mask = (kwargs or {}).get("output_mask", args[mask_at] if mask_at < len(args) else None)
        if isinstance(mask, (list, tuple)) and len(mask) == len(out):
            return [o for o, keep in zip(out, mask) if keep]
    if bn_at is not None:
        training = False if bn_at < 0 else (kwargs or {}).get("training", args[bn_at] if bn_at < len(args) else True)
        if not training:
            return out[:1]
    return out


def _any_floating_in(items: list) -> bool:
    return any(isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) for t in items)


def _nbytes(t: Any) -> int:
    return int(t.numel() * t.element_size()) if isinstance(t, torch.Tensor) else 0


def _op_name(op: Any) -> str:
    name = str(op)
    return name if name.startswith("aten.") else f"aten.{name}"


def formula_table() -> list[dict]:
    """Rows {op, unit, macs, flops, note}, one per registered formula, in registration order (the README table)."""
    return [{"op": ", ".join(_op_name(o) for o in f.ops), "unit": f.unit, "macs": f.macs, "flops": f.flops,
             "note": f.note} for f in _FORMULAS]


def formula_table_markdown() -> list[str]:
    """The README's formula table rows: operator names without `aten.`, cut with '…' before 160 characters."""
    lines = []
    for row in formula_table():
        names = [o.replace("aten.", "", 1) for o in row["op"].split(", ")]
        shown: list[str] = []
        for name in names:
            if len(", ".join(shown + [name])) >= 160:
                break
            shown.append(name)
        cell = ", ".join(shown) + (", …" if len(shown) < len(names) else "")
        lines.append(f"| {cell} | {row['unit']} | {row['macs']} | {row['flops']} | {row['note']} |")
    return lines


def registered_ops() -> set[str]:
    return {_op_name(o) for f in _FORMULAS for o in f.ops}


# ============================================================ matrix products
def _mm_dims(a: tuple, b: tuple) -> tuple[int, int, int]:
    return a[0], a[1], b[1]


@register_formula([aten.mm], unit="macs", macs="m·k·n", flops="2·m·k·n", note="A (m×k) @ B (k×n)")
def _mm(call: OpCall) -> OpCost:
    m, k, n = _mm_dims(call.shape("self", 0), call.shape("mat2", 1))
    return OpCost(macs=m * k * n, flops=2 * m * k * n)


@register_formula([aten.addmm, aten._addmm_activation], unit="macs", macs="m·k·n", flops="2·m·k·n + m·n",
                  note="Linear with bias: the bias add is m·n FLOPs (one per output)")
def _addmm(call: OpCall) -> OpCost:
    m, k, n = _mm_dims(call.shape("mat1", 1), call.shape("mat2", 2))
    extra = m * n if call.arg("beta", 1) != 0 else 0
    if call.func.overloadpacket is aten._addmm_activation:
        extra += m * n  # relu/gelu epilogue counted as 1 per output
    return OpCost(macs=m * k * n, flops=2 * m * k * n + extra)


@register_formula([aten.bmm], unit="macs", macs="b·m·k·n", flops="2·b·m·k·n", note="batched matmul; einsum and "
                  "torch.matmul on 3-D+ inputs reach this op")
def _bmm(call: OpCall) -> OpCost:
    b, m, k = call.shape("self", 0)
    n = call.shape("mat2", 1)[2]
    return OpCost(macs=b * m * k * n, flops=2 * b * m * k * n)


@register_formula([aten.baddbmm], unit="macs", macs="b·m·k·n", flops="2·b·m·k·n + b·m·n",
                  note="bmm plus an added tensor")
def _baddbmm(call: OpCall) -> OpCost:
    b, m, k = call.shape("batch1", 1)
    n = call.shape("batch2", 2)[2]
    extra = b * m * n if call.arg("beta", 1) != 0 else 0
    return OpCost(macs=b * m * k * n, flops=2 * b * m * k * n + extra)


@register_formula([aten.mv, aten.dot, aten.vdot], unit="macs", macs="m·k (mv) or k (dot)", flops="2·macs")
def _mv(call: OpCall) -> OpCost:
    a = call.shape("self", 0)
    macs = prod(a)
    return OpCost(macs=macs, flops=2 * macs)


@register_formula([aten.addmv], unit="macs", macs="m·k", flops="2·m·k + m")
def _addmv(call: OpCall) -> OpCost:
    m, k = call.shape("mat", 1)
    return OpCost(macs=m * k, flops=2 * m * k + m)


# ============================================================ convolution
def conv_macs(x_shape: Sequence[int], w_shape: Sequence[int], out_shape: Sequence[int], transposed: bool) -> int:
    """N · prod(weight) · prod(spatial), spatial = output's (convolution) or input's (transposed convolution).

    The weight is (C_out, C_in/groups, k...) or, transposed, (C_in, C_out/groups, k...), so prod(weight) already
    carries the 1/groups: grouped and depthwise convolutions are counted once, never once per group.
    """
    spatial = x_shape[2:] if transposed else out_shape[2:]
    return int(x_shape[0]) * prod(w_shape) * prod(spatial)


@register_formula([aten.convolution, aten._convolution, aten.cudnn_convolution, aten.cudnn_convolution_transpose,
                   aten.mkldnn_convolution, aten._slow_conv2d_forward, aten.conv_depthwise3d, aten._conv_depthwise2d,
                   aten.slow_conv_transpose2d, aten.slow_conv_dilated2d],
                  unit="macs", macs="N · C_out · (C_in/groups) · prod(k) · prod(out spatial); transposed: "
                  "N · C_in · (C_out/groups) · prod(k) · prod(in spatial)",
                  flops="2·macs + N·C_out·prod(out spatial) if bias",
                  note="stride, padding, dilation enter through the output size; groups once")
def _conv(call: OpCall) -> OpCost:
    x = call.shape("input", 0) or call.shape("self", 0)
    w = call.shape("weight", 1)
    out = tuple(call.out_tensors()[0].shape)
    transposed = bool(call.arg("transposed", call.func.overloadpacket in (aten.cudnn_convolution_transpose,
                                                                            aten.slow_conv_transpose2d)))
    macs = conv_macs(x, w, out, transposed)
    bias = call.arg("bias", None)
    extra = prod(out) if isinstance(bias, torch.Tensor) else 0
    return OpCost(macs=macs, flops=2 * macs + extra)


@register_formula([aten.convolution_backward], unit="macs",
                  macs="forward macs × (grad_input? + grad_weight?)", flops="2·macs + N·C_out·prod(out) if grad_bias",
                  note="grad_input is a transposed conv and grad_weight a correlation, each as big as the forward")
def _conv_backward(call: OpCall) -> OpCost:
    g = call.shape("grad_output", 0)
    x = call.shape("input", 1)
    w = call.shape("weight", 2)
    mask = call.arg("output_mask", [True, True, True], 10)
    fwd = conv_macs(x, w, g, bool(call.arg("transposed", False, 7)))
    macs = fwd * (int(bool(mask[0])) + int(bool(mask[1])))
    extra = prod(g) if mask[2] else 0
    return OpCost(macs=macs, flops=2 * macs + extra)


# ============================================================ attention
def causal_pairs(lq: int, lk: int) -> int:
    """Unmasked (query, key) pairs of PyTorch's is_causal mask (top-left aligned tril): sum_i min(i+1, Lk)."""
    if lq <= lk:
        return lq * (lq + 1) // 2
    return lk * (lk + 1) // 2 + (lq - lk) * lk


def _attention_dims(q: tuple, k: tuple, v: tuple, causal: bool) -> tuple[int, int, int, int]:
    batch = prod(q[:-2])
    lq, e = q[-2], q[-1]
    lk, ev = k[-2], v[-1]
    pairs = causal_pairs(lq, lk) if causal else lq * lk
    return batch, pairs, e, ev


@register_formula([aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention,
                   aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention],
                  unit="macs", macs="B·H·P·(E + E_v), P = Lq·Lk, causal P = Σ_i min(i+1, Lk)",
                  flops="2·macs + 6·B·H·P (scale 1 + softmax 5) + B·H·P if attn_mask",
                  note="causal counts the unmasked pairs only: PyTorch's CPU flash kernel skips the masked blocks "
                       "(measured: causal runs in ~0.57x the time of full at L=2048); the math fallback "
                       "(dropout>0, meta decomposition) computes all Lq·Lk")
def _sdpa(call: OpCall) -> OpCost:
    causal = bool(call.arg("is_causal", False))
    batch, pairs, e, ev = _attention_dims(call.shape("query", 0), call.shape("key", 1), call.shape("value", 2), causal)
    macs = batch * pairs * (e + ev)
    mask = call.arg("attn_mask", None)
    if mask is None:
        mask = call.arg("attn_bias", None)
    extra = batch * pairs if isinstance(mask, torch.Tensor) else 0
    return OpCost(macs=macs, flops=2 * macs + 6 * batch * pairs + extra)


@register_formula([aten._scaled_dot_product_flash_attention_for_cpu_backward,
                   aten._scaled_dot_product_flash_attention_backward,
                   aten._scaled_dot_product_efficient_attention_backward,
                   aten._scaled_dot_product_cudnn_attention_backward],
                  unit="macs", macs="B·H·P·(3E + 2E_v)",
                  flops="2·macs + 5·B·H·P + 2·B·H·Lq·E_v",
                  note="flash backward recomputes S = QKᵀ (E), then dV (E_v), dP (E_v), dQ (E), dK (E); "
                       "elementwise: scale, P = exp(S - lse), dS = P·(dP - D); D = rowsum(dO·O)")
def _sdpa_backward(call: OpCall) -> OpCost:
    causal = bool(call.arg("is_causal", False))
    q, k, v = call.shape("query", 1), call.shape("key", 2), call.shape("value", 3)
    batch, pairs, e, ev = _attention_dims(q, k, v, causal)
    macs = batch * pairs * (3 * e + 2 * ev)
    return OpCost(macs=macs, flops=2 * macs + 5 * batch * pairs + 2 * batch * q[-2] * ev)


@register_formula([aten._native_multi_head_attention], unit="macs",
                  macs="B·Lq·D² + 2·B·Lk·D² (in-proj) + B·Lq·Lk·2D (attention) + B·Lq·D² (out-proj)",
                  flops="2·macs + biases B·(2Lq + 2Lk)·D + 6·B·H·Lq·Lk (+ B·H·Lq·Lk when averaging weights)",
                  note="nn.MultiheadAttention fast path (eval, no grad): one fused op")
def _native_mha(call: OpCall) -> OpCost:
    q, k = call.shape("query", 0), call.shape("key", 1)
    d = int(call.arg("embed_dim", q[-1], 3))
    h = int(call.arg("num_head", 1, 4))
    b = prod(q[:-2]) if len(q) > 2 else 1
    lq, lk = q[-2], k[-2]
    macs = b * lq * d * d + 2 * b * lk * d * d + b * lq * lk * 2 * d + b * lq * d * d
    flops = 2 * macs + b * (2 * lq + 2 * lk) * d + 6 * b * h * lq * lk
    if call.arg("mask", None) is not None:
        flops += b * h * lq * lk
    if call.arg("need_weights", True) and call.arg("average_attn_weights", True):
        flops += b * h * lq * lk
    return OpCost(macs=macs, flops=flops)


@register_formula([aten._transformer_encoder_layer_fwd], unit="macs",
                  macs="B·L·D·3D + B·L²·2D + B·L·D² (self-attention) + 2·B·L·D·F (feed-forward)",
                  flops="2·macs + attention biases 4·B·L·D + 6·B·H·L² (+ B·H·L² with a mask) + 2 residual adds "
                        "+ 2 layer norms 7·B·L·D + FFN biases B·L·(F + D) + activation (relu 1, gelu 5)·B·L·F",
                  note="nn.TransformerEncoderLayer fast path (eval, no grad, no hooks on the layer): one fused op")
def _encoder_layer(call: OpCall) -> OpCost:
    src = call.shape("src", 0)
    d = int(call.arg("embed_dim", src[-1], 1))
    h = int(call.arg("num_heads", 1, 2))
    f = call.shape("ffn_weight_1")[0]
    b = prod(src[:-2]) if len(src) > 2 else 1
    length = src[-2]
    attn_macs = b * length * d * 3 * d + b * length * length * 2 * d + b * length * d * d
    ffn_macs = 2 * b * length * d * f
    macs = attn_macs + ffn_macs
    flops = 2 * macs + 4 * b * length * d + 6 * b * h * length * length
    if call.arg("mask", None) is not None:
        flops += b * h * length * length
    flops += 2 * b * length * d                     # residual adds
    flops += 2 * 7 * b * length * d                 # two affine layer norms
    flops += b * length * (f + d)                   # feed-forward biases
    flops += (5 if call.arg("use_gelu", False) else 1) * b * length * f
    return OpCost(macs=macs, flops=flops)


# ============================================================ recurrent (CPU LSTM runs as one oneDNN op per layer)
_LSTM_CELL_FLOPS = 18       # σ(i), σ(f), σ(o): 4 each; tanh(g): 1; c' = f·c + i·g: 3; h' = o·tanh(c'): 2
_LSTM_CELL_BACKWARD = 22    # activation grads 12 + cell grads 10, per hidden unit


def _lstm_dims(call: OpCall, bwd: bool) -> tuple[int, int, int, int, bool]:
    x = call.shape("input", 0)
    batch_first = bool(call.arg("batch_first", False))
    t, b = (x[1], x[0]) if batch_first else (x[0], x[1])
    w_ih = call.shape("weight1" if bwd else "weight0", 1)
    hidden = int(call.arg("hidden_size"))
    has_bias = bool(call.arg("has_biases", True))
    return t, b, w_ih[1], hidden, has_bias


@register_formula([aten.mkldnn_rnn_layer], unit="macs", macs="T·B·4H·(I + H)",
                  flops="2·macs + T·B·4H·3 (bias and gate adds; 1 without bias) + 18·T·B·H (cell)",
                  note="one LSTM layer and direction; cell: 3 sigmoids at 4, tanh 1, c'=f·c+i·g 3, h'=o·tanh(c') 2")
def _lstm_layer(call: OpCall) -> OpCost:
    t, b, i, h, bias = _lstm_dims(call, False)
    macs = t * b * 4 * h * (i + h)
    flops = 2 * macs + t * b * 4 * h * (3 if bias else 1) + _LSTM_CELL_FLOPS * t * b * h
    return OpCost(macs=macs, flops=flops)


@register_formula([aten.mkldnn_rnn_layer_backward], unit="macs", macs="2 · T·B·4H·(I + H)",
                  flops="2·macs + 22·T·B·H (cell) + 8·T·B·H (two bias grads)",
                  note="grads of input, hidden state and both weight matrices are each one forward-sized matmul")
def _lstm_layer_backward(call: OpCall) -> OpCost:
    t, b, i, h, bias = _lstm_dims(call, True)
    macs = 2 * t * b * 4 * h * (i + h)
    flops = 2 * macs + _LSTM_CELL_BACKWARD * t * b * h + (8 * t * b * h if bias else 0)
    return OpCost(macs=macs, flops=flops)


# ============================================================ pointwise
def _pointwise(per_element: int, ops: list, text: str, note: str = "") -> None:
    @register_formula(ops, unit="flops", flops=f"{per_element} per output element" if not text else text, note=note)
    def _fn(call: OpCall) -> OpCost:
        return OpCost(flops=per_element * call.out_numel())


def _with_alpha(call: OpCall) -> int:
    alpha = call.arg("alpha", 1)
    return 2 if alpha not in (1, 1.0) else 1


@register_formula([aten.add, aten.add_, aten.sub, aten.sub_, aten.rsub], unit="flops",
                  flops="1 per output element (2 with alpha ≠ 1)")
def _add(call: OpCall) -> OpCost:
    return OpCost(flops=_with_alpha(call) * call.out_numel())


_pointwise(1, [aten.mul, aten.mul_, aten.div, aten.div_, aten.neg, aten.neg_, aten.abs, aten.abs_, aten.exp, aten.exp_,
               aten.log, aten.log_, aten.sqrt, aten.sqrt_, aten.rsqrt, aten.rsqrt_, aten.reciprocal, aten.reciprocal_,
               aten.pow, aten.pow_, aten.square, aten.maximum, aten.minimum, aten.sign, aten.floor, aten.ceil, aten.round,
               aten.erf, aten.erf_, aten.sin, aten.cos, aten.log1p, aten.expm1, aten.exp2, aten.log2,
               aten.eq, aten.ne, aten.gt, aten.lt, aten.ge, aten.le, aten.logical_not, aten.logical_and,
               aten.logical_or, aten.logical_xor, aten.bitwise_and, aten.bitwise_or, aten.bitwise_xor,
               aten.bitwise_not, aten.remainder, aten.fmod, aten.trunc, aten.frac, aten.clamp_min, aten.clamp_min_,
               aten.clamp_max, aten.clamp_max_],
          "1 per output element", "arithmetic, comparison and transcendental (exp, log, erf, sqrt count 1)")
_pointwise(2, [aten.clamp, aten.clamp_, aten.clip, aten.clip_], "2 per output element", "compare against min and max")
_pointwise(3, [aten.lerp, aten.lerp_], "3 per output element", "a + w·(b − a)")


@register_formula([aten.addcmul, aten.addcmul_, aten.addcdiv, aten.addcdiv_], unit="flops",
                  flops="2 per output element (3 with value ≠ 1)", note="self + value · t1 ∘ t2")
def _addc(call: OpCall) -> OpCost:
    value = call.arg("value", 1)
    return OpCost(flops=(2 if value in (1, 1.0) else 3) * call.out_numel())


# activations; backward formulas derived from the derivative written with the forward's saved value
_pointwise(1, [aten.relu, aten.relu_, aten.threshold, aten.threshold_, aten.threshold_backward, aten.tanh, aten.tanh_],
           "1 per element", "relu = max(x, 0); its backward a compare-select; tanh as one transcendental")
_pointwise(2, [aten.leaky_relu, aten.leaky_relu_, aten.leaky_relu_backward, aten.hardtanh, aten.hardtanh_,
               aten.hardtanh_backward, aten.elu_backward],
           "2 per element", "leaky_relu: compare + multiply; hardtanh/ReLU6: two compares")
_pointwise(3, [aten.tanh_backward, aten.sigmoid_backward, aten.hardsigmoid, aten.hardsigmoid_],
           "3 per element", "tanh': g·(1 − y²); σ': g·y·(1 − y); hardsigmoid: add, divide, clamp")
_pointwise(4, [aten.sigmoid, aten.sigmoid_, aten.elu, aten.elu_, aten.hardswish, aten.hardswish_, aten.softplus],
           "4 per element", "σ(x) = 1/(1 + exp(−x)): neg, exp, add, divide; softplus: threshold, exp, add, log")
_pointwise(5, [aten.silu, aten.silu_, aten.softplus_backward], "5 per element",
           "silu: x·σ(x); softplus': g·σ(βx)")
_pointwise(4, [aten.hardswish_backward], "4 per element", "compare, (2x + 3)/6 (3 ops) times g")
_pointwise(3, [aten.hardsigmoid_backward], "3 per element",
           "hardsigmoid': g/6 inside (−3, 3), else 0: two compares (as hardtanh_backward) and one multiply")
_pointwise(6, [aten.mish, aten.mish_], "6 per element", "x·tanh(softplus(x)): softplus 4, tanh 1, multiply 1")
_pointwise(15, [aten.mish_backward], "15 per element", "softplus 4, tanh 1, σ 4, g·(t + x·σ·(1 − t²)) 6")
_pointwise(9, [aten.silu_backward], "9 per element", "s = σ(x) (4), g·s·(1 + x·(1 − s)) (5)")


@register_formula([aten.gelu, aten.gelu_], unit="flops", flops="5 per element (tanh approximation: 9)",
                  note="0.5·x·(1 + erf(x/√2)): scale, erf, add, two multiplies")
def _gelu(call: OpCall) -> OpCost:
    per = 9 if call.arg("approximate", "none") == "tanh" else 5
    return OpCost(flops=per * call.out_numel())


@register_formula([aten.gelu_backward], unit="flops", flops="11 per element (tanh approximation: 18)",
                  note="g·(Φ(x) + x·φ(x)): Φ 4, φ = exp(−x²/2)/√2π 4, combine 3")
def _gelu_backward(call: OpCall) -> OpCost:
    per = 18 if call.arg("approximate", "none") == "tanh" else 11
    return OpCost(flops=per * call.out_numel())


# ============================================================ softmax, reductions
_pointwise(5, [aten._softmax, aten._safe_softmax, aten._log_softmax, aten.softmax, aten.log_softmax],
           "5 per element", "max, subtract, exp, sum, divide (log_softmax: log and subtract instead of divide)")
_pointwise(4, [aten._softmax_backward_data, aten._log_softmax_backward_data],
           "4 per element", "softmax: y·(g − Σ g·y); log_softmax: g − exp(y)·Σ g")


@register_formula([aten.sum, aten.nansum], unit="flops", flops="numel(in) − numel(out)", note="n − 1 adds per output")
def _sum(call: OpCall) -> OpCost:
    return OpCost(flops=max(call.in_numel(0) - call.out_numel(), 0))


@register_formula([aten.mean], unit="flops", flops="numel(in)", note="n − 1 adds and 1 divide per output")
def _mean(call: OpCall) -> OpCost:
    return OpCost(flops=call.in_numel(0))


@register_formula([aten.amax, aten.amin, aten.max, aten.min, aten.argmax, aten.argmin, aten.prod, aten.any, aten.all],
                  unit="flops", flops="numel(in) − numel(out)", note="n − 1 compares (or products) per output")
def _reduce_compare(call: OpCall) -> OpCost:
    if call.func.overloadpacket in (aten.max, aten.min) and isinstance(call.arg("other", None), torch.Tensor):
        return OpCost(flops=call.out_numel())
    return OpCost(flops=max(call.in_numel(0) - call.out_numel(), 0))


_pointwise(1, [aten.cumsum, aten.cumsum_], "1 per element", "running sum: one add per element")


@register_formula([aten.var, aten.std, aten.var_mean, aten.std_mean], unit="flops", flops="4 per input element",
                  note="mean (1), subtract (1), square (1), sum (1)")
def _var(call: OpCall) -> OpCost:
    return OpCost(flops=4 * call.in_numel(0))


@register_formula([aten.norm, aten.linalg_vector_norm], unit="flops", flops="2 per input element",
                  note="square and add (p = 2), then one sqrt per output")
def _norm(call: OpCall) -> OpCost:
    return OpCost(flops=2 * call.in_numel(0))


# ============================================================ normalisation
_NORM_FWD, _NORM_AFFINE = 5, 2
_NORM_BWD_INPUT, _NORM_BWD_WEIGHT, _NORM_BWD_BIAS = 9, 2, 1


def _affine_terms(weight: Any, bias: Any) -> int:
    return int(isinstance(weight, torch.Tensor)) + int(isinstance(bias, torch.Tensor))


@register_formula([aten.native_layer_norm, aten.native_group_norm],
                  unit="flops", flops="5 per element + 1 per element for each of weight, bias",
                  note="mean (add), subtract, square, variance (add), multiply by rsqrt; affine multiply + add")
def _norm_forward(call: OpCall) -> OpCost:
    n = call.in_numel(0)
    return OpCost(flops=n * (_NORM_FWD + _affine_terms(call.arg("weight"), call.arg("bias"))))


@register_formula([aten.native_batch_norm, aten._native_batch_norm_legit, aten._native_batch_norm_legit_no_training,
                   aten._native_batch_norm_legit_functional],
                  unit="flops", flops="training: as layer norm (5 + affine); eval: 2 per element",
                  note="eval folds running stats and affine into x·a + b per channel")
def _batch_norm(call: OpCall) -> OpCost:
    n = call.in_numel(0)
    training = bool(call.arg("training", False)) and call.func.overloadpacket is not aten._native_batch_norm_legit_no_training
    if not training:
        return OpCost(flops=2 * n)
    return OpCost(flops=n * (_NORM_FWD + _affine_terms(call.arg("weight"), call.arg("bias"))))


@register_formula([aten.native_layer_norm_backward, aten.native_batch_norm_backward, aten.native_group_norm_backward],
                  unit="flops", flops="per element: 9 (grad input) + 2 (grad weight) + 1 (grad bias), by output_mask",
                  note="dx = rstd·(g·w − mean(g·w) − x̂·mean(g·w·x̂)); dw = Σ g·x̂; db = Σ g")
def _norm_backward(call: OpCall) -> OpCost:
    n = call.in_numel(0)
    mask = call.arg("output_mask", [True, True, True])
    weight = call.arg("weight", None)
    per = (_NORM_BWD_INPUT if mask[0] else 0)
    if mask[1] and weight is not None:
        per += _NORM_BWD_WEIGHT
    if mask[2]:
        per += _NORM_BWD_BIAS
    if call.func.overloadpacket is aten.native_batch_norm_backward and not call.arg("train", True):
        per = (2 if mask[0] else 0) + (_NORM_BWD_WEIGHT if mask[1] and weight is not None else 0) + (1 if mask[2] else 0)
    return OpCost(flops=n * per)


# ============================================================ pooling
def _kernel(call: OpCall, dims: int) -> int:
    k = call.arg("kernel_size")
    k = list(k) if isinstance(k, (list, tuple)) else [k]
    if len(k) == 1:
        k = k * dims
    return prod(k)


def _pool_dims(call: OpCall) -> int:
    name = str(call.func.overloadpacket)
    return 3 if "3d" in name else 1 if "1d" in name else 2


@register_formula([aten.max_pool2d_with_indices, aten.max_pool3d_with_indices, aten.max_pool1d, aten.max_pool2d,
                   aten.max_pool3d], unit="flops", flops="(prod(kernel) − 1) per output element",
                  note="compares; padding and dilation do not change the per-window count")
def _max_pool(call: OpCall) -> OpCost:
    return OpCost(flops=(_kernel(call, _pool_dims(call)) - 1) * call.out_numel())


@register_formula([aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d], unit="flops",
                  flops="prod(kernel) per output element", note="k − 1 adds and 1 divide")
def _avg_pool(call: OpCall) -> OpCost:
    return OpCost(flops=_kernel(call, _pool_dims(call)) * call.out_numel())


@register_formula([aten.max_pool2d_with_indices_backward, aten.max_pool3d_with_indices_backward], unit="flops",
                  flops="1 per grad_output element", note="scatter-add of each gradient to its argmax")
def _max_pool_backward(call: OpCall) -> OpCost:
    return OpCost(flops=call.in_numel(0))


@register_formula([aten.avg_pool2d_backward, aten.avg_pool3d_backward], unit="flops",
                  flops="prod(kernel) per grad_output element", note="divide and add into each window position")
def _avg_pool_backward(call: OpCall) -> OpCost:
    return OpCost(flops=_kernel(call, _pool_dims(call)) * call.in_numel(0))


def adaptive_window_total(n_in: int, n_out: int) -> int:
    """Σ over output positions of PyTorch's adaptive window length: [floor(i·I/O), ceil((i+1)·I/O))."""
    return sum(-(-((i + 1) * n_in) // n_out) - (i * n_in) // n_out for i in range(n_out))


def _adaptive_total(in_shape: tuple, out_shape: tuple, nd: int) -> tuple[int, int]:
    """(Σ window sizes over all outputs, numel(out)) for adaptive pooling over the nd trailing dims."""
    lead = prod(out_shape[:-nd])
    total = lead
    for d in range(1, nd + 1):
        total *= adaptive_window_total(in_shape[-d], out_shape[-d])
    return total, prod(out_shape)


@register_formula([aten._adaptive_avg_pool2d, aten._adaptive_avg_pool3d, aten.adaptive_avg_pool1d,
                   aten._adaptive_avg_pool2d_backward, aten._adaptive_avg_pool3d_backward],
                  unit="flops", flops="Σ window sizes over outputs", note="window − 1 adds + 1 divide per output "
                  "(backward: one divide-and-add per window position)")
def _adaptive_avg(call: OpCall) -> OpCost:
    outs = call.out_tensors()
    if "backward" in str(call.func.overloadpacket):
        total, _ = _adaptive_total(tuple(outs[0].shape), call.shape("grad_output", 0), _pool_dims(call))
    else:
        total, _ = _adaptive_total(call.shape("self", 0), tuple(outs[0].shape), _pool_dims(call))
    return OpCost(flops=total)


@register_formula([aten.adaptive_max_pool2d, aten.adaptive_max_pool3d], unit="flops",
                  flops="Σ (window − 1) over outputs", note="compares")
def _adaptive_max(call: OpCall) -> OpCost:
    outs = call.out_tensors()
    total, n = _adaptive_total(call.shape("self", 0), tuple(outs[0].shape), _pool_dims(call))
    return OpCost(flops=total - n)


@register_formula([aten.upsample_bilinear2d, aten.upsample_bilinear2d_backward, aten._upsample_bilinear2d_aa],
                  unit="flops", flops="7 per output element (backward: per grad_output element)",
                  note="4 weighted taps: 4 multiplies + 3 adds")
def _bilinear(call: OpCall) -> OpCost:
    n = call.in_numel(0) if "backward" in str(call.func.overloadpacket) else call.out_numel()
    return OpCost(flops=7 * n)


@register_formula([aten.upsample_nearest1d_backward, aten.upsample_nearest2d_backward, aten.upsample_nearest3d_backward,
                   aten.embedding_dense_backward, aten.index_add, aten.index_add_, aten.scatter_add, aten.scatter_add_,
                   aten.index_put, aten.index_put_, aten._index_put_impl_],
                  unit="flops", flops="1 per gradient (source) element", note="scatter-add of each gradient into place")
def _scatter_add(call: OpCall) -> OpCost:
    name = str(call.func.overloadpacket)
    if name.endswith("index_put") or name.endswith("index_put_") or name.endswith("_index_put_impl_"):
        if not call.arg("accumulate", False):
            return OpCost()
        values = call.arg("values", None)
        return OpCost(flops=int(values.numel()) if isinstance(values, torch.Tensor) else 0)
    if "index_add" in name or "scatter_add" in name:
        src = call.arg("source", None)
        if src is None:
            src = call.arg("src", None)
        return OpCost(flops=int(src.numel()) if isinstance(src, torch.Tensor) else 0)
    return OpCost(flops=call.in_numel(0))


@register_formula([aten.reflection_pad1d_backward, aten.reflection_pad2d_backward, aten.reflection_pad3d_backward,
                   aten.replication_pad1d_backward, aten.replication_pad2d_backward, aten.replication_pad3d_backward],
                  unit="flops", flops="numel(grad_output) − numel(grad_input)",
                  note="each padded position's gradient is added onto the input position it mirrors or repeats")
def _pad_backward(call: OpCall) -> OpCost:
    return OpCost(flops=max(call.in_numel(0) - call.out_numel(), 0))


# ============================================================ dropout and losses
_pointwise(2, [aten.native_dropout, aten.native_dropout_backward], "2 per element",
           "mask multiply + 1/(1−p) scale (random draws are not FLOPs)")


@register_formula([aten.nll_loss_forward, aten.nll_loss2d_forward], unit="flops", flops="N (gather, sum)",
                  note="one add per target (the picked log-probability)")
def _nll(call: OpCall) -> OpCost:
    t = call.arg("target", None)
    return OpCost(flops=int(t.numel()) if isinstance(t, torch.Tensor) else 0)


@register_formula([aten.nll_loss_backward, aten.nll_loss2d_backward], unit="flops", flops="N", note="one write per target")
def _nll_backward(call: OpCall) -> OpCost:
    t = call.arg("target", None)
    return OpCost(flops=int(t.numel()) if isinstance(t, torch.Tensor) else 0)


@register_formula([aten.mse_loss, aten.mse_loss_backward, aten.smooth_l1_loss, aten.l1_loss,
                   aten.binary_cross_entropy, aten.binary_cross_entropy_with_logits],
                  unit="flops", flops="3 per input element", note="difference, square (or abs), reduce")
def _elementwise_loss(call: OpCall) -> OpCost:
    return OpCost(flops=3 * call.in_numel(0))


# ============================================================ foreach (optimizers with foreach=True)
_FOREACH = {
    "add": 1, "sub": 1, "mul": 1, "div": 1, "sqrt": 1, "neg": 1, "maximum": 1, "minimum": 1, "exp": 1,
    "reciprocal": 1, "sign": 1, "abs": 1, "pow": 1, "lerp": 3, "addcmul": 3, "addcdiv": 3, "clamp_min": 1,
    "clamp_max": 1,
}


def _foreach_ops() -> list:
    found = []
    for base in _FOREACH:
        for suffix in ("", "_"):
            op = getattr(aten, f"_foreach_{base}{suffix}", None)
            if op is not None:
                found.append(op)
    return found


@register_formula(_foreach_ops(), unit="flops", flops="Σ over the tensor list of the pointwise formula",
                  note="_foreach_add/mul/lerp/addcmul/addcdiv/sqrt... as their single-tensor versions")
def _foreach(call: OpCall) -> OpCost:
    name = str(call.func.overloadpacket).split("_foreach_")[-1].rstrip("_")
    per = _FOREACH.get(name, 1)
    if name in ("add", "sub") and call.arg("alpha", 1) not in (1, 1.0):
        per = 2
    if name in ("addcmul", "addcdiv"):
        value = call.arg("value", call.arg("scalars", 1))
        per = 2 if (not isinstance(value, (list, tuple, torch.Tensor)) and value in (1, 1.0)) else 3
    tensors = call.args[0] if call.args else []
    return OpCost(flops=per * sum(int(t.numel()) for t in tensors if isinstance(t, torch.Tensor)))


# ============================================================ no arithmetic: views and data movement
_VIEWS = [aten.view, aten._unsafe_view, aten.reshape, aten._reshape_alias, aten.t, aten.transpose, aten.permute,
          aten.expand, aten.squeeze, aten.unsqueeze, aten.select, aten.slice, aten.split, aten.split_with_sizes,
          aten.chunk, aten.unbind, aten.as_strided, aten.as_strided_, aten.detach, aten.alias, aten.unflatten, aten.flatten, aten.narrow,
          aten.diagonal, aten.lift_fresh, aten.view_as, aten.expand_as, aten.unfold, aten.numpy_T, aten.t_,
          aten.transpose_, aten.squeeze_, aten.unsqueeze_, aten.view_as_real, aten.view_as_complex, aten.movedim,
          aten.resolve_conj, aten.resolve_neg, aten.unsafe_split, aten.unsafe_chunk, aten.unsafe_split_with_sizes,
          aten._local_scalar_dense, aten.sym_size, aten.sym_stride,
          aten.sym_numel, aten.is_same_size, aten.set_]


_VIEWS += [op for op in (getattr(torch.ops.profiler, "_record_function_enter_new", None),
                         getattr(torch.ops.profiler, "_record_function_exit", None)) if op is not None]


@register_formula(_VIEWS, unit="bytes", flops="0", note="views, metadata and profiler markers: no arithmetic, no bytes moved",
                  moves_data=False)
def _view(call: OpCall) -> OpCost:
    return OpCost()


_MOVES = [aten.clone, aten.copy_, aten.copy, aten._to_copy, aten.contiguous, aten.cat, aten.stack, aten.constant_pad_nd,
          aten.reflection_pad1d, aten.reflection_pad2d, aten.reflection_pad3d, aten.replication_pad1d,
          aten.replication_pad2d, aten.replication_pad3d, aten.embedding, aten.index_select,
          aten.gather, aten.index, aten.select_backward, aten.slice_backward, aten.upsample_nearest1d,
          aten.upsample_nearest2d, aten.upsample_nearest3d, aten.roll, aten.flip, aten.repeat, aten.tril, aten.triu,
          aten.tril_, aten.triu_, aten.where, aten.masked_fill, aten.masked_fill_, aten.fill_, aten.fill, aten.zero_,
          aten.zeros, aten.ones, aten.empty, aten.full, aten.arange, aten.scalar_tensor, aten.ones_like,
          aten.zeros_like, aten.empty_like, aten.full_like, aten.new_empty, aten.new_zeros, aten.new_ones,
          aten.new_full, aten.empty_strided, aten.new_empty_strided, aten.rand, aten.randn, aten.randint, aten.rand_like,
          aten.randn_like, aten.bernoulli, aten.bernoulli_, aten.normal_, aten.uniform_, aten.random_, aten.linspace,
          aten.eye, aten.scatter, aten.scatter_, aten.masked_scatter, aten.diagonal_backward, aten.expand_copy,
          aten.permute_copy, aten.view_copy, aten.transpose_copy, aten._unsafe_index, aten.pixel_shuffle,
          aten.channel_shuffle, aten.lift, aten._copy_from, aten._copy_from_and_resize, aten.resize_, aten.col2im,
          aten.im2col, aten.unfold_backward, aten.sort, aten.topk, aten.nonzero, aten.masked_select]


@register_formula(_MOVES, unit="bytes", flops="0",
                  note="copies, concatenation, padding, embedding lookup, creation, selection (where, masked_fill): "
                       "bytes only")
def _move(call: OpCall) -> OpCost:
    return OpCost()
