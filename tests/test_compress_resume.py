"""`netdiet compress --out M.ndz --resume`: a run stopped mid-recipe continues after its last finished stage and
ends with the numbers, and the archive bytes, of a run never stopped (same seed); a checkpoint of another run or a
damaged one is one line, exit 2."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from netdiet.cli import main
from netdiet.compression import stage_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

MLP = ["--data", "digits", "--model-kw", "in_features=64", "--model-kw", "widths=[32]", "--no-latency", "--seed", "3",
       "--threads", "1"]
# three stages, two of them fine-tuned: a resumed run must restore weights, masks, codebooks and RNG exactly
RECIPE = """\
name: three
baseline: {epochs: 2, lr: 0.003}
stages:
  - technique: prune
    options: {sparsity: 0.7}
    finetune: {epochs: 1, lr: 0.001}
  - technique: cluster
    options: {bits: 4}
    finetune: {epochs: 1, lr: 0.0005}
  - technique: quantize
    options: {mode: int8-weight}
"""
# wall-clock and memory figures differ between any two runs; everything else must be equal
TIMING = {"seconds", "samples_per_s", "data_wait_fraction", "peak_rss", "peak_rss_delta", "environment", "path"}


def _numbers(doc):
    if isinstance(doc, dict):
        return {k: _numbers(v) for k, v in doc.items() if k not in TIMING}
    if isinstance(doc, list):
        return [_numbers(v) for v in doc]
    return doc


class Crash(BaseException):
    """A crash past the CLI's error handling (it turns an Exception into exit 1)."""


_RECIPES = {}


def _compress(tmp_path, name, *extra):
    # one recipe file for every run: its path is recorded in the archive header, so it changes the archive bytes
    recipe = _RECIPES["path"]
    return ["compress", "mlp", *MLP, "--recipe", str(recipe), "--out", str(tmp_path / f"{name}.ndz"),
            "--json", str(tmp_path / f"{name}.json"), *extra]


@pytest.fixture(scope="module", autouse=True)
def recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "three.yaml"
    path.write_text(RECIPE)
    _RECIPES["path"] = path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, recipe_file):
    tmp = tmp_path_factory.mktemp("full")
    assert main(_compress(tmp, "full")) == 0
    assert not stage_checkpoint.partial_dir(tmp / "full.ndz").exists()     # removed once the archive is written
    return json.loads((tmp / "full.json").read_text()), (tmp / "full.ndz").read_bytes()


def _stopped_run(tmp_path, monkeypatch, after: int | None):
    """Run the recipe into tmp_path/run.ndz and crash right after the checkpoint of `after` finished stages
    (0: the baseline; None: the first checkpoint, whatever it holds)."""
    real_save = stage_checkpoint.save

    def save_then_crash(folder, **kw):
        real_save(folder, **kw)
        if after is None or kw["done"] == after:
            raise Crash()
    monkeypatch.setattr(stage_checkpoint, "save", save_then_crash)
    with pytest.raises(Crash):
        main(_compress(tmp_path, "run"))
    monkeypatch.undo()


def test_a_run_stopped_after_stage_1_resumes_to_the_same_numbers_and_archive(tmp_path, monkeypatch, capsys, uninterrupted):
    full_doc, full_archive = uninterrupted
    _stopped_run(tmp_path, monkeypatch, after=1)
    index = json.loads((tmp_path / "run.ndz.partial" / "stages" / "checkpoint.json").read_text())
    assert index["epoch"] == 1 and [h["name"] for h in index["history"]] == ["prune"]
    assert not (tmp_path / "run.ndz").exists()
    capsys.readouterr()
    assert main(_compress(tmp_path, "run", "--resume")) == 0
    err = capsys.readouterr().err
    assert "1 of 3 stages are done" in err and "training the dense baseline" not in err   # nothing redone
    doc = json.loads((tmp_path / "run.json").read_text())
    assert _numbers(doc) == _numbers(full_doc)
    assert (tmp_path / "run.ndz").read_bytes() == full_archive                            # bit for bit
    assert not (tmp_path / "run.ndz.partial").exists()


