"""The command-line contract, over every command, from a user's side.

Bad input: exit code 2 and exactly one line on stderr starting with `netdiet: error:` (no traceback).
--json: a document whose "schema" is "netdiet.<command>/<version>". Same --seed, same numbers.
Tables fit an 80-column terminal without cutting a header or a number to "…".
Everything runs in-process on scikit-learn's digits with one epoch and tiny models, so the file stays fast.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from netdiet.cli import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("contract")
    (d / "adir").mkdir()
    (d / "afile").write_text("x")
    (d / "garbage.ndz").write_bytes(b"not an archive at all")
    (d / "other.json").write_text('{"a": 1}')
    (d / "list.json").write_text("[1, 2]")
    (d / "broken.json").write_text("{not json")
    return d


@pytest.fixture(scope="module")
def archive(scratch) -> Path:
    """A real int8 archive of an MLP trained one epoch on digits (the dense baseline is trained by compress)."""
    out = scratch / "mlp-int8.ndz"
    code = main(["compress", "mlp", "--data", "digits", "--recipe", "int8", "--baseline-epochs", "1", "--no-latency",
                 "--out", str(out), "--json", str(scratch / "compress.json"), "--seed", "1"])
    assert code == 0 and out.is_file()
    return out


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


BAD_INPUTS = [
    # (id, argv with {d} for the scratch folder, a phrase the one line must contain)
    ("models-json-into-folder", ["models", "--json", "{d}/adir"], "is a folder"),
    ("recipes-json-under-a-file", ["recipes", "--json", "{d}/afile/x.json"], "cannot create folder"),
    ("data-unknown-suggests", ["data", "digts"], "did you mean 'digits'"),
    ("data-negative-samples", ["data", "digits", "--samples", "-1"], "samples"),
    ("data-zero-repeats", ["data", "digits", "--repeats", "0"], "--repeats"),
    ("data-list-json-into-folder", ["data", "--list", "--json", "{d}/adir"], "is a folder"),
    ("profile-unknown-model-suggests", ["profile", "lenett5"], "did you mean 'lenet5'"),
    ("profile-shape-with-letter", ["profile", "mlp", "--input", "1,x"], "cannot read input shape"),
    ("profile-shape-empty-part", ["profile", "mlp", "--input", "1,,784"], "cannot read input shape"),
    ("profile-zero-batch", ["profile", "mlp", "--batch-size", "0"], "--batch-size"),
    ("profile-non-numeric-batch", ["profile", "mlp", "--batch-size", "abc"], "--batch-size"),
    ("profile-bad-size", ["profile", "mlp", "--max-batch-for", "4XB"], "cannot read size"),
    ("profile-missing-weights", ["profile", "mlp", "--weights", "{d}/nosuch.safetensors"], "does not exist"),
    ("profile-weights-are-a-folder", ["profile", "mlp", "--weights", "{d}/adir"], "does not exist"),
    ("profile-weights-not-safetensors", ["profile", "mlp", "--weights", "{d}/garbage.ndz"], "safetensors"),
    ("profile-bad-model-kw", ["profile", "mlp", "--model-kw", "foo"], "key=value"),
    ("compress-unknown-recipe-suggests", ["compress", "mlp", "--recipe", "int9", "--data", "digits"], "did you mean 'int8'"),
    ("compress-recipe-not-yaml-mapping", ["compress", "mlp", "--recipe", "{d}/list.json", "--data", "digits"], "recipe"),
    ("compress-zero-baseline-epochs-without-weights", ["compress", "mlp", "--recipe", "int8", "--data", "digits",
                                                       "--baseline-epochs", "0"], "--baseline-epochs 0 needs --weights"),
    ("compress-zero-threads", ["compress", "mlp", "--recipe", "int8", "--threads", "0"], "--threads"),
    # fails before the baseline is trained: the single stderr line proves no training log came first
    ("compress-out-is-a-folder", ["compress", "mlp", "--recipe", "int8", "--data", "digits", "--out", "{d}/adir"], "is a folder"),
    ("compress-model-does-not-fit-data", ["compress", "lenet5", "--recipe", "int8", "--data", "digits"], "cannot take"),
    ("evaluate-missing-archive", ["evaluate", "{d}/nosuch.ndz", "--data", "digits"], "does not exist"),
    ("evaluate-folder-as-archive", ["evaluate", "{d}/adir", "--data", "digits"], "does not exist"),
    ("evaluate-garbage-archive", ["evaluate", "{d}/garbage.ndz", "--data", "digits"], "not a netdiet archive"),
    ("evaluate-json-not-archive", ["evaluate", "{d}/other.json", "--data", "digits"], "not a netdiet archive"),
    ("train-zero-epochs", ["train", "mlp", "--data", "digits", "--epochs", "0"], "epochs"),
    ("train-zero-batch", ["train", "mlp", "--data", "digits", "--batch-size", "0"], "batch_size"),
    ("train-out-is-a-file", ["train", "mlp", "--data", "digits", "--out", "{d}/afile"], "not a folder"),
    ("train-json-into-folder", ["train", "mlp", "--data", "digits", "--epochs", "1", "--json", "{d}/adir"], "is a folder"),
    ("train-bad-budget", ["train", "mlp", "--data", "digits", "--memory-budget", "12XB"], "cannot read size"),
    ("sweep-knob-without-values", ["sweep", "mlp", "--data", "digits", "--knob", "widths"], "--knob"),
    ("sweep-one-fold", ["sweep", "mlp", "--data", "digits", "--knob", "widths=[[8]]", "--folds", "1"], "k >= 2"),
    ("continual-unknown-strategy", ["continual", "--data", "digits", "--strategy", "replai"], "unknown strategy"),
    ("continual-zero-classes-per-task", ["continual", "--data", "digits", "--classes-per-task", "0"], "cannot split"),
    ("continual-bad-bits", ["continual", "--data", "digits", "--exemplar-bits", "3"], "--exemplar-bits"),
    ("report-missing-file", ["report", "{d}/nosuch.json", "-o", "{d}/r.html"], "does not exist"),
    ("report-not-json", ["report", "{d}/broken.json", "-o", "{d}/r.html"], "is not JSON"),
    ("report-json-not-netdiet", ["report", "{d}/other.json", "-o", "{d}/r.html"], "not a netdiet result"),
    ("report-json-list", ["report", "{d}/list.json", "-o", "{d}/r.html"], "not a netdiet result"),
    ("report-out-is-a-folder", ["report", "{d}/other.json", "-o", "{d}/adir"], "is a folder"),
    ("demo-json-into-folder", ["demo", "--out", "{d}/demo", "--json", "{d}/adir"], "is a folder"),
    # sizes whose real inputs could not be made (issue 11, item 6): refused before allocating, naming the value
    ("profile-input-beyond-ram", ["profile", "mlp", "--input", "99999999999,784"], "99999999999x784"),
    ("profile-input-beyond-ram-cut-to-batch", ["profile", "mlp", "--input", "99999999999,784", "--batch-size", "2"],
     "99999999999x784"),
    ("profile-batch-size-beyond-ram", ["profile", "mlp", "--input", "1,784", "--batch-size", "99999999999"],
     "99999999999x784"),
    ("profile-batch-sizes-beyond-ram", ["profile", "mlp", "--batch-sizes", "1000000000000000"], "batch 1000000000000000"),
    ("profile-batch-sizes-float", ["profile", "mlp", "--batch-sizes", "1e15"], "--batch-sizes"),
    ("profile-max-batch-for-float", ["profile", "mlp", "--max-batch-for", "1e40"], "cannot read size"),
    # an unwritable target fails before the work (issue 11, item 7): /proc passes os.access as root
    ("profile-json-into-proc", ["profile", "mlp", "--json", "/proc/x.json"], "/proc"),
    ("train-json-into-proc", ["train", "mlp", "--data", "digits", "--json", "/proc/x.json"], "/proc"),
    ("report-out-into-proc", ["report", "{d}/other.json", "-o", "/proc/x.html"], "/proc"),
]


@pytest.mark.parametrize("argv,phrase", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_exit_2_and_one_error_line(capsys, scratch, argv, phrase):
    code, _, err = _run(capsys, [a.replace("{d}", str(scratch)) for a in argv])
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("netdiet: error: ") and "Traceback" not in err
    assert phrase in lines[0]


@pytest.mark.parametrize("argv", [["profile", "mlp", "--batch-size", "x"], ["data", "digits", "--samples", "x"],
                                  ["proflie", "mlp"], ["train"]], ids=["profile-x", "data-x", "typo-command", "no-model"])
def test_argparse_usage_errors_exit_2_without_traceback(capsys, argv):
    code, _, err = _run(capsys, argv)
    assert code == 2 and "Traceback" not in err and "error" in err


def test_evaluate_on_other_data_shape_is_one_line(capsys, archive):
    code, _, err = _run(capsys, ["evaluate", str(archive), "--data", "mnist5k", "--no-latency"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--data" in err


def test_truncated_and_bit_flipped_archives_are_one_line(capsys, archive, scratch):
    data = archive.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    for name, blob in (("trunc.ndz", data[: len(data) // 2]), ("flip.ndz", bytes(flipped)), ("empty.ndz", b"")):
        (scratch / name).write_bytes(blob)
        code, _, err = _run(capsys, ["evaluate", str(scratch / name), "--data", "digits", "--no-latency"])
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("netdiet: error:"), (name, err)


def test_failed_command_leaves_earlier_json_intact(capsys, scratch):
    out = scratch / "keep.json"
    assert _run(capsys, ["models", "--json", str(out)])[0] == 0
    before = out.read_bytes()
    code, _, _ = _run(capsys, ["data", "nosuch", "--json", str(out)])
    assert code == 2 and out.read_bytes() == before
    assert not [p for p in scratch.iterdir() if p.name.startswith(".keep.json.")]  # no temp file left behind


def _schema(path: Path) -> str:
    return json.loads(path.read_text())["schema"]


@pytest.fixture(scope="module")
def docs(scratch, archive) -> Path:
    """One --json run of every command (tiny settings); returns the folder with <name>.json per command."""
    d = scratch
    runs = {
        "models": ["models"],
        "recipes": ["recipes"],
        "datasets": ["data", "--list"],
        "data": ["data", "digits", "--repeats", "1", "--samples", "1"],
        "profile": ["profile", "mlp", "--model-kw", "widths=[16]"],
        "evaluate": ["evaluate", str(archive), "--data", "digits", "--no-latency"],
        "train": ["train", "mlp", "--model-kw", "widths=[16]", "--data", "digits", "--epochs", "1", "--projection-steps", "0"],
        "sweep": ["sweep", "mlp", "--data", "digits", "--knob", "widths=[[8],[16]]", "--folds", "2", "--epochs", "1"],
        "continual": ["continual", "--data", "digits", "--strategy", "naive", "--epochs", "1", "--model-kw", "widths=[16]"],
    }
    for name, argv in runs.items():
        assert main([*argv, "--json", str(d / f"{name}.json")]) == 0, name
    assert main(["report", str(d / "train.json"), str(d / "compress.json"), "-o", str(d / "r.html"),
                 "--json", str(d / "report.json")]) == 0
    return d


@pytest.mark.parametrize("name", ["models", "recipes", "datasets", "data", "profile", "compress", "evaluate", "train",
                                  "sweep", "continual", "report"])
def test_json_document_carries_its_schema(docs, name):
    assert _schema(docs / f"{name}.json") == f"netdiet.{name}/1"


def test_report_wrote_its_html(docs):
    assert (docs / "r.html").stat().st_size > 1000


def test_demo_accepts_json_option():
    from netdiet.cli import build_parser
    args = build_parser().parse_args(["demo", "--json", "x.json"])
    assert args.json == "x.json"


def test_compress_builds_mlp_for_the_data_shape(scratch, archive):
    """mlp's default input is 784 features; on digits (64) compress sizes it from the data, like train does."""
    doc = json.loads((scratch / "compress.json").read_text())
    assert doc["model"]["kwargs"] == {"in_features": 64}  # recorded, so the archive rebuilds the same network
    header_params = doc["stages"][0]["params"]
    assert header_params == 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10


