"""Per-rank memory and collectives of a training step laid out over N devices (DDP, FSDP2, ZeRO 1-3, tensor
parallel), from the same meta-device simulation the single-device estimate uses.

(Interface skeleton: parse_layout validates the layout; analyse builds the `distributed` section of a profile.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from netdiet.errors import NetdietError

STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3", "tp")


@dataclass(frozen=True)
class Layout:
    strategy: str
    world_size: int
    tp: int = 1
    device: str | None = None


def parse_layout(strategy: str | None, world_size: int | None, tp: int | None, device: str | None) -> Layout | None:
    """The checked layout, or None for a single-device profile. Bad input raises NetdietError (one line)."""
    if strategy is None:
        given = [flag for flag, v in (("--world-size", world_size), ("--tp", tp), ("--device", device)) if v is not None]
        if given:
            raise NetdietError(f"{', '.join(given)} describe a parallel layout; add --parallel {'|'.join(STRATEGIES)}")
        return None
    key = str(strategy).lower()
    if key not in STRATEGIES:
        raise NetdietError(f"unknown --parallel '{strategy}'; choose one of: {', '.join(STRATEGIES)}")
    if world_size is None or int(world_size) < 1:
        raise NetdietError(f"--parallel {key} needs --world-size N (N >= 1), got {world_size}")
    return Layout(key, int(world_size), int(tp or 1), device)


def analyse(layout: Layout, net: nn.Module, x: tuple, *, counts: Any, estimate: Any, estimate_at: Any,
            mem_kw: dict, measure: bool, unavailable: str | None) -> dict[str, Any]:
    """The `distributed` section of a profile document."""
    raise NetdietError("--parallel is not available yet")
