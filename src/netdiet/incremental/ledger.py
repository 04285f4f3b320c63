"""The byte ledger: exact bytes of everything a continual-learning method keeps after each task.

Each strategy hands over what it keeps as named items, each a dict of tensors at their stored dtype
(float32 weights, int8 codes and scales, bit-packed masks as uint8, exemplar codes, Fisher and anchors,
teacher copies). An item's bytes are the sum of numel * element_size of its tensors: exactly the payload
safetensors writes for them (`serialise`), without the file's JSON header. The budget is a hard cap on the total.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import torch

from netdiet.errors import NetdietError
from netdiet.units import format_bytes

KeptState = dict[str, dict[str, torch.Tensor]]   # item -> {tensor name -> tensor}


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def item_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(tensor_bytes(t) for t in tensors.values())


@dataclass
class LedgerEntry:
    task: int
    items: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.items.values())

    def to_dict(self) -> dict:
        return {"task": self.task, "items": dict(self.items), "total": self.total}


def measure(task: int, kept: KeptState) -> LedgerEntry:
    return LedgerEntry(task, {name: item_bytes(tensors) for name, tensors in kept.items() if tensors})


def serialise(kept: KeptState) -> bytes:
    """What the strategy keeps, as one safetensors blob (keys `item/name`)."""
    from safetensors.torch import save
    flat = {f"{item}/{name}": t.detach().contiguous().clone() for item, tensors in kept.items() for name, t in tensors.items()}
    return save(flat)


def safetensors_payload_bytes(blob: bytes) -> int:
    """Bytes of tensor data in a safetensors blob: total minus the 8-byte length and the JSON header."""
    (header_len,) = struct.unpack("<Q", blob[:8])
    return len(blob) - 8 - header_len


def enforce(entry: LedgerEntry, budget: int | None, strategy: str) -> None:
    """The hard cap: never silently exceed the budget."""
    if budget is not None and entry.total > budget:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in entry.items.items())
        raise NetdietError(f"strategy '{strategy}' would keep {entry.total} bytes after task {entry.task} "
                           f"({parts}) > budget {budget} bytes; raise --budget or use fewer/smaller exemplars or --shrink int8")


def state_dict_item(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A model's weights as kept: every parameter and buffer at its dtype (or cast to `dtype` if floating)."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t
    return out
