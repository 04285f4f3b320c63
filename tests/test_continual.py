"""continual: metrics on hand-made matrices, exact ledger bytes, the hard budget, strategies on a tiny scenario."""
from __future__ import annotations

import math

import pytest
import torch

from netdiet.errors import NetdietError
from netdiet.incremental import metrics
from netdiet.incremental.buffer import ExemplarBuffer
from netdiet.incremental.ledger import LedgerEntry, enforce, measure, safetensors_payload_bytes, serialise
from netdiet.incremental.packing import pack_bits, pack_mask, unpack_bits, unpack_mask
from netdiet.incremental.runner import build_model_fn, run_strategy
from netdiet.incremental.scenarios import make_scenario
from netdiet.incremental.strategies import ContinualConfig, create_strategy

torch.set_num_threads(1)


# ---------------------------------------------------------------- metrics, worked out by hand
def test_metrics_on_hand_made_matrix():
    R = [[0.5, 0.2, 0.1],
         [0.9, 0.8, 0.3],
         [0.7, 0.6, 0.9]]
    assert metrics.average_accuracy(R) == pytest.approx((0.7 + 0.6 + 0.9) / 3)
    # BWT: ((0.7 - 0.5) + (0.6 - 0.8)) / 2 = 0
    assert metrics.backward_transfer(R) == pytest.approx(0.0)
    # forgetting: task 0 peaked at 0.9 (after task 1) and ends at 0.7 -> 0.2; task 1: 0.8 -> 0.6 -> 0.2
    assert metrics.forgetting_per_task(R) == pytest.approx([0.2, 0.2])
    assert metrics.forgetting(R) == pytest.approx(0.2)
    # FWT with b = [0.1, 0.1, 0.2]: ((0.2 - 0.1) + (0.3 - 0.2)) / 2 = 0.1
    assert metrics.forward_transfer(R, [0.1, 0.1, 0.2]) == pytest.approx(0.1)


def test_forgetting_ignores_accuracy_measured_before_the_task_was_learned():
    R = [[0.9, 0.95, 0.0],    # 0.95 on task 1 before it was learned must not count as its peak
         [0.9, 0.70, 0.0],
         [0.9, 0.60, 0.8]]
    assert metrics.forgetting_per_task(R) == pytest.approx([0.0, 0.1])
    assert metrics.backward_transfer(R) == pytest.approx(((0.9 - 0.9) + (0.6 - 0.7)) / 2)


def test_metrics_reject_a_non_square_matrix():
    with pytest.raises(NetdietError):
        metrics.average_accuracy([[0.5, 0.5]])


# ---------------------------------------------------------------- packing and exemplar bytes
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_bits_round_trips_and_takes_ceil_bits_over_8_bytes(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 13), generator=g).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (3, math.ceil(13 * bits / 8))
    assert torch.equal(unpack_bits(packed, bits, 13), codes)


