"""Low-rank factorisation: exactness at full rank, Eckart-Young error, rank rules, replay, masks, fine-tuning."""
import pytest
import torch
from torch import nn

from netdiet.compression.base import CompressionState, StageContext, create_technique, replay_structure
from netdiet.compression.lowrank import factorise, rank_for_energy
from netdiet.errors import NetdietError
from netdiet.models import create_model
from netdiet.training import TrainConfig, evaluate_accuracy, fit


# one torch thread: these train end to end, and two threads thrash on a loaded 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


def _lenet300(seed=0):
    torch.manual_seed(seed)
    return create_model("lenet300")


def test_full_rank_linear_factorisation_computes_the_same_outputs():
    torch.manual_seed(0)
    lin = nn.Linear(20, 12)
    x = torch.randn(5, 20)
    seq = factorise(lin, 12)
    assert [tuple(m.weight.shape) for m in seq] == [(12, 20), (12, 12)]
    assert seq[0].bias is None and torch.equal(seq[1].bias, lin.bias)
    torch.testing.assert_close(seq(x), lin(x), atol=1e-5, rtol=1e-5)


def test_full_rank_conv_factorisation_keeps_stride_padding_and_outputs():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 9, 9)
    seq = factorise(conv, 8)  # the weight is an 8 x 27 matrix: rank 8 is exact
    assert tuple(seq[0].weight.shape) == (8, 3, 3, 3) and tuple(seq[1].weight.shape) == (8, 8, 1, 1)
    assert seq[0].stride == (2, 2) and seq[0].padding == (1, 1)
    torch.testing.assert_close(seq(x), conv(x), atol=1e-5, rtol=1e-5)


def test_truncation_error_equals_the_discarded_singular_values():
    # Eckart-Young: || W - W_r ||_F = sqrt(sum of s_i^2 for i >= r)
    torch.manual_seed(1)
    lin = nn.Linear(30, 16, bias=False)
    s = torch.linalg.svdvals(lin.weight.detach().double())
    seq = factorise(lin, 5)
    w_r = (seq[1].weight @ seq[0].weight).double()
    err = torch.linalg.norm(lin.weight.detach().double() - w_r)
    assert err.item() == pytest.approx(s[5:].pow(2).sum().sqrt().item(), rel=1e-4)


def test_energy_rule_picks_the_smallest_rank_reaching_the_fraction():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14: cumulative 0.643, 0.929, 1.0
    assert rank_for_energy(s, 0.5) == 1
    assert rank_for_energy(s, 9 / 14) == 1   # exactly reached counts
    assert rank_for_energy(s, 0.643) == 2     # just above 9/14
    assert rank_for_energy(s, 0.9) == 2
    assert rank_for_energy(s, 0.95) == 3
    assert rank_for_energy(s, 1.0) == 3


def test_fixed_rank_gives_r_times_in_plus_out_parameters_and_skips_layers_that_would_grow():
    model = _lenet300()
    state = CompressionState()
    tech = create_technique("lowrank", rank=10)
    model = tech.apply(model, state, StageContext())
    rep = tech.report()["layers"]
    assert rep["1"]["rank"] == 10 and rep["1"]["params_after"] == 10 * (784 + 300)
    assert rep["3"]["rank"] == 10 and rep["3"]["params_after"] == 10 * (300 + 100)
    # 100 -> 10 at rank 10: 10 * 110 = 1,100 > 1,000, so the last layer stays dense
    assert rep["5"]["rank"] is None and isinstance(model[5], nn.Linear)
    expected = 10 * 1084 + 300 + 10 * 400 + 100 + 1010
    assert sum(p.numel() for p in model.parameters()) == expected == tech.report()["params_after"]
    assert state.structure == [{"op": "lowrank", "layers": [{"name": "1", "kind": "linear", "rank": 10},
                                                            {"name": "3", "kind": "linear", "rank": 10}]}]


def test_param_ratio_keeps_the_factorised_layers_within_the_budget():
    model = _lenet300()
    tech = create_technique("lowrank", param_ratio=0.25)
    tech.apply(model, CompressionState(), StageContext())
    layers = tech.report()["layers"]
    before = sum(v["params_before"] for v in layers.values())
    after = sum(v["params_after"] for v in layers.values())
    assert before == 784 * 300 + 300 * 100 + 100 * 10
    assert after <= 0.25 * before
    for v in layers.values():  # every entry follows r * (out + in) or stays dense
        if v["rank"] is not None:
            assert v["params_after"] == v["rank"] * sum(v["matrix"])
    # the budget is used: one rank step more on the biggest layer would overshoot or nearly
    assert after > 0.2 * before


