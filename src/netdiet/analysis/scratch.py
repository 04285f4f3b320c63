"""CPU kernel scratch: the bytes a kernel allocates and frees inside one aten op, as rules keyed by the CPU.

The meta-device simulation (memory.py) sees every tensor an operator returns, but not the buffers a CPU
kernel allocates and frees inside the op: oneDNN's reorders into its blocked layouts, its scratchpad, the
column buffer of PyTorch's own im2col convolution, the per-thread buffers of the flash-attention kernel.
They are real peaks (the profiler's allocator events see them) and which ones a call makes depends on the
machine: the instruction set oneDNN dispatches to (its blocking is 8 channels on AVX2, 16 on AVX-512; bf16
runs natively on AVX512-BF16 and AMX, through PyTorch's im2col kernel where oneDNN has no bf16), the thread
count, the dtype and PyTorch's own choice of backend. So the rules are keyed by what the machine reports,
never by the machine they were measured on:

    probe_cpu()      CpuCapability: the ISA family (`isa`: amx | avx512_bf16 | avx512 | avx2 | baseline, from
                     torch._C._cpu._get_cpu_capability(), ONEDNN_MAX_CPU_ISA honoured), whether PyTorch sends
                     convolutions/matmuls to oneDNN (torch.backends.mkldnn), whether it does so for bf16/fp16
                     (torch.ops.mkldnn._is_mkldnn_bf16_supported() / _fp16_), the ATen capability string and
                     torch.get_num_threads().
    RULES            the rule table: (op, backend, dtypes, ISA families) -> a small function giving the scratch
                     bytes alive at the op's peak beyond the tensors it returns, and where it was measured.
    kernel_scratch() picks PyTorch's backend for the call (its own dispatch logic, CPU-independent), looks the
                     rule up and returns (bytes, None), or (0, Unmodelled(...)) when no rule is known for that
                     op / dtype / backend / ISA. memory.py lists every Unmodelled in MemoryEstimate.unmodelled
                     and in a warning, so an unknown combination is never a silent zero.

Rule table (torch 2.13, oneDNN 3.x as bundled; bytes above the op's outputs; see docs/memory.md):

    op      backend  dtypes            ISA families               measured on
    conv2d  any      fp32, bf16, fp16  avx2                       an AVX2 CPU without native bf16 (the original
                                                                  rules, unchanged; oneDNN bf16/fp16 excluded)
    conv2d  native   fp32, bf16, fp16  all                        PyTorch's slow_conv2d (im2col), AMD EPYC below
    conv2d  onednn   fp32              avx512, avx512_bf16, amx   AMD EPYC (AVX512 + AVX512-BF16), 1 and 2
                                                                  threads (fp32 runs the same avx512_core JIT)
    conv2d  onednn   bf16              avx512_bf16                the same machine
    matmul  onednn   bf16              avx512_bf16                the same machine: exact on 500+ shapes
    matmul  blas     all               all                        MKL / native gemm: nothing c10 sees (both CPUs)
    sdpa    aten     all               all                        PyTorch's CPU flash-attention kernel
Everything else is unmodelled and reported as such: bf16 on the oneDNN backend of AMX CPUs or of AVX-512 CPUs
without BF16, fp16 where oneDNN takes fp16, grouped (not depthwise) or dilated convolutions on oneDNN,
transposed / 1-D / 3-D convolutions, and the inner brgemm scratch of the bf16 flash-attention backward.

Meeting a new CPU (an `unmodelled` entry, or `--measure` disagreeing): measure the op alone. Run it once to
warm up, then under torch.profiler.profile(activities=[CPU], profile_memory=True) with its outputs kept
alive; walk prof.profiler.kineto_results.experimental_event_tree() for Allocation events (ptr, alloc_size;
negative sizes are frees, pair them by ptr), and the op's scratch is the peak of the running total minus the
bytes still allocated at the end (its outputs). ONEDNN_VERBOSE=1 names the kernel oneDNN picked
(e.g. brg_matmul:avx512_core_bf16, jit:avx512_core) and the layouts it reordered into, which usually explains
the sizes. Then add a function here and a row to RULES with that ISA family (and to probe_cpu's mapping if the
family is new), add the measured shapes to tests/test_memory.py, and the row to docs/memory.md.

Why this module is long: every CPU family's rules sit here side by side with the one table that selects them, so
that a person who meets a new CPU reads and extends one file; each rule reproduces oneDNN's blocking arithmetic
for its kernel, which is long by nature.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

ISA_FAMILIES = ("amx", "avx512_bf16", "avx512", "avx2", "baseline")
_DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


# ------------------------------------------------------------------ what the machine reports
@dataclass(frozen=True)
class CpuCapability:
    isa: str              # rule-table key: amx | avx512_bf16 | avx512 | avx2 | baseline
    onednn: bool          # PyTorch may send convolutions to oneDNN (built with it, torch.backends.mkldnn.enabled)
    onednn_bf16: bool     # ... and bf16 convolutions / matmuls (torch.ops.mkldnn._is_mkldnn_bf16_supported())
    onednn_fp16: bool     # ... and fp16 ones
    aten: str             # torch.backends.cpu.get_cpu_capability(), e.g. AVX512
    threads: int          # torch.get_num_threads(): oneDNN's per-thread buffers scale with it

    @property
    def label(self) -> str:
        extra = [f for f, on in (("onednn-bf16", self.onednn_bf16), ("onednn-fp16", self.onednn_fp16)) if on]
        backend = "oneDNN" if self.onednn else "no oneDNN"
        return f"{self.isa} (ATen {self.aten}, {backend}{', ' + ', '.join(extra) if extra else ''}, " \
               f"{self.threads} thread{'s' if self.threads != 1 else ''})"


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> dict[str, Any]:
    try:
        return dict(torch._C._cpu._get_cpu_capability())
    except (AttributeError, RuntimeError):
        import torch.cpu as tc
        probe = {"avx2": "_is_avx2_supported", "avx512_f": "_is_avx512_supported",
                 "avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported"}
        flags: dict[str, Any] = {}
        for key, fn in probe.items():
            try:
                flags[key] = bool(getattr(tc, fn)())
            except (AttributeError, RuntimeError):
                flags[key] = False
        flags["avx512_bw"] = flags["avx512_vl"] = flags["avx512_dq"] = flags["avx512_f"]
        flags["amx_bf16"] = flags["amx_tile"]
        return flags


def isa_family(flags: dict[str, Any], max_isa: str | None = None) -> str:
    """The rule-table family of a CPU from its feature flags (and oneDNN's ONEDNN_MAX_CPU_ISA cap, if set)."""
    avx512 = all(flags.get(f) for f in ("avx512_f", "avx512_bw", "avx512_vl", "avx512_dq"))
    if avx512 and (flags.get("amx_bf16") or flags.get("amx_tile")):
        family = "amx"
    elif avx512 and flags.get("avx512_bf16"):
        family = "avx512_bf16"
    elif avx512:
        family = "avx512"
    elif flags.get("avx2"):
        family = "avx2"
    else:
        family = "baseline"
    if max_isa:
        cap = max_isa.strip().lower()
        capped = ("avx2" if cap.startswith("avx2") else "baseline" if cap in ("sse41", "avx", "default") else
                  "avx512" if cap in ("avx512_core", "avx512_core_vnni") else
                  "avx512_bf16" if cap in ("avx512_core_bf16", "avx512_core_fp16", "avx2_vnni_2") else None)
        if capped is not None and ISA_FAMILIES.index(capped) > ISA_FAMILIES.index(family):
            family = capped
    return family


def probe_cpu() -> CpuCapability:
    """What this machine reports now (the thread count is read at each call)."""
    onednn = bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)

    def supported(name: str) -> bool:
        try:
            return bool(getattr(torch.ops.mkldnn, name)())
        except (AttributeError, RuntimeError):
            return False
    family = isa_family(_cpu_flags(), os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"))
    return CpuCapability(isa=family, onednn=onednn,
                         onednn_bf16=onednn and supported("_is_mkldnn_bf16_supported"),
                         onednn_fp16=onednn and supported("_is_mkldnn_fp16_supported"),
                         aten=str(torch.backends.cpu.get_cpu_capability()), threads=torch.get_num_threads())


# ------------------------------------------------------------------ results
@dataclass(frozen=True)
class Unmodelled:
    """An op whose in-kernel scratch has no rule for this CPU: it is counted as 0 bytes, and said so."""
    op: str
    dtype: str
    backend: str
    capability: str
    reason: str


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAME.get(dtype, str(dtype).replace("torch.", ""))


def _ru(a: int, b: int) -> int:
    return -(-a // b) * b


def _du(a: int, b: int) -> int:
    return -(-a // b)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def peak_above(events: list[tuple[str, str, int]], outputs: int) -> int:
    """Peak of a buffer sequence ('+', name, bytes) / ('-', name, 0) minus the bytes the op returns."""
    live: dict[str, int] = {}
    run = peak = 0
    for sign, name, n in events:
        if sign == "+":
            live[name] = live.get(name, 0) + n
            run += n
        else:
            run -= live.pop(name, 0)
        peak = max(peak, run)
    return max(0, peak - outputs)


# ------------------------------------------------------------------ op calls
@dataclass
class ConvCall:
    forward: bool
    inp: torch.Tensor
    weight: torch.Tensor
    grad_out: torch.Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    transposed: bool
    groups: int
    mask: tuple[bool, bool, bool]      # backward: input, weight, bias gradients wanted
    has_bias: bool

    @property
    def dims(self):
        n, c, h, w = (int(v) for v in self.inp.shape)
        o = int(self.weight.shape[0])
        kh, kw = (int(v) for v in self.weight.shape[2:])
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return n, c, h, w, o, kh, kw, oh, ow

    def cols(self) -> int:
        """The im2col column buffer, N x (C k_h k_w) x (H' W') elements; a 1x1/stride-1/no-pad conv needs none."""
        n, c, h, w, o, kh, kw, oh, ow = self.dims
        if kh == kw == 1 and all(s == 1 for s in self.stride) and all(p == 0 for p in self.padding):
            return 0
        return n * c * kh * kw * oh * ow * self.inp.element_size()


@dataclass
class MatmulCall:
    a: torch.Tensor
    b: torch.Tensor
    batched: bool
    with_sum: bool           # addmm / baddbmm with beta != 0: oneDNN's sum post-op


@dataclass
class AttentionCall:
    forward: bool
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor | None


def _as_tuple(v, n: int = 2) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return (int(v),) * n


def scratch_ops() -> tuple:
    """Every aten overload parse_call recognises (any other op has no kernel scratch rule)."""
    aten = torch.ops.aten
    ops = [aten.convolution.default, aten.convolution_backward.default, aten.mm.default, aten.bmm.default,
           aten.addmm.default, aten.baddbmm.default]
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"):
        if getattr(aten, name, None) is not None:
            ops.append(getattr(aten, name).default)
    return tuple(ops)


def parse_call(func, args: tuple) -> tuple[str, Any] | None:
    """(op family, call) for the aten ops that have kernel scratch on CPU; None for every other op."""
    aten = torch.ops.aten
    if func is aten.convolution.default and len(args) >= 9:
        inp, weight, bias = args[0], args[1], args[2]
        return "conv2d", ConvCall(True, inp, weight, None, _as_tuple(args[3]), _as_tuple(args[4]), _as_tuple(args[5]),
                                  bool(args[6]), int(args[8]), (False, False, False), bias is not None)
    if func is aten.convolution_backward.default and len(args) >= 11:
        mask = tuple(bool(m) for m in args[10])
        return "conv2d", ConvCall(False, args[1], args[2], args[0], _as_tuple(args[4]), _as_tuple(args[5]),
                                  _as_tuple(args[6]), bool(args[7]), int(args[9]), mask, args[3] is not None)
    if func is aten.mm.default and len(args) >= 2:
        return "matmul", MatmulCall(args[0], args[1], False, False)
    if func is aten.bmm.default and len(args) >= 2:
        return "matmul", MatmulCall(args[0], args[1], True, False)
    if func in (aten.addmm.default, aten.baddbmm.default) and len(args) >= 3:
        beta = args[3] if len(args) > 3 else 1
        return "matmul", MatmulCall(args[1], args[2], func is aten.baddbmm.default, beta != 0)
    flash = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is not None and func is flash.default and len(args) >= 3:
        return "sdpa", AttentionCall(True, args[0], args[1], args[2], None)
    flash_bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if flash_bwd is not None and func is flash_bwd.default and len(args) >= 4:
        return "sdpa", AttentionCall(False, args[1], args[2], args[3], args[0])
    return None


# ------------------------------------------------------------------ PyTorch's backend choice (CPU-independent)
def conv_backend(call: ConvCall, cap: CpuCapability) -> str:
    """PyTorch's ConvParams::use_mkldnn (torch 2.13): 'onednn' or 'native' (slow_conv2d / depthwise kernels)."""
    if not cap.onednn:
        return "native"
    dt = call.inp.dtype
    if dt == torch.bfloat16:
        return "onednn" if cap.onednn_bf16 else "native"
    if dt == torch.float16:
        return "onednn" if cap.onednn_fp16 else "native"
    if dt != torch.float32:
        return "native"
    n = int(call.inp.shape[0])
    kh, kw = (int(v) for v in call.weight.shape[-2:])
    strided = any(s != 1 for s in call.stride)
    dilated = any(d != 1 for d in call.dilation)
    # "For 1x1 filters, MKLDNN is faster than THNN when multi-threaded, but THNN is faster when single-threaded"
    if not (strided or dilated or n >= 16 or (kh, kw) != (1, 1) or cap.threads > 1):
        return "native"
    # "for some case, native is faster"
    if not (call.groups > 1 or (kh > 3 and kw > 3) or n > 1 or call.inp.numel() > 20480):
        return "native"
    return "onednn"


def _layout(t: torch.Tensor) -> str:
    """'plain' (row-major in the last two dims), 'transposed', or 'other' (PyTorch copies it first)."""
    if t.dim() < 2:
        return "plain"
    st, sz = t.stride(), t.shape
    if t.is_contiguous():
        return "plain"
    if st[-2] == 1 and (sz[-1] == 1 or st[-1] >= max(1, sz[-2])):
        rest_ok = all(st[i] >= st[-1] * sz[-1] or sz[i] == 1 for i in range(t.dim() - 2))
        return "transposed" if rest_ok else "other"
    return "other"


def matmul_backend(call: MatmulCall, cap: CpuCapability) -> str:
    """oneDNN for bf16/fp16 when PyTorch's use_mkldnn_*_matmul says so (size > 16^3), else blas (MKL / native)."""
    a, b = call.a, call.b
    dt = a.dtype
    wants = cap.onednn and ((dt == torch.bfloat16 and cap.onednn_bf16) or (dt == torch.float16 and cap.onednn_fp16))
    if not wants or b.dtype != dt or a.numel() == 0 or b.numel() == 0:
        return "blas"
    size = _numel(a.shape) * int(b.shape[-1])
    return "onednn" if size > 16 * 16 * 16 else "blas"


def conv_outside_rule(call: ConvCall) -> str:
    n, c, h, w, o, kh, kw, oh, ow = call.dims
    if call.groups > 1 and not call.groups == c == o:
        return f"grouped convolution (groups={call.groups}, not depthwise) was not measured"
    if any(d != 1 for d in call.dilation):
        return f"dilated convolution (dilation={tuple(call.dilation)}) was not measured"
    return "outside the measured shapes"


def onednn_measured(call: ConvCall) -> bool:
    """The oneDNN AVX-512 rules were measured on dense and depthwise, undilated 2-D convolutions."""
    n, c, h, w, o, kh, kw, oh, ow = call.dims
    return (call.groups == 1 or call.groups == c == o) and all(d == 1 for d in call.dilation)


# ------------------------------------------------------------------ rules: AVX2 (the original, measured there)
AVX2_GEMM_COLUMNS_MAX = 589_824   # largest column buffer measured to take the GEMM path (smallest direct: 921,600)


def avx2_native_1x1(call: ConvCall, threads: int) -> bool:
    n = int(call.inp.shape[0])
    return (call.inp.dtype == torch.float32 and tuple(call.weight.shape[2:]) == (1, 1)
            and all(v == 1 for v in call.stride) and all(v == 1 for v in call.dilation) and n < 16 and threads == 1)


def avx2_conv(call: ConvCall, cap: CpuCapability) -> int | None:
    """The rules measured on an AVX2 CPU without native bf16 (torch 2.13), unchanged.

    oneDNN fp32 backward: max(2 * max(input, grad_output), weight) (input/grad-output reorders, a weight-sized
    scratch); forward: one output-sized scratch with the channels padded to a multiple of 8. A batch of one
    with a column buffer up to 576 KiB, PyTorch's single-threaded 1x1 path and bf16/fp16 without oneDNN use
    the im2col kernel: the column buffer. fp32 depthwise backward: input + grad_output bytes.
    """
    inp, weight = call.inp, call.weight
    n, c, h, w, o, kh, kw, oh, ow = call.dims
    native_lowp = ((inp.dtype == torch.bfloat16 and not cap.onednn_bf16)
                   or (inp.dtype == torch.float16 and not cap.onednn_fp16))
    onednn_fp32 = inp.dtype == torch.float32 and cap.onednn
    if onednn_fp32 and call.groups != 1 and not call.groups == c == o:
        return None          # grouped, not depthwise: never measured there (counted 0 before, now said so)
    if not call.forward:
        if call.groups != 1:
            depthwise = call.groups == c == o
            return _nbytes(inp) + _nbytes(call.grad_out) if depthwise and onednn_fp32 else 0
        if avx2_native_1x1(call, cap.threads):
            return call.cols()
        if onednn_fp32:
            cols = call.cols()
            if n == 1 and cols <= AVX2_GEMM_COLUMNS_MAX:
                return cols
            return max(2 * max(_nbytes(inp), _nbytes(call.grad_out)), _nbytes(weight))
        return call.cols() if native_lowp else 0
    if call.groups == 1 and (native_lowp or avx2_native_1x1(call, cap.threads)):
        return call.cols()
    if onednn_fp32:
        if n == 1 and call.groups == 1 and call.cols() <= AVX2_GEMM_COLUMNS_MAX:
            return call.cols()
        return avx2_onednn_forward(call) if conv_backend(call, cap) == "onednn" else n * _ru(o, 8) * oh * ow * 4
    return 0


def avx2_onednn_forward(call: ConvCall) -> int:
    """oneDNN fp32 forward on AVX2 (8-channel blocking): max(dst, src + weights + dst padding).

    jit:avx2 computes in nChw8c: it holds a blocked dst (N x ceil8(C_out) x H' x W'), or, while it runs, the
    input reordered to nChw8c (ceil8(C_in) channels), the weights reordered to 8x8 blocks (ceil8(C_out) x
    ceil8(C_in/groups) x k², depthwise ceil8(C) x k²) and the dst's channel padding; a dense non-1x1 conv with
    C_in < 8 (a stem) reads the plain input. The old rule had only the dst term, where an expanding conv
    (C_out >= C_in) peaks; a projecting or depthwise conv peaks at the reorders instead: MobileNetV3-small's
    1x1 projections, SE convs and depthwise convs made its inference estimate 6.5 % low at batch 16.
    Measured with ONEDNN_MAX_CPU_ISA=AVX2 (torch 2.13 and 2.14), 220 random shapes at 1 and 2 threads:
    exact but for strided 1x1 convs (an extra per-thread reduce-to-unit-stride buffer, not modelled: low by
    up to ~4 %) and kernels wider than the padded input (oneDNN takes another kernel: this rule is above).
    """
    n, c, h, w, o, kh, kw, oh, ow = call.dims
    dst = n * _ru(o, 8) * oh * ow * 4
    pad = dst - n * o * oh * ow * 4
    depthwise = call.groups == c == o and c > 1
    stem = call.groups == 1 and c < 8 and (kh, kw) != (1, 1)
    src = 0 if stem else n * _ru(c, 8) * h * w * 4
    if depthwise:
        wei = _ru(o, 8) * kh * kw * 4
    else:
        wei = _ru(o, 8) * (c if stem else _ru(c // call.groups, 8)) * kh * kw * 4
    return max(dst, src + wei + pad)


def avx2_conv_modelled(call: ConvCall, cap: CpuCapability) -> bool:
    """The AVX2 rules cover fp32 on oneDNN and bf16/fp16 on the im2col kernel, not oneDNN bf16/fp16."""
    dt = call.inp.dtype
    return (dt == torch.float32 or (dt == torch.bfloat16 and not cap.onednn_bf16)
            or (dt == torch.float16 and not cap.onednn_fp16))


# ------------------------------------------------------------------ rules: PyTorch's im2col kernel (any CPU)
def native_conv(call: ConvCall, cap: CpuCapability) -> int | None:
    """slow_conv2d: the column buffer N x (C k_h k_w) x (H' W'), forward and backward (none for 1x1/s1/p0);
    the depthwise kernels allocate nothing (MobileNet in fp16 on this CPU: within 0.11 %)."""
    n, c, h, w, o, kh, kw, oh, ow = call.dims
    if call.groups == 1:
        return call.cols()
    return 0 if call.groups == c == o else None


# ------------------------------------------------------------------ rules: oneDNN on AVX-512 (16-channel blocking)
_SIMD = 16


def _balance_batch_split(cost: Callable[[int, int, int], float], nthr: int, batch: int, nb_oc: int,
                         nb_ic: int) -> int:
    """oneDNN's balance() search: over thread splits (batch parts x output-channel blocks x input-channel blocks)
    the one with the lowest `cost`, the last one on a tie; returns its number of batch parts (1 when none beats
    the unsplit 1 x 1 x 1)."""
    best, best_mb = cost(1, 1, 1), 1
    for nmb in range(1, min(nthr, batch) + 1):
        par = nthr // nmb
        for noc in range(1, min(par, nb_oc) + 1):
            c_ = cost(nmb, noc, min(par // noc, nb_ic))
            if c_ <= best:
                best, best_mb = c_, nmb
    return best_mb


def fp32_bwd_weights_threads_on_batch(call: ConvCall, nthr: int) -> int:
    """How many threads oneDNN's fp32 backward-weights kernel splits the batch over (each beyond the first needs
    its own fp32 weight-gradient buffer). Its balance(): the thread split (batch x output-channel blocks x
    input-channel blocks) with the lowest per-thread memory traffic, weights weighted 6x (fitted on this CPU);
    1x1 convolutions (a separate kernel): split when the batch has 2048+ output pixels."""
    n, c, h, w, o, kh, kw, oh, ow = call.dims
    if nthr <= 1:
        return 1
    if kh == kw == 1 and all(p == 0 for p in call.padding):
        return min(nthr, n) if n * oh * ow >= 2048 else 1
    nb_ic, nb_oc, s = _du(c, _SIMD), _du(o, _SIMD), call.stride[0]
    iw = w + 2 * call.padding[1]

    def cost(nmb: int, noc: int, nic: int) -> float:
        return (_du(n, nmb) * _du(nb_ic, nic) * _SIMD * h * iw / (s * s)
                + _du(n, nmb) * _du(nb_oc, noc) * _SIMD * oh * ow
                + 6 * _du(nb_oc, noc) * _du(nb_ic, nic) * kh * kw * _SIMD * _SIMD)
    best_mb = _balance_batch_split(cost, nthr, n, nb_oc, nb_ic)
    if nthr / 2 < best_mb < nthr:
        best_mb = min(n, nthr)
    return best_mb


def _onednn_blocked(call: ConvCall, es: int) -> tuple[bool, bool, bool, bool, int, int, int, int, int]:
    """What both oneDNN avx512 convolution rules start from, with `es` bytes an element: whether the conv is
    depthwise, 'flat' (fewer than 16 input channels, not grouped), 1x1 without padding and strided; the blocked
    (channels padded to 16) input and output, the plain output and input, and the plain weights, in bytes."""
    n, c, h, w, o, kh, kw, oh, ow = call.dims
    g = call.groups
    return (g > 1 and g == c == o, c < _SIMD and g == 1, kh == kw == 1 and all(p == 0 for p in call.padding),
            any(s != 1 for s in call.stride), n * _ru(c, _SIMD) * h * w * es, n * _ru(o, _SIMD) * oh * ow * es,
            n * o * oh * ow * es, n * c * h * w * es, o * (c // g) * kh * kw * es)


def avx512_conv_fp32(call: ConvCall, cap: CpuCapability) -> int | None:
    """oneDNN jit:avx512_core fp32 convolution: reorders into 16-channel blocked layouts (channels padded).

    Forward: the input (unless fewer than 16 channels: the 'flat' first-layer kernel reads it as is), the
    weights and a blocked output are alive together, then the blocked output is copied to the returned one;
    a strided 1x1 also copies the strided input per thread. Backward data: blocked grad-output, weights and
    grad-input, then the copy out (a strided conv also zero-fills a grad-input-sized buffer). Backward weights:
    blocked grad-output and input and the blocked weight gradient; with more than one thread, one more weight-
    gradient buffer per thread and oneDNN's reducer (8 KiB).
    """
    if not onednn_measured(call):
        return None
    n, c, h, w, o, kh, kw, oh, ow = call.dims
    es, g, nthr = 4, call.groups, cap.threads
    depthwise, flat, one, strided, src_b, dst_b, out, inp, w_plain = _onednn_blocked(call, es)
    if depthwise:
        w_b = _ru(g, _SIMD) * kh * kw * es
    elif flat:
        w_b = _ru(o, _SIMD) * c * kh * kw * es
    else:
        w_b = _ru(o, _SIMD) * _ru(c, _SIMD) * kh * kw * es
    rtus = nthr * oh * ow * _ru(c, _SIMD) * es + 128 if one and strided else 0
    ev: list[tuple[str, str, int]] = []
    if call.forward:
        ev += [("+", "rtus", rtus)] + ([] if flat else [("+", "src", src_b)])
        ev += [("+", "wei", w_b), ("+", "dst", dst_b), ("-", "wei", 0), ("-", "src", 0), ("-", "rtus", 0),
               ("+", "out", out), ("-", "dst", 0)]
        return peak_above(ev, out)
    outputs = 0
    if call.mask[0]:
        wd = _ru(g, _SIMD) * kh * kw * es if depthwise else _ru(o, _SIMD) * _ru(c, _SIMD) * kh * kw * es
        gi_b = n * _ru(c, _SIMD) * h * w * es
        zero = gi_b if strided and not depthwise else 0
        ev += [("+", "go", dst_b), ("+", "wd", wd), ("+", "gib", gi_b), ("-", "wd", 0), ("-", "go", 0),
               ("+", "gi", inp), ("+", "zero", zero), ("-", "gib", 0), ("-", "zero", 0)]
        outputs += inp
    if call.mask[1]:
        if flat:
            go_w = dst_b if o >= _SIMD or c <= 3 else n * _ru(o, 8) * oh * ow * es
            src_w = 0 if c <= 3 else n * _ru(c, 8) * h * w * es
            gw_b = _ru(o, _SIMD) * c * kh * kw * es
        else:
            go_w, src_w, gw_b = dst_b, src_b, w_b
        red = 0
        mb = fp32_bwd_weights_threads_on_batch(call, nthr) if not depthwise else min(nthr, n)
        if mb > 1:
            red = (mb - 1) * gw_b + (128 if depthwise else 8320)
        ev += [("+", "go2", go_w), ("+", "src2", src_w), ("+", "gwb", gw_b), ("+", "red", red + rtus),
               ("-", "red", 0), ("-", "src2", 0), ("-", "go2", 0), ("+", "gw", w_plain), ("-", "gwb", 0)]
        outputs += w_plain
    return peak_above(ev, outputs)


def bf16_bwd_weights_splits_rows(call: ConvCall, nthr: int, tr_iw: int) -> bool:
    """Whether oneDNN's bf16 backward-weights kernel gives each thread its own rows of the batch (and so its own
    fp32 accumulator and transposition buffers) rather than its own channel blocks. Its balance(): the split
    (image rows x output-channel blocks x input-channel blocks) with the lowest memory cost, source weighted by
    the channel ratio (x4 when the weights outweigh the activations), weights by activations / weights.
    Fitted on this CPU: right for 30 of the 32 measured zoo shapes at 2 threads (LeNet-5's 5x5 conv2 splits
    channels, predicted rows)."""
    if nthr <= 1:
        return False
    n, c, h, w, o, kh, kw, oh, ow = call.dims
    s = call.stride[0]
    flat = c < _SIMD
    nb_ic, nb_oc = _du(c, _SIMD), _du(o, _SIMD)
    icb = c if flat else _SIMD
    cp, op, tr_ow = (c if flat else _ru(c, _SIMD)), _ru(o, _SIMD), _ru(ow, 2)
    src, dst, wei = n * cp * h * tr_iw * 2, n * op * oh * tr_ow * 2, op * cp * kh * kw * 4
    comp = 0.5 * (src + dst) / wei
    ratio = nb_oc / nb_ic
    src_coef = max(1 / ratio, 1.0) * (4.0 if comp < 1 else 1.0)
    dst_coef, wei_coef = max(ratio, 1.0), max(comp, 1.0)
    rows = n * oh

    def cost(nmb: int, noc: int, nic: int) -> float:
        return (src_coef * _du(rows, nmb) * _du(nb_ic, nic) * n * icb * h * tr_iw / rows / s / s
                + dst_coef * _du(rows, nmb) * _du(nb_oc, noc) * n * _SIMD * oh * tr_ow / rows
                + wei_coef * _du(nb_oc, noc) * _du(nb_ic, nic) * kh * kw * icb * _SIMD)
    return _balance_batch_split(cost, nthr, rows, nb_oc, nb_ic) > 1


def avx512_conv_bf16(call: ConvCall, cap: CpuCapability) -> int | None:
    """oneDNN jit_bf16:avx512_core_bf16 convolution: the same reorders as fp32 in bf16 (16-channel blocks).

    Forward as fp32, plus for 1x1 convolutions an fp32 accumulator of one image's output per busy thread (and
    the strided input copy). Backward data as fp32 (a 1x1 adds a per-thread fp32 grad-input accumulator; a
    strided depthwise conv runs as a grouped dense kernel). Backward weights: the blocked tensors plus oneDNN's
    scratchpad: an fp32 weight-gradient accumulator, the input transposed per input-channel block (16 x H x
    tr_iw bf16, tr_iw the padded width rounded to pairs of stride steps) and the grad-output per output-channel
    block (16 x H' x W' bf16), all once per thread when its balance() splits image rows rather than channels
    (bf16_bwd_weights_splits_rows), plus 388 B and 8 KiB buffers. First layers (< 16 channels) whose output
    channels are not a multiple of 16 take oneDNN's gemm-based kernel instead (one image's bf16 columns).
    Exact on most measured shapes; the 1x1 and strided backward-weights terms are fitted (within 10 %).
    """
    if not onednn_measured(call):
        return None
    n, c, h, w, o, kh, kw, oh, ow = call.dims
    es, g, nthr = 2, call.groups, cap.threads
    ph, pw = call.padding
    depthwise, flat, one, strided, src_b, dst_b, out, inp, w_plain = _onednn_blocked(call, es)
    if depthwise:
        w_b = _ru(g, _SIMD) * kh * kw * es
    elif flat:
        w_b = _ru(o, _SIMD) * _ru(c, 2) * kh * kw * es
    else:
        w_b = _ru(o, _SIMD) * _ru(c, _SIMD) * kh * kw * es
    ev: list[tuple[str, str, int]] = []
    if call.forward:
        acc = 0
        if one:
            acc = min(nthr, n) * (_ru(o, _SIMD) * oh * ow * 4 + (_ru(c, _SIMD) * oh * ow * es if strided else 0))
            acc += 128 * (2 if strided else 1)
        ev += [("+", "acc", acc)] + ([] if flat else [("+", "src", src_b)])
        ev += [("+", "wei", w_b), ("+", "dst", dst_b), ("-", "wei", 0), ("-", "src", 0), ("-", "acc", 0),
               ("+", "out", out), ("-", "dst", 0)]
        return peak_above(ev, out)
    outputs = 0
    if call.mask[0]:
        if depthwise:
            wd = g * _SIMD * 2 * kh * kw * es if strided else w_b
        else:
            wd = _ru(o, _SIMD) * _ru(c, _SIMD) * kh * kw * es
        gi_b = n * _ru(c, _SIMD) * h * w * es
        acc = min(nthr, n) * _ru(c, _SIMD) * h * w * 4 + 128 if one and not strided else 0
        zero = gi_b if strided else 0
        ev += [("+", "go", dst_b), ("+", "wd", wd), ("+", "gib", gi_b), ("+", "acc", acc), ("-", "acc", 0),
               ("-", "wd", 0), ("-", "go", 0), ("+", "gi", inp), ("+", "zero", zero), ("-", "gib", 0), ("-", "zero", 0)]
        outputs += inp
    if call.mask[1]:
        w32 = _ru(o, _SIMD) * (c if flat else _ru(c, _SIMD)) * kh * kw * 4
        if flat and o % _SIMD:
            # no JIT bf16 kernel for it: oneDNN's gemm-based backward weights reads the plain grad-output and
            # builds one image's bf16 columns, with fp32 weight-gradient accumulators
            sp = c * kh * kw * oh * ow * es + 4 * o * c * kh * kw * 4 + 384
            ev += [("+", "gw", w_plain), ("+", "sp", sp), ("-", "sp", 0)]
            return peak_above(ev, outputs + w_plain)
        if depthwise:
            w32 = _ru(g, _SIMD) * kh * kw * 4
            sp = max(1, nthr // _du(g, _SIMD)) * w32 + 128
        elif one and not strided:
            hw = oh * ow
            if hw > 64:
                sp = nthr * w32 + (8192 if nthr > 1 else 0) + 128
            else:
                sp = w32 + nthr * 2 * hw * (min(c, 128) + min(o, 256)) + 384
        elif one:
            sp = nthr * (w32 + oh * ow * _ru(c, _SIMD) * es) + 256 + (8192 if nthr > 1 else 0)
        else:
            # transposed input rows (per input-channel block, tr_iw = width with padding, rounded to pairs of
            # stride steps) and grad-output rows (per output-channel block), fp32 weight accumulator
            sw = call.stride[1]
            r_pad = max(0, (ow - 1) * sw + kw - 1 - (w + pw - 1))
            tr_iw = _ru(_du(w + pw + r_pad, sw), 2) * sw
            tr = (0 if flat else _du(c, _SIMD) * _SIMD * h * tr_iw * es) + _du(o, _SIMD) * _SIMD * oh * _ru(ow, 2) * es
            small = 8192 if oh * ow <= 64 * 64 else 0
            split = bf16_bwd_weights_splits_rows(call, nthr, tr_iw)
            copies = nthr if split else 1
            sp = copies * (w32 + tr) + 388 + small + (8192 if nthr > 1 and not split else 0)
        gw_b = w_plain if flat else w_b
        ev += [("+", "go2", dst_b)] + ([] if flat else [("+", "src2", src_b)])
        ev += [("+", "gwb", gw_b), ("+", "sp", sp), ("-", "sp", 0), ("-", "src2", 0), ("-", "go2", 0),
               ("+", "gw", w_plain), ("-", "gwb", 0)]
        outputs += w_plain
    return peak_above(ev, outputs)


# ------------------------------------------------------------------ rules: oneDNN brgemm matmul, AVX512-BF16
def brgemm_bf16_scratchpad(m: int, n: int, k: int, batch: int, a_transposed: bool, nthr: int) -> int:
    """oneDNN's brg_matmul:avx512_core_bf16 scratchpad for a bf16 (batch x) M x K @ K x N problem.

    oneDNN's avx512 blocking heuristic (brgemm_matmul_utils.cpp: the M-block / N-chunk / K-parallel search
    that minimises the thread imbalance), then its per-thread buffers: 16 batch elements of 40 bytes, the
    copied (transposed) A (M_blk x LDA bf16), B repacked for VNNI (64 x rnd_up(K_blk, 32) bf16) and the fp32
    accumulator (M_blk x N_blk, times the N chunks when K spans more than one block; measured also without a
    sum post-op and for K in one block), each booked with 128 bytes of alignment. Measured exact on 500+
    random mm / addmm / bmm shapes (plain and transposed operands) at 1 and 2 threads. The M-block imbalance
    term is the padded rows over the padded M (that is what reproduces the measured choices).
    """
    transposed_a = a_transposed and m != 1
    n_blk = min(64, n)
    use_ext = k > 1024 and not a_transposed and m != 1
    k_blk = min(k, 1024 if use_ext else 512)
    max_m_blk, min_m_blk = min(256, m), min(32, m)
    n_chunks = _du(n, n_blk)
    n_chunks_start = min(16 if transposed_a else 1, n_chunks)
    start_nthr_k = 1
    if nthr > batch * n_chunks:    # low parallel work
        min_m_blk = min(m, 16)
        if batch == 1 and a_transposed and k >= 2048 and (k & (k - 1)) == 0:
            start_nthr_k = min(nthr, 4)

    def disb(work: int, block: int) -> float:
        mod = work % block
        return (block - mod if work < block else min(block - mod, mod)) / block

    best, best_score = None, 1.0
    for nthr_k in range(start_nthr_k, 0, -1):
        cur = nthr // nthr_k
        for n_chunk in range(n_chunks_start, 0, -1):
            for m_blk in range(max_m_blk, min_m_blk - 1, -1):
                work = _du(m, m_blk) * _du(n, n_blk * n_chunk) * batch
                m_pad = m_blk * _du(m, m_blk)
                nb = _du(n, n_blk)
                idle = (nthr - cur * nthr_k) / nthr if cur * nthr_k != nthr else 0.0
                score = (disb(work, cur) + (m_pad % m) / m_pad + (_du(nb, n_chunk) * n_chunk - nb) / nb
                         + idle + disb(k, nthr_k * k_blk)) / 5
                if score < best_score:
                    best, best_score = (m_blk, n_chunk, nthr_k), score
    if best is None:
        return 0
    m_blk, n_chunk, nthr_k = best
    entries = [nthr * 16 * 40]
    if transposed_a:
        lda = _ru(k_blk, 32)
        if lda >= 512 and (lda & (lda - 1)) == 0:
            lda += 32
        entries.append(nthr * 2 * m_blk * lda)
    entries.append(nthr * 2 * 64 * _ru(k_blk, 32))
    ldc = n_blk if nthr_k <= 1 else n
    chunks = 1 if (nthr_k > 1 or k <= k_blk) else n_chunk
    entries.append(nthr * 4 * ldc * (m if nthr_k > 1 else m_blk) * chunks)
    return sum(entries) + 128 * len(entries)


def avx512_bf16_matmul(call: MatmulCall, cap: CpuCapability) -> int:
    """PyTorch's mkldnn_matmul for bf16 mm / addmm / bmm / baddbmm on AVX512-BF16: the brgemm scratchpad.

    A 2-D product with one output column is computed transposed (PyTorch swaps the operands); an operand that
    is neither row-major nor transposed is first copied to a contiguous one (that copy is scratch too).
    """
    a, b = call.a, call.b
    copies = sum(_nbytes(t) for t in (a, b) if _layout(t) == "other")
    a_t = _layout(a) == "transposed"
    b_t = _layout(b) == "transposed"
    if call.batched:
        batch, m, k = (int(v) for v in a.shape[-3:])
        nn = int(b.shape[-1])
        return copies + brgemm_bf16_scratchpad(m, nn, k, batch, a_t, cap.threads)
    m, k = (int(v) for v in a.shape[-2:])
    nn = int(b.shape[-1])
    if nn == 1:
        return copies + brgemm_bf16_scratchpad(1, m, k, 1, b_t, cap.threads)
    return copies + brgemm_bf16_scratchpad(m, nn, k, 1, a_t, cap.threads)


def blas_matmul(call: MatmulCall, cap: CpuCapability) -> int:
    """MKL / PyTorch's own gemm: no allocation the c10 allocator sees (measured on both CPUs)."""
    return 0


# ------------------------------------------------------------------ rules: PyTorch's flash attention (CPU)
def flash_attention(call: AttentionCall, cap: CpuCapability) -> int:
    """_scaled_dot_product_flash_attention_for_cpu: per-thread fp32 blocks (q-split x kv-split).

    Forward: threads x (qS kvS + 2 qS + qS D) fp32, plus threads x qS kvS in the input dtype for bf16/fp16.
    Backward: threads x 2 qS kvS fp32 (+ threads x qS kvS low-precision), qS fp32, and a copy of the output
    gradient when it is not laid out (B, T, H, D). qS = 32 / 64 / 256 for T < 192 / < 768 / more, kvS = 512,
    both capped at the sequence lengths.
    """
    q, k = call.q, call.k
    t_q, t_kv, d = int(q.shape[-2]), int(k.shape[-2]), int(q.shape[-1])
    q_split = 256 if t_q >= 768 else 64 if t_q >= 192 else 32
    qs, kvs = min(q_split, t_q), min(512, t_kv)
    nthr = cap.threads
    low = q.dtype in (torch.bfloat16, torch.float16)
    if call.forward:
        return nthr * (qs * kvs + 2 * qs + qs * d) * 4 + (nthr * qs * kvs * q.element_size() if low else 0)
    go = call.grad_out
    copy = _nbytes(go) if go is not None and go.dim() == 4 and not go.transpose(1, 2).is_contiguous() else 0
    return copy + nthr * 2 * qs * kvs * 4 + (nthr * qs * kvs * q.element_size() if low else 0) + qs * 4


# ------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Rule:
    op: str                          # conv2d | matmul | sdpa
    backend: str                     # onednn | native | blas | aten | any
    dtypes: tuple[str, ...]
    isas: tuple[str, ...]
    fn: Callable[[Any, CpuCapability], int | None]   # None: the call is outside what was measured
    measured: str


_EVERY = ISA_FAMILIES
RULES: tuple[Rule, ...] = (
    Rule("conv2d", "any", ("fp32", "bf16", "fp16"), ("avx2",), avx2_conv,
         "AVX2 CPU without native bf16, torch 2.13, 1 and 2 threads (the original rules)"),
    Rule("conv2d", "native", ("fp32", "bf16", "fp16"), _EVERY, native_conv,
         "PyTorch's slow_conv2d on an AVX512-BF16 CPU (CPU-independent kernel)"),
    Rule("conv2d", "onednn", ("fp32",), ("avx512", "avx512_bf16", "amx"), avx512_conv_fp32,
         "AMD EPYC with AVX512 + AVX512-BF16, torch 2.13, 1 and 2 threads"),
    Rule("conv2d", "onednn", ("bf16",), ("avx512_bf16",), avx512_conv_bf16,
         "AMD EPYC with AVX512 + AVX512-BF16, torch 2.13, 1 and 2 threads"),
    Rule("matmul", "onednn", ("bf16",), ("avx512_bf16",), avx512_bf16_matmul,
         "AMD EPYC with AVX512-BF16: exact on 500+ shapes at 1 and 2 threads"),
    Rule("matmul", "blas", ("fp32", "bf16", "fp16", "fp64"), _EVERY, blas_matmul, "both CPUs"),
    Rule("sdpa", "aten", ("fp32", "bf16", "fp16", "fp64"), _EVERY, flash_attention,
         "PyTorch's CPU flash-attention kernel on an AVX512-BF16 CPU (CPU-independent buffers)"),
)


def find_rule(op: str, backend: str, dtype: str, isa: str, *, exact_backend: bool = False) -> Rule | None:
    """The first RULES row for (op, backend, dtype, ISA family); `exact_backend` skips the 'any' rows."""
    for rule in RULES:
        backend_ok = rule.backend == backend or (rule.backend == "any" and not exact_backend)
        if rule.op == op and backend_ok and dtype in rule.dtypes and isa in rule.isas:
            return rule
    return None


def kernel_scratch(func, args: tuple, cap: CpuCapability) -> tuple[int, Unmodelled | None]:
    """Scratch bytes of one aten call on this CPU, or (0, Unmodelled) when no rule is known for it."""
    parsed = parse_call(func, args)
    if parsed is None:
        return 0, None
    op, call = parsed
    if op == "conv2d":
        inp = call.inp
        if not isinstance(inp, torch.Tensor) or not isinstance(call.weight, torch.Tensor):
            return 0, None
        dtype = dtype_name(inp.dtype)
        kind = "forward" if call.forward else "backward"
        backend = conv_backend(call, cap)
        if inp.dim() != 4 or call.transposed:
            what = "transposed convolution" if call.transposed else f"{inp.dim() - 2}-D convolution"
            return 0, Unmodelled(f"aten.convolution ({kind})", dtype, backend, cap.label,
                                 f"no rule for a {what} (only 2-D, non-transposed ones are modelled)")
        if cap.isa == "avx2" and cap.onednn and not avx2_conv_modelled(call, cap):
            rule = None
        else:
            # with oneDNN switched off every conv is PyTorch's own kernel: the native rule, whatever the CPU
            rule = find_rule("conv2d", backend, dtype, cap.isa, exact_backend=not cap.onednn)
        if rule is None:
            return 0, Unmodelled(f"aten.convolution ({kind})", dtype, backend, cap.label,
                                 f"no measured {backend} convolution rule for {dtype} on {cap.isa}")
        extra = rule.fn(call, cap)
        if extra is None:
            return 0, Unmodelled(f"aten.convolution ({kind})", dtype, backend, cap.label, conv_outside_rule(call))
        return int(extra), None
    if op == "matmul":
        a, b = call.a, call.b
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            return 0, None
        dtype = dtype_name(a.dtype)
        backend = matmul_backend(call, cap)
        rule = find_rule("matmul", backend, dtype, cap.isa)
        if rule is None:
            return 0, Unmodelled(f"aten.{func.__name__.split('.')[0]}", dtype, backend, cap.label,
                                 f"no measured {backend} matmul rule for {dtype} on {cap.isa}")
        return int(rule.fn(call, cap)), None
    if op == "sdpa":
        dtype = dtype_name(call.q.dtype)
        rule = find_rule("sdpa", "aten", dtype, cap.isa)
        if rule is None:
            return 0, Unmodelled("aten._scaled_dot_product_flash_attention_for_cpu", dtype, "aten", cap.label,
                                 f"no rule for {dtype}")
        extra = int(rule.fn(call, cap))
        if not call.forward and dtype in ("bf16", "fp16") and (cap.onednn_bf16 if dtype == "bf16" else cap.onednn_fp16):
            # the backward's inner bf16 GEMMs are oneDNN brgemm ukernels with their own scratch (up to a few
            # hundred KiB per thread); no rule yet
            return extra, Unmodelled("aten._scaled_dot_product_flash_attention_for_cpu_backward (inner brgemm)",
                                     dtype, "onednn", cap.label,
                                     "the flash-attention backward's inner oneDNN brgemm scratch is not modelled")
        return extra, None
    return 0, None
