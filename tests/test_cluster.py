"""Weight clustering: at most 2**bits values per layer, zeros stay zero, centroids trained by summed gradients."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netdiet.compression.base import CompressionState, StageContext, create_technique
from netdiet.compression.cluster import kmeans_1d
from netdiet.errors import NetdietError
from netdiet.models import create_model
from netdiet.training import TrainConfig


def _lenet300(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("lenet300")


def test_kmeans_on_two_obvious_groups_finds_their_means():
    values = torch.tensor([0.0, 0.1, 0.2, 10.0, 10.1, 10.2])
    centroids, idx = kmeans_1d(values, 2, "linear")
    assert centroids.tolist() == pytest.approx([0.1, 10.1])
    assert idx.tolist() == [0, 0, 0, 1, 1, 1]
    c_pp, idx_pp = kmeans_1d(values, 2, "kmeans++", seed=3)
    assert sorted(c_pp.tolist()) == pytest.approx([0.1, 10.1])


def test_linear_init_with_three_centroids_on_hand_data():
    # linear init: -1, 0.5, 2; Lloyd moves them to the means of {-1, -0.8}, {0.4, 0.6}, {1.8, 2}
    values = torch.tensor([-1.0, -0.8, 0.4, 0.6, 1.8, 2.0])
    centroids, idx = kmeans_1d(values, 3, "linear")
    assert centroids.tolist() == pytest.approx([-0.9, 0.5, 1.9])
    assert idx.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("bits", [1, 3])
def test_dense_layers_use_at_most_two_to_the_bits_values_and_the_encoding_reproduces_them(bits):
    model = _lenet300()
    state = CompressionState()
    tech = create_technique("cluster", bits=bits)
    tech.apply(model, state, StageContext())
    params = dict(model.named_parameters())
    for name in ("1.weight", "3.weight", "5.weight"):
        enc = state.encodings[name]
        assert enc.kind == "cluster" and enc.bits == bits
        assert enc.codebook.shape == (2 ** bits,) and enc.indices.dtype == torch.uint8
        assert int(enc.indices.max()) < 2 ** bits
        assert torch.unique(params[name]).numel() <= 2 ** bits
        assert torch.equal(enc.dequantize(), params[name])
    # 30,000 uniform-ish weights fill every one of the 8 clusters
    assert torch.unique(params["3.weight"]).numel() == 2 ** bits
    assert tech.report()["index_bits"] == 266200 * bits


def test_pruned_weights_stay_zero_and_count_inside_the_two_to_the_bits_budget():
    model = _lenet300()
    state = CompressionState()
    create_technique("prune", sparsity=0.9).apply(model, state, StageContext())
    create_technique("cluster", bits=4).apply(model, state, StageContext())
    params = dict(model.named_parameters())
    for name, mask in state.masks.items():
        p = params[name]
        assert torch.equal(p != 0, mask)             # zeros exactly where pruned, survivors never snapped to 0
        assert torch.unique(p).numel() <= 16         # 0 plus at most 15 shared survivor values
        enc = state.encodings[name]
        assert enc.codebook[0] == 0.0 and torch.all(enc.indices[~mask] == 0) and torch.all(enc.indices[mask] > 0)
        assert torch.equal(enc.dequantize(), p)


def test_finetuning_moves_the_centroids_by_the_summed_gradient_of_their_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    x, y = torch.randn(8, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    state = CompressionState()
    create_technique("cluster", bits=2).apply(model, state, StageContext())
    enc = state.encodings["0.weight"]
    codebook, indices = enc.codebook.clone(), enc.indices.long()
    # independent gradient of the clustered model on the single batch
    probe = nn.Sequential(nn.Linear(6, 3))
    probe.load_state_dict(model.state_dict())
    F.cross_entropy(probe(x), y).backward()
    expected_grad = torch.zeros(4).index_add_(0, indices.flatten(), probe[0].weight.grad.flatten())
    expected = codebook - 0.5 * expected_grad
    expected_bias = probe[0].bias.detach() - 0.5 * probe[0].bias.grad
    # one SGD step on the whole batch
    tech = create_technique("cluster", bits=2)
    state2 = CompressionState()
    tech.apply(model, state2, StageContext(data=SimpleNamespace(x_train=x, y_train=y),
                                           finetune=TrainConfig(epochs=1, batch_size=8, lr=0.5, optimizer="sgd", progress=False)))
    # re-clustering an already clustered layer finds the same 4 values, then one step moves them
    new = state2.encodings["0.weight"]
    assert torch.equal(new.indices.long(), indices)
    assert new.codebook.tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert model[0].bias.tolist() == pytest.approx(expected_bias.tolist(), abs=1e-6)  # the bias trains normally
    assert torch.equal(model[0].weight, new.codebook[indices])


def test_finetuning_after_pruning_keeps_zeros_and_the_value_budget(mnist5k):
    model = _lenet300()
    state = CompressionState()
    create_technique("prune", sparsity=0.8, include_bias=True).apply(model, state, StageContext())
    data = SimpleNamespace(x_train=mnist5k.x_train[:256], y_train=mnist5k.y_train[:256])
    tech = create_technique("cluster", bits=3)
    before = None
    tech.apply(model, state, StageContext(data=data, finetune=TrainConfig(epochs=1, batch_size=64, lr=1e-3, progress=False)))
    params = dict(model.named_parameters())
    for name, mask in state.masks.items():
        assert torch.equal(params[name] != 0, mask), name   # weights and the (not clustered) pruned biases
    for name in ("1.weight", "3.weight", "5.weight"):
        assert torch.unique(params[name]).numel() <= 8
        assert torch.equal(state.encodings[name].dequantize(), params[name])
    assert tech.report()["finetune"]["steps"] == 4
    assert before is None


def test_conv_bits_apply_to_convolutions_only():
    torch.manual_seed(0)
    model = create_model("lenet5")
    state = CompressionState()
    create_technique("cluster", bits=5, conv_bits=8).apply(model, state, StageContext())
    assert {n: e.bits for n, e in state.encodings.items()} == {"conv1.weight": 8, "conv2.weight": 8,
                                                               "fc1.weight": 5, "fc2.weight": 5}
    assert torch.unique(model.conv2.weight).numel() <= 256 and torch.unique(model.fc1.weight).numel() <= 32


def test_kmeanspp_is_reproducible_with_the_same_seed():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(100, 50))
    b = nn.Sequential(nn.Linear(100, 50))
    b.load_state_dict(a.state_dict())
    sa, sb = CompressionState(), CompressionState()
    create_technique("cluster", bits=3, init="kmeans++").apply(a, sa, StageContext(seed=7))
    create_technique("cluster", bits=3, init="kmeans++").apply(b, sb, StageContext(seed=7))
    assert torch.equal(sa.encodings["0.weight"].codebook, sb.encodings["0.weight"].codebook)
    assert torch.equal(a[0].weight, b[0].weight) and torch.unique(a[0].weight).numel() == 8


def test_one_bit_on_a_pruned_layer_is_zero_or_the_mean_of_the_survivors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, -2.0, 0.2, 3.0], [-0.05, 1.0, 0.0, 2.0]]))
    state = CompressionState()
    create_technique("prune", sparsity=0.5).apply(model, state, StageContext())   # keeps -2, 3, 1, 2
    create_technique("cluster", bits=1).apply(model, state, StageContext())
    assert state.encodings["0.weight"].codebook.tolist() == pytest.approx([0.0, 1.0])  # (-2 + 3 + 1 + 2) / 4
    assert model[0].weight.tolist() == [[0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]]


@pytest.mark.parametrize("options, message", [
    ({"bits": 0}, "bits must be an integer in 1..8"),
    ({"bits": 9}, "bits must be an integer in 1..8"),
    ({"conv_bits": 12}, "conv_bits must be an integer in 1..8"),
    ({"init": "random"}, "init must be one of"),
    ({"iterations": -1}, "iterations must be"),
])
def test_bad_cluster_options_are_netdiet_errors(options, message):
    with pytest.raises(NetdietError, match=message):
        create_technique("cluster", **options)


def test_state_dict_round_trips_codebooks_and_indices():
    model = _lenet300()
    tech = create_technique("cluster", bits=2)
    tech.apply(model, CompressionState(), StageContext())
    other = create_technique("cluster", bits=2)
    other.load_state_dict(tech.state_dict())
    assert set(other.state_dict()) == set(tech.state_dict())
    assert all(torch.equal(other.state_dict()[k], v) for k, v in tech.state_dict().items())
    with pytest.raises(NetdietError, match="codebook.<param> and indices.<param>"):
        other.load_state_dict({"codebook.a": torch.zeros(4)})


def test_prune_structured_cluster_chain_round_trips_through_the_archive_exactly():
    from netdiet.compression import archive
    from netdiet.models import ModelSpec
    torch.manual_seed(0)
    model = create_model("cnn")
    state = CompressionState(spec=ModelSpec("cnn", {}).to_dict())
    x = torch.rand(4, 1, 28, 28)
    create_technique("prune", sparsity=0.6).apply(model, state, StageContext())
    create_technique("structured", ratio=0.5).apply(model, state, StageContext(example_inputs=x[:1]))
    create_technique("cluster", bits=4).apply(model, state, StageContext())
    loaded = archive.read(archive.encode(model, state))
    model.eval(), loaded.model.eval()
    assert torch.equal(loaded.model(x), model(x))
    assert loaded.model[0].out_channels == 16
    assert torch.unique(loaded.model[4].weight).numel() <= 16
