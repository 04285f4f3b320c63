"""An exemplar buffer whose bytes are exact: images stored as float32, float16 or 8/4/2/1-bit codes, optionally
down-sampled, labels as the smallest integer type that holds them.

Codes are uniform over one range [lo, hi] taken from the first data stored (for the registered datasets,
[0, 1]); 8-bit codes of uint8-sourced images (MNIST) are lossless. Down-sampling averages d x d pixel blocks;
replay up-samples bilinearly to the model's input size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from netdiet.errors import NetdietError
from netdiet.incremental.packing import pack_bits, packed_row_bytes, unpack_bits

EXEMPLAR_BITS = (32, 16, 8, 4, 2, 1)


def _label_dtype(num_outputs: int) -> torch.dtype:
    return torch.uint8 if num_outputs <= 256 else (torch.int16 if num_outputs <= 32767 else torch.int32)


class ExemplarBuffer:
    def __init__(self, sample_shape: tuple[int, ...], num_outputs: int, bits: int = 32, downsample: int = 1) -> None:
        self.sample_shape = tuple(sample_shape)
        self.label_dtype = _label_dtype(num_outputs)
        self._check(bits, downsample)
        self.bits, self.downsample = bits, downsample
        self.codes: torch.Tensor | None = None          # (N, row) float32/float16 values or packed uint8 codes
        self.labels = torch.zeros(0, dtype=self.label_dtype)
        self.value_range: torch.Tensor | None = None    # float32 [lo, hi], kept only for integer codes

    def _check(self, bits: int, downsample: int) -> None:
        if bits not in EXEMPLAR_BITS:
            raise NetdietError(f"--exemplar-bits {bits} is not supported; choose one of: {', '.join(map(str, EXEMPLAR_BITS))}")
        if downsample < 1 or (downsample > 1 and len(self.sample_shape) != 3):
            raise NetdietError(f"--exemplar-downsample {downsample} needs image samples (C,H,W) and a factor >= 1")

    # ------------------------------------------------------------------ sizes
    @property
    def stored_shape(self) -> tuple[int, ...]:
        if self.downsample == 1:
            return self.sample_shape
        c, h, w = self.sample_shape
        return (c, math.ceil(h / self.downsample), math.ceil(w / self.downsample))

    @property
    def values_per_exemplar(self) -> int:
        return math.prod(self.stored_shape)

    def bytes_per_exemplar(self, bits: int | None = None) -> int:
        bits = bits or self.bits
        label = torch.tensor([], dtype=self.label_dtype).element_size()
        if bits >= 16:
            return self.values_per_exemplar * bits // 8 + label
        return packed_row_bytes(self.values_per_exemplar, bits) + label

    def fixed_bytes(self, bits: int | None = None) -> int:
        return 8 if (bits or self.bits) <= 8 else 0   # the float32 [lo, hi] range of integer codes

    def capacity_for(self, available_bytes: int, bits: int | None = None) -> int:
        """How many exemplars fit into `available_bytes` (0 if not even the fixed part fits)."""
        free = available_bytes - self.fixed_bytes(bits)
        return max(0, free // self.bytes_per_exemplar(bits))

    def __len__(self) -> int:
        return len(self.labels)

    # ------------------------------------------------------------------ encode / decode
    def _shrink(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample > 1:
            x = F.adaptive_avg_pool2d(x, self.stored_shape[1:])
        return x.reshape(len(x), -1)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._shrink(x.float())
        if self.bits == 32:
            return flat.float().clone()
        if self.bits == 16:
            return flat.half()
        if self.value_range is None:
            self.value_range = torch.tensor([flat.min().item(), flat.max().item()], dtype=torch.float32)
        lo, hi = self.value_range.tolist()
        levels = (1 << self.bits) - 1
        q = torch.round((flat.clamp(lo, hi) - lo) / max(hi - lo, 1e-12) * levels)
        return pack_bits(q.to(torch.uint8), self.bits)

    def decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The exemplars as the model sees them (float32, full input size) and their labels (int64)."""
        if len(self) == 0:
            return torch.zeros((0,) + self.sample_shape), torch.zeros(0, dtype=torch.long)
        return self._decode(self.codes), self.labels.long()

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        n = len(codes)
        if self.bits >= 16:
            flat = codes.float()
        else:
            lo, hi = self.value_range.tolist()
            q = unpack_bits(codes, self.bits, self.values_per_exemplar).float()
            flat = q / ((1 << self.bits) - 1) * (hi - lo) + lo
        x = flat.reshape((n,) + self.stored_shape)
        if self.downsample > 1:
            x = F.interpolate(x, size=self.sample_shape[1:], mode="bilinear", align_corners=False)
        return x

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as this buffer would give it back after storing it (encoded, decoded); nothing is stored. Before
        anything is stored, integer codes take their range from `x`, as the first `add` would."""
        if len(x) == 0:
            return x
        return self._decode(self._encode(x)).to(x.dtype)

    # ------------------------------------------------------------------ contents
    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) == 0:
            return
        codes = self._encode(x)
        self.codes = codes if self.codes is None or len(self) == 0 else torch.cat([self.codes, codes])
        self.labels = torch.cat([self.labels, y.to(self.label_dtype)])

    def replace(self, index: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self.codes[index] = self._encode(x.unsqueeze(0))[0]
        self.labels[index] = y.to(self.label_dtype)

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the exemplars at `index` (in that order)."""
        if self.codes is not None:
            self.codes = self.codes[index].clone()
        self.labels = self.labels[index].clone()

    def reformat(self, bits: int | None = None, downsample: int | None = None) -> None:
        """Re-encode every stored exemplar at new bits / down-sampling (precision lost earlier is not regained)."""
        bits = self.bits if bits is None else bits
        downsample = self.downsample if downsample is None else downsample
        self._check(bits, downsample)
        if bits == self.bits and downsample == self.downsample:
            return
        x, y = self.decode()
        self.bits, self.downsample = bits, downsample
        if bits > 8:
            self.value_range = None
        self.codes, self.labels = None, torch.zeros(0, dtype=self.label_dtype)
        self.add(x, y)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the buffer keeps, at stored dtype (for the ledger and for saving)."""
        if len(self) == 0:
            return {}
        out = {"codes": self.codes, "labels": self.labels}
        if self.bits <= 8 and self.value_range is not None:
            out["range"] = self.value_range
        return out
