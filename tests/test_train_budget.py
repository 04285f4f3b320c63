"""--memory-budget: the picker's choice never exceeds the budget when measured; too small a budget says the minimum."""
import pytest
import torch

from netdiet.cli import main
from netdiet.errors import NetdietError
from netdiet.models import create_model
from netdiet.training.budget import LiveStorageTracker, choose_for_budget, measure_training_peak


def test_tracker_counts_weights_grads_and_adam_state_of_a_linear_layer_by_hand():
    torch.manual_seed(0)
    model = torch.nn.Linear(100, 10)                      # 1,010 parameters = 4,040 bytes
    x, y = torch.randn(8, 100), torch.randint(0, 10, (8,))
    peak = measure_training_peak(model, x, y, optimizer="adam")
    # steady state holds weights + grads + exp_avg + exp_avg_sq (4 x 4,040) + the batch (3,200 + 64) at least
    assert peak >= 4 * 4040 + 3200 + 64
    # ... and not more than that plus the step's temporaries: Adam's foreach step materialises sqrt(v) and the
    # update (2 x 4,040), plus logits-sized tensors of the loss (8 x 10 x 4 each)
    assert peak <= 6 * 4040 + 3200 + 64 + 4 * (8 * 10 * 4)


@pytest.mark.parametrize("spec,kw,budget,batch", [
    ("lenet300", {}, 7 << 20, 128), ("mlp", {}, 8 << 20, 128), ("lenet5", {}, 11 << 20, 32),
    pytest.param("mlp", {"widths": [512] * 4}, 22 << 20, 256, marks=pytest.mark.slow),  # the optimizer step sets the peak
    pytest.param("cnn", {"channels": [8, 16]}, 2 << 20, 32, marks=pytest.mark.slow),   # escalates to recompute + bf16
    pytest.param("resnet", {"in_channels": 1, "depth": 8}, 8 << 20, 16, marks=pytest.mark.slow),
    pytest.param("mobilenet", {"in_channels": 1}, 8 << 20, 16, marks=pytest.mark.slow),
])
def test_budget_picker_choice_measures_within_the_budget_on_zoo_models(mnist5k, spec, kw, budget, batch):
    torch.manual_seed(0)
    model = create_model(spec, **kw)
    decision = choose_for_budget(model, (1, 28, 28), budget, optimizer="adam", batch_size=batch,
                                 x_sample=mnist5k.x_train, y_sample=mnist5k.y_train)
    assert 1 <= decision.batch_size <= batch
    assert decision.measured_peak <= budget
    # measured again, independently of the picker's own check
    x, y = mnist5k.x_train[:decision.batch_size].clone(), mnist5k.y_train[:decision.batch_size].clone()
    again = measure_training_peak(model, x, y, optimizer="adam", precision=decision.precision,
                                  checkpointing=decision.checkpointing)
    assert again <= budget
    assert str(decision.batch_size) in decision.explanation


def test_budget_below_batch_one_names_the_minimum_needed(mnist5k):
    model = create_model("lenet300")
    with pytest.raises(NetdietError, match=r"too small for batch 1.*at least [0-9.]+ MiB \((\d+) bytes\)") as exc:
        choose_for_budget(model, (1, 28, 28), "1MiB", optimizer="adam", batch_size=64,
                          x_sample=mnist5k.x_train, y_sample=mnist5k.y_train)
    import re
    need = int(re.search(r"\((\d+) bytes\)", str(exc.value)).group(1))
    # lenet300 with Adam: 266,610 parameters x 4 bytes x (weights + grads + 2 moments) = 4,265,760 bytes at least
    assert need >= 4 * 266610 * 4


def test_cli_budget_too_small_exits_2_with_one_line(tmp_path, capsys):
    code = main(["train", "lenet300", "--data", "digits", "--model-kw", "in_features=64", "--memory-budget", "64KiB",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "at least" in err[0]
    assert not (tmp_path / "run" / "model.safetensors").exists()
