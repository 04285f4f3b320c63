"""Timing statistics and dense / CSR / bitmask storage bytes, checked by hand and against scipy."""
import time

import numpy as np
import pytest
import torch
from torch import nn

from netdiet.analysis.latency import (
    DEFAULT_TIMING_THREADS,
    _percentile,
    measure_latency,
    median_ci_ranks,
    ratio_of,
    summarise,
    time_callable,
    time_interleaved,
    timing_threads_of,
)
from netdiet.analysis.storage import dataset_storage, tensor_storage, weight_storage
from netdiet.errors import NetdietError
from netdiet.models import create_model


def test_tensor_storage_matches_hand_count():
    t = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    s = tensor_storage(t)
    assert (s["numel"], s["nonzero"], s["dense_bytes"]) == (6, 2, 24)
    assert s["csr_bytes"] == 2 * 4 + 2 * 4 + 3 * 4          # values + int32 columns + (rows + 1) int32 pointers
    assert s["bitmask_bytes"] == 1 + 2 * 4                   # ceil(6 / 8) mask byte + values
    assert s["best"] == "bitmask" and s["density"] == pytest.approx(1 / 3)


def test_csr_bytes_equal_scipy_csr_matrix_nbytes():
    sparse = pytest.importorskip("scipy.sparse")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 3, 5, 5, generator=g)
    w[torch.rand(w.shape, generator=g) < 0.9] = 0
    m = sparse.csr_matrix(w.reshape(64, -1).numpy())
    assert tensor_storage(w)["csr_bytes"] == m.data.nbytes + m.indices.nbytes + m.indptr.nbytes


def test_weight_storage_reports_the_pruned_weight_of_torch_prune():
    from torch.nn.utils import prune
    model = nn.Sequential(nn.Linear(10, 10, bias=False))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    doc = weight_storage(model)
    (row,) = doc["parameters"]
    assert row["name"] == "0.weight" and row["nonzero"] == 50 and row["sparsity"] == pytest.approx(0.5)
    assert doc["totals"]["dense_bytes"] == 400 and doc["totals"]["csr_bytes"] == 50 * 8 + 11 * 4


def test_dense_model_totals_and_tied_weights_counted_once():
    model = create_model("lenet300")
    doc = weight_storage(model)
    assert doc["totals"]["numel"] == 266_610 and doc["totals"]["dense_bytes"] == 4 * 266_610
    assert doc["totals"]["best_single_layout"] == "dense"
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    assert weight_storage(tied)["totals"]["numel"] == 16


def test_mnist_images_are_sparse_enough_for_csr_to_beat_dense(mnist5k):
    s = dataset_storage(mnist5k.x_test)
    assert s["samples"] == 1000 and s["features"] == 784
    assert 0.15 < s["density"] < 0.25
    assert s["csr_bytes"] < 0.5 * s["dense_bytes"]
    assert s["nonzero"] == int((mnist5k.x_test != 0).sum())


def test_percentile_matches_numpy_linear_method():
    values = sorted([3.0, 1.0, 7.0, 2.0, 10.0, 4.0])
    for q in (0.0, 0.5, 0.95, 1.0):
        assert _percentile(values, q) == pytest.approx(np.percentile(values, q * 100))


def test_time_callable_measures_a_known_sleep():
    r = time_callable(lambda: time.sleep(0.005), warmup=1, repeats=8, time_limit_s=0.5)
    assert r["median_ms"] >= 5.0 and r["p95_ms"] >= r["median_ms"] and r["repeats"] >= 8
    assert r["ci_low_ms"] <= r["median_ms"] <= r["ci_high_ms"]
    assert r["threads"] == DEFAULT_TIMING_THREADS == 1
    with pytest.raises(NetdietError):
        time_callable(lambda: None, warmup=0, repeats=0)


def test_median_interval_ranks_by_hand_and_against_scipy():
    # n = 10: P(B <= 0) = 1/1024, P(B <= 1) = 11/1024 = 0.0107 <= 0.025 < P(B <= 2) = 56/1024, so the interval is
    # [x_(1), x_(8)] (0-based), coverage 1 - 22/1024 = 97.9 %; n = 6: 1 - 2/64 = 96.9 % with [x_(0), x_(5)];
    # n = 5: already 1 - 2/32 = 93.8 % < 95 %, so no interval at all
    assert median_ci_ranks(10) == (1, 8) and median_ci_ranks(6) == (0, 5) and median_ci_ranks(5) is None
    binom = pytest.importorskip("scipy.stats").binom
    for n in list(range(6, 120)) + [500, 1000]:
        j, k = median_ci_ranks(n)
        assert k == n - 1 - j
        assert 1 - 2 * binom.cdf(j, n, 0.5) >= 0.95 > 1 - 2 * binom.cdf(j + 1, n, 0.5), n
    for n in (1001, 5000):   # normal approximation: within one rank of the exact binomial choice
        j, _ = median_ci_ranks(n)
        exact = int(binom.ppf(0.025, n, 0.5)) - 1
        assert abs(j - exact) <= 1, (n, j, exact)