def test_a_fresh_run_over_an_unfinished_one_is_refused_and_a_changed_run_cannot_resume_it(tmp_path, monkeypatch, capsys):
    _stopped_run(tmp_path, monkeypatch, after=None)      # right after the baseline's checkpoint
    capsys.readouterr()
    assert main(_compress(tmp_path, "run")) == 2          # without --resume it would throw the baseline away
    err = capsys.readouterr().err.strip()
    assert "unfinished compress run" in err and "--resume" in err and len(err.splitlines()) == 1
    changed = [a if a != "3" else "4" for a in _compress(tmp_path, "run", "--resume")]   # --seed 4
    assert main(changed) == 2
    err = capsys.readouterr().err.strip()
    assert "incompatible" in err and "seed" in err and len(err.splitlines()) == 1
    assert main(_compress(tmp_path, "run", "--resume", "--finetune-epochs", "2")) == 2     # another recipe
    assert "its recipe differs" in capsys.readouterr().err


def test_resume_with_nothing_to_resume_starts_fresh_and_says_so(tmp_path, capsys, uninterrupted):
    assert main(_compress(tmp_path, "run", "--resume")) == 0
    assert "no finished stage" in capsys.readouterr().err
    assert (tmp_path / "run.ndz").read_bytes() == uninterrupted[1]


def test_resume_needs_out(capsys):
    assert main(["compress", "mlp", *MLP, "--recipe", "int8", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


@pytest.mark.parametrize("edit,words", [
    (lambda ix: ix["callbacks"].pop("state"), "callbacks.state' is missing"),
    (lambda ix: ix["callbacks"]["state"].update(structure={"op": "x"}), "structure"),
    (lambda ix: ix["callbacks"]["state"].update(structure=[{"op": "structured", "modules": {"1": {
        "type": "Linear", "params": {"weight": [40000, 40000]}}}}]), "do not fit"),
    (lambda ix: ix["callbacks"]["state"]["encodings"].update({"1.weight": {"kind": "cluster", "bits": 99}}), "bits"),
    (lambda ix: ix["callbacks"]["run"].update(numpy_rng=[1, 2]), "numpy_rng"),
    (lambda ix: ix.update(epoch=7, history=ix["history"] * 7), "the recipe has 3"),
    (lambda ix: ix["history"][0].update(name="other"), "not the recipe's first"),
], ids=["no-state", "structure-type", "huge-structure", "enc-bits", "numpy-rng", "too-many-stages", "renamed-stage"])
def test_a_damaged_stage_checkpoint_is_one_line_exit_2(tmp_path, monkeypatch, capsys, edit, words):
    _stopped_run(tmp_path, monkeypatch, after=1)
    path = tmp_path / "run.ndz.partial" / "stages" / "checkpoint.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))
    capsys.readouterr()
    assert main(_compress(tmp_path, "run", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


# ------------------------------------------------------------------ the real thing: SIGKILL, then the CLI's --resume
KILLER = textwrap.dedent("""
    import os, signal, sys
    from netdiet.compression import stage_checkpoint
    from netdiet.training import loop
    from netdiet.cli import main
    where, argv = sys.argv[1], sys.argv[2:]
    save_stage, save_epoch = stage_checkpoint.save, loop.save_checkpoint
    def stage(folder, **kw):
        save_stage(folder, **kw)
        if where == f"stage-{kw['done']}":
            os.kill(os.getpid(), signal.SIGKILL)
    def epoch(folder, ck):
        save_epoch(folder, ck)
        if where == f"baseline-epoch-{ck.epoch}" and "baseline" in str(folder):
            os.kill(os.getpid(), signal.SIGKILL)
    stage_checkpoint.save, loop.save_checkpoint = stage, epoch
    sys.exit(main(argv))
""")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["baseline-epoch-1", "stage-0", "stage-2"])
def test_sigkill_mid_recipe_then_resume_equals_an_uninterrupted_run(tmp_path, where, uninterrupted):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLER, where, *_compress(tmp_path, "run")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr                       # really SIGKILLed
    assert not (tmp_path / "run.ndz").exists()
    resumed = subprocess.run([sys.executable, "-m", "netdiet", *_compress(tmp_path, "run", "--resume")], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    if where == "stage-2":
        assert "2 of 3 stages are done" in resumed.stderr
    full_doc, full_archive = uninterrupted
    assert _numbers(json.loads((tmp_path / "run.json").read_text())) == _numbers(full_doc)
    assert (tmp_path / "run.ndz").read_bytes() == full_archive
