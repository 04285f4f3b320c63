"""Atomic file writing: a temp file in the same folder, fsync, then rename.

A crash mid-write leaves the previous file intact, never half of a new one.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
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


# ------------------------------------------------------------------ reading JSON: bounded, strict, finite
MAX_JSON_BYTES = 64 << 20   # netdiet writes well under 1 MiB (a 7B profile: ~0.3 MiB); a 3000x3000 matrix of 0.5: 45 MB
MAX_JSON_DEPTH = 32         # netdiet nests ~8 deep; json.loads recurses once per level
MAX_JSON_MEMORY = 512 << 20  # parsed objects a JSON file may become (a 3000x3000 accuracy matrix: ~290 MB)
_DEPTH_CHUNK = 1 << 18
# what json.loads makes of the text, per item, measured on CPython 3.11: an empty object or list ~72 bytes with its
# slot in the parent, a number or string ~32 (a 2.8M-item array of {} took 212 MB, of 0.5 100 MB)
# and an object's key ~64 more (its string and its slot in the table: a 1M-key object took 132 MB)
CONTAINER_BYTES, VALUE_BYTES, KEY_BYTES = 80, 32, 64


def json_shape(raw: bytes) -> tuple[int, int, int, int]:
    """(depth, containers, values, keys) of JSON text, counted outside strings without building anything: how
    deeply arrays and objects nest, how many there are, how many values they hold (about: commas + containers)
    and how many keys (colons). One
    pass in 256 KiB chunks over numpy arrays; strings are found by their unescaped quotes, so the scratch stays a
    few MB whatever the text (a regex substitution of the strings took 450 MB on 2.8M empty strings)."""
    import numpy as np
    depth = deepest = containers = commas = colons = 0
    inside, run = 0, 0            # carried across chunks: inside a string?, backslashes ending the previous chunk
    for start in range(0, len(raw), _DEPTH_CHUNK):
        a = np.frombuffer(raw, dtype=np.uint8, count=min(_DEPTH_CHUNK, len(raw) - start), offset=start)
        n = len(a)
        backslash = a == 92
        idx = np.arange(n, dtype=np.int32)
        last_other = np.where(backslash, -1, idx)
        np.maximum.accumulate(last_other, out=last_other)
        quotes = np.flatnonzero(a == 34)
        before = quotes - 1                                   # backslashes right before each quote
        prev_other = last_other[np.maximum(before, 0)]
        run_before = np.where(before < 0, run, before - prev_other + np.where(prev_other < 0, run, 0))
        run_before[before < 0] = run
        real = quotes[run_before % 2 == 0]                    # quotes that open or close a string
        toggle = np.zeros(n, dtype=np.int8)
        toggle[real] = 1
        outside = ((np.cumsum(toggle, dtype=np.int32) + inside) & 1 == 0) & (toggle == 0)
        opens = outside & ((a == 91) | (a == 123))
        step = opens.astype(np.int32) - (outside & ((a == 93) | (a == 125)))
        levels = np.cumsum(step, dtype=np.int32) + depth
        if n:
            deepest = max(deepest, int(levels.max()))
            depth = int(levels[-1])
        containers += int(opens.sum())
        commas += int((outside & (a == 44)).sum())
        colons += int((outside & (a == 58)).sum())
        inside = (inside + len(real)) % 2
        if n and backslash[-1]:
            run = (n - 1 - int(last_other[-1])) + (run if last_other[-1] < 0 else 0)
        else:
            run = 0
    return deepest, containers, commas + containers + (1 if raw.strip() else 0), colons


def json_depth(raw: bytes) -> int:
    """How deeply JSON text nests arrays and objects (brackets inside strings do not count)."""
    return json_shape(raw)[0]


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is not finite")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH, max_memory: int | None = None) -> Any:
    """Strict JSON from bytes: UTF-8, nested at most `max_depth` deep, every number finite (NaN, Infinity and
    1e999 are refused), integers of at most 4,300 digits, and -- with `max_memory` -- holding no more items than
    that many bytes of Python objects (CONTAINER_BYTES, VALUE_BYTES, KEY_BYTES each; strings also take their
    own length),
    all checked before anything is built. ValueError says what is wrong."""
    depth, containers, values, keys = json_shape(raw)
    if depth > max_depth:
        raise ValueError(f"JSON nested {depth} deep (at most {max_depth})")
    need = containers * CONTAINER_BYTES + values * VALUE_BYTES + keys * KEY_BYTES
    if max_memory is not None and need > max_memory:
        raise ValueError(f"JSON of {containers:,} arrays/objects, {values:,} values and {keys:,} keys would take "
                         f"about {need >> 20} MiB to hold (at most {max_memory >> 20} MiB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    # a float overflows to inf only with an exponent of 3+ digits or 200+ digits: only then is each float checked
    # in Python (1.5 us a number: 3 s for an 8 MiB header of floats), else json's C parser reads them
    finite = _finite if _MAYBE_HUGE.search(raw) else float
    try:
        doc = json.loads(text, parse_float=finite, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if _SURROGATE_ESCAPE.search(raw):   # "\ud800" parses to a string no file or page can hold: refused here
        _check_strings(doc)
    return doc


_MAYBE_HUGE = re.compile(rb"[eE]\+?0*[1-9][0-9]{2,}|[0-9]{200,}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_strings(node: Any) -> None:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        for s in (key, value):
            if isinstance(s, str):
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("a string holds an unpaired UTF-16 surrogate (\\ud800-\\udfff)") from None
        if isinstance(value, (dict, list)):
            _check_strings(value)


def read_json(path: str | os.PathLike, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH,
              max_memory: int = MAX_JSON_MEMORY, hint: str = "give a JSON file written by netdiet") -> Any:
    """A JSON file read within limits: at most `max_bytes` (checked before reading), `max_depth` deep, at most
    `max_memory` bytes of parsed objects, strict and finite (parse_json). Anything else is one NetdietError naming
    the file, ending with `hint`."""
    path = Path(path)
    if not path.is_file():
        raise NetdietError(f"file {path} does not exist; check the path")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as exc:
        raise NetdietError(f"cannot read {path}: {exc.strerror or exc}; check the path and its permissions") from None
    if len(raw) > max_bytes:
        raise NetdietError(f"{path} is larger than {max_bytes >> 20} MiB, more than any JSON netdiet writes; {hint}")
    try:
        return parse_json(raw, max_depth=max_depth, max_memory=max_memory)
    except ValueError as exc:
        raise NetdietError(f"{path} is not JSON netdiet can read ({exc}); {hint}") from None


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
