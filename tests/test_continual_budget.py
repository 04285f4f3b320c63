"""continual under a byte budget: the ledger of the rehearsal strategies (hand counts), int4 kept weights, weight
aligning, NME, stored logits, and the automatic budget split (prediction <= budget, actual == predicted)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from netdiet.errors import NetdietError
from netdiet.incremental.autosplit import smallest_budget
from netdiet.incremental.ledger import measure, safetensors_payload_bytes, serialise
from netdiet.incremental.rehearsal import _NMEClassifier, dequantize_rows, quantize_rows, weight_align
from netdiet.incremental.runner import build_model_fn, run_strategy
from netdiet.incremental.scenarios import make_scenario
from netdiet.incremental.strategies import ContinualConfig, create_strategy

torch.set_num_threads(1)

# mlp widths [16] on digits (64 pixels, 10 classes), int4 weights: 16x64 codes at 4 bits = 512 B + 16 float32
# scales 64 B + bias 16 x 4 = 64 B; 10x16 codes = 80 B + 10 scales 40 B + bias 40 B  -> 800 B
INT4_WEIGHTS = 512 + 64 + 64 + 80 + 40 + 40
EXEMPLAR = 32 + 1                 # 64 pixels at 4 bits + a uint8 label
RANGE = 8                         # float32 [lo, hi] of the codes


@pytest.fixture(scope="module")
def digits():
    from netdiet.data import get_dataset
    return get_dataset("digits")


def _cfg(**kw):
    return ContinualConfig(epochs=1, batch_size=32, progress=False, **kw)


@pytest.mark.parametrize("name,extra", [
    ("rehearsal", lambda n: {"exemplars": 40 * EXEMPLAR + RANGE}),
    ("replay-wa", lambda n: {"exemplars": 40 * EXEMPLAR + RANGE}),
    ("der++", lambda n: {"exemplars": 40 * (EXEMPLAR + 10 + 2) + RANGE}),           # + 10 int8 logits + float16 scale
    ("nme", lambda n: {"exemplars": 40 * EXEMPLAR + RANGE, "class_means": 10 * 16 * 2 + 10}),  # float16 means + flags
    ("lwf-logits", lambda n: {"old_logits": n * (10 + 2)}),                       # task 2's samples x (logits + scale)
])
def test_ledger_of_each_new_strategy_equals_its_serialised_payload(digits, name, extra):
    sc = make_scenario("split", digits, "class")
    model = build_model_fn("mlp", {"widths": [16]}, sc)[0]()
    strategy = create_strategy(name, sc, _cfg(exemplar_bits=4, exemplars=40, shrink="int4"))
    for t in range(2):
        strategy.learn(model, t)
        strategy.after_task(model, t)
        kept = strategy.kept(model)
        entry = measure(t, kept)
        assert entry.total == safetensors_payload_bytes(serialise(kept))
    assert entry.items["weights"] == INT4_WEIGHTS
    assert {k: v for k, v in entry.items.items() if k != "weights"} == extra(len(sc.tasks[1].y_train))


def test_weight_aligning_scales_new_rows_to_the_old_mean_norm():
    model = nn.Sequential(nn.Linear(2, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0, 0], [0, 2.0], [0.5, 0], [0, 0.5]]))   # old norms 2, new norms 0.5
    gamma = weight_align(model, torch.tensor([True, True, False, False]), torch.tensor([2, 3]))
    assert gamma == pytest.approx(4.0)
    assert torch.equal(model[0].weight[2:], torch.tensor([[2.0, 0], [0, 2.0]]))
    assert torch.equal(model[0].weight[:2], torch.tensor([[2.0, 0], [0, 2.0]]))


def test_stored_logits_are_int8_codes_with_one_float16_scale_per_row():
    q, s = quantize_rows(torch.tensor([[254.0, 100.0], [-1.27, 0.5]]))
    assert q.dtype == torch.int8 and s.dtype == torch.float16
    assert q.tolist() == [[127, 50], [-127, 50]]                   # scale 254/127 = 2; 1.27/127 = 0.01
    assert torch.allclose(dequantize_rows(q, s), torch.tensor([[254.0, 100.0], [-1.27, 0.5]]), atol=3e-3)


def test_an_all_zero_or_tiny_row_of_logits_is_stored_as_zero_codes_not_nan():
    # 1e-9 / 127 and 0 / 127 both round to 0 in float16; the scale's floor is float16's smallest step, 2**-24
    q, s = quantize_rows(torch.tensor([[0.0, 0.0], [1e-9, -1e-9], [254.0, 100.0]]))
    assert torch.isfinite(s.float()).all() and s[:2].tolist() == [2.0 ** -24, 2.0 ** -24] and s[2].item() == 2.0
    assert q.tolist() == [[0, 0], [0, 0], [127, 50]]
    assert dequantize_rows(q, s).tolist() == [[0.0, 0.0], [0.0, 0.0], [254.0, 100.0]]


def test_nme_answers_the_class_of_the_nearest_normalised_mean():
    model = nn.Sequential(nn.Identity(), nn.Linear(2, 3))              # the features are the input itself
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]).half()
    present = torch.tensor([True, True, False])                        # class 2 has no exemplar: never answered
    scores = _NMEClassifier(model, means, present)(torch.tensor([[3.0, 0.1], [0.2, -5.0], [0.1, 2.0]]))
    assert scores.argmax(1).tolist() == [0, 0, 1]                      # (0.2, -5) normalised is nearer (1,0) than (0,1)
    assert torch.isinf(scores[:, 2]).all()


@pytest.mark.parametrize("budget", [5000, 9000, 20000])
def test_auto_split_never_predicts_above_the_budget_and_the_actual_is_the_prediction(digits, budget):
    sc = make_scenario("split", digits, "class")
    model_fn, _ = build_model_fn("mlp", {"widths": [16]}, sc)
    res = run_strategy("auto", sc, model_fn, _cfg(budget=budget))
    d = res.decision
    assert d["predicted_bytes"] <= budget and max(res.bytes_per_task) <= budget
    c = d["chosen"]
    assert res.exemplars_per_task[-1] == c["exemplars"]
    # the prediction is a full buffer; when the stream has fewer samples than that, the shortfall is exact
    stored = min(c["exemplars"], sum(len(t.y_train) for t in sc.tasks))
    per = next(f["per_exemplar"] for f in d["formats"] if (f["bits"], f["downsample"]) == (c["bits"], c["downsample"]))
    assert d["actual_bytes"] == res.bytes_per_task[-1] == d["predicted_bytes"] - (c["exemplars"] - stored) * per
    assert res.ledger_per_task[-1]["weights"] == next(m["bytes"] for m in d["models"] if m["model"] == c["model"])


def test_auto_split_candidates_all_fit_and_the_pick_follows_the_stated_rule(digits):
    sc = make_scenario("split", digits, "class")
    model_fn, _ = build_model_fn("mlp", {"widths": [16]}, sc)
    strategy = create_strategy("auto", sc, _cfg(budget=9000))
    model = model_fn()
    strategy.learn(model, 0)
    d = strategy.decision
    tol = d["tolerance"]
    ok = [(m, f) for m in d["models"] for f in d["formats"] if m["drop"] <= tol and f["drop"] <= tol]
    # recompute the winner's coverage by hand from the measured table: the chosen one has the largest
    best = max(min(1.0, ((9000 - m["bytes"] - f["fixed"]) // f["per_exemplar"]) / d["exemplars_needed"]) for m, f in ok)
    assert d["chosen"]["coverage"] == pytest.approx(best)
    assert d["exemplars_needed"] == 8 * round(len(sc.tasks[0].y_train) / 2)   # 8 old classes x task 1's per class


def test_a_budget_below_every_configuration_is_one_line_naming_the_smallest(digits, capsys):
    sc = make_scenario("split", digits, "class")
    model = build_model_fn("mlp", {"widths": [16]}, sc)[0]()
    need, option = smallest_budget(create_strategy("auto", sc, _cfg(budget=10 ** 6)), model)
    # prune=0.5+int4 is the smallest weights here: 1-bit 4x4 exemplars: 2 code bytes + label = 3 B each
    assert option == "prune=0.5+int4" and need < INT4_WEIGHTS + 8 + 10 * 16 * 2 + 10 + 10 * 3
    create_strategy("auto", sc, _cfg(budget=need)).check_start(model)            # exactly enough: accepted
    with pytest.raises(NetdietError, match=f"the smallest that fits is {need} bytes"):
        create_strategy("auto", sc, _cfg(budget=need - 1)).check_start(model)
    from netdiet.cli import main
    assert main(["continual", "--data", "digits", "--budget", str(need - 1), "--model", "mlp", "--model-kw", "widths=[16]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("netdiet: error:") and "\n" not in err and f"smallest that fits is {need} bytes" in err


def test_auto_needs_a_budget(digits):
    with pytest.raises(NetdietError, match="give one, e.g. --budget"):
        create_strategy("auto", make_scenario("split", digits, "class"), _cfg())


def test_view_is_what_the_buffer_gives_back_after_storing_and_stores_nothing():
    from netdiet.incremental.buffer import ExemplarBuffer
    x = torch.tensor([[[[0.0, 0.3], [0.7, 1.0]]]])                   # 1 x 1 x 2 x 2, range [0, 1]
    buf = ExemplarBuffer((1, 2, 2), 10, bits=1)
    assert buf.view(x).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]     # 1 bit: below / above the middle of [0, 1]
    assert len(buf) == 0
    two = ExemplarBuffer((1, 2, 2), 10, bits=2)                       # levels 0, 1/3, 2/3, 1
    assert torch.allclose(two.view(x).flatten(), torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    two.add(x, torch.tensor([3]))
    assert torch.equal(two.view(x), two.decode()[0])


def test_same_view_answers_test_images_through_the_exemplar_format(digits):
    sc = make_scenario("split", digits, "class")
    model = build_model_fn("mlp", {"widths": [16]}, sc)[0]()
    strategy = create_strategy("rehearsal", sc, _cfg(exemplar_bits=1, exemplars=20, same_view=True))
    strategy.learn(model, 0)
    strategy.after_task(model, 0)
    x = sc.tasks[0].x_test[:8]
    with torch.no_grad():
        assert torch.equal(strategy.eval_model(model, 0)(x), model(strategy.buffer.view(x)))
        assert not torch.equal(model(strategy.buffer.view(x)), model(x))


def test_the_seed_flow_initial_slice_then_more_data_pruned_and_quantized_after_each_step(digits):
    # the seed's flow: a model on a first slice (50 %), more data in later slices, prune 50 % + int4 after each
    # step, every task tested after each optimisation. Kept weights, by hand (mlp [16] on digits): layer 1 keeps
    # 512 of 1024 weights at 4 bits = 256 B + 16 scales 64 B + a 1024-bit mask 128 B + bias 64 B; layer 2 keeps
    # 80 of 160 = 40 B + 10 scales 40 B + mask 20 B + bias 40 B  -> 652 B
    sc = make_scenario("incremental-data", digits, "domain", num_tasks=3)
    model_fn, _ = build_model_fn("mlp", {"widths": [16]}, sc)
    res = run_strategy("rehearsal", sc, model_fn, _cfg(exemplar_bits=4, budget=4000, shrink="prune=0.5+int4"))
    assert [len(row) for row in res.accuracy_matrix] == [3, 3, 3]
    assert all(len(set(row)) == 1 for row in res.accuracy_matrix)       # one shared test set: equal across j
    assert [entry["weights"] for entry in res.ledger_per_task] == [652, 652, 652]
    assert max(res.bytes_per_task) <= 4000 and res.exemplars_per_task == [98, 98, 98]   # (4000-652-8) // 34
