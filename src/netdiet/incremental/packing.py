"""Bit packing for exemplar codes and PackNet masks: `bits` in {1, 2, 4, 8} per value, rows padded to whole bytes.

A row of P codes at b bits takes ceil(P * b / 8) bytes; the first code sits in the lowest bits of the first byte.
"""
from __future__ import annotations

import torch

PACKABLE_BITS = (1, 2, 4, 8)


def packed_row_bytes(values_per_row: int, bits: int) -> int:
    return (values_per_row * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, P) integer codes < 2**bits -> (N, ceil(P*bits/8)) uint8."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"can pack 1, 2, 4 or 8 bits per value, not {bits}")
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    n, p = codes.shape
    per_byte = 8 // bits
    pad = (-p) % per_byte
    if pad:
        codes = torch.cat([codes, codes.new_zeros(n, pad)], dim=1)
    groups = codes.view(n, -1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    return (groups << shifts).sum(dim=2).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, values_per_row: int) -> torch.Tensor:
    """Inverse of `pack_bits`: (N, B) uint8 -> (N, values_per_row) uint8 codes."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"can unpack 1, 2, 4 or 8 bits per value, not {bits}")
    if bits == 8:
        return packed[:, :values_per_row].contiguous()
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(2) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :values_per_row].to(torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor of any shape -> 1 bit per element, ceil(numel/8) bytes."""
    return pack_bits(mask.reshape(1, -1).to(torch.uint8), 1).reshape(-1)


def unpack_mask(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    numel = 1
    for d in shape:
        numel *= int(d)
    return unpack_bits(packed.reshape(1, -1), 1, numel).reshape(shape).bool()