def test_pack_mask_is_one_bit_per_weight():
    mask = torch.rand(7, 9, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(mask)
    assert packed.numel() == math.ceil(63 / 8) == 8
    assert torch.equal(unpack_mask(packed, mask.shape), mask)


def test_exemplar_bytes_and_precision_per_bit_width():
    x = torch.randint(0, 256, (5, 1, 28, 28)).float() / 255.0
    y = torch.arange(5)
    for bits, per in ((32, 784 * 4 + 1), (16, 784 * 2 + 1), (8, 784 + 1), (4, 392 + 1), (2, 196 + 1), (1, 98 + 1)):
        buf = ExemplarBuffer((1, 28, 28), 10, bits=bits)
        buf.add(x, y)
        assert buf.bytes_per_exemplar() == per
        tensors = buf.tensors()
        assert sum(t.numel() * t.element_size() for t in tensors.values()) == 5 * per + (8 if bits <= 8 else 0)
        xd, yd = buf.decode()
        assert torch.equal(yd, y)
        step = 1.0 / ((1 << bits) - 1) if bits <= 8 else 0.0
        assert (xd - x).abs().max().item() <= step / 2 + 1e-3   # 8-bit codes of uint8 images: lossless
    ds = ExemplarBuffer((1, 28, 28), 10, bits=4, downsample=2)
    assert ds.bytes_per_exemplar() == 14 * 14 // 2 + 1


def test_buffer_capacity_fits_the_bytes_available():
    buf = ExemplarBuffer((1, 8, 8), 10, bits=4)     # 32 bytes of codes + 1 label byte, 8 bytes of range
    assert buf.capacity_for(8 + 33 * 10) == 10
    assert buf.capacity_for(8 + 33 * 10 - 1) == 9
    assert buf.capacity_for(7) == 0


# ---------------------------------------------------------------- a tiny scenario on the 8x8 digits
@pytest.fixture(scope="module")
def digits():
    from netdiet.data import get_dataset
    return get_dataset("digits")


def _cfg(**kw) -> ContinualConfig:
    base = dict(epochs=1, batch_size=32, progress=False, fisher_samples=32)
    base.update(kw)
    return ContinualConfig(**base)


def _run(digits, name, setting="class", widths=(16,), **kw):
    sc = make_scenario("split", digits, setting)
    model_fn, _ = build_model_fn("mlp", {"widths": list(widths)}, sc)
    return run_strategy(name, sc, model_fn, _cfg(**kw)), sc, model_fn


def test_split_scenario_maps_labels_per_setting(digits):
    cls = make_scenario("split", digits, "class")
    dom = make_scenario("split", digits, "domain")
    assert [t.classes for t in cls.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert cls.num_outputs == 10 and dom.num_outputs == 2
    assert set(dom.tasks[3].y_train.tolist()) == {0, 1} and set(cls.tasks[3].y_train.tolist()) == {6, 7}
    shuffled = make_scenario("split", digits, "class", order_seed=3)
    assert shuffled.to_dict()["options"]["class_order"] == torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()


def test_unknown_scenario_and_inapplicable_setting_are_bad_input(digits):
    with pytest.raises(NetdietError, match="unknown scenario"):
        make_scenario("splitt", digits, "class")
    with pytest.raises(NetdietError, match="does not apply"):
        make_scenario("incremental-data", digits, "class")
    with pytest.raises(NetdietError, match="does not apply to class-incremental"):
        create_strategy("packnet", make_scenario("split", digits, "class"), _cfg())


def _ledger_matches_safetensors(strategy, model, task):
    kept = strategy.kept(model)
    entry = measure(task, kept)
    assert entry.total == safetensors_payload_bytes(serialise(kept))
    return entry


@pytest.mark.parametrize("name,setting", [("naive", "class"), ("joint", "class"), ("ewc", "domain"), ("lwf", "class"),
                                          ("replay", "domain"), ("replay-reservoir", "class"), ("packnet", "task")])
def test_ledger_equals_the_bytes_of_the_saved_state(digits, name, setting):
    sc = make_scenario("split", digits, setting)
    model_fn, _ = build_model_fn("mlp", {"widths": [16]}, sc)
    model = model_fn()
    cfg = _cfg(exemplar_bits=4, exemplars=40)
    strategy = create_strategy(name, sc, cfg)
    for t in range(2):
        strategy.learn(model, t)
        strategy.after_task(model, t)
        entry = _ledger_matches_safetensors(strategy, model, t)
    weights = (64 * 16 + 16 + 16 * sc.num_outputs + sc.num_outputs) * 4
    assert entry.items["weights"] == weights
    extra = {k: v for k, v in entry.items.items() if k != "weights"}
    if name == "ewc":
        assert extra == {"fisher": weights, "anchors": weights}
    if name == "lwf":
        assert extra == {"teacher": weights}
    if name == "replay":                       # 40 exemplars x (32 code bytes + 1 label + 1 task id) + range
        assert extra == {"exemplars": 40 * 34 + 8}
    if name == "packnet":                      # two tasks x one bit per hidden weight
        assert extra == {"masks": 2 * (64 * 16 // 8)}
    if name == "joint":                        # every sample so far as lossless 8-bit codes... digits are /16, so float32
        n = len(sc.tasks[0].y_train) + len(sc.tasks[1].y_train)
        assert extra == {"data": n * (64 * 4 + 1)}


def test_budget_is_never_exceeded_when_exemplar_bits_and_counts_change_mid_run(digits):
    budget = 6000
    weights = (64 * 16 + 16 + 16 * 10 + 10) * 4            # 4840 bytes
    schedule = {1: {"bits": 8}, 2: {"bits": 2, "exemplars": 10}, 3: {"bits": 32, "exemplars": None}}
    res, sc, _ = _run(digits, "replay", budget=budget, exemplar_bits=4, exemplar_schedule=schedule)
    room = budget - weights                                 # 1160 bytes for exemplars
    expected = [(room - 8) // 33, (room - 8) // 65, 10, room // 257, room // 257]
    assert res.exemplars_per_task == expected == [34, 17, 10, 4, 4]
    assert all(b <= budget for b in res.bytes_per_task)
    assert res.ledger_per_task[2] == {"weights": weights, "exemplars": 10 * 17 + 8}


def test_a_budget_smaller_than_the_model_is_bad_input(digits):
    with pytest.raises(NetdietError, match="smaller than the model itself"):
        _run(digits, "naive", budget=1000)


def test_enforce_refuses_to_exceed_the_budget():
    enforce(LedgerEntry(0, {"weights": 100}), 100, "x")
    with pytest.raises(NetdietError, match="101 bytes"):
        enforce(LedgerEntry(0, {"weights": 100, "exemplars": 1}), 100, "x")


def test_joint_over_budget_stops_with_a_clear_error(digits):
    with pytest.raises(NetdietError, match="joint training keeps every sample"):
        _run(digits, "joint", budget=20000)


def test_ewc_keeps_bfloat16_copies_when_float32_does_not_fit(digits):
    weights = (64 * 16 + 16 + 16 * 10 + 10) * 4
    res, _, _ = _run(digits, "ewc", budget=weights * 2 + 100)
    assert res.ledger_per_task[-1] == {"weights": weights, "fisher": weights // 2, "anchors": weights // 2}


def test_class_balanced_replay_keeps_equal_counts_per_class(digits):
    sc = make_scenario("split", digits, "class")
    model_fn, _ = build_model_fn("mlp", {"widths": [16]}, sc)
    model = model_fn()
    strategy = create_strategy("replay", sc, _cfg(exemplars=30))
    for t in range(3):
        strategy.learn(model, t)
        strategy.after_task(model, t)
    counts = torch.bincount(strategy.buffer.labels.long(), minlength=10)[:6].tolist()
    assert counts == [5, 5, 5, 5, 5, 5]


def test_packnet_has_zero_forgetting_and_grows_only_by_its_masks(digits):
    res, sc, _ = _run(digits, "packnet", setting="task", widths=(32,), epochs=5)
    R = res.accuracy_matrix
    for j in range(len(R)):
        assert all(R[i][j] == R[j][j] for i in range(j, len(R)))   # exactly the same weights answer task j
    assert res.forgetting == 0.0 and res.bwt == 0.0
    mask_set = 64 * 32 // 8
    assert [b - res.bytes_per_task[0] for b in res.bytes_per_task] == [k * mask_set for k in range(5)]
    assert res.average_accuracy > 0.9


def test_shrink_keeps_int8_codes_and_scales_through_the_compress_interface(digits):
    pytest.importorskip("netdiet.compression.quantize")
    res, _, _ = _run(digits, "shrink", exemplars=10)
    # int8 codes (1024 + 160) + per-output-channel float32 scales (16 + 10) + float32 biases (16 + 10)
    assert res.ledger_per_task[0]["weights"] == 1024 + 160 + 4 * 26 + 4 * 26


def test_naive_forgets_in_class_incremental_and_metrics_match_the_matrix(digits):
    res, _, _ = _run(digits, "naive", epochs=5)
    R = res.accuracy_matrix
    assert res.average_accuracy == pytest.approx(sum(R[-1]) / 5)
    assert res.forgetting > 0.5          # fine-tuning on two new classes wipes out the old ones
    assert res.fwt is None               # undefined in class-IL
    assert all(f is None or f > 0 for f in res.train_flops_per_task)


def test_cli_bad_input_exits_2_with_one_line(capsys):
    from netdiet.cli import main
    for argv in (["continual", "--scenario", "nope"],
                 ["continual", "--data", "digits", "--setting", "class", "--strategy", "packnet"],
                 ["continual", "--data", "digits", "--budget", "1KiB"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("netdiet: error:") and "\n" not in err


def test_shrink_prune_and_int8_keeps_kept_codes_plus_bit_masks(digits):
    pytest.importorskip("netdiet.compression.quantize")
    res, _, _ = _run(digits, "naive", shrink="prune=0.5+int8")
    # kept int8 codes 512 + 80, scales 4 x (16 + 10), masks ceil(1024/8) + ceil(160/8), float32 biases 4 x (16 + 10)
    assert res.ledger_per_task[-1] == {"weights": 592 + 104 + 148 + 104}
    res, _, _ = _run(digits, "naive", shrink="prune=0.5")
    assert res.ledger_per_task[-1] == {"weights": 592 * 4 + 148 + 104}
    with pytest.raises(NetdietError, match="prune="):
        _run(digits, "naive", shrink="prune=2")


def test_strategy_all_stops_only_what_cannot_fit_and_writes_the_schema(digits):
    import json

    from netdiet.fileio import dumps_json
    from netdiet.incremental.runner import run_continual
    sc = make_scenario("split", digits, "task")
    model_fn, info = build_model_fn("mlp", {"widths": [16]}, sc)
    doc = json.loads(dumps_json(run_continual(sc, "all", model_fn, _cfg(budget=12000, exemplar_bits=4), info)))
    assert doc["schema"] == "netdiet.continual/1" and doc["setting"] == "task" and doc["budget"] == 12000
    status = {s["name"]: s["status"] for s in doc["strategies"]}
    assert status == {"naive": "ok", "joint": "stopped", "ewc": "ok", "lwf": "ok", "replay": "ok",
                      "replay-reservoir": "ok", "packnet": "ok", "shrink": "ok", "rehearsal": "ok", "replay-wa": "ok",
                      "nme": "ok", "der++": "ok", "lwf-logits": "ok", "auto": "ok"}
    for s in doc["strategies"]:
        if s["status"] == "ok":
            assert len(s["accuracy_matrix"]) == 5 and all(b <= 12000 for b in s["bytes_per_task"])
            assert set(s) >= {"average_accuracy", "bwt", "forgetting", "fwt", "ledger_per_task", "train_flops_per_task"}
    ewc = next(s for s in doc["strategies"] if s["name"] == "ewc")
    assert ewc["ledger_per_task"][-1] == {"weights": 4840, "fisher": 2420, "anchors": 2420}   # bfloat16 copies


def test_downsampled_exemplars_decode_to_the_full_input_size():
    # a linear ramp survives 2x2 average pooling + bilinear up-sampling exactly, away from the borders
    ramp = (torch.arange(28).float() / 27).view(1, 1, 1, 28).expand(2, 1, 28, 28).contiguous()
    buf = ExemplarBuffer((1, 28, 28), 10, bits=8, downsample=2)
    buf.add(ramp, torch.tensor([1, 2]))
    assert buf.bytes_per_exemplar() == 14 * 14 + 1
    xd, yd = buf.decode()
    assert xd.shape == (2, 1, 28, 28) and yd.tolist() == [1, 2]
    assert (xd - ramp)[..., 1:27].abs().max().item() <= 0.5 / 255 + 1e-6


def test_permuted_and_incremental_scenarios_record_their_construction(digits):
    perm = make_scenario("permuted", digits, "class", num_tasks=3, seed=5)
    assert perm.num_outputs == 30
    assert torch.equal(perm.tasks[0].x_train, digits.x_train)                    # task 1 is unpermuted
    assert torch.equal(perm.tasks[2].y_train, digits.y_train + 20)               # class-IL: outputs offset per task
    flat0, flat2 = digits.x_train.reshape(len(digits.x_train), -1), perm.tasks[2].x_train.reshape(len(digits.x_train), -1)
    assert torch.equal(flat0.sort(1).values, flat2.sort(1).values)               # the same pixels, moved
    assert make_scenario("permuted", digits, "domain", num_tasks=3).num_outputs == 10
    inc = make_scenario("incremental-data", digits, "domain", num_tasks=4, initial_fraction=0.5)
    sizes = inc.to_dict()["options"]["slice_sizes"]
    assert sum(sizes) == len(digits.y_train) and sizes[0] == round(len(digits.y_train) * 0.5)
    assert all(torch.equal(t.x_test, digits.x_test) for t in inc.tasks)


def test_reservoir_counts_the_stream_and_never_holds_more_than_its_capacity(digits):
    sc = make_scenario("split", digits, "class")
    model_fn, _ = build_model_fn("mlp", {"widths": [16]}, sc)
    model = model_fn()
    strategy = create_strategy("replay-reservoir", sc, _cfg(exemplars=50))
    streamed = 0
    for t in range(3):
        strategy.after_task(model, t)            # the buffer update alone (no training needed)
        streamed += len(sc.tasks[t].y_train)
        assert len(strategy.buffer) == 50 and int(strategy.seen) == streamed
    labels = set(strategy.buffer.labels.tolist())
    assert labels <= set(range(6)) and len(labels) >= 4   # samples of earlier tasks survive


def test_cli_writes_the_continual_json(tmp_path):
    import json

    from netdiet.cli import main
    out = tmp_path / "c.json"
    assert main(["continual", "--data", "digits", "--setting", "task", "--strategy", "packnet", "--epochs", "1",
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == "netdiet.continual/1" and doc["strategies"][0]["name"] == "packnet"
    assert doc["strategies"][0]["forgetting"] == 0.0
