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


def _short(v: float) -> str:
    """Three significant digits, trailing zeros dropped: 512, 16.1, 4.94, 2.5, 4."""
    text = f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def byte_unit(n: float) -> tuple[str, int]:
    """The binary unit ('B', 'KiB' ... 'TiB') and its size that `n` bytes are written in."""
    scale = 1
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 * scale:
            return unit, scale
        scale *= 1024
    return "TiB", scale


def format_bytes(n: float | int | None, short: bool = False) -> str:
    """Human-readable bytes: '9.63 MiB' (JSON always keeps plain bytes). `short`: three significant digits,
    trailing zeros dropped ('512 MiB', '4.9 MiB', '2.5 KiB'), for narrow columns and chart axes."""
    if n is None:
        return "-"
    n = float(n)
    unit, scale = byte_unit(n)
    if unit == "B":
        return f"{n:.0f} B"
    return f"{_short(n / scale)} {unit}" if short else f"{n / scale:.2f} {unit}"


def format_count(n: float | int | None, short: bool = False) -> str:
    """1234567 -> '1.23M' (K, M, G, T: powers of 1000). `short`: '1.2M', '500K', '2.5G' (chart axes)."""
    if n is None:
        return "-"
    n = float(n)
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{_short(n / scale) if short else f'{n / scale:.2f}'}{unit}"
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
