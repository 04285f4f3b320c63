"""A meta-device run that reads values (meta_values.py) and attention as the CPU runs it (cpu_attention.py): the
count and the memory estimate of a forward that asks `.item()` of its inputs, of transformers' masking code, and of
every scaled_dot_product_attention the CPU takes another kernel for, stay on meta and equal the real tensors.

Each meta figure is checked against the slow way it replaces: count_ops(meta=False) on the real tensors, and the
memory simulation's real-tensor step (the same tracked step on a real copy, `_simulate(real=True)`). Where a value
is written out by hand it says so.
"""
from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from netdiet.analysis import cpu_attention, memory
from netdiet.analysis.counter import count_ops
from netdiet.analysis.memory import estimate_memory
from netdiet.analysis.meta_values import MetaValues
from netdiet.analysis.passes import count_step
from netdiet.analysis.step import default_loss

torch.set_num_threads(1)


class _Values(TorchDispatchMode):
    """The smallest dispatch mode that keeps real twins (what the counter and the memory tracker do)."""

    def __init__(self, values: MetaValues) -> None:
        super().__init__()
        self.values = values

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.values(func, args, kwargs or {}, lambda f, a, k: f(*a, **k))


# ------------------------------------------------------------------ the twins themselves
def test_position_ids_made_on_meta_answer_transformers_packed_sequence_question():
    # transformers' find_packed_sequence_indices: one sequence per row when the diff of the positions is all 1
    values = MetaValues()
    with _Values(values):
        pos = torch.arange(8, device="meta").unsqueeze(0).expand(3, -1)
        diff = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1)
        packed = (diff != 1).cumsum(-1)
        one_per_row = bool((packed[:, -1] == 0).all())
        # three packed sequences: positions 0 1 2 0 1 0 1 2
        starts = torch.cat([torch.arange(n, device="meta") for n in (3, 2, 3)]).unsqueeze(0)
        many = (torch.diff(starts, prepend=starts[:, :1] - 1, dim=-1) != 1).cumsum(-1)[:, -1].item()
    assert one_per_row is True and many == 2 and values.answered == 2
    assert packed.device.type == "meta"


def test_seeded_inputs_answer_value_questions_and_are_never_written():
    values = MetaValues()
    real = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    meta = torch.empty(2, 4, dtype=torch.long, device="meta")
    values.seed(meta, real)
    with _Values(values):
        assert not bool(meta.all())
        lengths = meta.sum(-1)
        assert lengths.device.type == "meta"
        assert lengths[0].item() == 3 and lengths[1].item() == 2
        meta.add_(1)                                   # the twin is a clone: the caller's tensor is untouched
        assert meta.sum().item() == 5 + 8
        kept = torch.nonzero(meta > 1)                 # a data-dependent shape: five positions hold a 2
        assert kept.device.type == "meta" and tuple(kept.shape) == (5, 2)
        assert torch.equal(meta, meta)                 # aten.equal has no meta kernel: the twins answer
    assert real.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]


def test_random_values_and_writes_without_twins_drop_every_alias():
    values = MetaValues()
    unknown = torch.empty(4, device="meta")            # made outside: no twin
    with _Values(values):
        noise = torch.rand(4, device="meta")           # random: never run on a twin
        with pytest.raises(RuntimeError, match="meta"):
            noise.sum().item()
        base = torch.zeros(2, 4, device="meta")
        view = base[0]
        assert base.sum().item() == 0
        view[:2].copy_(unknown[:2])                    # a write from a tensor with no twin
        for t in (base, view, base[1]):                # the base, the view and a new view: no stale value
            with pytest.raises(RuntimeError, match="meta"):
                t.sum().item()


def test_a_pass_makes_no_more_twins_than_its_budget():
    values = MetaValues(budget=4 * 8 + 8)   # an int64 arange of 4 (32 B) and its sum (8 B)
    with _Values(values):
        first = torch.arange(4, device="meta")
        assert first.sum().item() == 6
        second = torch.arange(4, device="meta")   # the budget is spent: no twin
        with pytest.raises(RuntimeError, match="meta"):
            second.sum().item()