def test_same_seed_same_training_numbers(capsys, scratch):
    docs = []
    for i in range(2):
        path = scratch / f"seed{i}.json"
        code, _, err = _run(capsys, ["train", "mlp", "--model-kw", "widths=[16]", "--data", "digits", "--epochs", "1",
                                     "--projection-steps", "0", "--seed", "7", "--json", str(path)])
        assert code == 0, err
        docs.append(json.loads(path.read_text()))
    assert docs[0]["test_acc"] == docs[1]["test_acc"]
    assert [h["loss"] for h in docs[0]["history"]] == [h["loss"] for h in docs[1]["history"]]


def _no_ellipsis(renderable) -> str:
    console = Console(width=80, record=True, file=open("/dev/null", "w"))
    console.print(renderable)
    text = console.export_text()
    assert "…" not in text, text
    return text


def test_train_table_fits_80_columns_even_for_wide_values(docs):
    from netdiet.reporting.train_tables import train_history_table
    doc = json.loads((docs / "train.json").read_text())
    doc["history"].append(dict(doc["history"][0], epoch=100, loss=12.3456, train_acc=1.0, val_acc=1.0, seconds=1234.5,
                               samples_per_s=123456.7, data_wait_fraction=0.999, peak_rss=999 * 2**30,
                               peak_rss_delta=1023.9 * 2**20))
    text = _no_ellipsis(train_history_table(doc))
    for cell in ("12.346", "100.0%", "1234.5", "123457", "99.9%", "999 GiB", "1024 MiB", "smp/s"):
        assert cell in text


