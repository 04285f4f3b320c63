"""Hostile and broken input to training (issue 11): every bad number is one line and exit 2, a diverging run keeps
its last good checkpoint and writes its JSON, a damaged checkpoint.json is named field by field, user factories
without num_classes work."""
from __future__ import annotations

import hashlib
import json
import shutil
import textwrap

import pytest
import torch

import netdiet
from netdiet.cli import main
from netdiet.errors import NetdietError
from netdiet.fileio import load_state_dict, save_state_dict
from netdiet.models import create_model
from netdiet.training import TrainConfig, fit


def _run(capsys, argv):
    capsys.readouterr()
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _strict_json(path):
    """The file as JSON, refusing NaN/Infinity (what other tools' parsers do)."""
    def refuse(name):
        raise AssertionError(f"{path} holds {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


# ---------------------------------------------------------------- 1. numbers: one check for CLI, recipes and API
BAD_NUMBERS = [
    (["train", "lenet300", "--lr", "nan"], "--lr"),
    (["train", "lenet300", "--lr", "inf"], "--lr"),
    (["train", "lenet300", "--l1", "nan"], "--l1"),
    (["train", "lenet300", "--l2", "inf"], "--l2"),
    (["train", "lenet300", "--gamma", "nan"], "--gamma"),
    (["train", "lenet300", "--min-delta", "nan"], "--min-delta"),
    (["train", "lenet300", "--warmup-steps", "-5"], "--warmup-steps"),
    (["train", "lenet300", "--step-epochs", "-1"], "--step-epochs"),
    (["train", "lenet300", "--workers", "-1"], "--workers"),
    (["train", "lenet300", "--segments", "-1"], "--segments"),
    (["train", "lenet300", "--weight-decay", "-1"], "--weight-decay"),
    (["train", "lenet300", "--weight-decay", "nan"], "--weight-decay"),
    (["train", "lenet300", "--prefetch", "-1"], "--prefetch"),
    (["train", "lenet300", "--seed", str(2**70)], "--seed"),
    (["train", "lenet300", "--seed", "-1"], "--seed"),
    (["sweep", "mlp", "--knob", "widths=[[8]]", "--lr", "nan"], "--lr"),
    (["continual", "--ewc-lambda", "nan"], "--ewc-lambda"),
    (["continual", "--lr", "inf"], "--lr"),
    (["continual", "--seed", str(2**70)], "--seed"),
]


@pytest.mark.parametrize("argv,option", BAD_NUMBERS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_NUMBERS])
def test_bad_numbers_are_one_line_exit_2(capsys, tmp_path, argv, option):
    out = tmp_path / "run"
    extra = ["--out", str(out)] if argv[0] == "train" else []
    code, _, err = _run(capsys, argv + extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("netdiet: error:"), err
    assert option in lines[0] and argv[-1] in lines[0]          # names the option and the value given
    assert not (out / "checkpoint").exists()                    # refused before any training


def test_api_numbers_go_through_the_same_check():
    for kw, option in (({"lr": float("nan")}, "--lr"), ({"weight_decay": -1.0}, "--weight-decay"),
                       ({"epochs": 2.5}, "--epochs"), ({"seed": 2**64}, "--seed"), ({"batch_size": True}, "--batch-size")):
        with pytest.raises(NetdietError, match=option):
            netdiet.train("lenet300", **kw)
    with pytest.raises(NetdietError, match="--ewc-lambda"):
        netdiet.continual(ewc_lambda=float("nan"))
    with pytest.raises(NetdietError, match="--lr"):         # fit itself refuses too (compression fine-tuning, strategies)
        fit(torch.nn.Linear(4, 2), torch.zeros(8, 4), torch.zeros(8, dtype=torch.long), TrainConfig(lr=float("inf")))


def test_a_recipe_lr_nan_is_refused_at_load_with_its_line(tmp_path, capsys):
    recipe = tmp_path / "nan.yaml"
    recipe.write_text(textwrap.dedent("""\
        name: nan-lr
        baseline: {epochs: 1, lr: .nan, optimizer: adam, batch_size: 64}
        stages:
          - technique: quantize
            options: {mode: dynamic}
    """))
    with pytest.raises(NetdietError, match=r"nan\.yaml line 2: baseline lr nan must be a finite positive number"):
        netdiet.compress("mlp", str(recipe), data="digits", latency=False, progress=False)
    code, _, err = _run(capsys, ["compress", "mlp", "--data", "digits", "--recipe", str(recipe), "--no-latency"])
    # refused before anything trains: the only line is the error
    assert code == 2 and err.strip().splitlines() == [err.strip().splitlines()[-1]]
    assert "line 2: baseline lr nan" in err and "Traceback" not in err


# ---------------------------------------------------------------- 2. a diverging run is not lost
def test_diverging_run_stops_with_exit_2_and_writes_its_json(tmp_path, capsys):
    out = tmp_path / "X"
    code, _, err = _run(capsys, ["train", "lenet300", "--optimizer", "sgd", "--lr", "50", "--epochs", "2",
                                 "--projection-steps", "0", "--out", str(out)])
    line = err.strip().splitlines()[-1]
    assert code == 2 and "diverged at epoch 1 step" in line and "lower --lr" in line, err
    doc = _strict_json(out / "train.json")
    assert doc["diverged"]["epoch"] == 1 and doc["diverged"]["loss"] in ("nan", "inf", "-inf")
    assert doc["diverged"]["checkpoint_epoch"] is None and doc["history"] == []
    assert not (out / "model.safetensors").exists()             # NaN weights are not written as a result
    assert not list((out / "checkpoint").glob("epoch-*.safetensors")) if (out / "checkpoint").exists() else True


BOMB = textwrap.dedent("""
    import os
    import torch
    from torch import nn

    class Bomb(nn.Module):
        '''Trains normally, then its training outputs turn NaN after BOMB_AFTER forward passes (0: never).'''
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)
            self.calls = 0
        def forward(self, x):
            y = self.fc(x.flatten(1))
            if self.training:
                self.calls += 1
                after = int(os.environ.get("BOMB_AFTER", "0"))
                if after and self.calls > after:
                    y = y * float("nan")
            return y

    def bomb():
        return Bomb()
""")


def test_divergence_keeps_the_last_good_checkpoint_loadable_by_resume(tmp_path, capsys, monkeypatch):
    (tmp_path / "bombs.py").write_text(BOMB)
    spec, out = f"{tmp_path / 'bombs.py'}:bomb", tmp_path / "run"
    base = ["train", spec, "--data", "digits", "--optimizer", "sgd", "--lr", "0.05", "--projection-steps", "0",
            "--out", str(out)]
    monkeypatch.setenv("BOMB_AFTER", "30")                   # digits: 21 steps per epoch, so step 31 is in epoch 2
    code, _, err = _run(capsys, base + ["--epochs", "3"])
    line = err.strip().splitlines()[-1]
    assert code == 2 and "diverged at epoch 2 step 31 (loss nan)" in line and "epoch 1" in line, err
    doc = _strict_json(out / "train.json")
    assert doc["diverged"] == {"epoch": 2, "step": 31, "loss": "nan", "checkpoint_epoch": 1}
    assert len(doc["history"]) == 1 and doc["files"]["checkpoint"].endswith("checkpoint.json")
    index = _strict_json(out / "checkpoint" / "checkpoint.json")
    assert index["epoch"] == 1 and index["step"] == 21
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["checkpoint.json", "epoch-0001.safetensors"]
    # a fresh run would overwrite the kept checkpoint: refused; --resume continues from it
    assert _run(capsys, base + ["--epochs", "3"])[0] == 2
    monkeypatch.setenv("BOMB_AFTER", "0")
    code, _, err = _run(capsys, base + ["--epochs", "3", "--resume"])
    assert code == 0, err
    doc = _strict_json(out / "train.json")
    assert doc["resumed_from_epoch"] == 1 and len(doc["history"]) == 3 and doc["diverged"] is None


# ---------------------------------------------------------------- 3. --resume with nothing to resume
def test_resume_before_the_first_checkpoint_starts_fresh_and_says_so(tmp_path, capsys):
    out = tmp_path / "killed-early"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "epoch-0001.safetensors").write_bytes(b"half written")   # killed while saving the first one
    code, _, err = _run(capsys, ["train", "mlp", "--model-kw", "widths=[16]", "--data", "digits", "--epochs", "1",
                                 "--projection-steps", "0", "--out", str(out), "--resume"])
    assert code == 0, err
    assert "starting fresh" in err
    doc = _strict_json(out / "train.json")
    assert doc["resumed_from_epoch"] is None and len(doc["history"]) == 1
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["checkpoint.json", "epoch-0001.safetensors"]
    assert load_state_dict(out / "checkpoint" / "epoch-0001.safetensors")      # the orphan was replaced, not kept


