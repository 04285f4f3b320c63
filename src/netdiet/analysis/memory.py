"""Training and inference memory estimated on the meta device, before any of it is spent.

The estimate runs the real training step (forward, loss, backward, optimizer step, zero_grad) of a copy of the
model whose parameters live on the meta device, so shapes and dtypes are real but no memory is spent. A
`TorchDispatchMode` sees every tensor an operator returns; each new storage is counted when it appears and
uncounted when its Python storage object is finalised (which happens when the C++ storage dies, because
PyTorch keeps the Python object alive as long as the storage lives). Views and in-place results share their
base's storage and so are counted once. Saved-tensor hooks record which storages autograd keeps for
backward and which module was running when it saved them.

The step simulated is netdiet's trainer step (`training/loop.py`): zero_grad(set_to_none) -> forward -> loss ->
backward -> optimizer.step. The forward and backward run once; the optimizer's state and step are priced from its
definition (optimizer_cost.py), so the steady state is derived from that one step (`_simulate` says how). An
optimizer the pricing does not cover runs its real step in two simulated steps (step 1 creates the state, step 2 is
the steady state). During the reported step the tracker keeps a copy of what is alive at each new high
(`peak_breakdown`).
On the meta device each distinct operator call runs its meta kernel once (meta_memo.py): repeated blocks and the
training forward after the inference one get fresh outputs of the recorded metadata, the same storages in the
same order.

When a forward reads tensor values (transformers' masking utilities ask `.item()` whether an attention mask is
all ones), the meta simulation stops (MetaDeviceLimit). For a real model with real inputs the same tracked step
then runs on a real copy, within the caller's bound and the available RAM, and the result says so (`simulation`
"cpu", `simulation_reason`). Fake tensors would stop at the same `.item()`, so they are not tried.

The measurement (measurement.py) runs the same step (step.py) on a real copy of the model and reads the
allocator; the RAM guard is ram.py.

What a CPU kernel allocates and frees inside one op (oneDNN's reorders and scratchpads, im2col columns, the
flash-attention blocks) is invisible at the dispatch level; analysis/scratch.py has those rules, keyed by the
capabilities this machine reports (ISA family, oneDNN bf16/fp16 support, threads, dtype). A kernel without a
rule for this CPU is listed in MemoryEstimate.unmodelled (and `warnings`) instead of being silently 0.

Why this module is long: it is one mechanism — the storage tracker, the saved-tensor log, the meta-device
autocast policy and checkpointing all run inside the same simulated step and read each other's state; the
pieces that stand alone are in step.py (the step), scratch.py (CPU kernel rules), measurement.py and ram.py.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from netdiet.analysis import cpu_attention, optimizer_cost, scratch
from netdiet.analysis.counter import count_ops
from netdiet.analysis.meta_memo import MetaMemo
from netdiet.analysis.meta_values import NOT_HANDLED, MetaValues
from netdiet.analysis.ram import available_ram
from netdiet.analysis.step import (
    STEP_ORDER,
    as_tuple,
    batch_size_of,
    cast_input,
    default_loss,
    dtype_label,
    meta_copy,
    model_device,
    normalise_optimizer,
    parse_dtype,
    real_copy,
    step_optimizer,
    train_step,
)
from netdiet.errors import NetdietError
from netdiet.units import format_bytes


# ------------------------------------------------------------------ result
@dataclass
class MemoryEstimate:
    batch_size: int | None
    optimizer: str
    dtype: str
    amp: bool
    checkpointing: bool
    weights: int
    buffers: int
    gradients: int
    optimizer_state: int
    activations: int          # bytes saved for backward at the end of forward (deduplicated by storage)
    temporaries: int          # transient bytes alive at the peak beyond weights/buffers/inputs/grads/state/activations
    peak_estimated: int       # steady-state training peak (step 2+), bytes
    inference_peak: int       # forward under no_grad in eval mode, bytes
    module_activations: dict[str, int]   # module name -> activation bytes saved for backward attributed to it
    peak_measured: int | None = None     # filled by measure_memory
    inputs: int = 0                      # the input batch (and nothing else) — part of every peak
    peak_phase: str = ""                 # forward | backward | optimizer: where the steady-state peak happens
    phase_peaks: dict[str, int] = field(default_factory=dict)      # steady-state step: peak per phase
    peak_breakdown: dict[str, int] = field(default_factory=dict)   # what is alive at the peak (sums to the peak)
    first_step_peak: int = 0            # step 1 (no optimizer state yet)
    checkpointing_saved: int | None = None   # peak without checkpointing - peak with (only with checkpointing)
    recompute_flops: int | None = None       # extra forward FLOPs the backward spends recomputing (checkpointing)
    recompute_flops_method: str | None = None
    checkpointed_blocks: list[str] = field(default_factory=list)
    step_order: str = STEP_ORDER
    method: str = "meta-device simulation (dispatch-mode storage tracking), optimizer priced from its definition"
    # where the step was simulated: "meta" (nothing allocated), or "cpu" when a value-dependent op stopped the
    # meta simulation and the same tracked step ran on a real copy (`simulation_reason` says which op)
    simulation: str = "meta"
    simulation_reason: str | None = None
    cpu_rules: str = ""                  # the CPU the kernel-scratch rules were chosen for (scratch.probe_cpu)
    # kernels whose in-op scratch has no rule for this CPU / dtype / backend: {op, dtype, backend, capability,
    # reason, calls}; their scratch is counted as 0 bytes, and `warnings` says so
    unmodelled: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class MetaDeviceLimit(NetdietError):
    """The meta simulation stopped: the forward reads a tensor's values (.item(), .tolist(), a data-dependent
    shape) or runs an op without a meta kernel. Not a bad input: a real-tensor step can still be simulated."""


def _is_meta_limit(exc: BaseException) -> bool:
    text = str(exc)
    return (isinstance(exc, NotImplementedError) or "meta tensor" in text or "Cannot copy out of meta" in text
            or "data-dependent" in text.lower() or "data dependent" in text.lower())


# ------------------------------------------------------------------ storage bookkeeping
class _StorageTracker(TorchDispatchMode):
    """Live bytes of every storage an operator creates; freed when the storage dies.

    Storage addresses are reused after a free, so each allocation also gets a serial number (`uid`) and
    everything that classifies storages (saved for backward, gradient, optimizer state) uses uids.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[int, int]] = {}   # storage address -> (uid, nbytes)
        self.current = 0
        self.peak = 0
        self._next_uid = 0
        self.snapshot_on = False                # while on, keep a copy of the live set at every new high
        self.snapshot: dict[int, int] | None = None
        self.snapshot_total = -1
        # bytes a kernel allocates and frees inside one op (invisible at the dispatch level): see _CpuScratch
        self.workspace_fn: Callable[[Any, tuple], int] | None = None
        # where storages were created, for peak_breakdown: uid -> "backward" | "optimizer" | "recomputed"
        self.phase: str | None = None
        self.origin: dict[int, str] = {}
        self.memo: MetaMemo | None = None       # meta kernels run once per distinct call (meta_memo.py)
        self.values: MetaValues | None = None   # real twins of small meta tensors, for .item() (meta_values.py)

    def register(self, t: torch.Tensor) -> int | None:
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None
        key = s._cdata
        hit = self.live.get(key)
        if hit is not None:
            return hit[0]
        n = s.nbytes()
        uid = self._next_uid
        self._next_uid += 1
        self.live[key] = (uid, n)
        self.current += n
        if _RECOMPUTING[0] and self.phase == "backward":
            self.origin[uid] = "recomputed"
        elif self.phase in ("backward", "optimizer"):
            self.origin[uid] = self.phase
        weakref.finalize(s, self._free, key, uid)
        if self.current > self.peak:
            self.peak = self.current
        if self.snapshot_on and self.current > self.snapshot_total:
            self.take_snapshot(self.current)
        return uid

    def take_snapshot(self, total: int, workspace: int = 0) -> None:
        self.snapshot_total = total
        self.snapshot = dict(self.live.values())
        if workspace:
            self.snapshot[-1] = workspace   # uid -1: a kernel's own workspace (a temporary)

    def uids(self, tensors: Iterable[Any]) -> dict[int, int]:
        """uid -> nbytes of the (tracked) storages of `tensors`, each storage once."""
        out: dict[int, int] = {}
        for t in tensors:
            if isinstance(t, torch.Tensor):
                try:
                    hit = self.live.get(t.untyped_storage()._cdata)
                except (RuntimeError, NotImplementedError):
                    hit = None
                if hit is not None:
                    out[hit[0]] = hit[1]
        return out

    def _free(self, key: int, uid: int) -> None:
        hit = self.live.get(key)
        if hit is not None and hit[0] == uid:
            del self.live[key]
            self.current -= hit[1]

    def reset_peak(self) -> None:
        self.peak = self.current

    def _run(self, func, args: tuple, kwargs: dict) -> Any:
        return func(*args, **kwargs) if self.memo is None else self.memo(func, args, kwargs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self._run(func, args, kwargs) if self.values is None else self.values(func, args, kwargs, self._run)
        if type(out) is torch.Tensor:
            self.register(out)
        else:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.register(t)
        if self.workspace_fn is not None:
            extra = self.workspace_fn(func, args)
            if extra and self.current + extra > self.peak:
                self.peak = self.current + extra
            if self.snapshot_on and self.current + extra > self.snapshot_total:
                self.take_snapshot(self.current + extra, extra)
        return out


# shared by every meta simulation of the process: a meta kernel's result depends on nothing but the call
META_MEMO = MetaMemo()


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class _CpuScratch:
    """The tracker's workspace_fn on CPU: kernel scratch from netdiet.analysis.scratch's rules for this machine.

    Calls whose (op, dtype, backend, CPU) has no rule count 0 bytes and are collected in `unmodelled`
    (one entry per combination, with the number of calls), so the estimate says what it could not model.
    """

    def __init__(self, cap: scratch.CpuCapability) -> None:
        self.cap = cap
        self.unmodelled: dict[scratch.Unmodelled, int] = {}
        self.counting = True   # off while a step that is not reported runs (step 1 of a two-step simulation)
        self.ops = {id(f) for f in scratch.scratch_ops()}   # the only ops with a rule (or a missing one)

    def __call__(self, func, args: tuple) -> int:
        if id(func) not in self.ops:
            return 0
        extra, missing = scratch.kernel_scratch(func, args, self.cap)
        if missing is not None and self.counting:
            self.unmodelled[missing] = self.unmodelled.get(missing, 0) + 1
        return extra

    def entries(self) -> list[dict]:
        ordered = sorted(self.unmodelled.items(), key=lambda kv: (kv[0].op, kv[0].dtype))
        return [{**asdict(u), "calls": n} for u, n in ordered]


# parts of peak_breakdown beside weights/buffers/inputs/optimizer_state/gradients/activations/outputs
_TRANSIENT_PARTS = ["backward_buffers", "recomputed", "workspace", "optimizer_temporaries", "temporaries"]


class _ModuleStack:
    """Which module is running: forward pre/post hooks on every submodule of the (copied) model."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[str] = []
        self.handles = []
        for name, mod in model.named_modules():
            self.handles.append(mod.register_forward_pre_hook(self._enter(name)))
            self.handles.append(mod.register_forward_hook(self._exit, always_call=True))

    def _enter(self, name: str):
        def hook(_mod, _args):
            self.stack.append(name)
        return hook

    def _exit(self, _mod, _args, _out):
        if self.stack:
            self.stack.pop()

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else "(outside the model)"

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _SavedTensorLog:
    """Saved-tensor hooks: the storages autograd keeps for backward, and the module that saved each first."""

    def __init__(self, modules: _ModuleStack, tracker: _StorageTracker) -> None:
        self.modules = modules
        self.tracker = tracker
        self.saved: dict[int, tuple[str, int]] = {}   # uid -> (module, nbytes)

    def clear(self) -> None:
        self.saved = {}

    def pack(self, t: torch.Tensor):
        uid = self.tracker.register(t)
        if uid is not None and uid not in self.saved:
            self.saved[uid] = (self.modules.current, self.tracker.live[t.untyped_storage()._cdata][1])
        # A detached alias: same storage, no grad_fn, so no reference cycle through the graph.
        return t.detach()

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def alive(self) -> dict[int, tuple[str, int]]:
        live = {uid for uid, _ in self.tracker.live.values()}
        return {uid: v for uid, v in self.saved.items() if uid in live}

    def context(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


# ------------------------------------------------------------------ autocast on the meta device
# torch.autocast does not act on meta tensors, so the estimate applies autocast's CPU casting policy itself,
# above autograd (a TorchFunctionMode), exactly where autocast casts: matmul-like ops run in the low-precision
# dtype (casts of parameters are cached for the region, as autocast caches them), losses in fp32.
_LOWP_FUNCS = {
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm", "scaled_dot_product_attention", "prelu", "conv_tbc",
    "__matmul__", "__rmatmul__", "einsum",
}
_FP32_FUNCS = {
    "cross_entropy", "cross_entropy_loss", "nll_loss", "nll_loss2d", "mse_loss", "l1_loss", "smooth_l1_loss",
    "huber_loss", "kl_div", "binary_cross_entropy", "binary_cross_entropy_with_logits", "soft_margin_loss",
    "multi_margin_loss", "multilabel_margin_loss", "poisson_nll_loss", "hinge_embedding_loss",
    "cosine_embedding_loss", "margin_ranking_loss", "triplet_margin_loss", "ctc_loss",
}


class _MetaPolicy(torch.overrides.TorchFunctionMode):
    """What the real device would do that the meta device does not: autocast, and the CPU attention kernel.

    On meta, scaled_dot_product_attention falls back to the math path (it materialises the T x T attention
    matrix); on CPU PyTorch picks its flash kernel where the call qualifies, which saves only the output and the
    log-sum-exp. cpu_attention.py asks PyTorch's own chooser and runs that kernel's op where it would.
    """

    def __init__(self, target: torch.device, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.amp_on = False   # set by `amp()` around the forward (and around checkpoint recomputes)
        self.target = target
        self.dtype = dtype
        self.cache: dict[int, torch.Tensor] = {}
        self.values: MetaValues | None = None   # the tracker's real twins: tolist() and torch.tensor on meta

    @contextlib.contextmanager
    def amp(self, on: bool):
        """An autocast region: parameter casts are cached inside it and dropped at its end, as autocast does."""
        prev, prev_cache = self.amp_on, self.cache
        self.amp_on, self.cache = bool(on), {}
        try:
            yield
        finally:
            self.amp_on, self.cache = prev, prev_cache

    def __enter__(self):
        _ACTIVE_POLICY.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE_POLICY.remove(self)
        return super().__exit__(*exc)

    def _cast(self, x: Any, to: torch.dtype, cache: bool) -> Any:
        if isinstance(x, (list, tuple)):
            return type(x)(self._cast(v, to, cache) for v in x)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == to or x.dtype == torch.float64:
            return x
        if cache and x.is_leaf and x.requires_grad:
            hit = self.cache.get(id(x))
            if hit is None:
                hit = self.cache[id(x)] = x.to(to)
            return hit
        return x.to(to)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.values is not None:   # tolist() and torch.tensor(device="meta") dispatch no operator
            answer = self.values.function(func, args, kwargs)
            if answer is not NOT_HANDLED:
                return answer
        name = getattr(func, "__name__", "")
        if self.amp_on and name in _LOWP_FUNCS:
            args = self._cast(args, self.dtype, True)
            kwargs = {k: self._cast(v, self.dtype, True) for k, v in kwargs.items()}
        elif self.amp_on and name in _FP32_FUNCS:
            args = self._cast(args, torch.float32, False)
            kwargs = {k: self._cast(v, torch.float32, False) for k, v in kwargs.items()}
        if name == "scaled_dot_product_attention":
            routed = (_cuda_efficient_attention(*args, **kwargs) if self.target.type == "cuda"
                      else cpu_attention.on_meta(*args, **kwargs)[1])
            if routed is not None:
                return routed
        return func(*args, **kwargs)



_ACTIVE_POLICY: list[_MetaPolicy] = []
_RECOMPUTING = [0]   # > 0 while a checkpointed forward is being recomputed inside backward (estimate only)


def _cuda_efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False):
    """For a CUDA model: the fused kernels (flash / memory-efficient) keep the output and the log-sum-exp, not the
    T x T matrix; the memory-efficient op has meta support, so it stands in for both (not verified on a GPU here)."""
    ok = (query.dim() == 4 and key.dim() == 4 and value.dim() == 4 and not enable_gqa
          and query.dtype in (torch.float32, torch.bfloat16, torch.float16) and query.dtype == key.dtype == value.dtype)
    if not ok:
        return None
    kw = {"scale": scale} if scale is not None else {}
    need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, need_lse, float(dropout_p), bool(is_causal), **kw)[0]


# ------------------------------------------------------------------ activation checkpointing
def _run_checkpointed(fn: Callable, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint
    policy = _ACTIVE_POLICY[-1] if _ACTIVE_POLICY else None
    if policy is not None:
        # Real checkpointing re-enters the forward's autocast state when it recomputes; do the same for
        # the meta-device autocast emulation.
        inner, amp_on = fn, policy.amp_on

        def fn(*a, **k):
            from torch.overrides import _get_current_function_mode_stack
            # The recompute runs inside backward, where function modes entered around the step are not active.
            active = policy in _get_current_function_mode_stack()
            _RECOMPUTING[0] += 0 if active else 1
            try:
                with (contextlib.nullcontext() if active else policy), policy.amp(amp_on):
                    return inner(*a, **k)
            finally:
                _RECOMPUTING[0] -= 0 if active else 1
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def apply_checkpointing(model: nn.Module) -> list[str]:
    """Checkpoint the top-level sequential blocks of `model` in place; returns the checkpointed names.

    The top-level Sequentials are the model itself and its direct children. A Sequential of composite
    blocks (ResNet stages, transformer blocks) is checkpointed block by block; a Sequential of single layers
    (an MLP) in ceil(sqrt(n)) segments, Chen et al.'s choice. Module names are unchanged.
    """
    candidates = [("", model)] if isinstance(model, nn.Sequential) else []
    candidates += [(n, m) for n, m in model.named_children() if isinstance(m, nn.Sequential)]
    done: list[str] = []
    for prefix, seq in candidates:
        children = list(seq.named_children())
        if len(children) < 2:
            continue
        if all(len(list(c.children())) > 0 for _, c in children):
            for name, child in children:
                original = child.forward
                child.forward = (lambda f: lambda *a, **k: _run_checkpointed(f, *a, **k))(original)
                done.append(f"{prefix}.{name}" if prefix else name)
        else:
            n = len(children)
            size = max(1, math.ceil(n / math.ceil(math.sqrt(n))))
            groups = [children[i:i + size] for i in range(0, n, size)]

            def seq_forward(x, _groups=groups):
                for group in _groups:
                    def run(inp, _g=group):
                        for _, layer in _g:
                            inp = layer(inp)
                        return inp
                    x = _run_checkpointed(run, x)
                return x
            seq.forward = seq_forward
            for group in groups:
                names = [f"{prefix}.{nm}" if prefix else nm for nm, _ in group]
                done.append(names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}")
    if not done:
        raise NetdietError("--checkpointing found no top-level nn.Sequential with 2+ blocks in this model; "
                           "it applies to models built from sequential blocks")
    return done


# ------------------------------------------------------------------ model copies
_COPY_PURPOSE = "to estimate its memory"   # the one-line error for a model that cannot be copied


def estimate_memory(model: nn.Module, inputs: Any, *, optimizer: str = "adam", dtype: str | torch.dtype | None = None,
                    amp: bool = False, checkpointing: bool = False,
                    loss_fn: Callable[[Any], torch.Tensor] | None = None,
                    real_step_bytes: int | None = None, simulate_optimizer: bool = False) -> MemoryEstimate:
    """Training and inference memory of `model` on `inputs`, predicted without allocating any of it.

    When the meta simulation stops at a value-dependent op (transformers' masking utilities ask whether an
    attention mask is all ones with .item()), the same tracked step runs on a real copy of the model with the
    real inputs, so the op sees real values and decides as a real run does. That needs a real model and real
    inputs, and `real_step_bytes` (the caller's upper bound of what the step allocates) within the available
    RAM; otherwise the MetaDeviceLimit stands. `simulation` / `simulation_reason` record which path ran.

    The optimizer's state and step are priced from its definition (optimizer_cost.py) and one step is simulated;
    `simulate_optimizer` runs the optimizer's own step instead, in two simulated steps (the check of the pricing).
    """
    opt_name = normalise_optimizer(optimizer)
    dt = parse_dtype(dtype)
    inputs = as_tuple(inputs)
    loss_fn = loss_fn or default_loss
    fallback: list[str] = []   # the reason, once the meta simulation has stopped

    def simulate(ckpt: bool) -> MemoryEstimate:
        if not fallback:
            try:
                return _simulate(model, inputs, opt_name, dt, amp, ckpt, loss_fn, real=False,
                                 price_optimizer=not simulate_optimizer)
            except MetaDeviceLimit as exc:
                _check_real_step(model, inputs, real_step_bytes, exc)
                fallback.append(str(exc))
        with torch.random.fork_rng(devices=[]):  # the real step's dropout must not move the caller's RNG
            est = _simulate(model, inputs, opt_name, dt, amp, ckpt, loss_fn, real=True,
                            price_optimizer=not simulate_optimizer)
        est.simulation = model_device(model).type
        est.method = (f"real-tensor step on {est.simulation} under the same storage tracker (the meta-device "
                      "simulation stopped at a value-dependent op)")
        est.simulation_reason = fallback[0]
        return est

    result = simulate(checkpointing)
    if checkpointing:
        plain = simulate(False)
        result.checkpointing_saved = plain.peak_estimated - result.peak_estimated
        flops, method = _recompute_flops(model, inputs, opt_name, dt, amp, loss_fn)
        result.recompute_flops, result.recompute_flops_method = flops, method
    return result


def _check_real_step(model: nn.Module, inputs: tuple[torch.Tensor, ...], bound: int | None,
                     exc: MetaDeviceLimit) -> None:
    """Raise `exc` (with why) unless a real-tensor step can replace the meta simulation within the RAM."""
    if model_device(model).type == "meta" or any(t.device.type == "meta" for t in inputs):
        raise MetaDeviceLimit(f"{exc}; the model or its inputs are on the meta device, so no real-tensor step "
                              "can stand in (profile a real model: a spec under 1 GiB of weights, or --measure)")
    if bound is None:
        raise exc
    avail = available_ram()
    if avail is not None and bound > avail:
        raise MetaDeviceLimit(f"{exc}; the real-tensor step that would stand in needs up to {format_bytes(bound)} "
                              f"but only {format_bytes(avail)} of RAM is available; use a smaller batch or input")


def _simulate(model, inputs, opt_name, dt, amp, checkpointing, loss_fn, real: bool = False,
              price_optimizer: bool = True) -> MemoryEstimate:
    """One tracked simulation: on a meta copy (nothing allocated), or with `real` on a real copy of the model and
    the real inputs (the variable keeps the name `meta` for the copy either way).

    With `price_optimizer` (and an optimizer optimizer_cost prices), one step runs without the optimizer: it is
    step 1's forward and backward; the steady state adds the priced state to both (neither touches it) and the
    optimizer phase is what is alive when the step starts plus the priced state and transients. Otherwise two
    steps run, the optimizer's own step included: step 1 creates the state, step 2 is the steady state."""
    target = model_device(model)
    meta = real_copy(model, dt) if real else meta_copy(model, dt, _COPY_PURPOSE)
    x = tuple(cast_input(t, dt, target if real else "meta") for t in inputs)
    blocks = apply_checkpointing(meta) if checkpointing else []
    policy = _MetaPolicy(target)
    amp_ctx = lambda: policy.amp(amp)  # noqa: E731

    params = list(dict.fromkeys(meta.parameters()))
    buffers = list(dict.fromkeys(meta.buffers()))
    tr = _StorageTracker()
    if not real:
        tr.memo = META_MEMO
        # the real inputs' and buffers' values, for a forward that asks one (.item() on a mask, position ids)
        tr.values = MetaValues()
        tr.values.seed_model(meta, model)
        for m, t in zip(x, inputs):
            tr.values.seed_input(m, t)
        policy.values = tr.values
    cpu_scratch = None
    if target.type in ("cpu", "meta"):
        cpu_scratch = _CpuScratch(scratch.probe_cpu())
        tr.workspace_fn = cpu_scratch
    for group in (params, buffers, x):
        for t in group:
            tr.register(t)
    weight_uids = tr.uids(params)
    buffer_uids = {u: n for u, n in tr.uids(buffers).items() if u not in weight_uids}
    input_uids = {u: n for u, n in tr.uids(x).items() if u not in weight_uids and u not in buffer_uids}
    base_uids = set(weight_uids) | set(buffer_uids) | set(input_uids)
    tr.reset_peak()

    # Inference: eval mode, no autograd, one forward; the output stays alive until the end (it is the result).
    meta.eval()
    try:
        with tr, policy, torch.no_grad(), amp_ctx():
            out = meta(*x)
        inference_peak = tr.peak
        del out
    except NetdietError:
        raise
    except Exception as exc:
        if not real and _is_meta_limit(exc):
            raise MetaDeviceLimit(f"the meta-device simulation stopped in the forward at a value-dependent op "
                                  f"({type(exc).__name__}: {_first_line(exc)})") from exc
        raise NetdietError(f"the model's forward failed on inputs {[tuple(t.shape) for t in inputs]} "
                           f"({type(exc).__name__}: {exc}); give inputs the model accepts") from None
    meta.train()
    tr.reset_peak()

    trainable = [p for p in params if p.requires_grad]
    opt = step_optimizer(opt_name, trainable)
    modules = _ModuleStack(meta)
    saved = _SavedTensorLog(modules, tr)
    state: dict[str, Any] = {}
    cost: list[optimizer_cost.StepCost | None] = [None]

    def marks(phase: str) -> None:
        prev = state.get("phase")
        if prev is not None:
            state["peaks"][prev] = tr.peak
        if phase == "backward":
            state["saved"] = saved.alive()
        if phase == "optimizer":
            state["grads"] = tr.uids(p.grad for p in trainable if p.grad is not None)
            if steps == 1:   # what the priced optimizer phase starts from
                cost[0] = optimizer_cost.price_step(opt, [p for p in trainable if p.grad is not None])
                state["opt_live"] = dict(tr.live.values())
        state["phase"] = phase
        tr.phase = phase
        tr.reset_peak()

    def on_output(out: Any, loss: Any) -> None:
        state["outputs"] = tr.uids(tree_leaves((out, loss)))

    # one step when the optimizer is priced (or absent); otherwise step 1 makes the state and step 2 is steady
    steps = 1 if price_optimizer and optimizer_cost.priceable(opt) else 2
    per_step: list[dict[str, Any]] = []
    try:
        with tr, policy:
            for step in range(steps):
                saved.clear()
                state.clear()
                state["peaks"] = {}
                if cpu_scratch is not None:   # unmodelled kernels: the calls of the inference and one step
                    cpu_scratch.counting = step == steps - 1
                if step == steps - 1:
                    tr.snapshot_on = True
                    tr.take_snapshot(tr.current)
                with saved.context():
                    train_step(meta, x, opt if steps == 2 else None, amp_ctx, loss_fn, marks, on_output)
                tr.snapshot_on = False
                tr.phase = None
                per_step.append({"peaks": {k: v for k, v in state["peaks"].items() if k != "end"},
                                 "saved": state.get("saved", {}), "saved_all": dict(saved.saved),
                                 "grads": state.get("grads", {}), "outputs": state.get("outputs", {}),
                                 "snapshot": tr.snapshot, "snapshot_total": tr.snapshot_total})
    except NetdietError:
        raise
    except Exception as exc:
        if not real and _is_meta_limit(exc):
            raise MetaDeviceLimit(f"the meta-device simulation stopped in the training step at a value-dependent "
                                  f"op ({type(exc).__name__}: {_first_line(exc)})") from exc
        raise NetdietError(f"simulating a training step failed ({type(exc).__name__}: {exc}); "
                           "check the inputs fit the model (or pass a loss_fn for this output)") from None
    finally:
        modules.remove()

    steady = per_step[-1]
    peaks = steady["peaks"]
    first_step_peak = max(per_step[0]["peaks"].values())
    snapshot, snapshot_total = steady["snapshot"], steady["snapshot_total"]
    state_uids: dict[int, int] = {}
    if steps == 1:
        if cost[0] is None:   # a gradient the pricing does not cover (sparse): simulate the optimizer's step
            return _simulate(model, inputs, opt_name, dt, amp, checkpointing, loss_fn, real, price_optimizer=False)
        peaks, first_step_peak, snapshot, snapshot_total = optimizer_cost.steady_state(
            peaks, cost[0], snapshot, snapshot_total, state["opt_live"])
        state_uids = {optimizer_cost.STATE_UID: cost[0].state}
        tr.origin[optimizer_cost.STEP_TEMPORARIES_UID] = "optimizer"
    elif opt is not None:
        state_uids = {u: n for u, n in tr.uids(v for st in opt.state.values() for v in st.values()).items()
                      if u not in base_uids}
    peak = max(peaks.values())
    peak_phase = max(peaks, key=lambda k: peaks[k])
    acts = {u: v for u, v in steady["saved"].items() if u not in base_uids}
    activations = sum(n for _, n in acts.values())
    module_acts: dict[str, int] = {}
    for owner, n in acts.values():
        module_acts[owner] = module_acts.get(owner, 0) + n

    state_bytes = sum(state_uids.values())
    gradients = sum(steady["grads"].values())
    weights, buffer_bytes, input_bytes = (sum(d.values()) for d in (weight_uids, buffer_uids, input_uids))

    breakdown: dict[str, int] = {}
    if snapshot is not None and snapshot_total == peak:
        parts = {"weights": weight_uids, "buffers": buffer_uids, "inputs": input_uids, "optimizer_state": state_uids,
                 "gradients": steady["grads"], "activations": steady["saved_all"], "outputs": steady["outputs"]}
        by_origin = {"backward": "backward_buffers", "recomputed": "recomputed", "optimizer": "optimizer_temporaries"}
        breakdown = {k: 0 for k in list(parts) + _TRANSIENT_PARTS}
        for uid, n in snapshot.items():
            part = next((name for name, uids in parts.items() if uid in uids), None)
            if part is None:
                part = "workspace" if uid == -1 else by_origin.get(tr.origin.get(uid, ""), "temporaries")
            breakdown[part] += n
    if "temporaries" in breakdown:
        # the field keeps its meaning: everything at the peak that is none of the long-lived parts
        temporaries = sum(breakdown[k] for k in ["outputs"] + _TRANSIENT_PARTS)
    else:
        temporaries = max(0, peak - weights - buffer_bytes - input_bytes - state_bytes - activations - gradients)

    return MemoryEstimate(
        batch_size=batch_size_of(inputs), optimizer=opt_name, dtype=dtype_label(model, dt), amp=bool(amp),
        checkpointing=bool(checkpointing), weights=weights, buffers=buffer_bytes, gradients=gradients,
        optimizer_state=state_bytes, activations=activations, temporaries=int(temporaries), peak_estimated=peak,
        inference_peak=inference_peak, module_activations=dict(sorted(module_acts.items(), key=lambda kv: -kv[1])),
        inputs=input_bytes, peak_phase=peak_phase, phase_peaks=peaks, peak_breakdown=breakdown,
        first_step_peak=first_step_peak, checkpointed_blocks=blocks,
        method=MemoryEstimate.method if steps == 1 else
        "meta-device simulation (dispatch-mode storage tracking), the optimizer's own step simulated (two steps)",
        cpu_rules=cpu_scratch.cap.label if cpu_scratch is not None else "",
        unmodelled=cpu_scratch.entries() if cpu_scratch is not None else [],
        warnings=_unmodelled_warnings(cpu_scratch),
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _unmodelled_warnings(cpu_scratch: _CpuScratch | None) -> list[str]:
    if cpu_scratch is None or not cpu_scratch.unmodelled:
        return []
    kinds = sorted({f"{u.op} {u.dtype} on {u.backend}" for u in cpu_scratch.unmodelled})
    return [f"{len(kinds)} kernel kind(s) have no scratch rule for this CPU ({cpu_scratch.cap.label}): "
            f"{'; '.join(kinds)}. Their in-kernel scratch is counted as 0 bytes, so the peak may be low; "
            "measure it (--measure) and see netdiet/analysis/scratch.py for how to add the rule."]


def _recompute_flops(model, inputs, opt_name, dt, amp, loss_fn) -> tuple[int | None, str | None]:
    """FLOPs the backward spends recomputing checkpointed forwards: count_ops' backward FLOPs with minus without.

    count_ops routes meta-device attention to the CPU flash op in the recompute too, so the figure is the one a
    CPU run gives (FLOPs do not depend on the dtype, so amp/bf16 runs are counted in the copies' dtype). Only the
    ops up to the last tensor backward needs are recomputed (torch.utils.checkpoint's early stop).
    """

    x = tuple(cast_input(t, dt, "meta") for t in inputs)
    try:
        plain, ckpt = meta_copy(model, dt, _COPY_PURPOSE), meta_copy(model, dt, _COPY_PURPOSE)
        apply_checkpointing(ckpt)
        extra = count_ops(ckpt, x, train=True).backward_flops - count_ops(plain, x, train=True).backward_flops
    except NetdietError:   # the figure is an extra; the memory estimate stands without it
        return None, None
    return int(extra), "netdiet.analysis.counter.count_ops: backward FLOPs with checkpointing minus without"