def test_continual_summary_fits_80_columns(docs):
    from netdiet.reporting.continual_tables import summary_table
    doc = json.loads((docs / "continual.json").read_text())
    s = dict(doc["strategies"][0], name="replay-reservoir")
    s["bytes_per_task"] = [10 * 2**20] + s["bytes_per_task"][1:]
    doc["strategies"] = [s, dict(s, name="joint", status="stopped", message="over")]
    text = _no_ellipsis(summary_table(doc))
    assert "max 10.00 MiB" in text and "stopped" in text


def test_sweep_table_fits_80_columns(docs):
    from netdiet.reporting.train_tables import sweep_table
    _no_ellipsis(sweep_table(json.loads((docs / "sweep.json").read_text())))


def test_python_dash_m_netdiet_help_works():
    res = subprocess.run([sys.executable, "-m", "netdiet", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "continual" in res.stdout and "demo" in res.stdout


def test_evaluate_tensor_table_fits_80_columns(docs):
    from netdiet.reporting.evaluate_tables import tensors_table
    doc = json.loads((docs / "evaluate.json").read_text())
    assert doc["tensors"], "the int8 archive lists its tensors"
    text = _no_ellipsis(tensors_table(doc))
    assert "numel" in text and f"{doc['tensors'][0]['bytes']:,}" in text


def test_profile_module_table_folds_long_types_instead_of_cutting(docs):
    """The mlp's module types (Sequential, Flatten) were cut to 'Sequenti…' at 80 columns."""
    from netdiet.reporting.profile_tables import module_table
    doc = json.loads((docs / "profile.json").read_text())
    doc["modules"][1] = dict(doc["modules"][1], type="CausalSelfAttention", depth=3, params=201_380_000,
                             macs=429_510_000_000, flops=859_790_000_000, backward_flops=1_740_000_000_000,
                             activation_bytes=512 * 2**20, output_shape=[1, 2048, 32000])
    text = _no_ellipsis(module_table(doc, 3))
    assert "Sequential" in text and "bwd" in text and "1x2048x32000" in text and "512 MiB" in text
    assert "CausalSelfAttentio" in text  # folded onto a second line when narrow, never cut


def test_debug_flag_after_the_command_shows_the_traceback(capsys):
    """Errors say 'rerun with --debug'; appending it to the command line must work, not be a usage error."""
    code, _, err = _run(capsys, ["profile", "nosuch", "--debug"])
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("netdiet: error: unknown model")


def test_mistyped_command_suggests_the_closest_in_one_line(capsys):
    from netdiet.cli import main as cli_main
    assert cli_main(["proflie", "lenet5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["netdiet: error: unknown command 'proflie'; did you mean 'profile'? `netdiet --help` lists the commands"]
    assert cli_main(["--debug", "models"]) == 0


def test_max_batch_search_for_a_huge_budget_stops_at_the_cap_without_allocating(scratch):
    """--max-batch-for 10^39 bytes: the search runs on meta tensors and stops at its cap (it allocated 52 GB)."""
    out = scratch / "huge-budget.json"
    assert main(["profile", "mlp", "--max-batch-for", str(10 ** 39), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["max_batch"]["capped"] is True and doc["max_batch"]["batch_size"] >= 1 << 24


def test_7b_preset_at_8x2048_still_profiles_on_meta(capsys):
    code, _, err = _run(capsys, ["profile", "transformer", "--model-kw", "preset=7b", "--input", "8,2048"])
    assert code == 0, err


WRONG_TYPED = [
    # (the result it is planted in, the field, its wrong-typed value): each failed `netdiet report` with exit 1
    ("profile", "totals", 5),
    ("profile", "memory", "x"),
    ("profile", "modules", [3]),
    ("compress", "stages", {}),
    ("train", "history", [1, 2]),
    ("continual", "strategies", [{"accuracy_matrix": "abc"}]),
]


@pytest.mark.parametrize("name,field,value", WRONG_TYPED, ids=[f"{n}-{f}" for n, f, _ in WRONG_TYPED])
def test_report_skips_a_section_with_a_wrong_typed_field_and_says_so(capsys, docs, tmp_path, name, field, value):
    doc = json.loads((docs / f"{name}.json").read_text())
    doc[field] = value
    bad = tmp_path / f"{name}-bad.json"
    bad.write_text(json.dumps(doc))
    out = tmp_path / "r.html"
    code, _, err = _run(capsys, ["report", str(bad), str(docs / "models.json"), "-o", str(out)])
    assert code == 0, err
    page = out.read_text()
    assert "Model zoo" in page  # the other result still renders
    notes = re.findall(r"<p class='warn skipped'>([^<]*)</p>", page)
    assert len(notes) == 1, page[-2000:]
    named = "accuracy_matrix" if field == "strategies" else f"&#x27;{field}&#x27;"
    assert named in notes[0] and "skipped" in notes[0]


def test_report_of_untouched_results_skips_nothing(docs, tmp_path):
    names = ["profile", "compress", "evaluate", "train", "sweep", "continual", "data", "models", "report"]
    out = tmp_path / "all.html"
    assert main(["report", *[str(docs / f"{n}.json") for n in names], "-o", str(out)]) == 0
    assert "skipped" not in out.read_text()