# ---------------------------------------------------------------- 4. checkpoint.json corruptions
@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    from netdiet.data import get_dataset
    d = get_dataset("digits")
    folder = tmp_path_factory.mktemp("ck") / "checkpoint"
    torch.manual_seed(0)
    fit(_mlp(), d.x_train, d.y_train, _cfg(folder, epochs=2, resume=False), x_val=d.x_test, y_val=d.y_test)
    return d, folder


def _mlp():
    return create_model("mlp", widths=[16], in_features=64)


def _cfg(folder, epochs=3, resume=True):
    return TrainConfig(epochs=epochs, batch_size=128, lr=1e-2, patience=5, progress=False, checkpoint_dir=str(folder),
                       resume=resume)


def _set(key, value):
    def edit(meta):
        meta[key] = value
    return edit


def _drop(key):
    def edit(meta):
        del meta[key]
    return edit


def _opt(edit_fn):
    def edit(meta):
        edit_fn(meta["optimizer"])
    return edit


def _first_state(meta):
    return next(iter(meta["optimizer"]["state"].values()))


def _drop_rng(folder, meta):
    path = folder / meta["tensors"]
    tensors = load_state_dict(path)
    del tensors["rng.torch"]
    save_state_dict(path, tensors)


def _drop_optim_tensor(folder, meta):
    path = folder / meta["tensors"]
    save_state_dict(path, {k: v for k, v in load_state_dict(path).items() if not k.startswith("optim.0.")})


