"""Ensembles: combining by hand, the K x cost against hand counts, member seeds, bagging, resume after SIGKILL in
member 2, bad input, and the ensemble as a distillation teacher (one model -> K models -> one student)."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from netdiet.cli import main
from netdiet.compression.base import CompressionState, StageContext, create_technique
from netdiet.compression.recipe import parse_recipe
from netdiet.data import Dataset, get_dataset
from netdiet.errors import NetdietError
from netdiet.models import create_model
from netdiet.reporting.ensemble_tables import ensemble_tables, plane_points
from netdiet.training import TrainConfig
from netdiet.training.ensemble import (
    Ensemble,
    accuracies,
    combine_mean,
    combine_vote,
    ensemble_cost,
    load_ensemble,
    member_probabilities,
    member_seed,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Fixed(nn.Module):
    """A 'member' with known outputs: sample i (x = [[i]]) gets the logits log(probs[i]), so its softmax is probs[i]."""

    def __init__(self, probs):
        super().__init__()
        self.register_buffer("logits", torch.log(torch.tensor(probs, dtype=torch.float64)).float())

    def forward(self, x):
        return self.logits[x.view(-1).long()]


# three members, three samples, three classes (rows sum to 1)
A = [[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.5, 0.45, 0.05]]
B = [[0.1, 0.6, 0.3], [0.2, 0.3, 0.5], [0.5, 0.45, 0.05]]
C = [[0.4, 0.1, 0.5], [0.6, 0.3, 0.1], [0.02, 0.96, 0.02]]
X = torch.tensor([[0.0], [1.0], [2.0]])


def test_mean_of_probabilities_equals_the_hand_computed_mean():
    probs = member_probabilities([Fixed(A), Fixed(B), Fixed(C)], X)
    # by hand: sample 0 (0.7+0.1+0.4, 0.2+0.6+0.1, 0.1+0.3+0.5)/3 = (0.4, 0.3, 0.3)
    #          sample 1 (0.1+0.2+0.6, 0.5+0.3+0.3, 0.4+0.5+0.1)/3 = (0.3, 0.3667, 0.3333)
    #          sample 2 (0.5+0.5+0.02, 0.45+0.45+0.96, 0.05+0.05+0.02)/3 = (0.34, 0.62, 0.04)
    hand = torch.tensor([[0.4, 0.3, 0.3], [0.9 / 3, 1.1 / 3, 1.0 / 3], [1.02 / 3, 1.86 / 3, 0.12 / 3]])
    assert torch.allclose(combine_mean(probs), hand, atol=1e-6)
    assert combine_mean(probs).argmax(1).tolist() == [0, 1, 1]
    ens = Ensemble([Fixed(A), Fixed(B), Fixed(C)]).eval()
    assert torch.allclose(ens(X), hand, atol=1e-6)                      # the module forward is the same mean
    ens.log_probs = True
    assert torch.allclose(ens(X), torch.log(hand), atol=1e-5)           # the distillation teacher's logits


def test_vote_counts_argmaxes_and_breaks_ties_by_mean_probability_then_lower_index():
    probs = member_probabilities([Fixed(A), Fixed(B), Fixed(C)], X)
    # sample 0: votes 0, 1, 2 (a three-way tie) -> the highest mean probability: class 0 (0.4)
    # sample 1: votes 1, 2, 0 (a tie) -> mean (0.3, 0.367, 0.333): class 1
    # sample 2: votes 0, 0, 1 -> class 0 by majority, although the mean (0.34, 0.62, 0.04) says class 1
    assert combine_vote(probs).tolist() == [0, 1, 0]
    two = member_probabilities([Fixed([[0.6, 0.4], [0.3, 0.7]]), Fixed([[0.4, 0.6], [0.3, 0.7]])], X[:2])
    # sample 0: one vote each and equal means (0.5, 0.5): the lower class index, 0; sample 1: both vote 1
    assert combine_vote(two).tolist() == [0, 1]
    acc = accuracies(probs, torch.tensor([0, 1, 1]))
    # members alone: A labels (0, 1, 0) -> 2/3; B (1, 2, 0) -> 0/3; C (2, 0, 1) -> 1/3
    assert acc["members"] == pytest.approx([2 / 3, 0.0, 1 / 3])
    assert acc["mean"] == pytest.approx(1.0) and acc["vote"] == pytest.approx(2 / 3)
    assert acc["members_mean"] == pytest.approx(1 / 3)
    # disagreement: A-B differ on samples 0, 1 (both say 0 on sample 2): 2/3; A-C and B-C on all three: (2/3 + 1 + 1) / 3
    assert acc["disagreement"] == pytest.approx(8 / 9)


def test_cost_of_k_members_is_k_times_one_members_by_the_counter():
    torch.manual_seed(0)
    members = [create_model("mlp", widths=[16], in_features=64) for _ in range(3)]
    cost = ensemble_cost(members, torch.zeros(1, 64))
    one, three = cost["single"], cost["ensemble"]
    # by hand, mlp 64-16-10: params 64*16 + 16 + 16*10 + 10 = 1210; MACs 64*16 + 16*10 = 1184;
    # FLOPs 2*MACs + 16 + 10 (bias adds) + 16 (ReLU) = 2410
    assert (one["params"], one["param_bytes"], one["macs"], one["flops"]) == (1210, 4 * 1210, 1184, 2410)
    assert (three["params"], three["param_bytes"], three["macs"]) == (3 * 1210, 3 * 4 * 1210, 3 * 1184)
    assert three["members_flops"] == 3 * 2410 and three["members_macs"] == 3 * 1184
    # the combination: softmax 5 per element (K*C = 30 elements) + the mean over members 1 per element = 180
    assert three["combine_flops"] == 5 * 30 + 30 and three["flops"] == 3 * 2410 + 180
    assert cost["ratio"]["params"] == cost["ratio"]["param_bytes"] == cost["ratio"]["macs"] == 3.0


def test_member_seeds_are_deterministic_distinct_and_member_one_keeps_the_seed():
    seeds = [member_seed(7, i) for i in range(1, 6)]
    assert seeds[0] == 7 and len(set(seeds)) == 5
    assert seeds == [member_seed(7, i) for i in range(1, 6)]
    assert not set(seeds[1:]) & {member_seed(8, i) for i in range(1, 6)}   # seed 8's members are others


BASE = ["train", "mlp", "--data", "digits", "--model-kw", "widths=[16]", "--epochs", "1", "--batch-size", "128",
        "--projection-steps", "0"]


def test_cli_ensemble_writes_members_and_member_one_is_the_plain_train_run(tmp_path, capsys):
    out = tmp_path / "ens"
    assert main(BASE + ["--ensemble", "2", "--out", str(out), "--json", str(tmp_path / "e.json")]) == 0
    text = capsys.readouterr().out
    assert "mean *" in text and "stack_module_state + vmap" in text
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["schema"] == "netdiet.train-ensemble/1" and doc["k"] == 2
    assert doc == json.loads((out / "ensemble.json").read_text())
    assert (out / "member-1" / "model.safetensors").is_file() and (out / "member-2" / "checkpoint" / "checkpoint.json").is_file()
    assert [m["seed"] for m in doc["members"]] == [0, member_seed(0, 2)]
    assert doc["cost"]["file_bytes"]["ensemble"] == 2 * doc["cost"]["file_bytes"]["single"]
    assert doc["latency"]["vmap_max_abs_diff"] < 1e-5                      # batched == loop
    for name in ("single", "loop", "vmap"):
        assert isinstance(doc["latency"][name]["stable"], bool) and doc["latency"][name]["p95_ms"] > 0
    plain = tmp_path / "plain"
    assert main(BASE + ["--out", str(plain)]) == 0
    single = json.loads((plain / "train.json").read_text())
    assert doc["members"][0]["test_acc"] == single["test_acc"]               # --ensemble K's member 1 is `train`
    assert (plain / "model.safetensors").read_bytes() == (out / "member-1" / "model.safetensors").read_bytes()
    ens, loaded = load_ensemble(out)
    assert len(ens.members) == 2 and loaded["k"] == 2
    hostile = json.loads((out / "ensemble.json").read_text())
    (out / "ensemble.json").write_text(json.dumps({**hostile, "k": 10 ** 9}))
    with pytest.raises(NetdietError, match="names 1000000000 members but .*member-1000000000/model.safetensors is missing"):
        load_ensemble(out)
    assert len(ensemble_tables(doc)) == 3


def test_bagging_members_train_on_bootstrap_resamples(tmp_path):
    from netdiet.training.ensemble import train_ensemble
    cfg = TrainConfig(epochs=1, batch_size=128, progress=False)
    kw = {"widths": [16]}
    seeds = train_ensemble("mlp", k=2, data="digits", model_kw=kw, config=cfg, latency=False)
    bag = train_ensemble("mlp", k=2, mode="bagging", data="digits", model_kw=kw, config=cfg, latency=False,
                         out=str(tmp_path / "bag"))
    assert [m["seed"] for m in bag.members] == [m["seed"] for m in seeds.members]
    assert bag.members[0]["test_acc"] != seeds.members[0]["test_acc"] or bag.members[1]["test_acc"] != seeds.members[1]["test_acc"]
    ck = json.loads((tmp_path / "bag" / "member-2" / "checkpoint" / "checkpoint.json").read_text())
    assert ck["fingerprint"]["bootstrap_seed"] == member_seed(0, 2)         # a resume must draw the same resample


@pytest.mark.parametrize("extra, words", [
    (["--ensemble", "0"], ["--ensemble", ">= 1"]),
    (["--ensemble", "2", "--nproc", "2"], ["not supported", "--nproc"]),
    (["--ensemble", "5", "--memory-budget", "300KiB"], ["do not fit the memory budget", "fewer members"]),
    (["--ensemble", "100000000"], ["RAM", "fewer members"]),
])
def test_bad_ensemble_input_is_one_line_exit_2(tmp_path, capsys, extra, words):
    # mlp 64-256-10 on digits: 19,210 params = 76,840 bytes; 5 members held twice = 768,400 bytes > 300 KiB;
    # 10^8 members: 15 TB, more than any machine's RAM. Both refused before anything is trained or written.
    out = tmp_path / "o"
    base = [a if a != "widths=[16]" else "widths=[256]" for a in BASE]
    code = main(base + extra + ["--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not (out / "member-1").exists()


def test_recipe_teacher_option_is_validated_with_its_line(tmp_path):
    text = "stages:\n  - technique: distill\n    options: {teacher: 'ensemble:%s'}\n    finetune: {epochs: 1}\n"
    with pytest.raises(NetdietError, match=r"line 3: .*holds no ensemble.json"):
        parse_recipe(text % (tmp_path / "nothing"))
    with pytest.raises(NetdietError, match=r"line 3: .*neither 'baseline' nor 'ensemble:PATH'"):
        parse_recipe(text.replace("'ensemble:%s'", "teachers"))


def test_distilling_an_ensemble_reports_the_three_points(tmp_path, capsys):
    from netdiet import api
    out = tmp_path / "ens"
    assert main(BASE + ["--ensemble", "2", "--out", str(out)]) == 0
    ens = json.loads((out / "ensemble.json").read_text())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stages:\n  - technique: distill\n    options: {{teacher: 'ensemble:{out}', student: copy}}\n"
                      "    finetune: {epochs: 1, lr: 0.001}\n")
    res = api.compress("mlp", str(recipe), data="digits", model_kwargs={"widths": [16]}, progress=False,
                       weights=str(out / "member-1" / "model.safetensors"))
    doc = res.to_dict()
    report = doc["stages"][0]["report"]
    assert report["teacher"]["kind"] == "ensemble" and report["teacher"]["k"] == 2
    assert report["teacher_params"] == 2 * report["student_params"] == 2 * 1210
    assert doc["baseline"]["accuracy"] == ens["members"][0]["test_acc"]    # the one model is member 1
    pts = plane_points(doc)
    assert [p["label"] for p in pts][0] == "one model" and pts[2]["label"] == "distilled student"
    assert pts[1]["accuracy"] == ens["accuracy"]["mean"] and pts[1]["bytes"] == ens["cost"]["file_bytes"]["ensemble"]
    assert pts[2]["accuracy"] == doc["stages"][0]["accuracy"]
    (tmp_path / "compress.json").write_text(json.dumps(doc))
    api.report([str(out / "ensemble.json"), str(tmp_path / "compress.json")], str(tmp_path / "r.html"))
    page = (tmp_path / "r.html").read_text()
    assert "Ensemble · mlp × 2 (seeds) · digits" in page and "One model → ensemble → one student" in page
    assert "skipped" not in page
    for p in pts:                                     # the three points' accuracies, as the table prints them
        assert f"{100 * p['accuracy']:.2f}%" in page
    d = get_dataset("digits")
    other = Dataset(name="other", x_train=d.x_train, y_train=d.y_train, x_test=d.x_test, y_test=d.y_test, num_classes=10)
    tech = create_technique("distill", teacher=f"ensemble:{out}")
    ctx = StageContext(data=other, finetune=TrainConfig(epochs=1, progress=False))
    with pytest.raises(NetdietError, match="trained on 'digits', not on 'other'"):
        tech.apply(res.compressed_model, CompressionState(spec={"spec": "mlp", "kwargs": {}}), ctx)


SCRIPT = textwrap.dedent("""
    import hashlib, json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from netdiet.training import Callback, TrainConfig
    from netdiet.training.ensemble import train_ensemble
    out, mode, kill_step = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class KillAt(Callback):
        def after_step(self, model, step):
            if step == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = TrainConfig(epochs=3, batch_size=128, lr=3e-3, progress=False, resume=mode == "resume")
    run = train_ensemble("mlp", k=3, data="digits", model_kw={"widths": [24], "dropout": 0.2}, out=out, config=cfg,
                         latency=False, member_callbacks=lambda i: [KillAt()] if (mode == "kill" and i == 2) else [])
    digest = [hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in m.parameters())).hexdigest() for m in run.models]
    d = run.to_dict()
    print(json.dumps({"accuracy": d["accuracy"], "members": [{k: m[k] for k in ("seed", "test_acc", "val_acc", "steps")}
                      for m in d["members"]], "weights": digest, "resumed": [m["resumed_from_epoch"] for m in d["members"]]}))
