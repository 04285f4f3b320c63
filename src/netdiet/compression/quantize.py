"""Quantization: fewer bits per weight, and int8 inference that is measured faster on this CPU.

One technique, `quantize`, with `mode`:

- `int8-weight`, `int4-weight` (or any `bits` in 1..8): weight-only storage. Each Linear/Conv/Embedding weight
  is rounded per output channel to a symmetric grid, value = q * scale with q in [-(2^(b-1)-1), 2^(b-1)-1] and
  scale = max|w| / (2^(b-1)-1) (b = 1: value = +-mean|w|, q in {0, 1}, zero point 0.5). The model keeps
  computing in fp32 with exactly the dequantized values; the archive stores q at b bits plus the scales.
- `dynamic`, `static`: int8 post-training quantization on ONNX Runtime (compression/onnxrt.py). The model is exported with
  torch.onnx.export (the torch.export-based exporter; the TorchScript one as a fallback), quantized with
  onnxruntime.quantization.quantize_dynamic (activations quantized at run time) or quantize_static (activation
  scales from calibration batches of the training data, QDQ format, per-channel weights). The int8 codes ORT
  chose are read back into the PyTorch model (so both runtimes compute with the same weights) and the int8
  ONNX model goes into `state.artifacts["onnx_int8"]`; the archive stores it without duplicating the codes.
- `qat`: quantization-aware fine-tuning. Weights pass through our own fake-quant (round to the b-bit grid in the
  forward pass, straight-through gradient in the backward pass) while the model trains with ctx.finetune,
  then they are stored like `int<b>-weight`. Pruned weights stay zero (the mask is part of the fake-quant).
- `fp16`, `bf16`: every floating parameter is rounded to that dtype and stored at 2 bytes.

Nothing here uses torch.ao.quantization (deprecated).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from netdiet.compression.base import (
    CompressionState,
    Encoding,
    StageContext,
    Technique,
    prunable_parameters,
    register_technique,
)
from netdiet.compression.finetune import finetune
from netdiet.compression.onnxrt import (
    EXPORTERS,
    LOCKED_HINT,
    ORT_TESTED,
    check_onnxruntime,
    export_onnx,
    fold_initializer_shapes,
    harvest_onnx_weights,
    ort_predict,
    ort_quantize,
    ort_session,
)
from netdiet.errors import NetdietError
from netdiet.models.registry import default_inputs, make_inputs
from netdiet.progress import progress_bar

__all__ = ["MODES", "Quantize", "quantize_tensor", "export_onnx", "ort_predict", "ort_session"]

MODES = ("int8-weight", "int4-weight", "dynamic", "static", "qat", "fp16", "bf16")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
_DEFAULT_BITS = {"int8-weight": 8, "int4-weight": 4, "dynamic": 8, "static": 8, "qat": 8}


# ------------------------------------------------------------------ the b-bit grid (shared by weight-only and QAT)
def quantize_tensor(w: torch.Tensor, bits: int, axis: int = 0,
                    keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-channel (along `axis`) symmetric codes: (q int8, scale float32 [channels], zero_point or None).

    Channels whose weights are all zero get scale 1 (their codes are all 0). `keep` (bool mask) restricts the
    statistics to surviving weights; pruned positions get the code of 0 (b = 1: they are re-zeroed by the mask).
    """
    w = w.detach().float()
    moved = w.movedim(axis, 0).reshape(w.shape[axis], -1)
    kept = None if keep is None else keep.movedim(axis, 0).reshape(w.shape[axis], -1).bool()
    if bits == 1:
        absw = moved.abs() if kept is None else moved.abs() * kept
        count = torch.full((moved.shape[0],), float(moved.shape[1])) if kept is None else kept.sum(1).float()
        alpha = absw.sum(1) / count.clamp(min=1)
        alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
        q = (moved >= 0).to(torch.int8)
        scale = 2 * alpha
        zp = torch.full_like(scale, 0.5)
        return q.reshape(w.movedim(axis, 0).shape).movedim(0, axis).contiguous(), scale, zp
    qmax = 2 ** (bits - 1) - 1
    absmax = (moved.abs() if kept is None else moved.abs() * kept).amax(1)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    q = torch.clamp(torch.round(moved / scale[:, None]), -qmax, qmax).to(torch.int8)
    return q.reshape(w.movedim(axis, 0).shape).movedim(0, axis).contiguous(), scale.float(), None


def _fake_quant_forward(w: torch.Tensor, bits: int, keep: torch.Tensor | None) -> torch.Tensor:
    q, scale, zp = quantize_tensor(w, bits, 0, keep)
    enc = Encoding(kind="quant", bits=bits, q=q, scale=scale, zero_point=zp, axis=0)
    out = enc.dequantize().to(w.dtype)
    return out if keep is None else out * keep.to(w.dtype)


class _FakeQuant(nn.Module):
    """Parametrization: forward rounds to the b-bit grid, backward passes the gradient straight through (STE)."""

    def __init__(self, bits: int, keep: torch.Tensor | None) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("keep", keep.bool() if keep is not None else None, persistent=False)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        wq = _fake_quant_forward(w, self.bits, self.keep)
        # straight-through estimator: the value of wq, the gradient of w (masked: pruned weights get none)
        ste = w + (wq - w).detach()
        return ste if self.keep is None else ste * self.keep.to(w.dtype)


