"""Distillation: the loss against a hand computation, alpha's two ends, zoo and copy students."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from netdiet.compression.base import CompressionState, StageContext, create_technique
from netdiet.compression.distill import distillation_loss
from netdiet.data import Dataset
from netdiet.errors import NetdietError
from netdiet.models import create_model
from netdiet.training import TrainConfig, evaluate_accuracy, fit


# one torch thread: these train end to end, and two threads thrash on a loaded 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small(mnist5k):
    return Dataset(name="small", x_train=mnist5k.x_train[:1000], y_train=mnist5k.y_train[:1000],
                   x_test=mnist5k.x_test, y_test=mnist5k.y_test, num_classes=10)


@pytest.fixture(scope="module")
def teacher(small):
    torch.manual_seed(0)
    model = create_model("lenet300")
    fit(model, small.x_train, small.y_train, TrainConfig(epochs=4, progress=False))
    return model


def test_distillation_loss_equals_t_squared_times_kl_worked_by_hand():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    t = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    temp = 2.0
    total = 0.0
    for row_s, row_t in zip(s.tolist(), t.tolist()):
        zs = sum(math.exp(v / temp) for v in row_s)
        zt = sum(math.exp(v / temp) for v in row_t)
        ps = [math.exp(v / temp) / zs for v in row_s]
        pt = [math.exp(v / temp) / zt for v in row_t]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    expected = temp ** 2 * total / 2
    assert distillation_loss(s, t, temp).item() == pytest.approx(expected, rel=1e-5)  # float32
    assert distillation_loss(t, t, temp).item() == pytest.approx(0.0, abs=1e-7)


def test_zoo_student_is_smaller_learns_from_the_teacher_and_becomes_the_archived_spec(small, teacher):
    state = CompressionState(spec={"spec": "lenet300", "kwargs": {}}, masks={"1.weight": torch.ones(300, 784, dtype=torch.bool)},
                             structure=[{"op": "lowrank", "layers": []}])
    tech = create_technique("distill", student="mlp", student_kwargs={"widths": [32]}, temperature=4.0, alpha=0.7)
    ctx = StageContext(data=small, finetune=TrainConfig(epochs=3, lr=3e-3, progress=False), teacher=teacher)
    student = tech.apply(copy.deepcopy(teacher), state, ctx)
    assert sum(p.numel() for p in student.parameters()) == 784 * 32 + 32 + 32 * 10 + 10 == tech.report()["student_params"]
    assert tech.report()["teacher_params"] == 266_610
    assert state.spec == {"spec": "mlp", "kwargs": {"widths": [32]}}
    assert state.masks == {} and state.structure == []
    assert evaluate_accuracy(student, small.x_test, small.y_test) > 0.7  # chance is 0.1; 3 epochs on 1,000 images


def test_alpha_one_ignores_the_labels(small, teacher):
    # with alpha = 1 the loss is the soft term only, so shuffled labels must give the very same student
    shuffled = Dataset(name="shuffled", x_train=small.x_train, y_train=small.y_train[torch.randperm(1000)],
                       x_test=small.x_test, y_test=small.y_test, num_classes=10)
    students = []
    for data in (small, shuffled):
        tech = create_technique("distill", student="mlp", student_kwargs={"widths": [16]}, alpha=1.0)
        ctx = StageContext(data=data, finetune=TrainConfig(epochs=1, progress=False), teacher=teacher, seed=3)
        students.append(tech.apply(teacher, CompressionState(), ctx))
    for a, b in zip(students[0].parameters(), students[1].parameters()):
        assert torch.equal(a, b)


def test_alpha_zero_is_plain_training_on_the_labels(small, teacher):
    tech = create_technique("distill", student="mlp", student_kwargs={"widths": [16]}, alpha=0.0)
    cfg = TrainConfig(epochs=1, progress=False, seed=5)
    student = tech.apply(teacher, CompressionState(), StageContext(data=small, finetune=cfg, teacher=teacher, seed=5))
    torch.manual_seed(5)
    reference = create_model("mlp", widths=[16])
    fit(reference, small.x_train, small.y_train, cfg, loss_fn=F.cross_entropy)
    for a, b in zip(student.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)


def test_copy_student_keeps_its_pruned_weights_at_zero(small, teacher):
    student = copy.deepcopy(teacher)
    keep = student[1].weight.detach().abs() > student[1].weight.detach().abs().median()
    with torch.no_grad():
        student[1].weight.mul_(keep)
    state = CompressionState(masks={"1.weight": keep})
    tech = create_technique("distill", student="copy", alpha=0.5)
    out = tech.apply(student, state, StageContext(data=small, finetune=TrainConfig(epochs=1, progress=False), teacher=teacher))
    assert out is student
    assert int((out[1].weight[~keep] != 0).sum()) == 0
    assert not torch.equal(out[1].weight, teacher[1].weight * keep)   # it did train


@pytest.mark.parametrize("options, message", [
    ({"alpha": 1.5}, "alpha"), ({"temperature": 0}, "temperature"), ({"student": ""}, "student"),
    ({"student_kwargs": {"widths": [8]}}, "student_kwargs"), ({"student": "mlp", "student_kwargs": [1]}, "mapping"),
])
def test_bad_options_raise_one_line_errors(options, message):
    with pytest.raises(NetdietError, match=message):
        create_technique("distill", **options)


def test_distill_without_finetune_epochs_is_a_clear_error(teacher):
    with pytest.raises(NetdietError, match="finetune epochs"):
        create_technique("distill").apply(teacher, CompressionState(), StageContext())
