"""Number checks shared by every config object (TrainConfig, ContinualConfig): finite, in range, integer where
an integer is meant. The CLI, the YAML recipes and the Python API all build those objects, so checking them here
checks all three. Each failure is one NetdietError naming the option, the value and the allowed range.
"""
from __future__ import annotations

import math
import numbers

from netdiet.errors import NetdietError

# numpy's RandomState takes seeds below 2**32, and torch generators are seeded with seed + epoch / seed * 1000 + task:
# one range every consumer accepts.
SEED_MAX = 2**32 - 1


def _label(name: str, flag: str | None) -> str:
    return f"{name} ({flag})" if flag else name


def check_number(name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
                 flag: str | None = None, example: str | None = None) -> float:
    """A finite real number in [low, high] (or (low, high] with low_open); returns it as float."""
    what = _label(name, flag)
    hint = f"; e.g. {example}" if example else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise NetdietError(f"{what} {value!r} is not a number{hint}")
    v = float(value)
    if not math.isfinite(v):
        raise NetdietError(f"{what} {value!r} is not finite; give a finite number{_range(low, high, low_open)}{hint}")
    if low is not None and (v <= low if low_open else v < low) or high is not None and v > high:
        raise NetdietError(f"{what} {value!r} is out of range; it must be{_range(low, high, low_open)}{hint}")
    return v


def check_integer(name: str, value, *, low: int | None = None, high: int | None = None, flag: str | None = None,
                  example: str | None = None) -> int:
    """A whole number in [low, high] (an integral float such as 3.0 counts); returns it as int."""
    what = _label(name, flag)
    hint = f"; e.g. {example}" if example else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise NetdietError(f"{what} {value!r} is not an integer{hint}")
    if not isinstance(value, numbers.Integral):
        if not math.isfinite(float(value)) or float(value) != int(value):
            raise NetdietError(f"{what} {value!r} is not an integer{_int_range(low, high)}{hint}")
    v = int(value)
    if low is not None and v < low or high is not None and v > high:
        raise NetdietError(f"{what} {value!r} is out of range; it must be an integer{_int_range(low, high)}{hint}")
    return v


def check_seed(value, *, name: str = "seed", flag: str | None = "--seed") -> int:
    return check_integer(name, value, low=0, high=SEED_MAX, flag=flag, example=f"{flag or name} 0")


def check_fields(obj, rules, *, optional=()) -> None:
    """Check each numeric field of a config object by a table of rules (field, kind, low, high, flag, example): kind
    "int" a whole number, "real" a finite number, "pos" a finite number > 0; a field named in `optional` may be None."""
    for name, kind, low, high, flag, example in rules:
        value = getattr(obj, name)
        if value is None and name in optional:
            continue
        if kind == "int":
            check_integer(name, value, low=low, high=high, flag=flag, example=example)
        else:
            check_number(name, value, low=low, high=high, low_open=kind == "pos", flag=flag, example=example)


def _range(low, high, low_open) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f" <= {high:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}]"


def _int_range(low, high) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" >= {low}"
    if low is None:
        return f" <= {high}"
    return f" in {low}..{high}"


def json_finite(doc):
    """`doc` with every NaN/infinite float replaced by None, so it can be written as strict JSON."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: json_finite(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [json_finite(v) for v in doc]
    return doc
