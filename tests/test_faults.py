"""Faults of the machine, not of the input: a full disk while writing a result is one line (exit 2) naming the
path and the reason, and leaves nothing half-written (the temp file is removed, an earlier file stays whole)."""
from __future__ import annotations

import errno
import json
import os

import pytest

from netdiet import fileio
from netdiet.cli import main
from netdiet.errors import NetdietError


def _full_disk(monkeypatch) -> None:
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", fsync)


def test_atomic_write_on_a_full_disk_is_a_netdiet_error_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    target.write_text('{"old": true}')
    _full_disk(monkeypatch)
    with pytest.raises(NetdietError) as info:
        fileio.atomic_write_json(target, {"new": 1})
    message = str(info.value)
    assert str(target) in message and "No space left on device" in message and "\n" not in message
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_write_that_fails_in_write_itself_is_one_line_too(tmp_path, monkeypatch):
    real_fdopen = os.fdopen

    class Failing:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def fileno(self):
            return self.fh.fileno()

        def write(self, data):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        def flush(self):
            pass

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Failing(real_fdopen(fd, mode)))
    with pytest.raises(NetdietError, match="Input/output error"):
        fileio.atomic_write_text(tmp_path / "x.html", "hello")
    assert list(tmp_path.iterdir()) == []


def test_check_writable_creates_and_removes_a_probe(tmp_path):
    assert fileio.check_writable(tmp_path / "a.json") == tmp_path / "a.json"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NetdietError, match="/proc"):
        fileio.check_writable("/proc/x.json")


def _one_error_line(capsys, argv, path) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("netdiet: error: cannot write "), err
    assert str(path) in err[0] and "No space left on device" in err[0]
    return err[0]


def test_report_on_a_full_disk_is_exit_2(tmp_path, monkeypatch, capsys):
    src = tmp_path / "models.json"
    assert main(["models", "--json", str(src)]) == 0
    _full_disk(monkeypatch)
    out = tmp_path / "r.html"
    _one_error_line(capsys, ["report", str(src), "-o", str(out)], out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_train_on_a_full_disk_is_exit_2(tmp_path, monkeypatch, capsys):
    _full_disk(monkeypatch)
    out = tmp_path / "run"
    _one_error_line(capsys, ["train", "mlp", "--data", "digits", "--model-kw", "widths=[8]", "--epochs", "1",
                             "--projection-steps", "0", "--out", str(out)], out)
    assert not [p for p in out.rglob("*.tmp")]
