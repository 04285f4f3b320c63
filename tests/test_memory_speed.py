"""The fast memory estimate keeps every figure: the optimizer priced from its definition (optimizer_cost.py)
against its real step run under a storage tracker, the one-step estimate against the two-step simulation, and the
memoised meta kernels (meta_memo.py) against the kernels themselves."""
from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from netdiet.analysis import memory, scratch
from netdiet.analysis.memory import estimate_memory
from netdiet.analysis.meta_memo import MetaMemo
from netdiet.analysis.optimizer_cost import price_step
from netdiet.models import create_model

torch.set_num_threads(1)


class _Bytes(TorchDispatchMode):
    """An independent storage counter: bytes of every storage an op returns, until the storage dies."""

    def __init__(self, existing):
        super().__init__()
        self.seen, self.current, self.peak = {t.untyped_storage()._cdata for t in existing}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if s._cdata not in self.seen:
                    self.seen.add(s._cdata)
                    self.current += s.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(s, self._free, s._cdata, s.nbytes())
        return out

    def _free(self, key, n):
        self.seen.discard(key)
        self.current -= n


SHAPES = [(3, 5), (7,), (2, 4, 4), (11, 3)]   # 15, 7, 32, 33 elements: the order of sizes matters for Adam
CONFIGS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-decay": lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.1),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "momentum-decay": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "nesterov-decay": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "adam": lambda ps: torch.optim.Adam(ps),
    "adam-decay": lambda ps: torch.optim.Adam(ps, weight_decay=0.1),
    "amsgrad": lambda ps: torch.optim.Adam(ps, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, amsgrad=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_priced_step_equals_the_real_step_on_meta_tensors(name, dtype):
    params = [torch.nn.Parameter(torch.empty(s, dtype=dtype, device="meta")) for s in SHAPES]
    for p in params:
        p.grad = torch.empty_like(p)
    opt = CONFIGS[name](params)
    cost = price_step(opt, params)
    counter = _Bytes(params + [p.grad for p in params])   # already there: not counted
    with counter:
        opt.step()                                   # step 1: makes the state
        first = counter.peak
        state = counter.current
        counter.peak = counter.current
        opt.step()                                   # step 2: the steady state
        steady = counter.peak - counter.current
    assert (cost.first_step_extra, cost.state, cost.transient) == (first, state, steady)


def test_adam_step_by_hand():
    # fp32 parameters of 60, 28, 128 and 132 bytes. State: exp_avg + exp_avg_sq (2 x 348) + a 4-byte float32
    # `step` per parameter = 712. Step: sqrt(v) and sqrt(v)/c of the parameter being updated while the previous
    # parameter's denom is still bound: max(0+2*60, 60+2*28, 28+2*128, 128+2*132) = 392.
    params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in SHAPES]
    for p in params:
        p.grad = torch.empty_like(p)
    cost = price_step(torch.optim.Adam(params), params)
    assert (cost.state, cost.transient, cost.first_step_extra) == (712, 392, 712 + 392)
    assert cost.state_tensors == ("step", "exp_avg", "exp_avg_sq")


def test_what_is_not_priced_says_so():
    params = [torch.nn.Parameter(torch.empty(4, device="meta"))]
    params[0].grad = torch.empty_like(params[0])
    assert price_step(torch.optim.Adam(params, foreach=True), params) is None
    assert price_step(torch.optim.Adam(params, maximize=True), params) is None
    assert price_step(torch.optim.RMSprop(params), params) is None


CASES = [  # (model, kwargs, input, optimizer, settings): each optimizer, fp32 / bf16 / amp, and peaks in every phase
    ("mlp", {}, (32, 784), "adam", {}),                    # peak in the optimizer phase
    ("mlp", {}, (32, 784), "adamw", {"amp": True}),
    ("lenet5", {}, (8, 1, 28, 28), "sgd", {}),
    ("lenet5", {}, (8, 1, 28, 28), "momentum", {"dtype": "bf16"}),
    ("lenet5", {}, (8, 1, 28, 28), "none", {}),
    ("resnet", {}, (2, 3, 32, 32), "adam", {"dtype": "bf16"}),
    ("transformer", {}, (2, 64), "momentum", {"amp": True}),
    ("transformer", {}, (2, 64), "adamw", {"checkpointing": True}),
    ("transformer", {}, (2, 64), "adam", {"dtype": "bf16"}),
    ("mobilenet", {}, (2, 3, 32, 32), "sgd", {"amp": True}),
]