""")


def _run(out, mode, kill_step=-1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(out), mode, str(kill_step)], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.slow
def test_ensemble_killed_in_member_two_resumes_to_the_same_metrics(tmp_path):
    # digits: 1,437 training samples, 10 % held out -> 1,293; batch 128 -> 11 steps per epoch; step 15 is in epoch 2
    full = _run(tmp_path / "full", "full")
    assert full.returncode == 0, full.stderr
    killed = _run(tmp_path / "resumed", "kill", kill_step=15)
    assert killed.returncode == -9                                        # really SIGKILLed, in member 2
    assert json.loads((tmp_path / "resumed" / "member-1" / "train.json").read_text())["steps"] == 33
    ck = json.loads((tmp_path / "resumed" / "member-2" / "checkpoint" / "checkpoint.json").read_text())
    assert ck["epoch"] == 1 and ck["step"] == 11                          # member 2's last complete epoch survived
    assert not (tmp_path / "resumed" / "member-3").joinpath("train.json").exists()
    refused = subprocess.run([sys.executable, "-m", "netdiet", "train", "mlp", "--data", "digits", "--ensemble", "3",
                              "--model-kw", "widths=[24]", "--out", str(tmp_path / "resumed")], capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr       # an unfinished member is not overwritten
    resumed = _run(tmp_path / "resumed", "resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = json.loads(full.stdout), json.loads(resumed.stdout)
    assert b["resumed"] == [3, 1, None]                                   # member 1 finished, 2 from epoch 1, 3 fresh
    assert a["members"] == b["members"] and a["weights"] == b["weights"]
    assert a["accuracy"] == b["accuracy"]
    assert not math.isnan(a["accuracy"]["mean"])
