"""The counter's shortcuts keep every count exact (issue 13): counting on a meta copy of a real model, the
inference forward derived from the training pass (passes.py), and the view fast path.

Each shortcut is checked against the slow way it replaces: count_ops(meta=False) on the real tensors, and a
separate eval-mode count_ops(train=False). Where a count is written out by hand it says so.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from netdiet.analysis.counter import count_ops
from netdiet.analysis.passes import count_step, separate_pass_reason
from netdiet.errors import NetdietError
from netdiet.models import create_model, default_inputs, list_models, make_inputs

torch.set_num_threads(1)

ZOO_KW = {"yolo": {"image_size": 64}, "transformer": {"preset": "tiny"}}


def _zoo(name: str, batch: int = 2):
    kw = ZOO_KW.get(name, {})
    torch.manual_seed(0)
    model = create_model(name, **kw)
    shape, dtype, high = default_inputs(name, kw)
    return model, (make_inputs((batch, *shape[1:]), dtype, high=high),)


def _without_derived_note(counts) -> dict:
    doc = counts.to_dict()
    doc["notes"] = [n for n in doc["notes"] if not n.startswith("inference forward derived")]
    return doc


@pytest.mark.parametrize("name", [e.name for e in list_models()])
def test_zoo_inference_derived_from_the_training_pass_equals_an_eval_pass(name):
    model, x = _zoo(name)
    train, inference, how = count_step(model, x, "adam")
    assert how["inference_forward"] == "derived" and how["device"] == "meta" and inference is not None
    assert inference.notes[0].startswith("inference forward derived from the training pass")
    separate = count_ops(model, x, train=False, meta=False)
    assert _without_derived_note(inference) == separate.to_dict()
    # the operators in the order an eval pass lists them (JSON output order), not just equal as dicts
    assert list(inference.operators) == list(separate.operators)
    assert train.to_dict() == count_ops(model, x, train=True, optimizer="adam", meta=False).to_dict()
    assert model.training  # the caller's mode is left as it was (zoo models are built in train mode)


@pytest.mark.parametrize("name", [e.name for e in list_models()])
def test_zoo_counts_on_a_meta_copy_equal_the_real_tensors(name, counted_on):
    model, x = _zoo(name, batch=3)
    ran = counted_on
    for train in (False, True):
        fast = count_ops(model, x, train=train).to_dict()
        assert ran.devices[-1] == "meta"
        assert fast == count_ops(model, x, train=train, meta=False).to_dict()
        assert ran.devices[-1] == "cpu"


def test_batch_norm_and_dropout_are_recounted_in_eval_mode_by_hand():
    # BatchNorm1d(4) on 5x4, Dropout, Linear(4, 2) (ops.py's formulas). Eval forward by hand: batch norm folds
    # its statistics into x·a + b, 2 FLOPs per element = 40; dropout nothing; linear 5·4·2 = 40 MACs, 80 FLOPs
    # + 10 bias adds = 90. Total 130 FLOPs. Training forward: batch statistics, 5 + 2 (affine) per element = 140.
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    x = torch.randn(5, 4)
    train, inference, how = count_step(model, x, "sgd")
    assert how["recounted_calls"] == 2
    separate = count_ops(model, x, train=False, meta=False)
    assert _without_derived_note(inference) == separate.to_dict()
    assert (inference.macs, inference.flops) == (40, 130)
    assert [inference.module(n).flops for n in ("0", "1", "2")] == [40, 0, 90]
    assert train.module("0").flops == 140 and train.module("1").flops > 0
    assert "aten.bernoulli_" in train.operators and "aten.bernoulli_" not in inference.operators
    # eval-mode batch norm writes its output only (the CPU returns empty saved statistics): 5·4 floats = 80 bytes,
    # on the meta copy too; the training pass also writes the saved mean and inverse std, 2·4 floats
    assert inference.operators["aten.native_batch_norm"]["bytes_written"] == 80
    assert train.operators["aten.native_batch_norm"]["bytes_written"] == 80 + 32


def test_a_batch_norm_called_with_a_keyword_is_counted_in_a_pass_of_its_own():
    class KeywordBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.fc = nn.BatchNorm1d(4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.bn(input=x))

    model = KeywordBN()
    assert separate_pass_reason(model) is not None   # a class of the test module: unknown behaviour
    x = torch.randn(3, 4)
    _, inference, how = count_step(model, x, "adam")
    assert inference is None and how["inference_forward"] == "separate pass" and "KeywordBN" in how["reason"]


@pytest.mark.parametrize("make,x", [
    (lambda: nn.LSTM(8, 8, batch_first=True), torch.randn(2, 5, 8)),
    (lambda: nn.GRU(8, 8, batch_first=True), torch.randn(2, 5, 8)),
    (lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2,
                                   enable_nested_tensor=False).eval(), torch.randn(2, 6, 16)),
    (lambda: nn.MultiheadAttention(16, 4, batch_first=True).eval(), None),
])
def test_layers_whose_cpu_path_differs_are_counted_on_the_real_tensors(make, x, counted_on):
    torch.manual_seed(0)
    model = make()
    if x is None:   # MultiheadAttention takes query, key, value
        q = torch.randn(2, 6, 16)
        x = (q, q, q)
    x = x if isinstance(x, tuple) else (x,)
    ran = counted_on
    for train in (False, True):
        fast = count_ops(model, x, train=train).to_dict()
        assert ran.devices[-1] == "cpu"   # the meta copy gave up, the real tensors were counted
        assert fast == count_ops(model, x, train=train, meta=False).to_dict()
    _, inference, how = count_step(model, x, "adam")
    assert inference is None and how["device"] == "real tensors"
    assert "another path on the CPU" in how["fallback"]   # what sent the count back, in the profile's counting


class _ReadsValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        n = int(x.shape[0] if y.abs().sum().item() >= 0 else 0)   # .item() of what a weight computed: no twin
        return y[:n]


def test_a_value_dependent_forward_falls_back_to_the_real_tensors(counted_on):
    # a value read from the inputs is answered on meta (tests/test_meta_values.py); one of the weights' output not
    model, x = _ReadsValues(), torch.randn(5, 4)
    ran = counted_on
    counts = count_ops(model, x)
    assert ran.devices == ["meta", "cpu"]
    assert counts.macs == 5 * 4 * 3   # by hand: Linear(4, 3) on 5 rows
    assert counts.to_dict() == count_ops(model, x, meta=False).to_dict()
    how = count_step(model, (x,), "adam")[2]
    assert how["device"] == "real tensors"
    assert how["fallback"] == "RuntimeError: Tensor.item() cannot be called on meta tensors"


def test_views_are_tallied_by_their_count_only():
    class Views(nn.Module):
        def forward(self, x):
            return x.view(6, 2).t().transpose(0, 1).unsqueeze(0).expand(3, 6, 2).sum()

    counts = count_ops(Views(), torch.randn(3, 4), train=False)
    zero = {"macs": 0, "flops": 0, "backward_count": 0, "backward_macs": 0, "backward_flops": 0,
            "bytes_read": 0, "bytes_written": 0}
    for op in ("aten.view", "aten.t", "aten.transpose", "aten.unsqueeze", "aten.expand"):
        assert counts.operators[op] == {"count": 1, **zero}, op
    # the sum reads the expanded 3·6·2 view: 36 elements, 35 additions (ops.py: n - 1 per output)
    assert counts.flops == 35 and counts.operators["aten.sum"]["count"] == 1


def test_hf_configs_count_their_inference_forward_in_a_pass_of_their_own(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                     architectures=["GPT2LMHeadModel"])
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 100, (2, 8))
    train, inference, how = count_step(model, (ids,), "adam")
    assert inference is None and "GPT2LMHeadModel" in how["reason"]
    # its attention takes dropout in train mode (the CPU's math path, the meta device's own) and transformers asks
    # .item() of the position ids (answered from their real twins): the meta copy stands in
    assert how["device"] == "meta"
    assert train.to_dict() == count_ops(model, ids, train=True, meta=False).to_dict()


def test_the_meta_copy_keeps_shared_weights_and_hooks_and_leaves_the_model_alone():
    from netdiet.analysis.step import meta_copy

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.norm = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.b(self.norm(self.a(x)))

    model = Tied()
    calls = []
    model.a.register_forward_hook(lambda mod, args, out: calls.append(out.device.type))
    copy = meta_copy(model)
    assert copy.b.weight is copy.a.weight and copy.a.weight is not model.a.weight
    assert all(t.device.type == "meta" for t in list(copy.parameters()) + list(copy.buffers()))
    assert [type(m) for m in copy.modules()] == [type(m) for m in model.modules()]
    assert copy.a.weight.requires_grad and isinstance(copy.a.weight, nn.Parameter)
    copy(torch.empty(3, 4, device="meta"))
    assert calls == ["meta"]   # the hook came along and ran on the copy
    assert model.a.weight.device.type == "cpu" and model.norm.num_batches_tracked.item() == 0
    # tied weights are one parameter: 16 + 4 + 4 (second bias) + 8 (batch norm) = 32, as on the real model
    assert count_ops(model, torch.randn(3, 4)).module("").params == 32 == sum(p.numel() for p in model.parameters())


def test_profile_says_how_it_counted():
    import netdiet

    doc = netdiet.profile("cnn", batch_size=2, progress=False).to_dict()
    # cnn: two BatchNorm2d and one Dropout, each called once
    assert doc["counting"] == {"device": "meta", "fallback": None, "inference_forward": "derived", "recounted_calls": 3,
                               "reason": None}
    model, x = _zoo("cnn")
    assert doc["totals"]["macs"] == count_ops(model, x, meta=False).macs
    assert doc["totals"]["train_forward_flops"] == count_ops(model, x, train=True, meta=False).flops

    frozen = nn.Sequential(nn.Linear(4, 3))
    frozen.requires_grad_(False)
    doc = netdiet.profile(frozen, torch.randn(2, 4), progress=False).to_dict()
    assert doc["counting"]["inference_forward"] == "separate pass" and doc["totals"]["macs"] == 2 * 4 * 3


def test_a_warning_of_the_forward_is_shown_once_when_the_meta_copy_counts():
    import warnings

    class Warns(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            warnings.warn("from the forward")
            return self.fc(x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        count_ops(Warns(), torch.randn(3, 2))
    assert [str(w.message) for w in caught] == ["from the forward"]


@pytest.mark.parametrize("layer,x", [
    (nn.Linear(3, 4), torch.randn(2, 3).bfloat16()),
    (nn.Conv2d(3, 4, 3, bias=False), torch.randn(1, 3, 8, 8).bfloat16()),
    (nn.ConvTranspose2d(3, 4, 3), torch.randn(1, 3, 8, 8).bfloat16()),
])
def test_a_dtype_the_cpu_kernel_refuses_is_refused_though_the_meta_kernel_takes_it(layer, x):
    # the meta kernels of matrix products and convolutions accept mixed dtypes; the count must fail as the real
    # model does, not count a call that cannot run
    with pytest.raises(NetdietError, match="dtype|type"):
        count_ops(layer, x)
    with pytest.raises(NetdietError):
        count_step(layer, x, "adam")


def test_token_ids_outside_the_embedding_fail_as_on_the_real_tensors(counted_on):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    ran = counted_on
    with pytest.raises(NetdietError, match="index out of range|out of range"):
        count_ops(model, torch.tensor([[1, 2, 10]]))
    assert ran.devices == ["meta", "cpu"]   # the copy saw the real ids and gave the count back
    # ids inside the table: counted on the copy; by hand Linear(4, 2) on 3 tokens = 3·4·2 MACs
    assert count_ops(model, torch.tensor([[1, 2, 9]])).macs == 24 and ran.devices[-1] == "meta"
