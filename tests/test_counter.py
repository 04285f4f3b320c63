"""count_ops: hand counts per module, forward and backward, optimizer steps checked against the real optimizers."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from netdiet.analysis.counter import OPTIMIZER_FLOPS_PER_PARAM, count_ops, optimizer_step_flops
from netdiet.analysis.ops import OpCost, op_cost
from netdiet.errors import NetdietError
from netdiet.models import create_model, default_inputs, list_models, make_inputs
from netdiet.training.loop import make_optimizer


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_linear_inference_is_batch_in_out_macs_plus_bias_flops():
    c = count_ops(nn.Linear(5, 3), torch.randn(4, 5))
    assert (c.macs, c.flops) == (60, 132)
    assert c.operators["aten.addmm"]["count"] == 1
    root = c.module("")
    assert (root.params, root.param_bytes, root.output_shape) == (18, 72, [4, 3])
    assert (c.backward_flops, c.optimizer_flops, c.train_flops) == (0, 0, 0)


def test_mlp_training_step_flops_by_hand_including_sgd_and_adam():
    # forward: L1 2·60 + 15 bias = 135; relu 15; L2 2·30 + 10 = 70; loss sum over 10 outputs = 9 adds
    # backward: L2 dX 2·30 + dW 2·30 + db (10 → 2) 8 = 128; relu 15; L1 dW 2·60 + db (15 → 3) 12 = 132
    # (no dX for L1: the input needs no gradient). 23 parameters: SGD 2 each, Adam 13 each.
    m, x = small_mlp(), torch.randn(5, 4)
    c = count_ops(m, x, train=True, optimizer="sgd", loss="sum")
    assert (c.macs, c.flops) == (90, 229)
    assert (c.backward_macs, c.backward_flops) == (120, 275)
    assert c.optimizer_flops == 46 and c.train_flops == 229 + 275 + 46
    per_module = {mc.name: (mc.flops, mc.backward_flops) for mc in c.modules}
    assert per_module == {"": (220, 275), "0": (135, 132), "1": (15, 15), "2": (70, 128), "<loss>": (9, 0)}
    adam = count_ops(m, x, train=True, optimizer="adam")
    assert adam.train_flops == 229 + 275 + 13 * 23


def test_functional_calls_and_matmul_inside_forward_are_attributed_to_the_module():
    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 5))
            self.inner = nn.Linear(5, 5, bias=False)

        def forward(self, x):
            y = torch.matmul(x, self.w)           # (2,3,4)@(4,5): 120 MACs
            z = torch.einsum("bij,bkj->bik", y, y)  # (2,3,5)x(2,3,5) -> (2,3,3): 2·3·5·3 = 90 MACs
            return F.relu(self.inner(y)).sum() + z.sum()

    c = count_ops(Fn(), torch.randn(2, 3, 4))
    assert c.macs == 120 + 90 + 6 * 5 * 5
    assert c.module("inner").macs == 150
    assert c.module("").macs == c.macs


def test_conv2d_stride_padding_dilation_groups_forward_and_backward():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2)
    net = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), conv)
    c = count_ops(net, torch.randn(1, 4, 9, 9), train=True, optimizer="none")
    fwd = 6 * 2 * 9 * 16  # Cout·(Cin/g)·k²·Hout·Wout, out 4x4
    m = c.module("1")
    assert m.macs == fwd and m.flops == 2 * fwd + 6 * 16
    # backward: grad input + grad weight, each as big as the forward; grad bias = 96 adds
    assert m.backward_macs == 2 * fwd and m.backward_flops == 4 * fwd + 96
    assert m.output_shape == [1, 6, 4, 4]


def test_depthwise_conv_backward_counts_macs_once_not_once_per_group():
    net = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False))
    c = count_ops(net, torch.randn(2, 8, 6, 6), train=True, optimizer="none")
    dw = c.module("1")
    assert dw.macs == 2 * 8 * 9 * 36
    assert dw.backward_macs == 2 * dw.macs
    # independent: the same depthwise conv as 8 separate single-channel convolutions, one per group
    class PerGroup(nn.Module):
        def __init__(self, dw: nn.Conv2d):
            super().__init__()
            self.pw = nn.Conv2d(8, 8, 1, bias=False)
            self.convs = nn.ModuleList(nn.Conv2d(1, 1, 3, padding=1, bias=False) for _ in range(8))

        def forward(self, x):
            y = self.pw(x)
            return torch.cat([conv(y[:, i:i + 1]) for i, conv in enumerate(self.convs)], dim=1)

    split = count_ops(PerGroup(net[1]), torch.randn(2, 8, 6, 6), train=True, optimizer="none")
    assert split.module("convs").backward_macs == dw.backward_macs
    # PyTorch's FlopCounterMode (torch 2.13) counts the grouped weight gradient once per group: 8x too much
    with FlopCounterMode(display=False) as fc:
        net(torch.randn(2, 8, 6, 6)).sum().backward()
    assert fc.get_total_flops() == 2 * (c.macs + c.backward_macs) + 2 * 7 * (2 * 8 * 9 * 36)


def test_conv_transpose_forward_and_backward():
    net = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False),
                        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2))
    c = count_ops(net, torch.randn(1, 4, 5, 5), train=True, optimizer="none")
    ct = c.module("1")
    assert ct.macs == 4 * 25 * 3 * 9 == 2700
    assert ct.flops == 2 * 2700 + 600
    assert ct.backward_macs == 2 * 2700 and ct.output_shape == [1, 6, 10, 10]


class Attn(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal
        self.qkv = nn.Linear(12, 36, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, 3, 4).transpose(1, 2) for z in self.qkv(x).split(12, dim=2))
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


@pytest.mark.parametrize("causal,pairs", [(False, 64), (True, 36)])
def test_sdpa_forward_backward_and_meta_agree_with_hand_counts(causal, pairs):
    # B=2, H=3, L=8, E=4: batch·heads = 6; projection 2·8·12·36 = 6912 MACs
    model, x = Attn(causal), torch.randn(2, 8, 12)
    c = count_ops(model, x, train=True, optimizer="none")
    assert c.macs == 6912 + 6 * pairs * 8
    assert c.operators["aten._scaled_dot_product_flash_attention_for_cpu"]["flops"] == 2 * 6 * pairs * 8 + 6 * 6 * pairs
    # backward: flash recomputes QKᵀ: P·(3E + 2E_v) = 20 per pair; Linear dW only (input needs no grad)
    assert c.backward_macs == 6 * pairs * 20 + 6912
    meta = count_ops(Attn(causal).to("meta"), x.to("meta"), train=True, optimizer="none")
    assert (meta.macs, meta.flops, meta.backward_macs, meta.backward_flops) == \
        (c.macs, c.flops, c.backward_macs, c.backward_flops)


def test_multihead_attention_fast_path_in_eval_matches_hand_count_and_the_training_path():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    q = torch.randn(2, 5, 8)
    c = count_ops(mha, (q, q, q))
    assert list(c.operators) == ["aten._native_multi_head_attention"]   # the fused fast path really ran
    # in-proj 2·5·8·24 = 1920, attention 2·25·16 = 800, out-proj 2·5·8·8 = 640
    assert c.macs == 3360
    # 2·macs + biases 2·(10+10)·8 + scale/softmax 6·2·2·25 + head-averaged weights 2·2·25
    assert c.flops == 6720 + 320 + 600 + 100
    assert count_ops(mha, (q, q, q), train=True).macs == 3360   # slow path, op by op


def test_lstm_counts_by_hand_and_by_the_decomposed_cpu_path():
    torch.manual_seed(0)
    lstm, x = nn.LSTM(3, 4, batch_first=True), torch.randn(2, 5, 3)
    c = count_ops(lstm, x)
    # T·B·4H·(I + H) = 5·2·16·7; flops 2·macs + 3 adds per gate element + 18 per hidden unit per step
    assert c.macs == 1120 and c.flops == 2240 + 10 * 16 * 3 + 18 * 40
    with torch.backends.mkldnn.flags(enabled=False):   # independent: the op-by-op LSTM cell
        plain = count_ops(lstm, x)
    assert (plain.macs, plain.flops) == (c.macs, c.flops)
    assert c.module("").output_shape == [2, 5, 4]


def test_ops_without_formula_are_reported_as_uncounted_not_zero():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.cumprod(x, 0) + x

    c = count_ops(Odd(), torch.randn(6))
    assert c.uncounted == {"aten.cumprod": 1}
    assert c.flops == 6 and "aten.cumprod" not in c.operators


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adamw"])
def test_optimizer_step_formula_matches_the_real_torch_optimizer(name, foreach):
    # count the second step (momentum's first step only copies the gradient) of the optimizer netdiet trains with,
    # in its single-tensor (CPU default) and foreach implementations; ops on 1-element tensors are Adam's step
    # counters, not per-parameter work
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    opt = make_optimizer(name, model.parameters(), lr=0.1)
    for group in opt.param_groups:
        group["foreach"] = foreach
    n = sum(p.numel() for p in model.parameters())
    for step in range(2):
        model(torch.randn(4, 6)).sum().backward()
        if step == 1:
            counted = OpCost()

            class Mode(TorchDispatchMode):
                def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                    nonlocal counted
                    out = func(*args, **(kwargs or {}))
                    first = args[0] if args else None
                    tensors = first if isinstance(first, (list, tuple)) else [first]
                    if any(isinstance(t, torch.Tensor) and t.numel() > 1 for t in tensors):
                        counted = counted + op_cost(func, args, kwargs or {}, out)
                    return out

            with Mode():
                opt.step()
        else:
            opt.step()
        opt.zero_grad()
    assert counted.flops == optimizer_step_flops(name, n) == OPTIMIZER_FLOPS_PER_PARAM[name] * n


def test_count_ops_leaves_mode_buffers_and_grads_untouched():
    m = create_model("cnn")
    m.eval()
    m[1].train()   # a mixed configuration must come back as it was
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    count_ops(m, x, train=True)
    assert not m.training and m[1].training and not m[0].training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters()) and x.grad is None


def test_every_zoo_model_is_fully_counted_forward_and_training():
    for entry in list_models():
        kw = {"image_size": 64} if entry.name == "yolo" else {"image_size": 16} if entry.name == "resnet" else {}
        model = create_model(entry.name, **kw)
        shape, dtype, high = default_inputs(entry.name, kw)
        x = make_inputs(shape, dtype, high=high)
        inf = count_ops(model, x)
        tr = count_ops(model, x, train=True)
        assert inf.uncounted == {} and tr.uncounted == {}, entry.name
        assert inf.macs > 0 and tr.backward_flops > tr.flops * 0.9, entry.name
        root = inf.module("")
        assert (root.macs, root.flops) == (inf.macs, inf.flops)
        # children at depth 1 never exceed their parent
        assert sum(m.flops for m in inf.modules if m.depth == 1) <= root.flops


def test_modules_are_inclusive_and_depth_one_sums_to_root_for_the_transformer():
    model = create_model("transformer")
    x = make_inputs((2, 64), torch.int64, high=1000)
    c = count_ops(model, x, train=True)
    depth1 = [m for m in c.modules if m.depth == 1]
    root = c.module("")
    # TransformerLM.forward does one add (tok + pos) itself: 2·64·128 FLOPs forward; its backward reduces the
    # gradient broadcast over the batch back to pos's (64, 128): 2·64·128 − 64·128 adds
    assert sum(m.macs for m in depth1) == root.macs
    assert sum(m.flops for m in depth1) + 2 * 64 * 128 == root.flops
    assert sum(m.backward_flops for m in depth1) + 64 * 128 == root.backward_flops
    # embedding backward is a scatter-add of its gradient, attributed to each embedding, never to both:
    # tok gets the (2, 64, 128) gradient, pos the batch-reduced (64, 128) one
    assert c.module("tok").backward_flops == 2 * 64 * 128
    assert c.module("pos").backward_flops == 64 * 128
    assert root.backward_flops + c.module("<loss>").backward_flops == c.backward_flops


def test_yolo_tuple_outputs_count_and_report_the_first_output_shape():
    model = create_model("yolo", image_size=64)
    c = count_ops(model, torch.randn(1, 3, 64, 64), train=True)
    assert c.module("").output_shape == [1, 255, 2, 2]
    assert c.module("<loss>").flops == (255 * 4 - 1) + (255 * 16 - 1) + 1


def test_transformer_7b_counts_on_meta_quickly_with_hand_checked_macs():
    with torch.device("meta"):
        model = create_model("transformer", preset="7b")
    b, t, d, layers, vocab = 8, 2048, 4096, 32, 32000
    c = count_ops(model, torch.empty((b, t), dtype=torch.int64, device="meta"))
    per_layer = b * t * d * (3 * d + d + 8 * d) + b * (t * (t + 1) // 2) * 2 * d   # linears + causal attention
    assert c.macs == layers * per_layer + b * t * d * vocab
    assert c.uncounted == {}


def test_bad_input_raises_netdiet_error():
    with pytest.raises(NetdietError):
        count_ops(nn.Linear(3, 2), torch.randn(2, 3), optimizer="lbfgs")
    with pytest.raises(NetdietError):
        count_ops(nn.Linear(3, 2), torch.randn(2, 5))
    with pytest.raises(NetdietError):
        optimizer_step_flops("rmsprop", 10)


def test_to_dict_carries_schema_and_plain_integers():
    d = count_ops(small_mlp(), torch.randn(5, 4), train=True).to_dict()
    assert d["schema"] == "netdiet.opcounts/1"
    assert isinstance(d["train_flops"], int) and d["modules"][0]["name"] == ""
    assert set(d["operators"]["aten.addmm"]) >= {"count", "macs", "flops", "backward_count", "backward_macs",
                                                 "backward_flops"}


@pytest.mark.parametrize("reentrant,recomputed", [(False, 544 + 32), (True, 544 + 32 + 544)])
def test_activation_checkpointing_recompute_is_counted_in_backward(reentrant, recomputed):
    # the checkpointed a -> relu -> b is recomputed during backward: a's addmm 2·4·8·8 + 32 bias = 544, relu 32;
    # non-reentrant checkpointing stops once relu's output (all b's backward needs) is back, reentrant reruns b too
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self, use_checkpoint: bool):
            super().__init__()
            self.use = use_checkpoint
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            fn = lambda y: self.b(torch.relu(self.a(y)))  # noqa: E731
            return checkpoint(fn, x, use_reentrant=reentrant) if self.use else fn(x)

    x = torch.randn(4, 8)
    plain = count_ops(nn.Sequential(nn.Linear(8, 8), Ckpt(False)), x, train=True, optimizer="none")
    ckpt = count_ops(nn.Sequential(nn.Linear(8, 8), Ckpt(True)), x, train=True, optimizer="none")
    assert ckpt.flops == plain.flops
    assert ckpt.backward_flops == plain.backward_flops + recomputed
    assert ckpt.module("1").backward_flops == plain.module("1").backward_flops + recomputed
    assert ckpt.module("<loss>").backward_flops == 0


def test_parameter_free_model_trains_to_zero_backward_with_a_note():
    c = count_ops(nn.AvgPool2d(2), torch.randn(1, 2, 4, 4), train=True)
    assert c.flops == 2 * 4 * 4 and c.backward_flops == 0 and c.optimizer_flops == 0
    assert any("nothing to back-propagate" in n for n in c.notes)


def test_a_formula_that_fails_on_a_call_reports_the_op_as_uncounted(monkeypatch):
    from netdiet.analysis import ops

    formula = ops.lookup(torch.ops.aten.relu.default)
    broken = ops.Formula(lambda call: 1 / 0, formula.unit, formula.ops, formula.macs, formula.flops, formula.note,
                         formula.moves_data)
    monkeypatch.setitem(ops._BY_PACKET, torch.ops.aten.relu, broken)
    c = count_ops(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), torch.randn(2, 3))
    assert c.uncounted == {"aten.relu": 1}
    assert c.flops == 2 * 18 + 6
    assert any("aten.relu" in n and "ZeroDivisionError" in n for n in c.notes)


def test_batch_norm_is_seven_flops_per_element_in_training_and_two_in_eval():
    # training: stats + normalise 5, affine 2; eval: folded x·a + b. The num_batches_tracked += 1 is integer work.
    bn, x = nn.BatchNorm2d(3), torch.randn(2, 3, 4, 4)
    assert count_ops(bn, x).flops == 2 * 96
    assert count_ops(bn, x, train=True).module("").flops == 7 * 96


def test_zoo_transformer_counts_the_same_on_meta_as_on_cpu():
    torch.manual_seed(0)
    cpu = create_model("transformer")
    x = make_inputs((2, 64), torch.int64, high=1000)
    with torch.device("meta"):
        meta = create_model("transformer")
    a = count_ops(cpu, x, train=True)
    b = count_ops(meta, x.to("meta"), train=True)
    assert (a.macs, a.flops, a.backward_macs, a.backward_flops, a.train_flops) == \
        (b.macs, b.flops, b.backward_macs, b.backward_flops, b.train_flops)
    assert [(m.name, m.flops, m.backward_flops) for m in a.modules] == [(m.name, m.flops, m.backward_flops) for m in b.modules]


@pytest.mark.slow
def test_transformer_7b_training_count_on_meta_stays_under_60s_and_1gib_rss():
    # a fresh process so the peak RSS is the count's own (model built on meta, batch 8, seq 2048, train step)
    import subprocess
    import sys

    code = (
        "import resource, time, torch\n"
        "from netdiet.analysis.counter import count_ops\n"
        "from netdiet.models import create_model\n"
        "t = time.perf_counter()\n"
        "with torch.device('meta'):\n"
        "    m = create_model('transformer', preset='7b')\n"
        "c = count_ops(m, torch.empty((8, 2048), dtype=torch.int64, device='meta'), train=True)\n"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, c.train_flops)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    seconds, rss, train_flops = out.stdout.split()
    assert float(seconds) < 60 and int(rss) < 1024 ** 3
    n = 6_714_695_680  # parameters of the preset; a training step is a bit more than 6·N·tokens
    assert 6 * n * 8 * 2048 < int(train_flops) < 1.1 * 6 * n * 8 * 2048


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_transformer_encoder_layer_fast_path_runs_under_the_counter_and_matches_the_op_by_op_path(activation):
    # the fused op only runs when no hooks are attached to the layer: the counter must not switch it off
    torch.manual_seed(0)
    layer, x = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, activation=activation), torch.randn(2, 5, 8)
    fused = count_ops(layer, x)
    assert list(fused.operators) == ["aten._transformer_encoder_layer_fwd"]
    # in-proj 2·5·8·24 + attention 2·25·16 + out-proj 2·5·8·8 + FFN 2·2·5·8·16
    assert fused.macs == 1920 + 800 + 640 + 2560
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        op_by_op = count_ops(layer, x)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert "aten._transformer_encoder_layer_fwd" not in op_by_op.operators
    assert (op_by_op.macs, op_by_op.flops) == (fused.macs, fused.flops)


def test_tensors_passed_as_keyword_arguments_are_attributed_to_the_caller():
    class Child(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, *, x):
            return self.lin(x)

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(4, 4)
            self.child = Child()

        def forward(self, x):
            h = self.pre(x) * 2.0          # the parent's own multiply: 3·4 FLOPs forward, 12 backward
            return self.child(x=h)

    c = count_ops(Parent(), torch.randn(3, 4), train=True, optimizer="none")
    own = c.module("").backward_flops - c.module("pre").backward_flops - c.module("child").backward_flops
    assert own == 12
    assert c.module("child").backward_flops == c.module("child.lin").backward_flops


def _checkpointed_transformer_counts(device: str) -> tuple:
    from netdiet.training.recompute import enable_checkpointing
    x = torch.zeros(2, 32, dtype=torch.int64, device=device)
    with torch.device(device):
        plain_model, ckpt_model = create_model("transformer"), create_model("transformer")
    enable_checkpointing(ckpt_model)
    return count_ops(plain_model, x, train=True), count_ops(ckpt_model, x, train=True)


def test_checkpointed_transformer_on_meta_counts_the_full_recomputed_forward_in_backward():
    # regression: the meta attention routing was off during the recompute inside backward, so the recomputed
    # SDPA took the math path and torch.utils.checkpoint refused the mismatching saved tensors
    from torch.utils.checkpoint import set_checkpoint_early_stop
    with set_checkpoint_early_stop(False):   # recompute every op of the blocks, so the extra is their forward
        plain, ckpt = _checkpointed_transformer_counts("meta")
    assert ckpt.flops == plain.flops
    assert ckpt.backward_flops == plain.backward_flops + plain.module("blocks").flops
    assert ckpt.module("blocks").backward_flops == plain.module("blocks").backward_flops + plain.module("blocks").flops


def test_checkpointed_transformer_counts_on_meta_equal_the_cpu_counts():
    # default early stop: the recompute ends once every saved tensor is back, so the last block's output Linear
    # and residual add (B·T·(2·512·128 + 2·128) = 8,404,992 FLOPs) are not recomputed
    meta_plain, meta_ckpt = _checkpointed_transformer_counts("meta")
    cpu_plain, cpu_ckpt = _checkpointed_transformer_counts("cpu")
    assert (meta_ckpt.flops, meta_ckpt.backward_flops) == (cpu_ckpt.flops, cpu_ckpt.backward_flops)
    extra = meta_ckpt.backward_flops - meta_plain.backward_flops
    assert extra == meta_plain.module("blocks").flops - 2 * 32 * (2 * 512 * 128 + 2 * 128)


def test_keyword_inputs_as_a_dict_are_counted_like_positional_ones():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(4, 3)
            self.k = nn.Linear(6, 3)

        def forward(self, query, key=None):
            return self.q(query) + self.k(key)

    model = Pair()
    q, k = torch.randn(5, 4), torch.randn(5, 6)
    by_name = count_ops(model, {"key": k, "query": q})
    by_position = count_ops(model, (q, k))
    # q: 5*4*3 = 60 MACs, k: 5*6*3 = 90 MACs; FLOPs 2*150 + two biases 2*15 + the add 15 = 345
    assert by_name.macs == by_position.macs == 150 and by_name.flops == by_position.flops == 345
    assert by_name.module("k").macs == 90 and "forward" not in model.__dict__
    trained = count_ops(model, {"query": q, "key": k}, train=True)
    assert trained.backward_flops == count_ops(model, (q, k), train=True).backward_flops > 0
    with pytest.raises(NetdietError, match="not a parameter of Pair.forward"):
        count_ops(model, {"qurey": q, "key": k})


def test_a_torch_without_the_autograd_internals_is_one_line_naming_its_version(monkeypatch):
    import netdiet.analysis.counter as counter_mod

    monkeypatch.setattr(counter_mod, "_next_sequence_nr", None)
    model = nn.Linear(3, 2)
    with pytest.raises(NetdietError) as err:
        counter_mod.count_ops(model, torch.zeros(1, 3), train=True)
    msg = str(err.value)
    assert f"torch {torch.__version__} lacks torch._C._autograd._get_sequence_nr" in msg and "torch==2.13.0" in msg
    monkeypatch.undo()
    assert counter_mod.count_ops(model, torch.zeros(1, 3), train=True).macs == 6   # with them, 3 x 2 MACs