# ------------------------------------------------------------------ the technique
@register_technique
class Quantize(Technique):
    name = "quantize"
    defaults: dict[str, Any] = {
        "mode": "int8-weight",
        "bits": None,                 # 1..8; default 8 (int4-weight: 4)
        "calibration_samples": 256,   # static: training images used for activation ranges
        "calibration_method": "minmax",
        "include_embeddings": True,
        "exporter": "auto",           # ONNX exporter for dynamic/static: auto | dynamo | torchscript
    }

    def validate(self) -> None:
        o = self.options
        if o["mode"] not in MODES:
            raise NetdietError(f"quantize option mode={o['mode']!r} is unknown; choose one of: {', '.join(MODES)}")
        bits = o["bits"]
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8):
            raise NetdietError(f"quantize option bits={bits!r} is outside 1..8; give an integer from 1 to 8")
        if o["mode"] in ("dynamic", "static") and bits not in (None, 8):
            raise NetdietError(f"quantize option bits={bits} does not apply to mode {o['mode']} (ONNX Runtime runs int8); "
                               "drop bits or use mode int4-weight / qat")
        if o["mode"] in ("fp16", "bf16") and bits is not None:
            raise NetdietError(f"quantize option bits does not apply to mode {o['mode']}; drop it")
        n = o["calibration_samples"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise NetdietError(f"quantize option calibration_samples={n!r} must be a positive integer, e.g. 256")
        if o["exporter"] not in EXPORTERS:
            raise NetdietError(f"quantize option exporter={o['exporter']!r} is unknown; choose one of: {', '.join(EXPORTERS)}")
        if o["calibration_method"] not in CALIBRATION_METHODS:
            raise NetdietError(f"quantize option calibration_method={o['calibration_method']!r} is unknown; "
                               f"choose one of: {', '.join(CALIBRATION_METHODS)}")

    @property
    def bits(self) -> int:
        return self.options["bits"] or _DEFAULT_BITS.get(self.options["mode"], 16)

    def _targets(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = prunable_parameters(model)
        if not self.options["include_embeddings"]:
            emb = {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
            params = {k: v for k, v in params.items() if k not in emb}
        return params

    def apply(self, model: nn.Module, state: CompressionState, ctx: StageContext) -> nn.Module:
        mode = self.options["mode"]
        before = sum(p.numel() * p.element_size() for p in model.parameters())
        if mode in ("fp16", "bf16"):
            layers = self._cast(model, state, torch.float16 if mode == "fp16" else torch.bfloat16)
        elif mode in ("int8-weight", "int4-weight"):
            layers = self._weight_only(model, state)
        elif mode == "qat":
            layers = self._qat(model, state, ctx)
        else:
            layers = self._onnx(model, state, ctx)
        if mode not in ("dynamic", "static"):
            state.artifacts.pop("onnx_int8", None)  # its weights are no longer the model's
        self._report = {"mode": mode, "bits": self.bits if mode not in ("fp16", "bf16") else 16,
                        "layers": layers, "param_bytes_fp32": before,
                        "quantized_params": int(sum(r["params"] for r in layers.values()))}
        if mode == "qat":
            # without fine-tune epochs there is nothing to be aware of: the result is int<b>-weight PTQ
            self._report["finetune"] = self._qat_history
        if mode in ("dynamic", "static"):
            self._report["onnx_int8_bytes"] = len(state.artifacts["onnx_int8"]["model"])
            self._report["exporter_ops"] = state.artifacts["onnx_int8"]["ops"]
            self._report["onnx_only_int8_weights"] = self._onnx_only
            if self._onnx_only:
                self._report["note"] = (f"{len(self._onnx_only)} int8 weight(s) exist only in the ONNX graph (they round "
                                        "no parameter of the model), so the archive also keeps their fp32 weights")
        return model

    # -- fp16 / bf16
    @torch.no_grad()
    def _cast(self, model: nn.Module, state: CompressionState, dtype: torch.dtype) -> dict:
        layers = {}
        name = "float16" if dtype == torch.float16 else "bfloat16"
        for pname, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            enc = state.encodings.get(pname)
            if enc is not None and enc.kind != "dense":
                continue  # already stored in fewer bits (codes + scales/codebook)
            p.copy_(p.to(dtype).to(p.dtype))
            state.encodings[pname] = Encoding(kind="dense", bits=16, dtype=name)
            layers[pname] = {"params": p.numel(), "dtype": name}
        return layers

    # -- int<b> weight-only
    @torch.no_grad()
    def _weight_only(self, model: nn.Module, state: CompressionState) -> dict:
        layers = {}
        for pname, p in self._targets(model).items():
            keep = state.masks.get(pname)
            keep = keep.bool() if keep is not None and tuple(keep.shape) == tuple(p.shape) else None
            q, scale, zp = quantize_tensor(p, self.bits, 0, keep)
            enc = Encoding(kind="quant", bits=self.bits, q=q, scale=scale, zero_point=zp, axis=0)
            value = enc.dequantize()
            if keep is not None:
                value = value * keep
            err = (value - p.float()).abs().max().item() if p.numel() else 0.0
            p.copy_(value.to(p.dtype))
            state.encodings[pname] = enc
            layers[pname] = {"params": p.numel(), "bits": self.bits, "max_abs_error": err,
                             "channels": int(scale.numel())}
        return layers

    # -- QAT
    def _qat(self, model: nn.Module, state: CompressionState, ctx: StageContext) -> dict:
        from torch.nn.utils import parametrize

        targets = self._targets(model)
        owners = {}
        for mname, mod in model.named_modules():
            for pn, p in mod.named_parameters(recurse=False):
                full = f"{mname}.{pn}" if mname else pn
                if full in targets:
                    owners[full] = (mod, pn)
        trained = None
        if ctx.finetune is not None and ctx.finetune.epochs > 0:
            for full, (mod, pn) in owners.items():
                keep = state.masks.get(full)
                keep = keep.bool() if keep is not None and tuple(keep.shape) == tuple(getattr(mod, pn).shape) else None
                parametrize.register_parametrization(mod, pn, _FakeQuant(self.bits, keep))
            try:
                trained = finetune(model, state, ctx, description=f"qat int{self.bits}")
            finally:
                for mod, pn in owners.values():
                    if parametrize.is_parametrized(mod, pn):
                        parametrize.remove_parametrizations(mod, pn, leave_parametrized=False)
        layers = self._weight_only(model, state)
        self._qat_history = trained.history if trained is not None else None
        return layers

    # -- ONNX Runtime int8 (dynamic / static)
    def _onnx(self, model: nn.Module, state: CompressionState, ctx: StageContext) -> dict:
        import onnx

        mode = self.options["mode"]
        calibration = None
        if mode == "static":
            if ctx.data is None:
                raise NetdietError("quantize mode static needs calibration data; pass --data (or use mode dynamic)")
            x = ctx.data.x_train[: self.options["calibration_samples"]]
            calibration = [x[i:i + 32] for i in range(0, len(x), 32)]
        example = self._example(model, state, ctx)
        model.eval()
        version = check_onnxruntime()
        with progress_bar(3, f"quantize {mode}: export, quantize, read back") as bar:
            # BatchNorm stays its own node in both modes, so every conv's int8 codes are a rounding of the
            # model's own weight and the archive holds each weight's codes once
            proto = export_onnx(model, example, self.options["exporter"], optimize=False)
            fold_initializer_shapes(proto)
            bar.advance()
            int8 = ort_quantize(proto, mode, calibration, self.options["calibration_method"])
            bar.advance()
            int8_proto = onnx.load_from_string(int8)
            encodings, fill, graph_only = harvest_onnx_weights(model, int8_proto)
            bar.advance()
        if not encodings:
            if graph_only:
                raise NetdietError(f"the {len(graph_only)} int8 weight(s) onnxruntime {version} wrote round no parameter "
                                   f"of this model (e.g. {graph_only[0]!r}); netdiet reads ORT {ORT_TESTED}: "
                                   f"{LOCKED_HINT}, or use mode int8-weight")
            raise NetdietError(f"ONNX Runtime {version} quantized no weight of this model in mode {mode} (it has no "
                               "Linear/Conv/MatMul it quantizes); use mode int8-weight")
        layers = {}
        params = dict(model.named_parameters())
        with torch.no_grad():
            for pname, enc in encodings.items():
                p = params[pname]
                value = enc.dequantize()
                keep = state.masks.get(pname)
                if keep is not None and tuple(keep.shape) == tuple(p.shape):
                    value = value * keep.bool()
                p.copy_(value.to(p.dtype))
                state.encodings[pname] = enc
                layers[pname] = {"params": p.numel(), "bits": 8, "channels": int(enc.scale.numel())}
        ops = sorted({n.op_type for n in int8_proto.graph.node})
        # int8 weights ORT made that are not a rounding of a model parameter live only in the ONNX graph: the
        # archive stores them there, next to the fp32 weight
        self._onnx_only = sorted(graph_only)
        state.artifacts["onnx_int8"] = {"model": int8, "fill": fill, "mode": mode, "ops": ops,
                                        "input_shape": list(example.shape[1:]), "input_dtype": str(example.dtype).replace("torch.", "")}
        return layers

    @staticmethod
    def _example(model: nn.Module, state: CompressionState, ctx: StageContext) -> torch.Tensor:
        if ctx.example_inputs is not None:
            return ctx.example_inputs[:1] if ctx.example_inputs.dim() > 0 and len(ctx.example_inputs) > 1 else ctx.example_inputs
        if ctx.data is not None:
            return ctx.data.x_train[:1]
        if state.spec:
            shape, dtype, high = default_inputs(state.spec["spec"], state.spec.get("kwargs") or {})
            return make_inputs(shape, dtype, high=high)
        raise NetdietError("quantize needs an example input to export ONNX; pass data or example_inputs")