def test_summary_interval_and_stability_by_hand():
    # sorted: 9, 9.5, 9.8, 9.9, 10.0, 10.1, 10.2, 10.5, 11, 30: median (10.0 + 10.1) / 2 = 10.05, interval
    # [x_(1), x_(8)] = [9.5, 11]; larger half-width 11 - 10.05 = 0.95, 0.95 / 10.05 = 9.45 % <= 10 %: stable
    s = summarise([10.0, 9.0, 11.0, 10.5, 9.5, 10.2, 9.8, 10.1, 9.9, 30.0])
    assert s["median_ms"] == pytest.approx(10.05)
    assert (s["ci_low_ms"], s["ci_high_ms"]) == (9.5, 11.0)
    assert s["ci_rel"] == pytest.approx(0.95 / 10.05) and s["stable"]
    assert not summarise([9.0, 9.5, 9.8, 9.9, 10.0, 10.1, 10.2, 10.5, 11.2, 30.0])["stable"]   # 1.15 / 10.05 = 11.4 %
    wide = summarise([1.0, 3.0] * 5)                                   # the interval spans 1..3 around a median of 2
    assert wide["ci_rel"] == pytest.approx(0.5) and not wide["stable"]
    assert not summarise([1.0] * 5)["stable"]                          # five samples bound no median at 95 %


def test_an_unstable_timing_repeats_until_the_time_limit_and_says_so():
    flip = iter(range(10**9))
    r = time_callable(lambda: time.sleep(0.001 if next(flip) % 2 else 0.004), warmup=0, repeats=6, time_limit_s=0.3)
    assert not r["stable"] and r["repeats"] > 6 and 0.3 <= r["seconds"] < 1.5 and r["time_limit_s"] == 0.3


def test_interleaved_timing_alternates_and_runs_on_the_timing_threads():
    calls, threads_seen = [], set()

    def make(tag):
        def fn():
            calls.append(tag)
            threads_seen.add(torch.get_num_threads())
        return fn

    before = torch.get_num_threads()
    stats = time_interleaved({"a": make("a"), "b": make("b")}, warmup=1, repeats=6, time_limit_s=0.0)
    assert calls[:8] == ["a", "b"] * 4 and len(calls) == 2 * (1 + stats["a"]["repeats"])
    assert stats["a"]["repeats"] == stats["b"]["repeats"] == 6     # time limit 0: one check after the first 6 rounds
    assert threads_seen == {1} and torch.get_num_threads() == before
    with timing_threads_of(2):
        time_callable(make("c"), warmup=0, repeats=1, time_limit_s=0.0)
    assert threads_seen == {1, 2} and torch.get_num_threads() == before


def test_a_ratio_of_timings_exists_only_when_both_are_stable():
    a = {"median_ms": 10.0, "ci_low_ms": 9.0, "ci_high_ms": 11.0, "stable": True, "threads": 1}
    b = {"median_ms": 4.0, "ci_low_ms": 3.8, "ci_high_ms": 4.2, "stable": True, "threads": 1}
    r = ratio_of(a, b)
    assert r["value"] == 2.5 and r["low"] == pytest.approx(9 / 4.2) and r["high"] == pytest.approx(11 / 3.8)
    noisy = ratio_of(a, {**b, "stable": False})
    assert noisy["value"] is None and noisy["median_ratio"] == 2.5 and not noisy["stable"]


def test_measure_latency_reports_throughput_and_leaves_model_unchanged():
    model = create_model("lenet300")
    before = [p.clone() for p in model.parameters()]
    r = measure_latency(model, torch.randn(8, 1, 28, 28), train=True, optimizer="adam", warmup=1, repeats=3)
    assert r.batch_size == 8 and r.threads == 1 and r.forward_repeats >= 3
    assert r.throughput_samples_per_s == pytest.approx(8 / (r.forward_ms_median / 1e3))
    assert r.train_throughput_samples_per_s == pytest.approx(8 / (r.train_step_ms_median / 1e3))
    assert r.forward_ms_p95 >= r.forward_ms_median > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert set(r.to_dict()) >= {"forward_ms_median", "train_step_ms_p95", "threads", "warmup", "repeats"}


def test_layout_bytes_follow_the_formulas_for_random_sparse_matrices():
    pytest.importorskip("hypothesis")
    sparse = pytest.importorskip("scipy.sparse")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=25, deadline=None)
    @given(rows=st.integers(1, 12), cols=st.integers(1, 40), density=st.floats(0.0, 1.0), seed=st.integers(0, 10**6))
    def check(rows, cols, density, seed):
        g = torch.Generator().manual_seed(seed)
        t = torch.randn(rows, cols, generator=g)
        t[torch.rand(rows, cols, generator=g) >= density] = 0
        s = tensor_storage(t)
        m = sparse.csr_matrix(t.numpy())
        assert s["nonzero"] == m.nnz
        assert s["csr_bytes"] == m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
        assert s["bitmask_bytes"] == -(-rows * cols // 8) + 4 * m.nnz
        assert s["best_bytes"] == min(s["dense_bytes"], s["csr_bytes"], s["bitmask_bytes"])

    check()
