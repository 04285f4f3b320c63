"""Quantization: fewer bits per weight, and int8 inference that is measured faster on this CPU.

One technique, `quantize`, with `mode`:

- `int8-weight`, `int4-weight` (or any `bits` in 1..8): weight-only storage. Each Linear/Conv/Embedding weight
  is rounded per output channel to a symmetric grid, value = q * scale with q in [-(2^(b-1)-1), 2^(b-1)-1] and
  scale = max|w| / (2^(b-1)-1) (b = 1: value = +-mean|w|, q in {0, 1}, zero point 0.5). The model keeps
  computing in fp32 with exactly the dequantized values; the archive stores q at b bits plus the scales.
- `dynamic`, `static`: int8 post-training quantization on ONNX Runtime. The model is exported with
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

import contextlib
import io
import os
import tempfile
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from netdiet.compress.base import (CompressionState, Encoding, StageContext, Technique, prunable_parameters,
                                   register_technique)
from netdiet.errors import NetdietError

MODES = ("int8-weight", "int4-weight", "dynamic", "static", "qat", "fp16", "bf16")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
EXPORTERS = ("auto", "dynamo", "torchscript")


class _SkipDynamo(Exception):
    pass
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


# ------------------------------------------------------------------ ONNX export and ORT quantization
@contextlib.contextmanager
def _quiet():
    """The exporter and the ORT quantizer log advice through `logging` and print progress: keep the CLI clean."""
    import logging
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx"), logging.getLogger("torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_onnx(model: nn.Module, example: torch.Tensor, exporter: str = "auto", optimize: bool = True):
    """The model as an onnx.ModelProto with a dynamic batch dimension (in memory, nothing written).

    exporter: "dynamo" (torch.export-based, torch's default since 2.9), "torchscript" (the legacy exporter: far
    quicker to run, deprecated by torch) or "auto" (dynamo, then torchscript if dynamo fails). optimize=False
    keeps BatchNorm as its own node instead of folding it into the conv weight (so the conv's int8 codes stay
    a rounding of the model's own weight).
    """
    import onnx

    if exporter not in EXPORTERS:
        raise NetdietError(f"unknown ONNX exporter {exporter!r}; choose one of: {', '.join(EXPORTERS)}")
    model = model.eval()
    errors = []
    with _quiet():
        try:
            if exporter == "torchscript":
                raise _SkipDynamo
            prog = torch.onnx.export(model, (example,), dynamo=True, external_data=False, verbose=False, optimize=optimize,
                                     dynamic_shapes=({0: torch.export.Dim("batch")},))
            proto = prog.model_proto
            # the exporter's value_info can disagree with ONNX shape inference (Gemm transB), which
            # onnxruntime.quantization runs; shapes are re-inferred from the graph anyway
            del proto.graph.value_info[:]
            return proto
        except _SkipDynamo:
            pass
        except Exception as exc:  # noqa: BLE001 - fall back to the TorchScript exporter below
            errors.append(f"torch.export-based exporter: {type(exc).__name__}: {str(exc)[:200]}")
        if exporter == "dynamo":
            raise NetdietError(f"cannot export the model to ONNX ({errors[0]}); try exporter torchscript or mode int8-weight")
        try:
            buf = io.BytesIO()
            torch.onnx.export(model, (example,), buf, dynamo=False, input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17)
            return onnx.load_from_string(buf.getvalue())
        except Exception as exc:  # noqa: BLE001
            errors.append(f"TorchScript exporter: {type(exc).__name__}: {str(exc)[:200]}")
    raise NetdietError(f"cannot export the model to ONNX ({'; '.join(errors)}); use mode int8-weight instead")


def ort_session(model_bytes: bytes, threads: int | None = None):
    """An onnxruntime CPU session; `threads` = intra-op threads (default: torch's thread count)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise NetdietError(f"onnxruntime cannot load the ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None


def ort_predict(session, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i:i + batch_size].numpy()})[0] for i in range(0, len(x), batch_size)]
    return torch.from_numpy(np.concatenate(outs))


def _ort_quantize(proto, mode: str, calibration: list[torch.Tensor] | None, method: str) -> bytes:
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)

    input_name = proto.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="netdiet-q-") as tmp, _quiet():
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(proto, src)
        if mode == "dynamic":
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True)
        else:
            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self._it = iter([{input_name: b.numpy()} for b in calibration or []])

                def get_next(self):
                    return next(self._it, None)

            calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                     "percentile": CalibrationMethod.Percentile}[method]
            quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=calib)
        with open(dst, "rb") as fh:
            return fh.read()


def align_initializer_names(proto, model: nn.Module) -> int:
    """Rename float initializers that are exact copies of a parameter (or of its transpose) to the parameter's
    name, so ORT's "<name>_quantized" codes can be matched to the model (exporters name some weights val_N).
    Returns how many were renamed."""
    import hashlib

    from onnx import numpy_helper

    by_value: dict[tuple, str] = {}
    for name, p in model.named_parameters():
        a = p.detach().float().contiguous().numpy()
        by_value.setdefault((a.shape, hashlib.sha1(a.tobytes()).hexdigest()), name)
        if a.ndim == 2:
            t = np.ascontiguousarray(a.T)
            by_value.setdefault((t.shape, hashlib.sha1(t.tobytes()).hexdigest()), name)
    taken = {i.name for i in proto.graph.initializer} | {i.name for i in proto.graph.input} | \
            {o for n in proto.graph.node for o in n.output}
    renamed = 0
    for init in proto.graph.initializer:
        if init.data_type != 1 or init.name in dict(model.named_parameters()):
            continue
        a = numpy_helper.to_array(init)
        target = by_value.get((a.shape, hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()))
        if target is None or target in taken:
            continue
        old = init.name
        init.name = target
        taken.add(target)
        for node in proto.graph.node:
            for k, inp in enumerate(node.input):
                if inp == old:
                    node.input[k] = target
        renamed += 1
    return renamed


