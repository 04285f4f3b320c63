"""Scaling: least-squares fits, batch sweeps, the largest batch within a budget, dataset x epochs projections."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from netdiet.analysis.scaling import (
    MAX_BATCH,
    ScalingPoint,
    fit_points,
    largest_batch_within,
    linear_fit,
    project_training,
    sweep_batch_sizes,
    with_batch,
)
from netdiet.errors import NetdietError


def fake_estimator(fixed, per_sample, round_to=1, calls=None):
    """peak = fixed + per_sample * batch, rounded up to `round_to` (an allocator-like step)."""
    def est(model, inputs, *, optimizer, dtype, amp, checkpointing):
        b = inputs[0].shape[0]
        raw = fixed + per_sample * b
        peak = -(-raw // round_to) * round_to
        if calls is not None:
            calls.append(b)
        return SimpleNamespace(peak_estimated=peak, inference_peak=fixed // 2 + per_sample // 3 * b,
                               activations=per_sample * b, batch_size=b)
    return est


def test_linear_fit_recovers_an_exact_line_with_r2_one():
    f = linear_fit([1, 8, 32], [1000 + 37 * 1, 1000 + 37 * 8, 1000 + 37 * 32])
    assert f.slope == pytest.approx(37.0)
    assert f.intercept == pytest.approx(1000.0)
    assert f.r2 == pytest.approx(1.0)


def test_linear_fit_r2_matches_hand_computation():
    # x = 1,2,3; y = 1,3,2: mean_y 2, slope = sxy/sxx = (−1·−1 + 0 + 1·0)/2 = 0.5, intercept 1.
    # predictions 1.5, 2, 2.5 -> ss_res = 0.25+1+0.25 = 1.5; ss_tot = 1+1+0 = 2; R^2 = 0.25
    f = linear_fit([1, 2, 3], [1, 3, 2])
    assert (f.slope, f.intercept) == (pytest.approx(0.5), pytest.approx(1.0))
    assert f.r2 == pytest.approx(0.25)


def test_linear_fit_of_a_constant_reports_no_r2():
    f = linear_fit([1, 2, 4], [7, 7, 7])
    assert f.slope == 0 and f.intercept == pytest.approx(7) and f.r2 is None


def test_with_batch_replaces_dim0_on_meta_and_real_tensors():
    meta = torch.empty(1, 3, 8, 8, device="meta")
    assert with_batch([meta], 16)[0].shape == (16, 3, 8, 8)
    real = torch.arange(6.0).view(2, 3)
    out = with_batch([real], 5)[0]
    assert out.shape == (5, 3)
    assert torch.equal(out[2], real[0]) and torch.equal(out[3], real[1])
    assert with_batch([real], 1)[0].shape == (1, 3)


def test_sweep_fits_fixed_and_per_sample_memory_and_linear_flops():
    def counter(model, inputs, *, train, optimizer):
        b = inputs[0].shape[0]
        return SimpleNamespace(macs=100 * b, flops=250 * b, train_flops=750 * b + 40)
    res = sweep_batch_sizes(nn.Linear(2, 2), (torch.zeros(1, 2),), [32, 1, 8], estimator=fake_estimator(5000, 120),
                            counter=counter)
    assert [p.batch_size for p in res.points] == [1, 8, 32]
    assert res.fit["memory_estimated"] == {"fixed": 5000, "per_sample": 120, "r2": pytest.approx(1.0), "n": 3}
    assert res.fit["flops"]["per_sample"] == pytest.approx(250) and res.fit["flops"]["fixed"] == pytest.approx(0, abs=1e-6)
    assert res.fit["train_flops"]["fixed"] == pytest.approx(40)
    assert "memory_measured" not in res.fit


def test_sweep_rejects_an_empty_or_nonpositive_batch_list():
    with pytest.raises(NetdietError):
        sweep_batch_sizes(nn.Linear(2, 2), (torch.zeros(1, 2),), [], estimator=fake_estimator(1, 1), count_flops=False)
    with pytest.raises(NetdietError):
        sweep_batch_sizes(nn.Linear(2, 2), (torch.zeros(1, 2),), [0, 4], estimator=fake_estimator(1, 1), count_flops=False)


def test_fit_points_includes_measured_memory_only_when_every_point_has_it():
    pts = [ScalingPoint(1, 110, 50, 10, peak_measured=120), ScalingPoint(4, 140, 60, 40, peak_measured=150)]
    fit = fit_points(pts)
    assert fit["memory_measured"]["per_sample"] == 10 and fit["memory_measured"]["fixed"] == 110
    pts[1].peak_measured = None
    assert "memory_measured" not in fit_points(pts)


@pytest.mark.parametrize("budget", [10_000, 10_037, 1_000_000, 123_456_789])
def test_largest_batch_is_exact_for_a_linear_estimator(budget):
    b, est = largest_batch_within(nn.Linear(2, 2), (1, 2), None, budget, estimator=fake_estimator(1000, 37))
    assert b == (budget - 1000) // 37
    assert est.peak_estimated <= budget


def test_largest_batch_is_exact_when_the_estimate_steps_like_an_allocator():
    # rounding to 4 KiB blocks makes the line a staircase: the fitted guess is off, the bisection must fix it
    est_fn = fake_estimator(70_001, 3_333, round_to=4096)
    budget = 50 * 1024 * 1024
    b, est = largest_batch_within(nn.Linear(2, 2), (1, 2), None, budget, estimator=est_fn)

    def peak(n):
        return est_fn(None, (torch.empty(n, 2, device="meta"),), optimizer="adam", dtype=None, amp=False,
                      checkpointing=False).peak_estimated
    assert peak(b) <= budget < peak(b + 1)


def test_largest_batch_uses_few_estimates():
    calls = []
    largest_batch_within(nn.Linear(2, 2), (1, 2), None, 10**9, estimator=fake_estimator(1000, 37, calls=calls))
    assert len(calls) <= 6  # 1, 2, the fitted guess, its neighbour: no linear scan


def test_largest_batch_is_zero_when_batch_one_does_not_fit():
    b, est = largest_batch_within(nn.Linear(2, 2), (1, 2), None, 999, estimator=fake_estimator(1000, 37))
    assert b == 0 and est.peak_estimated == 1037


def test_largest_batch_stops_at_the_cap_when_memory_does_not_grow():
    b, _ = largest_batch_within(nn.Linear(2, 2), (1, 2), None, 10**6, estimator=fake_estimator(1000, 0))
    assert b == MAX_BATCH


def test_largest_batch_accepts_a_factory_and_a_size_string():
    b, _ = largest_batch_within(lambda: nn.Linear(2, 2), (1, 2), None, "1MiB", estimator=fake_estimator(1000, 37))
    assert b == (1024 * 1024 - 1000) // 37


def test_projection_multiplies_per_sample_cost_by_samples_and_epochs():
    # 6.4e6 FLOPs per training step at batch 64 -> 1e5 per sample; 60k samples x 3 epochs -> 1.8e10
    pj = project_training(6_400_000, 64, 60_000, 3, samples_per_second=2_000.0, throughput_source="test")
    assert pj.train_flops_per_sample == 100_000
    assert pj.total_train_flops == 18_000_000_000
    assert pj.projected_seconds == pytest.approx(90.0)


def test_projection_without_throughput_has_no_time():
    pj = project_training(1000, 10, 5, 2)
    assert pj.total_train_flops == 1000 and pj.projected_seconds is None


def test_projection_rejects_nonpositive_sizes():
    with pytest.raises(NetdietError, match="positive"):
        project_training(1000, 10, 0, 2)


def test_largest_batch_is_exact_for_a_convex_estimator():
    # attention-like growth (quadratic in batch): the secant undershoots from one side; bracketing must finish it
    def est(model, inputs, *, optimizer, dtype, amp, checkpointing):
        b = inputs[0].shape[0]
        return SimpleNamespace(peak_estimated=10_000 + 50 * b + 3 * b * b)
    budget = 7_777_777
    b, _ = largest_batch_within(nn.Linear(2, 2), (1, 2), None, budget, estimator=est)
    assert 10_000 + 50 * b + 3 * b * b <= budget < 10_000 + 50 * (b + 1) + 3 * (b + 1) ** 2
