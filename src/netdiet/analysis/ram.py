"""The RAM guard: memory is budgeted before it is spent. A run whose estimated peak does not fit in the memory
this machine has available is refused up front (one line, exit 2) unless the user overrides it."""
from __future__ import annotations

import os

from torch import nn

from netdiet.analysis.step import unique_storage_bytes
from netdiet.errors import NetdietError
from netdiet.units import format_bytes



def available_ram() -> int | None:
    """Bytes of RAM available to new allocations (Linux MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def measure_copy_bytes(model: nn.Module) -> int:
    """Bytes a measured run needs beyond the estimated peak: measure_memory (and measure_latency's training
    step) work on a deep copy, so the caller's weights and buffers stay allocated beside the copy's."""
    total, _ = unique_storage_bytes(list(model.parameters()) + list(model.buffers()))
    return total


def check_fits_in_ram(estimate_bytes: int, override: bool = False, *, flag: str = "--force") -> None:
    """Refuse up front a measured run whose estimated peak exceeds the RAM available now."""
    if override:
        return
    avail = available_ram()
    if avail is None or estimate_bytes <= avail:
        return
    raise NetdietError(f"measuring needs about {format_bytes(estimate_bytes)} but only {format_bytes(avail)} of RAM is "
                       f"available; use a smaller batch, --dtype bf16 or --checkpointing, or pass {flag} to run anyway")
