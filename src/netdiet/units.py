"""Sizes in and out: `512MiB`, `4GiB`, `256KiB`, `1.5GB` or plain bytes."""
from __future__ import annotations

import re

from netdiet.errors import NetdietError

_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
    "k": 1024, "m": 1024**2, "g": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes from a size string. Raises NetdietError on anything unparseable."""
    if isinstance(text, int):
        if text < 0:
            raise NetdietError(f"size {text} is negative; give a positive size such as 512MiB")
        return text
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise NetdietError(
            f"cannot read size {text!r}; write it as plain bytes or with a unit: 256KiB, 512MiB, 4GiB, 1.5GB"
        )
    return int(round(float(m.group(1)) * _UNITS[unit]))


def format_bytes(n: float | int | None) -> str:
    """Human-readable bytes for terminal tables (JSON always keeps plain bytes)."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def format_count(n: float | int | None) -> str:
    """1234567 -> '1.23M' for terminal tables."""
    if n is None:
        return "-"
    n = float(n)
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' -> (1, 3, 224, 224)."""
    try:
        shape = tuple(int(p) for p in str(text).replace("x", ",").split(","))  # an empty part ('1,,3', '1,x') is an error
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise NetdietError(f"cannot read input shape {text!r}; write it as comma-separated positive sizes, e.g. 1,3,224,224")
    return shape


def parse_int_list(text: str, what: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]."""
    try:
        values = [int(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise NetdietError(f"cannot read {what} {text!r}; write comma-separated positive integers, e.g. 1,8,32")
    return values
