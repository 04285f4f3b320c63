"""Checkpoints: a run SIGKILLed mid-epoch and resumed ends exactly like an uninterrupted run; bad resumes refused."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from netdiet.cli import main

SCRIPT = textwrap.dedent("""
    import hashlib, json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from netdiet.data import get_dataset
    from netdiet.models import create_model
    from netdiet.training import Callback, TrainConfig, fit
    out, mode, kill_step = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class KillAt(Callback):
        def after_step(self, model, step):
            if step == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)

    d = get_dataset("digits")
    torch.manual_seed(0)
    model = create_model("mlp", widths=[48], in_features=64, dropout=0.2)   # dropout: the RNG state must resume too
    cfg = TrainConfig(epochs=4, batch_size=64, lr=3e-3, schedule="cosine", progress=False, patience=3,
                      checkpoint_dir=out, resume=mode == "resume")
    res = fit(model, d.x_train, d.y_train, cfg, x_val=d.x_test, y_val=d.y_test,
              callbacks=[KillAt()] if mode == "kill" else [])
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    keep = ("epoch", "loss", "train_acc", "val_acc", "val_loss", "lr", "steps")
    print(json.dumps({"history": [{k: h[k] for k in keep} for h in res.history], "weights": digest,
                      "resumed_from": res.resumed_from_epoch}))
""")


def _run(out, mode, kill_step=-1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(out), mode, str(kill_step)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow
def test_run_killed_with_sigkill_mid_epoch_resumes_to_the_same_metrics_and_weights(tmp_path):
    # digits: 1,437 training samples / 64 = 23 steps per epoch; step 56 is inside epoch 3
    full = _run(tmp_path / "full", "full")
    assert full.returncode == 0, full.stderr
    killed = _run(tmp_path / "resumed", "kill", kill_step=56)
    assert killed.returncode == -9                                   # really SIGKILLed
    index = json.loads((tmp_path / "resumed" / "checkpoint.json").read_text())
    assert index["epoch"] == 2 and index["step"] == 46                # the last complete epoch survived
    resumed = _run(tmp_path / "resumed", "resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = json.loads(full.stdout), json.loads(resumed.stdout)
    assert b["resumed_from"] == 2
    assert a["history"] == b["history"]                               # bit-identical loss, accuracy, LR per epoch
    assert a["weights"] == b["weights"]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_with_another_model_is_refused_and_leaves_the_run_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "mlp", "--data", "digits", "--epochs", "1", "--batch-size", "128", "--model-kw", "widths=[16]",
            "--out", str(out), "--projection-steps", "0"]
    assert main(base) == 0
    before = {p.name: _sha(p) for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    code = main(["train", "mlp", "--data", "digits", "--epochs", "2", "--batch-size", "128", "--model-kw", "widths=[32]",
                 "--out", str(out), "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "incompatible" in err and "widths" in err and len(err.splitlines()) == 1
    assert {p.name: _sha(p) for p in sorted(out.rglob("*")) if p.is_file()} == before
    # a fresh run into a folder whose run is unfinished (checkpoint, no final train.json) would lose it: refused
    (out / "train.json").unlink()
    before.pop("train.json")
    assert main(base) == 2
    assert "unfinished training run" in capsys.readouterr().err
    assert {p.name: _sha(p) for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_unwritable_output_folder_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    code = main(["train", "lenet300", "--data", "digits", "--out", str(blocker / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--out" in err and len(err.splitlines()) == 1
    assert blocker.read_text() == "keep me"


def test_optimizer_state_survives_the_safetensors_round_trip(tmp_path):
    from netdiet.training.checkpoint import Checkpoint, capture_rng, load_checkpoint, save_checkpoint
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, Checkpoint(1, 1, [], {}, model.state_dict(), opt.state_dict(), capture_rng()))
    ck = load_checkpoint(tmp_path)
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    fresh.load_state_dict(ck.optimizer)
    assert fresh.param_groups[0]["lr"] == 0.01 and fresh.param_groups[0]["betas"] == (0.9, 0.999)
    for pid, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            torch.testing.assert_close(fresh.state_dict()["state"][pid][name], value)
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


# ---------------------------------------------------------------- SIGKILL in the first epoch of `netdiet train`
FIRST_EPOCH_KILLER = textwrap.dedent("""
    import os, signal, sys
    from netdiet.training import Callback, run
    from netdiet.cli import main
    kill_step, argv = int(sys.argv[1]), sys.argv[2:]

    class KillAt(Callback):
        def after_step(self, model, step):
            if step == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)

    real_fit = run.fit
    def fit(*args, callbacks=None, **kw):
        return real_fit(*args, callbacks=list(callbacks or []) + [KillAt()], **kw)
    run.fit = fit
    sys.exit(main(argv))
""")
TRAIN = ["train", "mlp", "--data", "digits", "--model-kw", "widths=[24]", "--model-kw", "dropout=0.2", "--epochs", "2",
         "--batch-size", "64", "--lr", "3e-3", "--schedule", "cosine", "--projection-steps", "0", "--threads", "1"]
_TIMING = {"seconds", "samples_per_s", "data_wait_fraction", "peak_rss", "peak_rss_delta"}


def _cli(argv, killer_step=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    head = ["-c", FIRST_EPOCH_KILLER, str(killer_step)] if killer_step is not None else ["-m", "netdiet"]
    return subprocess.run([sys.executable, *head, *argv], capture_output=True, text=True, env=env, timeout=600)


def _metrics(out):
    doc = json.loads((out / "train.json").read_text())
    return [{k: v for k, v in h.items() if k not in _TIMING} for h in doc["history"]], doc["test_acc"], doc["steps"]


@pytest.mark.slow
@pytest.mark.parametrize("every,kept", [("5steps", 10), (None, None)], ids=["step-checkpoint", "no-checkpoint-yet"])
def test_sigkill_in_the_first_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, every, kept):
    # digits with the default 10 % validation hold-out: 1,293 training samples / 64 = 21 steps in epoch 1; the
    # kill at step 12 comes before the first epoch checkpoint; with --checkpoint-every 5steps one at step 10 exists
    extra = ["--checkpoint-every", every] if every else []
    full = _cli(TRAIN + extra + ["--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    killed = _cli(TRAIN + extra + ["--out", str(out)], killer_step=12)
    assert killed.returncode == -9, killed.stderr                     # really SIGKILLed, in epoch 1
    assert not (out / "train.json").exists()
    index = out / "checkpoint" / "checkpoint.json"
    if kept is None:
        assert not index.exists()                                       # nothing to resume from
    else:
        meta = json.loads(index.read_text())
        assert (meta["epoch"], meta["step"], meta["batch"]) == (0, kept, kept)   # mid-epoch 1
    resumed = _cli(TRAIN + extra + ["--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert ("starting fresh" in resumed.stderr) == (kept is None)
    assert _metrics(out) == _metrics(tmp_path / "full")                 # loss, accuracy, LR per epoch, bit for bit
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "full" / "model.safetensors").read_bytes()