def _optim_tensor(name, value):
    """Replace parameter 0's optimizer tensor `name` (None: fill it with NaN) in the tensor file."""
    def edit(folder, meta):
        path = folder / meta["tensors"]
        tensors = load_state_dict(path)
        key = f"optim.0.{name}"
        tensors[key] = torch.full_like(tensors[key], float("nan")) if value is None else value
        save_state_dict(path, tensors)
    return edit


CORRUPTIONS = [
    # (id, edit of the JSON, or (folder, meta) -> None for the tensor file, the field the one line must name)
    ("missing-tensors", _drop("tensors"), "'tensors' is missing"),
    ("missing-epoch", _drop("epoch"), "'epoch' is missing"),
    ("missing-step", _drop("step"), "'step' is missing"),
    ("missing-history", _drop("history"), "'history' is missing"),
    ("missing-fingerprint", _drop("fingerprint"), "'fingerprint' is missing"),
    ("missing-optimizer", _drop("optimizer"), "'optimizer' is missing"),
    ("tensors-not-a-string", _set("tensors", 7), "'tensors'"),
    ("tensors-escapes-the-folder", _set("tensors", "../epoch-0002.safetensors"), "'tensors'"),
    ("tensors-names-a-missing-file", _set("tensors", "epoch-0099.safetensors"), "'tensors' names 'epoch-0099"),
    # found by tests/test_fuzz_readers.py: a name past the file system's 255 bytes raised OSError (exit 1)
    ("tensors-name-too-long", _set("tensors", "[" * 300 + ".safetensors"), "'tensors' names '[[[["),
    ("epoch-negative", _set("epoch", -5), "'epoch' must be an integer >= 0, got -5"),
    ("epoch-a-string", _set("epoch", "2"), "'epoch' must be an integer"),
    ("epoch-a-float", _set("epoch", 2.5), "'epoch' must be an integer"),
    ("epoch-a-bool", _set("epoch", True), "'epoch' must be an integer"),
    ("epoch-below-its-history", _set("epoch", 1), "'history' holds 2 epoch records"),
    ("step-negative", _set("step", -1), "'step' must be an integer >= 0"),
    ("history-not-a-list", _set("history", {"epoch": 1}), "'history' must be a list"),
    ("history-of-numbers", _set("history", [1, 2]), "'history' must be a list"),
    ("fingerprint-a-list", _set("fingerprint", [1]), "'fingerprint' must be a mapping"),
    ("optimizer-a-list", _set("optimizer", []), "'optimizer' must be a mapping"),
    ("optimizer-without-state", _opt(lambda o: o.pop("state")), "'optimizer' must be a mapping"),
    ("param-groups-a-mapping", _opt(lambda o: o.__setitem__("param_groups", {})), "'optimizer' must be a mapping"),
    ("param-group-without-params", _opt(lambda o: o["param_groups"][0].pop("params")), "'optimizer.param_groups.0'"),
    ("param-group-lr-a-string", _opt(lambda o: o["param_groups"][0].__setitem__("lr", "fast")), "'optimizer.param_groups.0.lr'"),
    ("optimizer-entry-garbled", lambda m: _first_state(m).__setitem__("exp_avg", 3), "'optimizer.state.0.exp_avg'"),
    ("optimizer-state-key-not-an-index", _opt(lambda o: o.__setitem__("state", {"w": {}})), "'optimizer.state.w'"),
    ("callbacks-a-list", _set("callbacks", [1]), "'callbacks'"),
    ("early-stopping-scalars-missing", lambda m: m["callbacks"]["early_stopping"].pop("waited"), "early-stopping state"),
    ("early-stopping-waited-a-string", lambda m: m["callbacks"]["early_stopping"].__setitem__("waited", "x"), "early-stopping state"),
    ("scaler-a-string", _set("scaler", "on"), "'scaler'"),
    ("rng-state-missing", _drop_rng, "random-number state (rng.torch)"),
    ("optimizer-tensor-missing", _drop_optim_tensor, "points to a tensor missing"),
    # found by tests/test_fuzz_readers.py: each crashed the first optimizer step after resuming (exit 1)
    ("optimizer-moment-of-shape-0", _optim_tensor("exp_avg", torch.zeros(0)), "state 0.exp_avg is (0,)"),
    ("optimizer-moment-not-finite", _optim_tensor("exp_avg_sq", None), "not finite"),
    ("optimizer-state-entry-unknown", lambda m: _first_state(m).__setitem__("max_exp_avg_sq", {"value": 1}),
     "state of parameter 0 is ['exp_avg', 'exp_avg_sq', 'max_exp_avg_sq', 'step']"),
    ("optimizer-groups-of-another-model", _opt(lambda o: o["param_groups"][0].__setitem__("params", [0, 1])),
     "parameter groups are not this optimizer's"),
]


