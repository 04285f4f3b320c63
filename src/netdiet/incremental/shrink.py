"""Shrinking a continual learner's weights after each task through the compress techniques (`--shrink int8`,
`int4`, `prune=S`, `prune=S+int8`, `prune=S+int4`): training runs in fp32 from the dequantized values, and the kept
copy is re-quantized after every task. And the weights as an archive would keep them, so the byte ledger counts those bytes."""
from __future__ import annotations

import torch
from torch import nn

from netdiet.compression.base import CompressionState, StageContext, create_technique
from netdiet.errors import NetdietError
from netdiet.incremental.packing import pack_bits, pack_mask


class Shrinker:
    """After each task: `int8` (per-channel int8 weights), `prune=S` (magnitude pruning), or `prune=S+int8`, applied
    with the compress techniques; the weights item then holds what an archive would store: codes + scales for
    quantized weights, values of kept weights + a bit-packed mask for pruned ones, float32 for the rest."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.sparsity: float | None = None
        self.bits: int | None = None          # weight bits kept (8 or 4), None = float32
        for part in str(spec).split("+"):
            part = part.strip()
            if part in ("int8", "int4"):
                self.bits = int(part[3:])
            elif part.startswith("prune="):
                try:
                    self.sparsity = float(part.split("=", 1)[1])
                except ValueError:
                    self.sparsity = -1.0
                if not 0.0 < self.sparsity < 1.0:
                    raise NetdietError(f"--shrink {spec!r}: the sparsity after prune= must be in (0, 1), e.g. prune=0.5")
            else:
                raise NetdietError(f"--shrink {spec!r} is not understood; use int8, int4, prune=0.5 or prune=0.5+int4")

    def estimate(self, model: nn.Module) -> int:
        """A lower bound on the weights' bytes after shrinking (for the start-of-run budget check)."""
        n = sum(t.numel() for t in model.state_dict().values())
        keep = 1 - (self.sparsity or 0)
        return int(n * keep * self.bits / 8) if self.bits else int(n * 4 * keep)

    def apply(self, model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
        state, ctx = CompressionState(), StageContext(seed=seed)
        techniques = []
        try:
            if self.sparsity is not None:
                techniques.append(create_technique("prune", sparsity=self.sparsity))
            if self.bits:
                techniques.append(create_technique("quantize", mode=f"int{self.bits}-weight"))
        except NetdietError as exc:
            raise NetdietError(f"--shrink {self.spec} needs a compress technique this build lacks ({exc})") from None
        for tech in techniques:
            out = tech.apply(model, state, ctx)
            if out is not model:
                raise NetdietError(f"--shrink: technique '{tech.name}' changed the architecture; only in-place shrinking is supported")
        return encoded_weights(model, state)


def encoded_weights(model: nn.Module, state) -> dict[str, torch.Tensor]:
    """The weights as an archive keeps them after compression (the tensors, so their bytes are exact)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        enc = state.encodings.get(name)
        mask = state.masks.get(name)
        if enc is not None and enc.kind == "quant":
            q = enc.q.to(torch.int16) + (1 << (enc.bits - 1)) if enc.zero_point is None else enc.q.to(torch.int16)
            codes = q.clamp(0, (1 << enc.bits) - 1).to(torch.uint8).flatten()
            if mask is not None:
                codes = codes[mask.flatten()]
            out[f"{name}.q"] = pack_bits(codes.view(1, -1), enc.bits).flatten() if enc.bits in (1, 2, 4, 8) else enc.q.to(torch.int8).flatten()
            out[f"{name}.scale"] = enc.scale.detach()
            if enc.zero_point is not None:
                out[f"{name}.zero_point"] = enc.zero_point.detach()
        elif mask is not None:
            out[f"{name}.values"] = t.detach().flatten()[mask.flatten()].clone()
        else:
            out[name] = t.detach()
        if mask is not None:
            out[f"{name}.mask"] = pack_mask(mask)
    return out