def test_replaying_the_edit_on_a_fresh_factory_model_gives_identical_outputs():
    torch.manual_seed(0)
    model = create_model("lenet5")
    state = CompressionState()
    model = create_technique("lowrank", energy=0.6).apply(model, state, StageContext())
    assert any(e["kind"] == "conv2d" for e in state.structure[0]["layers"])
    rebuilt = replay_structure(create_model("lenet5"), state.structure)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(3, 1, 28, 28)
    model.eval(), rebuilt.eval()
    assert torch.equal(rebuilt(x), model(x))


def test_replay_rejects_an_edit_that_does_not_fit_the_model():
    with pytest.raises(NetdietError, match="does not fit"):
        replay_structure(create_model("lenet300"), [{"op": "lowrank", "layers": [{"name": "1", "rank": 999}]}])
    with pytest.raises(NetdietError, match="does not fit"):
        replay_structure(create_model("lenet300"), [{"op": "lowrank", "layers": [{"name": "nope", "rank": 2}]}])


def test_masks_of_factorised_layers_are_dropped_and_others_are_held_through_finetuning(mnist5k):
    model = _lenet300()
    keep = torch.rand(10, 100, generator=torch.Generator().manual_seed(0)) > 0.5
    with torch.no_grad():
        model[5].weight.mul_(keep)
    state = CompressionState(masks={"1.weight": torch.ones(300, 784, dtype=torch.bool), "5.weight": keep})
    small = type(mnist5k)(name="s", x_train=mnist5k.x_train[:256], y_train=mnist5k.y_train[:256],
                          x_test=mnist5k.x_test[:64], y_test=mnist5k.y_test[:64], num_classes=10)
    ctx = StageContext(data=small, finetune=TrainConfig(epochs=1, batch_size=64, lr=1e-2, progress=False))
    model = create_technique("lowrank", rank=20, layers=["1"]).apply(model, state, ctx)
    assert "1.weight" not in state.masks and "5.weight" in state.masks
    assert int((model[5].weight[~keep] != 0).sum()) == 0
    assert int((model[5].weight[keep] != 0).sum()) == int(keep.sum())


def test_finetuning_recovers_accuracy_lost_by_a_harsh_rank(mnist5k):
    import copy
    data = type(mnist5k)(name="s", x_train=mnist5k.x_train[:1000], y_train=mnist5k.y_train[:1000],
                         x_test=mnist5k.x_test, y_test=mnist5k.y_test, num_classes=10)
    torch.manual_seed(0)
    model = create_model("lenet300")
    fit(model, data.x_train, data.y_train, TrainConfig(epochs=3, progress=False))
    dense = evaluate_accuracy(model, data.x_test, data.y_test)
    cut = create_technique("lowrank", rank=3).apply(copy.deepcopy(model), CompressionState(), StageContext())
    cut_acc = evaluate_accuracy(cut, data.x_test, data.y_test)
    ctx = StageContext(data=data, finetune=TrainConfig(epochs=2, lr=1e-3, progress=False))
    tuned = create_technique("lowrank", rank=3).apply(copy.deepcopy(model), CompressionState(), ctx)
    tuned_acc = evaluate_accuracy(tuned, data.x_test, data.y_test)
    assert cut_acc < dense - 0.05          # rank 3 really hurts before fine-tuning
    assert tuned_acc > cut_acc + 0.05      # and fine-tuning wins much of it back


@pytest.mark.parametrize("options, message", [
    ({"energy": 1.5}, "energy"), ({"energy": 0.9, "rank": 4}, "one of"), ({"param_ratio": 1.0}, "param_ratio"),
    ({"rank": 0}, "rank"), ({"layers": "1"}, "layers"),
])
def test_bad_options_raise_one_line_errors(options, message):
    with pytest.raises(NetdietError, match=message):
        create_technique("lowrank", **options)


def test_unknown_layer_name_is_reported_with_the_choices():
    tech = create_technique("lowrank", rank=2, layers=["7"])
    with pytest.raises(NetdietError, match="not Linear/Conv2d"):
        tech.apply(_lenet300(), CompressionState(), StageContext())
