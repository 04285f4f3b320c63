"""The trainer's loop features: schedules, accumulation, L1, early stopping, recompute, checkpoints."""
import math

import pytest
import torch
from torch import nn

from netdiet.errors import NetdietError
from netdiet.models import create_model
from netdiet.training import TrainConfig, fit
from netdiet.training.callbacks import EarlyStopping
from netdiet.training.schedule import lr_at


@pytest.fixture(scope="module")
def digits():
    from netdiet.data import get_dataset
    return get_dataset("digits")


def _mlp(widths=(32,), **kw):
    torch.manual_seed(0)
    return create_model("mlp", widths=list(widths), in_features=64, **kw)


def test_cosine_schedule_is_half_the_base_lr_halfway_and_warmup_ramps_linearly():
    kw = dict(base_lr=0.1, schedule="cosine", total_steps=110, warmup_steps=10)
    assert lr_at(0, **kw) == pytest.approx(0.1 / 11)
    assert lr_at(9, **kw) == pytest.approx(0.1 * 10 / 11)
    assert lr_at(10, **kw) == pytest.approx(0.1)
    assert lr_at(60, **kw) == pytest.approx(0.05)           # (60-10)/100 = half way: cos(pi/2) = 0
    assert lr_at(110, **kw) == pytest.approx(0.0, abs=1e-12)
    step = dict(base_lr=1.0, schedule="step", total_steps=100, steps_per_epoch=10, step_epochs=3, gamma=0.5)
    assert [lr_at(s, **step) for s in (0, 29, 30, 59, 60)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert lr_at(50, base_lr=1.0, schedule="linear", total_steps=100) == pytest.approx(0.5)


def test_gradient_accumulation_of_two_half_batches_equals_one_full_batch(digits):
    x, y = digits.x_train[:1280], digits.y_train[:1280]
    full, accum = _mlp(), _mlp()
    fit(full, x, y, TrainConfig(epochs=1, batch_size=64, optimizer="sgd", lr=0.1, progress=False))
    fit(accum, x, y, TrainConfig(epochs=1, batch_size=32, grad_accum=2, optimizer="sgd", lr=0.1, progress=False))
    for a, b in zip(full.parameters(), accum.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_l1_penalty_drives_weights_toward_zero(digits):
    x, y = digits.x_train, digits.y_train
    plain, sparse = _mlp((64,)), _mlp((64,))
    cfg = dict(epochs=4, batch_size=64, lr=3e-3, optimizer="adam", progress=False)
    fit(plain, x, y, TrainConfig(**cfg))
    fit(sparse, x, y, TrainConfig(**cfg, l1=1e-3))
    def l1(m):
        return sum(p.abs().sum().item() for p in m.parameters() if p.dim() > 1)
    def near_zero(m):
        w = torch.cat([p.detach().flatten() for p in m.parameters() if p.dim() > 1])
        return (w.abs() < 1e-2).float().mean().item()
    # measured here: sum|w| 538 -> 315 and the share of |w| < 0.01 from 6 % to 49 % (4 epochs, l1 = 1e-3)
    assert l1(sparse) < 0.65 * l1(plain)
    assert near_zero(sparse) > near_zero(plain) + 0.3


def test_early_stopping_stops_after_patience_and_restores_the_best_epochs_weights():
    model = nn.Linear(2, 2)
    es = EarlyStopping(patience=2, monitor="val_acc")
    history = [0.50, 0.70, 0.60, 0.65, 0.90]
    weights_at = {}
    stopped = None
    for epoch, acc in enumerate(history):
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        weights_at[epoch + 1] = model.weight.clone()
        if es.on_epoch_end(model, epoch, {"val_acc": acc}):
            stopped = epoch + 1
            break
    assert stopped == 4 and es.best_epoch == 2 and es.best == 0.70
    es.on_train_end(model)
    torch.testing.assert_close(model.weight, weights_at[2])


def test_fit_with_patience_ends_early_and_returns_the_best_validation_model(digits):
    x, y, xv, yv = digits.x_train, digits.y_train, digits.x_test, digits.y_test
    model = _mlp((32,))
    # SGD with a far too large LR: validation accuracy peaks early and then collapses
    res = fit(model, x, y, TrainConfig(epochs=12, batch_size=32, lr=2.0, optimizer="sgd", patience=2, progress=False),
              x_val=xv, y_val=yv)
    es = res.early_stopping
    assert es["stopped_epoch"] is not None and len(res.history) == es["stopped_epoch"] < 12
    best = max(h["val_acc"] for h in res.history)
    assert es["best"] == best
    from netdiet.training import evaluate_accuracy
    assert evaluate_accuracy(model, xv, yv) == pytest.approx(best)
    assert res.history[-1]["val_acc"] < best


def test_activation_checkpointing_gives_the_same_gradients_and_keeps_fewer_activation_bytes(digits):
    from netdiet.training.budget import measure_activation_bytes
    from netdiet.training.recompute import enable_checkpointing
    x, y = digits.x_train[:128].clone(), digits.y_train[:128].clone()
    plain = _mlp((256,) * 6)
    ckpt = _mlp((256,) * 6)
    info = enable_checkpointing(ckpt)
    assert info["children"] == 1 + 6 * 2 + 1 and len(info["segments"]) == 4   # round(sqrt(14)) segments
    for m in (plain, ckpt):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    assert list(plain.state_dict()) == list(ckpt.state_dict())               # file layout unchanged
    kept_plain = measure_activation_bytes(_mlp((256,) * 6), x, y)
    kept_ckpt = measure_activation_bytes(_mlp((256,) * 6), x, y, checkpointing=True)
    # by hand: each ReLU keeps its output (the next Linear saves the same storage as its input): 6 x 128 x 256 x 4
    # bytes, plus cross-entropy's log-softmax 128 x 10 x 4 and two scalars
    assert kept_plain == pytest.approx(6 * 128 * 256 * 4 + 128 * 10 * 4, abs=16)
    assert kept_ckpt < 0.6 * kept_plain


def test_bf16_autocast_trains_on_cpu_and_reaches_similar_accuracy(digits):
    x, y = digits.x_train, digits.y_train
    accs = {}
    for precision in ("fp32", "bf16"):
        m = _mlp((64,))
        fit(m, x, y, TrainConfig(epochs=4, batch_size=64, lr=3e-3, precision=precision, progress=False))
        from netdiet.training import evaluate_accuracy
        accs[precision] = evaluate_accuracy(m, digits.x_test, digits.y_test)
        assert m[1].weight.dtype == torch.float32                             # master weights stay fp32
    assert accs["bf16"] > 0.85 and abs(accs["bf16"] - accs["fp32"]) < 0.05


def test_dataloader_workers_see_the_same_batches_as_in_loop_indexing(digits):
    x, y = digits.x_train[:640], digits.y_train[:640]
    a, b = _mlp(), _mlp()
    fit(a, x, y, TrainConfig(epochs=1, batch_size=64, optimizer="sgd", lr=0.1, progress=False))
    res = fit(b, x, y, TrainConfig(epochs=1, batch_size=64, optimizer="sgd", lr=0.1, workers=2, progress=False))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
    assert 0 <= res.history[0]["data_wait_fraction"] < 1


def test_bad_training_settings_are_one_line_errors(digits):
    x, y = digits.x_train[:64], digits.y_train[:64]
    for cfg, words in ((TrainConfig(batch_size=0), "batch_size"), (TrainConfig(schedule="exp"), "schedule"),
                       (TrainConfig(precision="fp16"), "CUDA"), (TrainConfig(resume=True), "--resume")):
        with pytest.raises(NetdietError, match=words) as exc:
            fit(_mlp(), x, y, cfg)
        assert "\n" not in str(exc.value)
