"""What the loop measures about itself: peak resident memory per epoch and the time projection.

Peak memory here is RSS-based: `peak_rss` is the process's peak resident set during the epoch (Linux VmHWM,
reset at the start of each epoch through /proc/self/clear_refs) and `peak_rss_delta` is that minus the resident
set at the reset. It counts what the epoch added on top
of what was already resident (weights, optimizer state after epoch 1, the data), including allocator slack; it is
an OS-level figure, not live-tensor tracking. Where the reset is unavailable (non-Linux) it is reported as None.
"""
from __future__ import annotations

import os


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakRSS:
    """`p = PeakRSS(); p.reset(); ...; p.peak_delta()` -> bytes above the RSS at reset (or None)."""

    method = "rss_delta"

    def __init__(self) -> None:
        self.available = _status_kib("VmHWM") is not None and os.access("/proc/self/clear_refs", os.W_OK)
        self._base = 0

    def reset(self) -> None:
        if not self.available:
            return
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")   # 5 = reset the peak RSS (VmHWM) to the current RSS
        except OSError:
            self.available = False
            return
        self._base = (_status_kib("VmRSS") or 0) * 1024

    def peak(self) -> int | None:
        """The process's peak resident set since the last reset, bytes."""
        if not self.available:
            return None
        return (_status_kib("VmHWM") or 0) * 1024

    def peak_delta(self) -> int | None:
        if not self.available:
            return None
        return max(0, (_status_kib("VmHWM") or 0) * 1024 - self._base)

    @staticmethod
    def current() -> int | None:
        kib = _status_kib("VmRSS")
        return None if kib is None else kib * 1024


def projection(samples_done: int, seconds: float, total_samples: int, train_flops_per_sample: int | None) -> dict:
    """Time for `total_samples` from the throughput measured so far (and the FLOP rate it implies)."""
    rate = samples_done / seconds if seconds > 0 else None
    out = {"measured_samples": samples_done, "measured_seconds": seconds, "samples_per_s": rate,
           "total_samples": total_samples, "projected_seconds": total_samples / rate if rate else None,
           "train_flops_per_sample": train_flops_per_sample, "total_train_flops": None, "achieved_flops_per_s": None}
    if train_flops_per_sample:
        out["total_train_flops"] = train_flops_per_sample * total_samples
        out["achieved_flops_per_s"] = train_flops_per_sample * rate if rate else None
    return out
