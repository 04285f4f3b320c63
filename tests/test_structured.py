"""Structured pruning (Torch-Pruning): fewer channels for real, valid residual/depthwise nets, replayable shapes."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from netdiet.compression.base import CompressionState, StageContext, create_technique, replay_structure
from netdiet.compression.structured import count_macs
from netdiet.errors import NetdietError
from netdiet.models import create_model
from netdiet.training import TrainConfig


def _prune(spec: str, x: torch.Tensor, seed: int = 0, kw: dict | None = None, state: CompressionState | None = None,
           **options):
    torch.manual_seed(seed)
    model = create_model(spec, **(kw or {}))
    state = state or CompressionState()
    tech = create_technique("structured", **options)
    model = tech.apply(model, state, StageContext(example_inputs=x[:1]))
    return model, state, tech


def _replayed(spec: str, state: CompressionState, pruned: nn.Module, kw: dict | None = None) -> nn.Module:
    fresh = replay_structure(create_model(spec, **(kw or {})), state.structure)
    fresh.load_state_dict(pruned.state_dict())
    return fresh


def test_cnn_half_the_channels_cuts_macs_to_the_hand_count():
    x = torch.rand(2, 1, 28, 28)
    model, state, tech = _prune("cnn", x, ratio=0.5)
    # dense: 28*28*32*9*1 + 14*14*64*9*32 + 3136*10 = 225,792 + 3,612,672 + 31,360
    assert tech.report()["macs_before"] == 3_869_824
    # half: 28*28*16*9 + 14*14*32*9*16 + 1568*10 = 112,896 + 903,168 + 15,680
    assert tech.report()["macs_after"] == 1_031_744 == count_macs(model, x[:1])
    assert (model[0].out_channels, model[4].in_channels, model[4].out_channels, model[10].in_features) == (16, 16, 32, 1568)
    params_after = 16 * 9 + 2 * 16 + 32 * 16 * 9 + 2 * 32 + 1568 * 10 + 10
    assert tech.report()["params_after"] == params_after == sum(p.numel() for p in model.parameters())
    assert model(x).shape == (2, 10)


def test_resnet_residual_blocks_keep_matching_widths_and_shrink():
    x = torch.rand(2, 3, 32, 32)
    model, state, tech = _prune("resnet", x, kw={"depth": 8}, ratio=0.5)
    r = tech.report()
    assert r["params_after"] < 0.3 * r["params_before"] and r["macs_after"] < 0.3 * r["macs_before"]
    # the stem, every block and the shortcut of an add must agree on the channel count, halved from 16/32/64
    assert model.conv1.out_channels == 8
    widths = [(b.conv1.out_channels, b.conv2.out_channels) for b in model.layers]
    assert widths == [(8, 8), (16, 16), (32, 32)]
    for block in model.layers:
        if isinstance(block.shortcut, nn.Sequential):
            assert block.shortcut[0].out_channels == block.conv2.out_channels
    assert model.fc.in_features == 32 and model.fc.out_features == 10
    assert model(x).shape == (2, 10)


def test_mobilenet_depthwise_convs_stay_depthwise_after_pruning():
    x = torch.rand(2, 3, 32, 32)
    dense = create_model("mobilenet")
    model, state, tech = _prune("mobilenet", x, ratio=0.5)
    blocks = [m for m in model.modules() if type(m).__name__ == "DepthwiseSeparable"]
    dense_blocks = [m for m in dense.modules() if type(m).__name__ == "DepthwiseSeparable"]
    for b, d in zip(blocks, dense_blocks):
        dw = b.depthwise
        assert dw.groups == dw.in_channels == dw.out_channels == d.depthwise.in_channels // 2
        assert dw.weight.shape == (dw.out_channels, 1, 3, 3)
        assert b.pointwise.out_channels == d.pointwise.out_channels // 2
    assert model(x).shape == (2, 10)
    assert tech.report()["macs_after"] < 0.35 * tech.report()["macs_before"]


@pytest.mark.parametrize("spec, kw, shape", [
    ("resnet", {"depth": 8}, (3, 3, 32, 32)),
    ("mobilenet", {}, (3, 3, 32, 32)),
    ("lenet5", {}, (3, 1, 28, 28)),
    ("yolo", {"width_mult": 0.25, "image_size": 64}, (1, 3, 64, 64)),
])
def test_replaying_the_recorded_edit_on_a_fresh_factory_model_gives_identical_outputs(spec, kw, shape):
    x = torch.rand(*shape)
    model, state, _ = _prune(spec, x, kw=kw, ratio=0.4)
    assert state.structure and state.structure[-1]["op"] == "structured"
    import json
    edits = json.loads(json.dumps(state.structure))  # what the archive header carries
    fresh = replay_structure(create_model(spec, **kw), edits)
    fresh.load_state_dict(model.state_dict())  # strict: every shape matches
    model.eval(), fresh.eval()
    outs, fresh_outs = model(x), fresh(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    fresh_outs = fresh_outs if isinstance(fresh_outs, tuple) else (fresh_outs,)
    assert all(torch.equal(a, b) for a, b in zip(outs, fresh_outs))


def test_replay_refuses_a_model_that_does_not_match_the_edit():
    x = torch.rand(1, 1, 28, 28)
    _, state, _ = _prune("cnn", x, ratio=0.5)
    with pytest.raises(NetdietError, match="expects '0' to be Conv2d"):
        replay_structure(create_model("lenet300"), state.structure)


def test_bn_scale_importance_keeps_the_channels_with_the_largest_gamma():
    torch.manual_seed(0)
    model = create_model("cnn")
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0 if i % 2 == 0 else 0.01 for i in range(32)]))
        model[5].weight.copy_(torch.tensor([1.0 if i < 32 else 0.01 for i in range(64)]))
    w0, w4, w10 = model[0].weight.clone(), model[4].weight.clone(), model[10].weight.clone()
    even = torch.arange(0, 32, 2)
    tech = create_technique("structured", ratio=0.5, importance="bn-scale")
    tech.apply(model, CompressionState(), StageContext(example_inputs=torch.rand(1, 1, 28, 28)))
    assert torch.equal(model[0].weight, w0[even])
    assert torch.equal(model[4].weight, w4[:32][:, even])
    assert torch.equal(model[10].weight, w10[:, :32 * 49])  # flatten: channel c owns columns c*49 .. c*49+48


def test_magnitude_importance_removes_the_neurons_with_the_smallest_weights():
    torch.manual_seed(0)
    model = create_model("lenet300")
    small = torch.tensor([1.0 if i % 4 else 1e-3 for i in range(100)])  # every fourth neuron of layer 3 is tiny
    with torch.no_grad():
        model[3].weight.mul_(small[:, None])
        model[3].bias.mul_(small)
        model[5].weight.mul_(small[None, :])
    tech = create_technique("structured", ratio=0.25, importance="magnitude", ignore=["1"])
    keep = torch.nonzero(small == 1.0).flatten()
    w3 = model[3].weight.clone()
    tech.apply(model, CompressionState(), StageContext(example_inputs=torch.rand(1, 1, 28, 28)))
    assert model[1].out_features == 300              # ignored
    assert model[3].out_features == 75 == len(keep)  # 100 - 0.25 * 100
    assert torch.equal(model[3].weight, w3[keep])


def test_target_macs_reaches_the_target_by_choosing_the_ratio():
    x = torch.rand(1, 1, 28, 28)
    model, _, tech = _prune("lenet300", x, target_macs=0.5)
    r = tech.report()
    # 784*300 + 300*100 + 100*10 = 266,200 dense; at ratio q: 784*300(1-q) + 300*100(1-q)^2 + 100(1-q)*10
    assert r["macs_before"] == 266_200
    assert r["macs_after"] <= r["target_macs"] == 133_100
    assert r["macs_after"] > 0.45 * 266_200           # the bisection (to 0.01 in ratio) does not overshoot by far
    keep1, keep3 = model[1].out_features, model[3].out_features
    assert r["macs_after"] == 784 * keep1 + keep1 * keep3 + keep3 * 10
    assert 0.4 < r["ratio"] < 0.55


def test_iterative_pruning_finetunes_between_steps(mnist5k):
    data = SimpleNamespace(x_train=mnist5k.x_train[:128], y_train=mnist5k.y_train[:128])
    torch.manual_seed(0)
    model = create_model("cnn")
    tech = create_technique("structured", ratio=0.5, iterative_steps=2)
    tech.apply(model, CompressionState(), StageContext(data=data, finetune=TrainConfig(epochs=1, batch_size=64, progress=False)))
    steps = tech.report()["steps"]
    assert len(steps) == 2 and all(s["finetune"]["steps"] == 2 for s in steps)
    assert steps[0]["macs"] > steps[1]["macs"] == 1_031_744


def test_taylor_importance_without_data_is_bad_input():
    with pytest.raises(NetdietError, match="taylor importance needs data"):
        create_technique("structured", importance="taylor").apply(
            create_model("cnn"), CompressionState(), StageContext(example_inputs=torch.rand(1, 1, 28, 28)))


def test_masks_of_an_earlier_prune_are_resized_with_the_weights():
    x = torch.rand(1, 1, 28, 28)
    torch.manual_seed(0)
    model = create_model("lenet300")
    state = CompressionState()
    create_technique("prune", sparsity=0.8).apply(model, state, StageContext())
    create_technique("structured", ratio=0.5).apply(model, state, StageContext(example_inputs=x))
    params = dict(model.named_parameters())
    for name, mask in state.masks.items():
        assert mask.shape == params[name].shape
        assert torch.equal(mask, params[name] != 0)


@pytest.mark.parametrize("options, message", [
    ({"ratio": 1.0}, "ratio must be a number in \\[0, 1\\)"),
    ({"importance": "random"}, "importance must be one of"),
    ({"iterative_steps": 0}, "iterative_steps must be an integer >= 1"),
    ({"target_macs": -5}, "target_macs must be"),
    ({"round_to": 0}, "round_to must be"),
    ({"max_ratio": 1.0}, "max_ratio must be"),
])
def test_bad_structured_options_are_netdiet_errors(options, message):
    with pytest.raises(NetdietError, match=message):
        create_technique("structured", **options)


def test_bn_scale_on_a_net_without_batchnorm_is_bad_input():
    with pytest.raises(NetdietError, match="needs BatchNorm"):
        create_technique("structured", importance="bn-scale").apply(
            create_model("lenet300"), CompressionState(), StageContext(example_inputs=torch.rand(1, 784)))


def test_unreachable_target_macs_is_bad_input():
    with pytest.raises(NetdietError, match="target_macs 10 is below"):
        _prune("cnn", torch.rand(1, 1, 28, 28), target_macs=10)


def test_transformer_feed_forward_neurons_prune_when_attention_and_embeddings_are_ignored():
    x = torch.randint(0, 1000, (1, 64))
    ignore = ["tok", "pos", "blocks.0.attn", "blocks.1.attn", "blocks.0.mlp.2", "blocks.1.mlp.2"]
    model, state, tech = _prune("transformer", x, ratio=0.5, ignore=ignore)
    assert [b.mlp[0].out_features for b in model.blocks] == [256, 256]        # d_ff 512 -> 256
    assert [b.attn.qkv.out_features for b in model.blocks] == [384, 384]      # attention untouched
    # each block loses 256 hidden neurons: 256 * (128 + 1) in the first Linear, 256 * 128 in the second
    assert tech.report()["params_before"] - tech.report()["params_after"] == 2 * 256 * (128 + 1 + 128)
    fresh = _replayed("transformer", state, model)
    assert torch.equal(fresh(x), model(x))


def test_a_model_torch_pruning_cannot_slice_is_a_one_line_error_naming_ignore():
    with pytest.raises(NetdietError, match="Torch-Pruning cannot prune this model.*`ignore`"):
        _prune("transformer", torch.randint(0, 1000, (1, 64)), ratio=0.5)


def test_finetuning_after_structured_pruning_keeps_an_earlier_prune_sparse(mnist5k):
    data = SimpleNamespace(x_train=mnist5k.x_train[:128], y_train=mnist5k.y_train[:128])
    torch.manual_seed(0)
    model = create_model("lenet300")
    state = CompressionState()
    create_technique("prune", sparsity=0.8).apply(model, state, StageContext())
    create_technique("structured", ratio=0.5).apply(
        model, state, StageContext(data=data, example_inputs=data.x_train[:1],
                                   finetune=TrainConfig(epochs=1, batch_size=64, lr=1e-2, progress=False)))
    params = dict(model.named_parameters())
    assert params["3.weight"].shape == (50, 150)
    for name, mask in state.masks.items():
        assert mask.shape == params[name].shape and torch.equal(params[name] != 0, mask)
        assert float((~mask).float().mean()) > 0.6   # still sparse after training (about 0.8 before slicing)


def test_round_to_keeps_channel_counts_multiples():
    x = torch.rand(1, 1, 28, 28)
    model, _, _ = _prune("cnn", x, ratio=0.3, round_to=8)
    # 32 * 0.7 = 22.4 and 64 * 0.7 = 44.8 channels, rounded to multiples of 8
    assert model[0].out_channels % 8 == 0 and model[4].out_channels % 8 == 0
    assert model[0].out_channels in (16, 24) and model[4].out_channels in (40, 48)


def test_taylor_importance_removes_neurons_that_do_not_affect_the_loss_even_with_large_weights(mnist5k):
    # neurons of layer 3 whose outgoing weights are zero get zero gradient, so |w * dL/dw| = 0 for their whole group,
    # although their incoming weights are ten times larger than the others (magnitude would keep them)
    data = SimpleNamespace(x_train=mnist5k.x_train[:512], y_train=mnist5k.y_train[:512])
    dead = torch.tensor([i % 4 == 0 for i in range(100)])
    def build():
        torch.manual_seed(0)
        model = create_model("lenet300")
        with torch.no_grad():
            model[3].weight[dead] *= 10
            model[3].bias[dead] *= 10
            model[3].bias[~dead] = 1.0   # the live neurons fire on every image (no accidental zero gradients)
            model[5].weight[:, dead] = 0
        return model
    taylor = build()
    create_technique("structured", ratio=0.25, importance="taylor", ignore=["1"]).apply(
        taylor, CompressionState(), StageContext(data=data, example_inputs=data.x_train[:1]))
    kept = build()[3].weight[~dead]
    assert taylor[3].out_features == 75 and torch.equal(taylor[3].weight, kept)
    assert all(p.grad is None for p in taylor.parameters())  # the gradients it used are not left behind
    magnitude = build()
    create_technique("structured", ratio=0.25, importance="magnitude", ignore=["1"]).apply(
        magnitude, CompressionState(), StageContext(example_inputs=data.x_train[:1]))
    assert not torch.equal(magnitude[3].weight, kept)


def test_global_pruning_removes_the_ratio_of_all_channels_but_not_evenly_per_layer():
    torch.manual_seed(0)
    model = create_model("cnn")
    create_technique("structured", ratio=0.5, global_pruning=True).apply(
        model, CompressionState(), StageContext(example_inputs=torch.rand(1, 1, 28, 28)))
    widths = (model[0].out_channels, model[4].out_channels)
    assert sum(widths) == (32 + 64) // 2          # half of all 96 channels
    assert widths != (16, 32)                     # ranked across layers, not half of each
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
