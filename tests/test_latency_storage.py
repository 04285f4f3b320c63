"""Timing statistics and dense / CSR / bitmask storage bytes, checked by hand and against scipy."""
import time

import numpy as np
import pytest
import torch
from torch import nn

from netdiet.analysis.latency import _percentile, measure_latency, time_callable
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
    r = time_callable(lambda: time.sleep(0.002), warmup=1, repeats=5)
    assert r["median_ms"] >= 2.0 and r["p95_ms"] >= r["median_ms"] and r["repeats"] == 5
    assert r["threads"] == torch.get_num_threads()
    with pytest.raises(NetdietError):
        time_callable(lambda: None, warmup=0, repeats=0)


def test_measure_latency_reports_throughput_and_leaves_model_unchanged():
    model = create_model("lenet300")
    before = [p.clone() for p in model.parameters()]
    r = measure_latency(model, torch.randn(8, 1, 28, 28), train=True, optimizer="adam", warmup=1, repeats=3)
    assert r.batch_size == 8 and r.threads == torch.get_num_threads()
    assert r.throughput_samples_per_s == pytest.approx(8 / (r.forward_ms_median / 1e3))
    assert r.train_throughput_samples_per_s == pytest.approx(8 / (r.train_step_ms_median / 1e3))
    assert r.forward_ms_p95 >= r.forward_ms_median > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert set(r.to_dict()) >= {"forward_ms_median", "train_step_ms_p95", "threads", "warmup", "repeats"}


def test_layout_bytes_follow_the_formulas_for_random_sparse_matrices():
    hypothesis = pytest.importorskip("hypothesis")
    sparse = pytest.importorskip("scipy.sparse")
    from hypothesis import given, settings, strategies as st

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
