"""Atomic file writing: a temp file in the same folder, fsync, then rename.

A crash mid-write leaves the previous file intact, never half of a new one.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from netdiet.errors import NetdietError


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, busy: str):
    """Hold an exclusive lock (flock) on `folder` itself (created if need be) while the block runs; a second holder
    gets NetdietError(`busy`). The OS drops the lock when the process ends, so a killed run never leaves the
    folder locked, and no lock file is left behind. Without flock (Windows), or when the folder cannot be made
    (the caller's own check then says why in one line), the block runs unlocked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise NetdietError(busy) from None
        yield
    finally:
        os.close(fd)                              # closing releases the lock


def _check_dir(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NetdietError(f"cannot create folder {parent}: {exc.strerror}; choose a writable output path") from None
    if not os.access(parent, os.W_OK):
        raise NetdietError(f"folder {parent} is not writable; choose a writable output path")
    # os.access trusts permission bits; a read-only mount, /proc or a quota says no only when a file is made
    try:
        fd, probe = tempfile.mkstemp(prefix=".netdiet-probe.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise NetdietError(f"cannot create a file in folder {parent}: {exc.strerror}; choose a writable output path") from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (one line, exit 2) when `path` cannot become a file: a folder is there, or its folder is not writable."""
    path = Path(path)
    if path.is_dir():
        raise NetdietError(f"{path} is a folder, not a file; give a file path (e.g. {path / ('result' + (path.suffix or '.json'))})")
    _check_dir(path)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically. An OSError (a full disk, a quota, an I/O error) is a NetdietError naming
    the path and the reason; the temp file is removed, and a previous file at `path` is left as it was."""
    path = check_writable(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; a result file gets the usual permissions
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from None
        raise
    return path


def _write_error(path: Path, exc: OSError) -> NetdietError:
    reason = exc.strerror or (errno.errorcode.get(exc.errno, "") if exc.errno else "") or str(exc) or type(exc).__name__
    return NetdietError(f"cannot write {path}: {reason}; free space or choose another output path, then rerun")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps_json(doc: Any) -> str:
    return json.dumps(doc, indent=2, default=_json_default, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike, doc: Any) -> Path:
    return atomic_write_text(path, dumps_json(doc))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise NetdietError(f"file {path} does not exist; check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NetdietError(f"{path} is not valid JSON ({exc}); give a JSON file written by netdiet") from None


def save_state_dict(path: str | os.PathLike, state: dict, metadata: dict[str, str] | None = None) -> Path:
    """safetensors, atomically. Tensors are made contiguous and de-aliased first."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_state_dict(path: str | os.PathLike) -> dict:
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise NetdietError(f"weights file {path} does not exist; check the path")
    try:
        return load(path.read_bytes())
    except Exception as exc:  # safetensors raises its own error types
        raise NetdietError(f"{path} is not a readable safetensors file ({exc}); give a file saved by netdiet") from None
