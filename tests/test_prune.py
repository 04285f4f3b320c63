"""Unstructured magnitude pruning: exact sparsity, TF-MOT schedule values, masks held through fine-tuning."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from netdiet.compression.base import CompressionState, StageContext, create_technique
from netdiet.compression.prune import (MaskHold, keep_count, magnitude_masks, polynomial_sparsity, should_prune)
from netdiet.errors import NetdietError
from netdiet.models import create_model
from netdiet.training import TrainConfig, fit


def _lenet300(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("lenet300")


def _small_data(mnist5k, n: int = 512):
    return SimpleNamespace(x_train=mnist5k.x_train[:n], y_train=mnist5k.y_train[:n])


# ------------------------------------------------------------------ schedule values by hand
def test_polynomial_schedule_values_match_the_tfmot_formula_worked_by_hand():
    # s_t = s_f + (s_i - s_f) (1 - (t - t0)/n)^p with s_i=0.5, s_f=0.8, t0=0, n=100, p=3
    assert polynomial_sparsity(0, 0.5, 0.8, 0, 100, 3) == pytest.approx(0.5)
    assert polynomial_sparsity(50, 0.5, 0.8, 0, 100, 3) == pytest.approx(0.8 - 0.3 * 0.125)   # 0.7625
    assert polynomial_sparsity(75, 0.5, 0.8, 0, 100, 3) == pytest.approx(0.8 - 0.3 * 0.015625)  # 0.7953125
    assert polynomial_sparsity(100, 0.5, 0.8, 0, 100, 3) == pytest.approx(0.8)
    # clipped outside [t0, t0 + n], and shifted by t0
    assert polynomial_sparsity(150, 0.5, 0.8, 0, 100, 3) == pytest.approx(0.8)
    assert polynomial_sparsity(5, 0.5, 0.8, 20, 120, 3) == pytest.approx(0.5)
    assert polynomial_sparsity(70, 0.5, 0.8, 20, 120, 3) == pytest.approx(0.7625)
    # power 1 is a straight line: a quarter of the way is a quarter of the change
    assert polynomial_sparsity(25, 0.5, 0.8, 0, 100, 1) == pytest.approx(0.575)


def test_pruning_turns_are_every_frequency_steps_inside_begin_end():
    turns = [t for t in range(0, 80) if should_prune(t, 10, 50, 20)]
    assert turns == [10, 30, 50]


def test_keep_count_rounds_like_tfmot():
    assert keep_count(1000, 0.8) == 200
    assert keep_count(10, 0.25) == 8      # round(7.5) -> 8 (banker's rounding keeps the even count)
    assert keep_count(7, 0.5) == 4        # round(3.5) -> 4


# ------------------------------------------------------------------ exact sparsity
def test_layer_scope_prunes_exactly_n_minus_round_keep_in_every_layer_and_only_the_smallest():
    model = _lenet300()
    state = CompressionState()
    tech = create_technique("prune", sparsity=0.8, scope="layer")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tech.apply(model, state, StageContext())
    params = dict(model.named_parameters())
    # 784*300 = 235200 -> keep 47040; 300*100 = 30000 -> keep 6000; 100*10 = 1000 -> keep 200
    expected_zeros = {"1.weight": 188160, "3.weight": 24000, "5.weight": 800}
    for name, zeros in expected_zeros.items():
        p = params[name]
        assert int((p == 0).sum()) == zeros
        assert torch.equal(state.masks[name], p != 0)
        pruned, kept = before[name][~state.masks[name]].abs(), before[name][state.masks[name]].abs()
        assert pruned.max() <= kept.min()
        assert torch.equal(p[state.masks[name]], before[name][state.masks[name]])  # survivors untouched
    assert tech.report()["layers"]["3.weight"]["sparsity"] == pytest.approx(0.8)
    assert torch.equal(params["1.bias"], before["1.bias"])  # biases are not pruned by default


def test_global_scope_uses_one_threshold_over_all_layers_worked_by_hand():
    params = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([0.1, 0.2, 0.3, 40.0])}
    masks = magnitude_masks(params, 0.5, "global")
    # the four smallest of all eight are 0.1, 0.2, 0.3 (in b) and 1.0 (in a)
    assert masks["a"].tolist() == [False, True, True, True]
    assert masks["b"].tolist() == [False, False, False, True]
    per_layer = magnitude_masks(params, 0.5, "layer")
    assert per_layer["a"].tolist() == [False, False, True, True]
    assert per_layer["b"].tolist() == [False, False, True, True]


def test_global_scope_reaches_exact_overall_sparsity_with_uneven_layers():
    model = _lenet300()
    state = CompressionState()
    create_technique("prune", sparsity=0.9, scope="global").apply(model, state, StageContext())
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    total = sum(p.numel() for p in weights)                                # 266200
    zeros = sum(int((p == 0).sum()) for p in weights)
    assert zeros == total - round(total * 0.1)                             # 239580
    per_layer = [float((p == 0).float().mean()) for p in weights]
    assert max(per_layer) - min(per_layer) > 0.01  # a global threshold prunes layers unevenly


def test_a_second_prune_stage_only_adds_zeros():
    model = _lenet300()
    state = CompressionState()
    create_technique("prune", sparsity=0.5).apply(model, state, StageContext())
    first = {n: m.clone() for n, m in state.masks.items()}
    create_technique("prune", sparsity=0.8).apply(model, state, StageContext())
    for name, m in first.items():
        assert not (state.masks[name] & ~m).any()   # nothing pruned before comes back
        assert int((~state.masks[name]).sum()) == m.numel() - keep_count(m.numel(), 0.8)


def test_layers_and_exclude_patterns_choose_what_is_pruned():
    model = _lenet300()
    state = CompressionState()
    create_technique("prune", sparsity=0.5, exclude=["5.*"]).apply(model, state, StageContext())
    assert set(state.masks) == {"1.weight", "3.weight"}
    assert int((model[5].weight == 0).sum()) == 0
    with pytest.raises(NetdietError, match="no parameter matches"):
        create_technique("prune", layers=["nothing.*"]).apply(_lenet300(), CompressionState(), StageContext())


# ------------------------------------------------------------------ masks through fine-tuning
def test_masks_are_held_through_finetuning_while_survivors_train(mnist5k):
    model = _lenet300()
    state = CompressionState()
    tech = create_technique("prune", sparsity=0.7)
    model = tech.apply(model, state, StageContext())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, mnist5k.x_train[:256], mnist5k.y_train[:256], TrainConfig(epochs=1, batch_size=32, lr=1e-2, progress=False),
        callbacks=[MaskHold(state.masks)])
    for name, mask in state.masks.items():
        p = dict(model.named_parameters())[name]
        assert torch.equal(p != 0, mask)
        assert not torch.equal(p[mask], before[name][mask])  # the kept weights did learn


def test_mask_hold_keeps_adam_state_of_pruned_weights_at_zero(mnist5k):
    model = _lenet300()
    state = CompressionState()
    create_technique("prune", sparsity=0.5).apply(model, state, StageContext())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    fit(model, mnist5k.x_train[:128], mnist5k.y_train[:128], TrainConfig(epochs=1, batch_size=64, progress=False),
        callbacks=[MaskHold(state.masks)], optimizer=opt)
    w = model[1].weight
    exp_avg = opt.state[w]["exp_avg"]
    assert int((exp_avg[~state.masks["1.weight"]] != 0).sum()) == 0


def test_polynomial_schedule_updates_masks_on_the_turns_and_ends_exactly_at_final_sparsity(mnist5k):
    model = _lenet300()
    state = CompressionState()
    # 512 samples / batch 64 = 8 steps per epoch, 2 epochs = 16 steps; turns every 4 steps
    tech = create_technique("prune", schedule="polynomial", initial_sparsity=0.5, sparsity=0.8, power=3, frequency=4)
    ctx = StageContext(data=_small_data(mnist5k), finetune=TrainConfig(epochs=2, batch_size=64, progress=False))
    tech.apply(model, state, ctx)
    events = tech.report()["mask_updates"]
    assert [e["step"] for e in events] == [0, 4, 8, 12, 16]
    for e in events:
        assert e["sparsity"] == pytest.approx(0.8 - 0.3 * (1 - e["step"] / 16) ** 3)
    assert events[2]["sparsity"] == pytest.approx(0.7625)   # half way: 0.8 - 0.3 / 8
    for name, mask in state.masks.items():
        p = dict(model.named_parameters())[name]
        assert int((p == 0).sum()) == p.numel() - keep_count(p.numel(), 0.8)
        assert torch.equal(p != 0, mask)


def test_constant_schedule_whose_turns_miss_the_end_still_reaches_the_target(mnist5k):
    model = _lenet300()
    state = CompressionState()
    # 8 steps, frequency 5: turns at 0 and 5 only; the final application at step 8 is added
    tech = create_technique("prune", schedule="constant", sparsity=0.6, frequency=5)
    tech.apply(model, state, StageContext(data=_small_data(mnist5k), finetune=TrainConfig(epochs=1, progress=False)))
    steps = [e["step"] for e in tech.report()["mask_updates"]]
    assert steps == [0, 5, 8]
    assert tech.report()["sparsity"] == pytest.approx(1 - sum(keep_count(n, 0.6) for n in (235200, 30000, 1000)) / 266200)


def test_begin_step_after_the_last_finetuning_step_is_bad_input(mnist5k):
    tech = create_technique("prune", schedule="polynomial", begin_step=1000)
    ctx = StageContext(data=_small_data(mnist5k), finetune=TrainConfig(epochs=1, progress=False))
    with pytest.raises(NetdietError, match="begin_step 1000"):
        tech.apply(_lenet300(), CompressionState(), ctx)


# ------------------------------------------------------------------ options and state
@pytest.mark.parametrize("options, message", [
    ({"sparsity": 1.0}, "sparsity must be a number in \\[0, 1\\)"),
    ({"sparsity": -0.1}, "sparsity must be"),
    ({"sparsity": "half"}, "sparsity must be"),
    ({"schedule": "cubic"}, "schedule must be one of"),
    ({"scope": "net"}, "scope must be one of"),
    ({"schedule": "polynomial", "initial_sparsity": 0.9, "sparsity": 0.5}, "exceeds the final sparsity"),
    ({"frequency": 0}, "frequency must be at least 1"),
    ({"begin_step": 10, "end_step": 5}, "end_step 5 is before begin_step 10"),
    ({"power": 0}, "power must be a positive number"),
    ({"sparsityy": 0.5}, "has no option"),
])
def test_bad_options_are_one_line_netdiet_errors(options, message):
    with pytest.raises(NetdietError, match=message) as info:
        create_technique("prune", **options)
    assert "\n" not in str(info.value)


def test_state_dict_round_trips_the_masks():
    model = _lenet300()
    tech = create_technique("prune", sparsity=0.6)
    tech.apply(model, CompressionState(), StageContext())
    other = create_technique("prune", **{k: v for k, v in tech.get_config().items() if k != "technique"})
    other.load_state_dict(tech.state_dict())
    assert set(other.state_dict()) == {"mask.1.weight", "mask.3.weight", "mask.5.weight"}
    assert all(torch.equal(other.state_dict()[k], v) for k, v in tech.state_dict().items())
    with pytest.raises(NetdietError, match="unexpected tensor"):
        other.load_state_dict({"codebook.x": torch.zeros(2)})


@pytest.mark.slow
def test_pruned_lenet300_keeps_accuracy_after_polynomial_finetuning(mnist5k):
    torch.manual_seed(0)
    model = create_model("lenet300")
    fit(model, mnist5k.x_train, mnist5k.y_train, TrainConfig(epochs=2, progress=False))
    from netdiet.training import evaluate_accuracy
    dense = evaluate_accuracy(model, mnist5k.x_test, mnist5k.y_test)
    tech = create_technique("prune", schedule="polynomial", initial_sparsity=0.5, sparsity=0.9, scope="global")
    tech.apply(model, CompressionState(), StageContext(data=mnist5k, finetune=TrainConfig(epochs=2, lr=5e-4, progress=False)))
    pruned = evaluate_accuracy(model, mnist5k.x_test, mnist5k.y_test)
    assert tech.report()["sparsity"] == pytest.approx(0.9, abs=1e-5)
    assert pruned >= dense - 0.02, (dense, pruned)
    assert math.isfinite(pruned)