def test_a_tensor_over_the_limit_gets_no_twin():
    values = MetaValues(limit=4)
    with _Values(values):
        small = torch.arange(4, device="meta")
        big = torch.arange(5, device="meta")
        assert small.sum().item() == 6               # 0 + 1 + 2 + 3
        with pytest.raises(RuntimeError, match="meta"):
            big.sum().item()


# ------------------------------------------------------------------ the counter and the memory estimate
class _KeepsRows(nn.Module):
    """Keeps the rows whose first input is positive, and reads how many there are: a forward that asks its
    inputs' values twice (a boolean index, nonzero, and .item())."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        kept = x[x[:, 0] > 0]
        n = int((x[:, 0] > 0).sum().item())
        return self.fc(kept) * n


def _real_memory(model, x) -> dict:
    """The memory simulation's real-tensor step on a real copy: the figures the meta run must give."""
    with torch.random.fork_rng(devices=[]):
        est = memory._simulate(model, memory.as_tuple(x), "adam", None, False, False, default_loss, real=True)
    return _figures(est)


def _figures(est) -> dict:
    doc = asdict(est)
    for k in ("simulation", "simulation_reason", "method"):
        doc.pop(k, None)
    return doc


def test_a_forward_reading_its_inputs_values_is_counted_and_simulated_on_meta(counted_on):
    torch.manual_seed(0)
    model = _KeepsRows()
    x = torch.tensor([[1.0, 0, 0, 0], [-1, 0, 0, 0], [2, 0, 0, 0], [3, 0, 0, 0], [-2, 0, 0, 0]])
    ran = counted_on
    for train in (False, True):
        fast = count_ops(model, x, train=train)
        assert ran.devices[-1] == "meta"
        assert fast.to_dict() == count_ops(model, x, train=train, meta=False).to_dict()
    # by hand: Linear(4, 3) on the 3 kept rows
    assert count_ops(model, x).macs == 3 * 4 * 3
    est = estimate_memory(model, x)
    assert est.simulation == "meta" and _figures(est) == _real_memory(model, x)