@pytest.mark.parametrize("edit,words", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_every_checkpoint_corruption_is_one_error_naming_the_file_and_field(good_checkpoint, tmp_path, edit, words):
    data, good = good_checkpoint
    folder = tmp_path / "checkpoint"
    shutil.copytree(good, folder)
    meta = json.loads((folder / "checkpoint.json").read_text())
    if edit.__code__.co_argcount == 2:
        edit(folder, meta)
    else:
        edit(meta)
        (folder / "checkpoint.json").write_text(json.dumps(meta))
    before = hashlib.sha256((folder / "checkpoint.json").read_bytes()).hexdigest()
    with pytest.raises(NetdietError) as exc:
        fit(_mlp(), data.x_train, data.y_train, _cfg(folder), x_val=data.x_test, y_val=data.y_test)
    msg = str(exc.value)
    assert words in msg and "\n" not in msg
    if "early-stopping" not in words:
        assert str(folder / "checkpoint.json") in msg
    else:
        assert "checkpoint.json is damaged" in msg
    assert hashlib.sha256((folder / "checkpoint.json").read_bytes()).hexdigest() == before   # nothing overwritten


def test_optimizer_hyperparameters_come_from_this_run_not_the_file(good_checkpoint, tmp_path):
    # amsgrad, capturable, betas = 1 or eps = -1 in a damaged file crashed the first step (fuzz); the run's own win
    data, good = good_checkpoint
    folder = tmp_path / "checkpoint"
    shutil.copytree(good, folder)
    meta = json.loads((folder / "checkpoint.json").read_text())
    meta["optimizer"]["param_groups"][0].update(amsgrad=True, capturable=True, betas=[1, 1], eps=-1, foreach="x")
    (folder / "checkpoint.json").write_text(json.dumps(meta))
    damaged = fit(_mlp(), data.x_train, data.y_train, _cfg(folder), x_val=data.x_test, y_val=data.y_test)
    shutil.rmtree(folder)
    shutil.copytree(good, folder)
    clean = fit(_mlp(), data.x_train, data.y_train, _cfg(folder), x_val=data.x_test, y_val=data.y_test)
    assert damaged.resumed_from_epoch == 2 and damaged.history[-1]["loss"] == clean.history[-1]["loss"]


def test_the_untouched_checkpoint_still_resumes(good_checkpoint, tmp_path):
    data, good = good_checkpoint
    shutil.copytree(good, tmp_path / "checkpoint")
    res = fit(_mlp(), data.x_train, data.y_train, _cfg(tmp_path / "checkpoint"), x_val=data.x_test, y_val=data.y_test)
    assert res.resumed_from_epoch == 2 and len(res.history) == 3


def test_a_corrupt_checkpoint_is_exit_2_from_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "mlp", "--model-kw", "widths=[16]", "--data", "digits", "--projection-steps", "0", "--out", str(out)]
    assert _run(capsys, base + ["--epochs", "1"])[0] == 0
    index = out / "checkpoint" / "checkpoint.json"
    meta = json.loads(index.read_text())
    meta["epoch"] = -5
    index.write_text(json.dumps(meta))
    code, _, err = _run(capsys, base + ["--epochs", "3", "--resume"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'epoch'" in err and "checkpoint.json" in err


# ---------------------------------------------------------------- 5. user factories without num_classes
USER_MODELS = textwrap.dedent("""
    from torch import nn

    def rescnn():                      # no num_classes: ten outputs, fixed
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def narrow():                      # no num_classes and too few outputs for ten classes
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))

    def flexible(**kw):                # takes anything: num_classes is passed
        return nn.Sequential(nn.Flatten(), nn.Linear(64, kw.get("num_classes", 3)))
""")


def test_user_factory_without_num_classes_trains_and_learns_continually(tmp_path, capsys):
    path = tmp_path / "mymodels.py"
    path.write_text(USER_MODELS)
    code, _, err = _run(capsys, ["continual", "--model", f"{path}:rescnn", "--data", "digits", "--strategy", "naive",
                                 "--epochs", "1"])
    assert code == 0, err
    code, _, err = _run(capsys, ["continual", "--model", f"{path}:flexible", "--data", "digits", "--strategy", "naive",
                                 "--epochs", "1"])
    assert code == 0, err
    code, _, err = _run(capsys, ["train", f"{path}:rescnn", "--data", "digits", "--epochs", "1", "--projection-steps", "0"])
    assert code == 0, err


def test_user_factory_with_the_wrong_width_says_what_is_wrong(tmp_path, capsys):
    path = tmp_path / "mymodels.py"
    path.write_text(USER_MODELS)
    for argv in (["continual", "--model", f"{path}:narrow", "--data", "digits", "--strategy", "naive", "--epochs", "1"],
                 ["train", f"{path}:narrow", "--data", "digits", "--epochs", "1"]):
        code, _, err = _run(capsys, argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "takes no num_classes" in lines[0] and "10 class scores" in lines[0], err


# ---------------------------------------------------------------- 6. one run per --out folder
def test_a_second_train_into_a_locked_out_folder_is_refused(tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "busy"
    out.mkdir()
    argv = ["train", "mlp", "--model-kw", "widths=[16]", "--data", "digits", "--epochs", "1", "--projection-steps", "0",
            "--out", str(out)]
    import os
    other = os.open(out, os.O_RDONLY)                          # another run holds the folder
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = _run(capsys, argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "in use by another netdiet train" in lines[0], err
        assert list(out.iterdir()) == []                      # nothing written, not even a lock file
    finally:
        os.close(other)
    code, _, err = _run(capsys, argv)                         # released (as when that run ends or is killed)
    assert code == 0, err
    code, _, err = _run(capsys, argv)                         # and this run released it too
    assert code == 0, err


# ---------------------------------------------------------------- 3b. checkpoints by steps or time, resumed mid-epoch
class _Killed(Exception):
    pass


def test_step_checkpoints_resume_mid_epoch_to_the_same_metrics_and_weights(tmp_path):
    from netdiet.data import get_dataset
    from netdiet.training import Callback

    class KillAt(Callback):
        def after_step(self, model, step):
            if step == 33:
                raise _Killed()

    d = get_dataset("digits")

    def run(folder, resume=False, callbacks=()):
        torch.manual_seed(0)
        model = create_model("mlp", widths=[24], in_features=64, dropout=0.2)  # dropout: RNG resumes too
        cfg = TrainConfig(epochs=3, batch_size=64, lr=3e-3, schedule="cosine", progress=False, checkpoint_dir=str(folder),
                          checkpoint_every="5steps", resume=resume)
        res = fit(model, d.x_train, d.y_train, cfg, x_val=d.x_test, y_val=d.y_test, callbacks=list(callbacks))
        keep = ("epoch", "loss", "train_acc", "val_acc", "val_loss", "lr", "steps")
        return [{k: h[k] for k in keep} for h in res.history], [p.detach().clone() for p in model.parameters()], res

    full_history, full_weights, _ = run(tmp_path / "full")
    with pytest.raises(_Killed):
        run(tmp_path / "cut", callbacks=[KillAt()])
    index = _strict_json(tmp_path / "cut" / "checkpoint.json")
    assert index["epoch"] == 1 and index["step"] == 30 and index["batch"] == 7     # 23 steps an epoch: inside epoch 2
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["checkpoint.json", "epoch-0001-step-00000030.safetensors"]
    history, weights, res = run(tmp_path / "cut", resume=True)
    assert res.resumed_from_epoch == 1 and history == full_history
    for a, b in zip(weights, full_weights):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value,ok", [(1, ("epochs", 1)), ("500steps", ("steps", 500)), ("5min", ("seconds", 300.0)),
                                      ("90s", ("seconds", 90.0)), ("2h", ("seconds", 7200.0)), ("3epochs", ("epochs", 3)),
                                      (0, None), (-1, None), ("0steps", None), ("2.5steps", None), ("5 parsecs", None),
                                      ("nanmin", None), (float("nan"), None)])
def test_checkpoint_every_parses_epochs_steps_and_time(value, ok):
    from netdiet.training.loop import parse_checkpoint_every
    if ok is None:
        with pytest.raises(NetdietError, match="--checkpoint-every"):
            parse_checkpoint_every(value)
    else:
        assert parse_checkpoint_every(value) == ok


def test_a_non_finite_gradient_stops_before_the_weights_are_spoiled(tmp_path):
    from netdiet.data import get_dataset
    from netdiet.training.loop import TrainingDiverged

    class InfGrad(torch.autograd.Function):      # finite forward, infinite gradient from the 5th training pass on
        calls = 0

        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            InfGrad.calls += 1
            return g * float("inf") if InfGrad.calls >= 5 else g

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):
            y = self.fc(x.flatten(1))
            return InfGrad.apply(y) if self.training else y

    d = get_dataset("digits")
    torch.manual_seed(0)
    model = Net()
    with pytest.raises(TrainingDiverged) as exc:
        fit(model, d.x_train, d.y_train, TrainConfig(epochs=1, batch_size=64, progress=False, checkpoint_dir=str(tmp_path)))
    assert exc.value.step == 5 and exc.value.record()["gradient_norm"] in ("inf", "nan")
    assert "gradient norm" in str(exc.value) and all(torch.isfinite(p).all() for p in model.parameters())
