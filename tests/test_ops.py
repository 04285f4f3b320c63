"""The op-cost registry: formulas against hand counts, independent of the module walker."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from netdiet.analysis import ops
from netdiet.analysis.ops import OpCost, causal_pairs, conv_macs, formula_table, op_cost, register_formula

aten = torch.ops.aten


class _Sum(TorchDispatchMode):
    """Sums op_cost over every dispatched op; records ops without a formula."""

    def __init__(self, min_numel: int = 0):
        super().__init__()
        self.cost = OpCost()
        self.missing: list[str] = []
        self.min_numel = min_numel

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(first, torch.Tensor) and first.numel() < self.min_numel:
            return out
        c = op_cost(func, args, kwargs or {}, out)
        if c is None:
            self.missing.append(str(func))
        else:
            self.cost = self.cost + c
        return out


def cost_of(fn, *a, **kw) -> OpCost:
    with torch.no_grad(), _Sum() as s:
        fn(*a, **kw)
    assert not s.missing, s.missing
    return s.cost


def test_mm_is_mkn_macs_and_twice_the_flops():
    c = cost_of(torch.mm, torch.randn(3, 4), torch.randn(4, 5))
    assert (c.macs, c.flops) == (60, 120)
    assert c.bytes_read == (12 + 20) * 4 and c.bytes_written == 15 * 4


def test_addmm_adds_one_flop_per_output_for_the_bias():
    c = cost_of(F.linear, torch.randn(4, 5), torch.randn(3, 5), torch.randn(3))
    assert (c.macs, c.flops) == (60, 2 * 60 + 12)


def test_matmul_and_einsum_reach_bmm_and_are_counted():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    assert cost_of(torch.matmul, a, b).macs == 2 * 3 * 4 * 5
    assert cost_of(torch.einsum, "bij,bjk->bik", a, b).macs == 2 * 3 * 4 * 5
    assert cost_of(torch.matmul, a, torch.randn(4, 5)).macs == 2 * 3 * 4 * 5


def test_conv_macs_use_the_output_size_from_stride_padding_dilation_and_groups():
    x, w = torch.randn(1, 4, 9, 9), torch.randn(6, 2, 3, 3)
    c = cost_of(F.conv2d, x, w, torch.randn(6), stride=2, padding=1, dilation=2, groups=2)
    # out side = floor((9 + 2 - 2*2 - 1)/2) + 1 = 4; macs = N·Cout·(Cin/g)·k²·Hout·Wout
    assert c.macs == 1 * 6 * 2 * 9 * 4 * 4 == 1728
    assert c.flops == 2 * 1728 + 6 * 16


def test_transposed_conv_counts_each_input_element_times_kernel_times_out_channels_per_group():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 3, 3, 3)  # (Cin, Cout/groups, k, k), groups=2 -> Cout 6
    c = cost_of(F.conv_transpose2d, x, w, torch.randn(6), stride=2, padding=1, output_padding=1, groups=2)
    assert c.macs == 4 * 25 * 3 * 9 == 2700
    assert c.flops == 2 * 2700 + 6 * 10 * 10


def test_conv_macs_helper_counts_groups_once():
    # depthwise 8 channels, 3x3, 6x6 output: 8·1·9·36 per image
    assert conv_macs((2, 8, 6, 6), (8, 1, 3, 3), (2, 8, 6, 6), False) == 2 * 8 * 9 * 36


@pytest.mark.parametrize("lq,lk", [(1, 1), (4, 4), (3, 5), (5, 3), (7, 2)])
def test_causal_pairs_match_the_count_of_ones_in_torchs_causal_mask(lq, lk):
    assert causal_pairs(lq, lk) == int(torch.ones(lq, lk).tril().sum())


def test_sdpa_counts_full_and_causal_pairs():
    q = torch.randn(2, 3, 8, 4)
    full = cost_of(F.scaled_dot_product_attention, q, q, q)
    causal = cost_of(F.scaled_dot_product_attention, q, q, q, is_causal=True)
    assert full.macs == 6 * 64 * (4 + 4) and full.flops == 2 * full.macs + 6 * 6 * 64
    assert causal.macs == 6 * 36 * 8 and causal.flops == 2 * causal.macs + 6 * 6 * 36


def test_pointwise_activation_constants():
    x = torch.randn(10)
    assert cost_of(torch.relu, x).flops == 10
    assert cost_of(torch.sigmoid, x).flops == 40
    assert cost_of(F.gelu, x).flops == 50
    assert cost_of(F.gelu, x, approximate="tanh").flops == 90
    assert cost_of(F.silu, x).flops == 50
    assert cost_of(torch.tanh, x).flops == 10
    assert cost_of(torch.add, x, x, alpha=2).flops == 20
    assert cost_of(torch.add, x, x).flops == 10


def test_softmax_layer_norm_and_pooling_formulas():
    x = torch.randn(4, 6)
    assert cost_of(torch.softmax, x, -1).flops == 5 * 24
    assert cost_of(F.layer_norm, x, (6,), torch.ones(6), torch.zeros(6)).flops == 7 * 24
    assert cost_of(F.layer_norm, x, (6,)).flops == 5 * 24
    img = torch.randn(1, 2, 8, 8)
    assert cost_of(F.max_pool2d, img, 2).flops == 2 * 16 * 3          # 3 compares per 2x2 window
    assert cost_of(F.avg_pool2d, img, 2).flops == 2 * 16 * 4
    assert cost_of(F.adaptive_avg_pool2d, img, 1).flops == 2 * 64      # 63 adds + 1 divide per channel
    # adaptive 8 -> 3 windows: [0,3) [2,6) [5,8): 3 + 4 + 3 = 10 per dim
    assert cost_of(F.adaptive_avg_pool2d, img, 3).flops == 2 * 10 * 10


def test_sum_and_mean_reduce_with_n_minus_one_adds():
    x = torch.randn(5, 4)
    assert cost_of(torch.sum, x).flops == 19
    assert cost_of(torch.sum, x, 0).flops == 16
    assert cost_of(torch.mean, x).flops == 20


def test_embedding_lookup_is_zero_flops_but_moves_bytes():
    c = cost_of(F.embedding, torch.tensor([[1, 2, 3]]), torch.randn(10, 4))
    assert c.flops == 0 and c.macs == 0 and c.bytes_written == 12 * 4


def test_views_move_no_bytes():
    c = cost_of(lambda t: t.view(4, 3).t(), torch.randn(12))
    assert c == OpCost()


def test_formula_table_rows_have_op_macs_flops_note_and_cover_the_core_ops():
    rows = formula_table()
    assert all(set(r) >= {"op", "macs", "flops", "note"} for r in rows)
    text = " ".join(r["op"] for r in rows)
    for op in ("aten.mm", "aten.addmm", "aten.bmm", "aten.convolution", "aten.convolution_backward",
               "aten._scaled_dot_product_flash_attention_for_cpu", "aten._native_multi_head_attention",
               "aten.mkldnn_rnn_layer", "aten._softmax", "aten.native_layer_norm", "aten.native_batch_norm",
               "aten.max_pool2d_with_indices", "aten.embedding", "aten.gelu", "aten.add"):
        assert op in text, op


def test_unknown_op_has_no_formula():
    assert op_cost(aten.cumprod.default, (torch.randn(3), 0), {}, torch.randn(3)) is None


def test_a_flops_unit_formula_returning_macs_is_rejected():
    # registering against a private op name keeps the real registry untouched
    op = aten.logaddexp

    @register_formula([op], unit="flops")
    def _bad(call):
        return OpCost(macs=1, flops=1)

    try:
        with pytest.raises(AssertionError):
            op_cost(aten.logaddexp.default, (torch.randn(2), torch.randn(2)), {}, torch.randn(2))
    finally:
        ops._BY_PACKET.pop(op, None)
        ops._FORMULAS.pop()


def test_less_common_activations_and_their_backward_have_formulas():
    x = torch.randn(6, requires_grad=True)
    with _Sum() as s:
        y = F.mish(F.hardswish(F.softplus(x)))
        y.sum().backward()
    assert not s.missing, s.missing
    # forward: softplus 4 + hardswish 4 + mish 6 per element, sum 5; backward: mish' 15, hardswish' 4, softplus' 5
    assert s.cost.flops == 6 * (4 + 4 + 6) + 5 + 6 * (15 + 4 + 5)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=30, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), cin_per=st.integers(1, 3), cout_per=st.integers(1, 3),
       k=st.integers(1, 4), stride=st.integers(1, 3), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       side=st.integers(6, 12), transposed=st.booleans())
def test_conv_macs_agree_with_torch_flop_counter_forward_on_random_configurations(groups, cin_per, cout_per, k, stride,
                                                                                  padding, dilation, side, transposed):
    # independent: FlopCounterMode's forward conv formula (2 FLOPs per MAC) is right for every config
    from torch.utils.flop_counter import FlopCounterMode

    cin, cout = groups * cin_per, groups * cout_per
    x = torch.randn(2, cin, side, side)
    if transposed:
        w = torch.randn(cin, cout_per, k, k)
        run = lambda: F.conv_transpose2d(x, w, stride=stride, padding=min(padding, k - 1), groups=groups,  # noqa: E731
                                         dilation=dilation)
    else:
        if (side + 2 * padding - dilation * (k - 1) - 1) < 0:
            return
        w = torch.randn(cout, cin_per, k, k)
        run = lambda: F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)  # noqa: E731
    ours = cost_of(run)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        run()
    assert 2 * ours.macs == fc.get_total_flops()


def test_hardsigmoid_backward_is_two_compares_and_a_multiply_per_element():
    # MobileNetV3's squeeze-excite gates: hardsigmoid forward 3 per element (add, divide, clamp), its backward
    # g/6 inside (-3, 3) else 0: two compares + one multiply = 3 per element. x has 8 elements:
    # forward hardsigmoid 3*8 = 24, sum 8-1 = 7; backward hardsigmoid' 3*8 = 24 (sum's backward is an expand: 0)
    x = torch.randn(8, requires_grad=True)
    with _Sum() as s:
        F.hardsigmoid(x).sum().backward()
    assert not s.missing, s.missing
    assert s.cost.flops == 24 + 7 + 24 and s.cost.macs == 0
    call_cost = op_cost(aten.hardsigmoid_backward.default, (torch.ones(8), torch.zeros(8)), {}, torch.ones(8))
    assert call_cost.flops == 3 * 8


def test_in_place_as_strided_is_cost_free():
    t = torch.randn(12)
    c = cost_of(lambda a: a.as_strided_((3, 4), (4, 1)), t)
    assert c == OpCost()
    assert op_cost(aten.as_strided_.default, (torch.randn(12), (3, 4), (4, 1)), {}, t) == OpCost()


def test_reflection_and_replication_pad_backward_add_each_padded_gradient_onto_its_source():
    # ReflectionPad2d(1) on 1x2x4x4 (32 elements) -> 1x2x6x6 (72): the pad is a copy (0 FLOPs), sum 72 - 1 = 71;
    # backward: sum's is an expand (0), reflection_pad2d_backward adds the 72 - 32 = 40 border gradients onto
    # the positions they mirror (each of the 32 input positions gets its own gradient plus its mirrors')
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    with _Sum() as s:
        torch.nn.ReflectionPad2d(1)(x).sum().backward()
    assert not s.missing, s.missing
    assert s.cost.flops == 71 + 40 and s.cost.macs == 0
    # ReplicationPad1d((2, 1)) on 1x1x5 -> 8: backward 8 - 5 = 3 adds (two onto the first element, one the last)
    y = torch.randn(1, 1, 5, requires_grad=True)
    with _Sum() as s:
        torch.nn.ReplicationPad1d((2, 1))(y).sum().backward()
    assert not s.missing, s.missing
    assert s.cost.flops == 7 + 3


def test_bitwise_mask_ops_are_counted_and_cost_nothing_on_bool_masks():
    # HF's eager attention builds its causal/padding mask with bitwise_and on bool tensors: integer work, 0 FLOPs
    a, b = torch.ones(4, 4, dtype=torch.bool).tril(), torch.ones(4, 4, dtype=torch.bool)
    assert cost_of(torch.bitwise_and, a, b).flops == 0
    assert cost_of(lambda u, v: ~(u | v) ^ u, a, b).flops == 0
    assert cost_of(torch.logical_xor, torch.randn(3), torch.randn(3)).flops == 3   # float inputs: 1 per element


def test_readme_formula_table_is_the_registry():
    # the README's table says it is generated from formula_table(): a formula added without its row fails here
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    start = readme.index("| operators | unit | MACs | FLOPs | why / note |") + 2
    end = start
    while end < len(readme) and readme[end].startswith("| "):
        end += 1
    assert readme[start:end] == ops.formula_table_markdown()