class _CountsStarts(nn.Module):
    """Makes a constant with torch.tensor on the inputs' device and reads it: on meta, torch.tensor dispatches
    nothing, so the constant's twin is made by the function modes (MetaValues.function)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        starts = torch.tensor([0, 1, 2, 0, 1], device=x.device)
        sequences = int((starts == 0).sum().item())              # by hand: 2
        return self.fc(x[: x.shape[0] - 1 + (sequences == 2)])   # all the rows when it reads 2


def test_a_constant_made_with_torch_tensor_answers_on_meta(counted_on):
    torch.manual_seed(0)
    model, x = _CountsStarts(), torch.randn(5, 4)
    for train in (False, True):
        assert count_ops(model, x, train=train).to_dict() == count_ops(model, x, train=train, meta=False).to_dict()
        assert counted_on.devices[-2:] == ["meta", "cpu"]
    assert count_ops(model, x).macs == 5 * 4 * 3   # all 5 rows: the constant was read as the CPU reads it
    est = estimate_memory(model, x)
    assert est.simulation == "meta" and _figures(est) == _real_memory(model, x)


class _ReadsWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        return y * float(y.detach().abs().sum().item() >= 0)   # a value of the weights' output: no twin


def test_a_value_of_what_the_weights_compute_still_needs_the_real_tensors(counted_on):
    model, x = _ReadsWeights(), torch.randn(5, 4)
    ran = counted_on
    counts = count_ops(model, x)
    assert ran.devices == ["meta", "cpu"]
    assert counts.to_dict() == count_ops(model, x, meta=False).to_dict()
    assert estimate_memory(model, x, real_step_bytes=1 << 20).simulation == "cpu"


# ------------------------------------------------------------------ attention as the CPU runs it
class _Attention(nn.Module):
    """Q, K, V projections and one scaled_dot_product_attention call of the given kind."""

    def __init__(self, kind: str, heads: int = 4, kv_heads: int = 4, d: int = 32):
        super().__init__()
        self.kind, self.h, self.kv, self.hd = kind, heads, kv_heads, d // heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, kv_heads * self.hd)
        self.v = nn.Linear(d, kv_heads * self.hd)
        self.mask = nn.Parameter(torch.zeros(6, 6)) if kind == "float mask needing grad" else None

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        kw: dict = {}
        if self.kind == "causal":
            kw = {"is_causal": True}
        elif self.kind == "bool mask":
            keep = torch.ones(b, 1, t, t, dtype=torch.bool, device=x.device).tril()
            kw = {"attn_mask": keep}
        elif self.kind == "float mask":
            kw = {"attn_mask": torch.zeros(t, t, device=x.device)}
        elif self.kind == "float mask needing grad":
            kw = {"attn_mask": self.mask}
        elif self.kind == "dropout":
            kw = {"dropout_p": 0.25 if self.training else 0.0, "is_causal": True}
        elif self.kind == "gqa":
            kw = {"is_causal": True, "enable_gqa": True}
        elif self.kind == "3-d":
            q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
        out = F.scaled_dot_product_attention(q, k, v, **kw)
        return out.reshape(b, -1)


# (kind, key/value heads, the backend PyTorch's chooser names for the CPU in training)
ATTENTION = [("causal", 4, "flash"), ("bool mask", 4, "flash"), ("float mask", 4, "flash"),
             ("float mask needing grad", 4, "math"), ("dropout", 4, "math"), ("gqa", 2, "flash"), ("3-d", 4, "math")]


@pytest.mark.parametrize("kind,kv,backend", ATTENTION)
def test_attention_counts_and_memory_on_meta_equal_the_cpu(kind, kv, backend, counted_on):
    torch.manual_seed(0)
    model = _Attention(kind, kv_heads=kv)
    x = torch.randn(2, 6, 32)
    ran = counted_on
    for train in (False, True):
        fast = count_ops(model, x, train=train)
        assert ran.devices[-1] == "meta", kind
        assert fast.to_dict() == count_ops(model, x, train=train, meta=False).to_dict(), (kind, train)
    flash = "aten._scaled_dot_product_flash_attention_for_cpu" in count_ops(model, x, train=True).operators
    assert flash == (backend == "flash")
    est = estimate_memory(model, x)
    assert est.simulation == "meta" and _figures(est) == _real_memory(model, x), kind


def test_the_backend_is_pytorchs_own_choice():
    q = torch.empty(2, 4, 6, 8, device="meta")
    assert cpu_attention.cpu_backend(q, q, q) == "flash"
    assert cpu_attention.cpu_backend(q, q, q, dropout_p=0.1) == "math"
    with sdpa_kernel([SDPBackend.MATH]):
        assert cpu_attention.cpu_backend(q, q, q) == "math"   # the user's switches count too
    assert cpu_attention.on_meta(torch.randn(2, 4, 6, 8), q, q) == (None, None)   # not meta: left alone


# ------------------------------------------------------------------ Hugging Face decoders and encoders
transformers = pytest.importorskip("transformers")


def _hf(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)
    if name == "llama":
        config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                          max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
        return transformers.LlamaForCausalLM(config)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                     num_attention_heads=2, vocab_size=100, max_position_embeddings=64)
    return transformers.BertForMaskedLM(config)


def _hf_inputs(mask: str) -> dict:
    ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    if mask == "none":
        return {"input_ids": ids}
    attention = torch.ones(2, 8, dtype=torch.long)
    if mask == "padded":
        attention[1, 5:] = 0     # the second row is 5 tokens and 3 of padding
    return {"input_ids": ids, "attention_mask": attention}


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("mask", ["none", "ones", "padded"])
def test_hf_models_are_counted_and_simulated_on_meta_as_on_the_cpu(name, mask, counted_on):
    from netdiet.models.inputs import bind_inputs, structured_forward
    model = _hf(name)
    inputs = _hf_inputs(mask)
    args, kwargs = bind_inputs(model, [], dict(inputs))
    with structured_forward(model, args, kwargs) as x:
        ran = counted_on
        train, inference, how = count_step(model, x, "adam")
        assert how["device"] == "meta" and ran.devices == ["meta"], how
        assert train.to_dict() == count_ops(model, x, train=True, meta=False).to_dict()
        assert count_ops(model, x, train=False).to_dict() == count_ops(model, x, train=False, meta=False).to_dict()
        assert ran.devices[-2:] == ["meta", "cpu"]
        est = estimate_memory(model, x)
        assert est.simulation == "meta" and est.simulation_reason is None
        assert _figures(est) == _real_memory(model, x)