def harvest_onnx_weights(model: nn.Module, int8_bytes: bytes) -> tuple[dict[str, Encoding], list[dict]]:
    """Read ORT's int8 weight codes back as PyTorch-layout Encodings, and list every initializer that the
    archive can refill from the model (so the ONNX blob it stores holds only the graph and small constants)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(int8_bytes)
    inits = {i.name: i for i in proto.graph.initializer}
    tensors = model.state_dict()
    encodings: dict[str, Encoding] = {}
    fill: list[dict] = []
    for name, init in inits.items():
        if not name.endswith("_quantized") or name[:-len("_quantized")] not in tensors:
            continue
        pname = name[:-len("_quantized")]
        if init.data_type != onnx.TensorProto.INT8 or f"{pname}_scale" not in inits:
            continue
        raw = torch.from_numpy(numpy_helper.to_array(init).copy())
        shape = tuple(tensors[pname].shape)
        scale = torch.from_numpy(numpy_helper.to_array(inits[f"{pname}_scale"]).copy()).float().reshape(-1)
        zp_init = inits.get(f"{pname}_zero_point")
        zp = torch.from_numpy(numpy_helper.to_array(zp_init).astype(np.int64)).reshape(-1) if zp_init is not None else None
        if scale.numel() not in (1, shape[0] if shape else 1):
            continue
        if zp is not None and not torch.any(zp != 0):
            zp = None
        # MatMul keeps the weight as (in, out), Gemm/Conv as PyTorch does; a square matrix fits both ways, so
        # each layout is tried and kept only if its codes are a rounding of *this* parameter (the exporter may
        # also have folded BatchNorm into a conv weight under the conv's name: those codes stay in the graph)
        candidates = [(raw, False)] if tuple(raw.shape) == shape else []
        if raw.dim() == 2 and tuple(raw.shape[::-1]) == shape:
            candidates.append((raw.t().contiguous(), True))
        enc = None
        for codes, transpose in candidates:
            trial = Encoding(kind="quant", bits=8, q=codes.to(torch.int8), scale=scale, zero_point=zp, axis=0)
            step = scale.view([-1] + [1] * (codes.dim() - 1))
            if torch.all((trial.dequantize() - tensors[pname].float()).abs() <= step * 0.5001 + 1e-7):
                enc = trial
                break
        if enc is None:
            continue
        encodings[pname] = enc
        fill.append({"init": name, "param": pname, "transpose": transpose})
    for name, init in inits.items():
        if name in tensors and init.data_type == onnx.TensorProto.FLOAT and name not in encodings:
            value = numpy_helper.to_array(init)
            if tuple(value.shape) == tuple(tensors[name].shape):
                fill.append({"init": name, "tensor": name})
    return encodings, fill


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
                self._report["note"] = (f"{len(self._onnx_only)} int8 weight(s) exist only in the ONNX graph (the exporter "
                                        "folded BatchNorm or reshaped them), so the archive also keeps their fp32 "
                                        "weights; mode static keeps BatchNorm unfolded and stores convnets compactly")
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
                from netdiet.compress.finetune import finetune
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
        mode = self.options["mode"]
        calibration = None
        if mode == "static":
            if ctx.data is None:
                raise NetdietError("quantize mode static needs calibration data; pass --data (or use mode dynamic)")
            x = ctx.data.x_train[: self.options["calibration_samples"]]
            calibration = [x[i:i + 32] for i in range(0, len(x), 32)]
        example = self._example(model, state, ctx)
        model.eval()
        from netdiet.report.progress import progress_bar
        with progress_bar(3, f"quantize {mode}: export, quantize, read back") as bar:
            # static: keep BatchNorm unfolded so conv codes are the model's own (measured: compact archives for
            # BN convnets); dynamic: the folded graph is what ORT's dynamic quantizer handles best
            proto = export_onnx(model, example, self.options["exporter"], optimize=(mode == "dynamic"))
            align_initializer_names(proto, model)
            bar.advance()
            int8 = _ort_quantize(proto, mode, calibration, self.options["calibration_method"])
            bar.advance()
            encodings, fill = harvest_onnx_weights(model, int8)
            bar.advance()
        if not encodings:
            raise NetdietError(f"ONNX Runtime quantized no weight of this model in mode {mode}; use mode int8-weight")
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
        import onnx
        graph = onnx.load_from_string(int8).graph
        ops = sorted({n.op_type for n in graph.node})
        # int8 weights ORT made that are not a rounding of a model parameter (e.g. BatchNorm folded into a conv
        # by the exporter) live only in the ONNX graph: the archive stores them there, next to the fp32 weight
        onnx_only = sorted(i.name[:-len("_quantized")] for i in graph.initializer
                           if i.name.endswith("_quantized") and i.data_type == onnx.TensorProto.INT8
                           and i.name[:-len("_quantized")] not in encodings)
        self._onnx_only = onnx_only
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
            from netdiet.models.registry import default_inputs, make_inputs
            shape, dtype, high = default_inputs(state.spec["spec"], state.spec.get("kwargs") or {})
            return make_inputs(shape, dtype, high=high)
        raise NetdietError("quantize needs an example input to export ONNX; pass data or example_inputs")