@pytest.mark.parametrize("name, kw, shape, optimizer, settings", CASES)
def test_one_priced_step_gives_the_figures_of_two_simulated_steps(name, kw, shape, optimizer, settings):
    torch.manual_seed(0)
    model = create_model(name, **kw)
    x = torch.randint(0, 1000, shape) if name == "transformer" else torch.randn(shape)
    fast = estimate_memory(model, x, optimizer=optimizer, **settings).to_dict()
    slow = estimate_memory(model, x, optimizer=optimizer, simulate_optimizer=True, **settings).to_dict()
    assert fast.pop("method") and slow.pop("method")
    assert fast == slow
    assert fast["first_step_peak"] <= fast["peak_estimated"]


class _Outputs(TorchDispatchMode):
    """Every op's outputs (shape, strides, dtype, storage bytes and offset), with or without the memo."""

    def __init__(self, memo=None):
        super().__init__()
        self.memo, self.events = memo, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self.memo(func, args, kwargs) if self.memo is not None else func(*args, **kwargs)
        self.events.append((str(func), [(tuple(t.shape), t.stride(), t.dtype, t.untyped_storage().nbytes(),
                                         t.storage_offset()) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]))
        return out


@pytest.mark.parametrize("name, shape", [("resnet", (2, 3, 32, 32)), ("transformer", (2, 64))])
def test_memoised_meta_kernels_return_what_the_kernels_return(name, shape):
    torch.manual_seed(0)
    model = create_model(name).to("meta")
    x = torch.empty(shape, dtype=torch.long if name == "transformer" else torch.float32, device="meta")
    memo = MetaMemo()
    runs = []
    for mode in (_Outputs(), _Outputs(memo), _Outputs(memo)):   # plain, memo filling, memo answering
        with mode:
            out = model(x)
            out.float().pow(2).mean().backward()
        runs.append(mode.events)
        model.zero_grad(set_to_none=True)
    assert runs[0] == runs[1] == runs[2]
    # the repeated blocks (resnet's stages, the transformer's layers) are answered inside the first run already
    assert memo.hits > len(runs[0]) // 2


@pytest.mark.parametrize("name, kw, shape, optimizer, settings", [
    ("resnet", {}, (2, 3, 32, 32), "adam", {}),
    ("mobilenet", {}, (2, 3, 32, 32), "momentum", {"dtype": "bf16"}),
    ("transformer", {}, (2, 64), "adamw", {"amp": True}),
    ("transformer", {}, (2, 64), "sgd", {"checkpointing": True}),
])
def test_the_estimate_with_the_memo_is_the_estimate_without(monkeypatch, name, kw, shape, optimizer, settings):
    torch.manual_seed(0)
    model = create_model(name, **kw)
    x = torch.randint(0, 1000, shape) if name == "transformer" else torch.randn(shape)
    fast = estimate_memory(model, x, optimizer=optimizer, **settings).to_dict()
    monkeypatch.setattr(memory, "META_MEMO", None)
    assert estimate_memory(model, x, optimizer=optimizer, **settings).to_dict() == fast


def test_the_ops_the_tracker_asks_for_scratch_are_every_op_a_rule_reads():
    # the tracker skips scratch.kernel_scratch for ops outside scratch_ops(): that must drop no call parse_call knows
    ids = {id(f) for f in scratch.scratch_ops()}
    seen = []

    class Calls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append((func, args))
            return func(*args, **(kwargs or {}))

    for name, x in (("resnet", torch.empty(2, 3, 32, 32, device="meta")),
                    ("transformer", torch.zeros(2, 64, dtype=torch.long, device="meta"))):
        model = create_model(name).to("meta")
        with Calls():
            out = model(x)
            if name == "transformer":
                q = torch.empty(2, 4, 16, 8, device="meta", requires_grad=True)
                out = out.sum() + torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)[0].sum()
            out.sum().backward()
    recognised = {func for func, args in seen if scratch.parse_call(func, args) is not None}
    assert len(recognised) >= 5 and all(id(f) in ids for f in recognised)   # conv fwd/bwd, addmm, mm, flash...


def test_repeated_layers_run_their_meta_kernels_once(monkeypatch):
    # a transformer of 2 and of 6 layers runs the same distinct calls (embedding, one layer, head, loss and their
    # backward); the 4 extra layers are answered from the memo: the same number of hits each, no extra kernel
    misses = {}
    for layers in (2, 6):
        monkeypatch.setattr(memory, "META_MEMO", MetaMemo())
        estimate_memory(create_model("transformer", layers=layers), torch.randint(0, 1000, (2, 64)))
        misses[layers] = (memory.META_MEMO.misses, memory.META_MEMO.hits)
    assert misses[2][0] == misses[6][0]
    extra = misses[6][1] - misses[2][1]
    assert extra > 0 and extra % 4 == 0
