"""The ONNX Runtime int8 path: export to ONNX, quantize with ORT, and read ORT's int8 codes back.

The codes are found by following the graph, never by initializer names (ORT renames them between releases:
1.31 wrote `<weight>_quantized`, 1.32 `<weight>_Transposed_quantized`). Every node that consumes an int8 weight
names its codes, scale and zero point by input position:

    DequantizeLinear(x, x_scale, x_zero_point)                 QDQ graphs (quantize_static)
    QLinearMatMul(a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp)       QOperator graphs
    QLinearConv(x, x_s, x_zp, w, w_s, w_zp, y_s, y_zp, B)
    MatMulInteger(a, b, a_zp, b_zp) / ConvInteger(x, w, x_zp, w_zp)   quantize_dynamic: the weight scale is an
        initializer multiplied into the integer result downstream (Cast -> Mul, often by Mul(a_scale, w_scale))
    DynamicQuantizeMatMul(a, b, b_scale, b_zp, bias), MatMulIntegerToFloat(a, b, a_s, b_s, a_zp, b_zp, bias)

Which PyTorch parameter a set of codes belongs to is decided by value: the codes (in the graph's layout or
transposed) must be a rounding of that parameter to within half a quantization step everywhere. A node that
consumes an int8 initializer in a way not listed above is an error naming the ORT version and the node.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from netdiet.compression.base import Encoding
from netdiet.errors import NetdietError

EXPORTERS = ("auto", "dynamo", "torchscript")
ORT_MINIMUM = (1, 18)       # pyproject's floor: older releases lack the quantizer options used here
ORT_TESTED = "1.31 - 1.32"  # the releases whose graphs the tests read (the lock and the newest)
LOCKED_HINT = "install the locked release (pip install -r requirements.lock)"

# op type -> (input index of the int8 weight, of its scale or None (found downstream), of its zero point,
#             channel axis of the weight in the graph's layout or None (read the node's `axis` attribute))
_WEIGHT_INPUTS = {
    "DequantizeLinear": (0, 1, 2, None),
    "QLinearMatMul": (3, 4, 5, 1),
    "QLinearConv": (3, 4, 5, 0),
    "MatMulInteger": (1, None, 3, 1),
    "ConvInteger": (1, None, 3, 0),
    "DynamicQuantizeMatMul": (1, 2, 3, 1),
    "MatMulIntegerToFloat": (1, 3, 5, 1),
}


class SkipDynamo(Exception):
    """Raised inside export_onnx to go straight to the TorchScript exporter."""


def ort_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


def check_onnxruntime() -> str:
    """The installed ORT version, or a one-line error when it is older than netdiet can drive."""
    try:
        version = ort_version()
    except ImportError:
        raise NetdietError("onnxruntime is not installed; pip install 'netdiet[onnx]' (or use mode int8-weight)") from None
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < ORT_MINIMUM:
        raise NetdietError(f"onnxruntime {version} is older than netdiet supports (>= {'.'.join(map(str, ORT_MINIMUM))}); "
                           f"{LOCKED_HINT} or pip install 'onnxruntime>=1.18'")
    return version


@contextlib.contextmanager
def quiet():
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
    keeps BatchNorm as its own node instead of folding it into the conv weight (so a conv's int8 codes stay a
    rounding of the model's own weight, and an int8 archive holds every weight's codes once).
    """
    import onnx

    if exporter not in EXPORTERS:
        raise NetdietError(f"unknown ONNX exporter {exporter!r}; choose one of: {', '.join(EXPORTERS)}")
    model = model.eval()
    errors = []
    with quiet():
        try:
            if exporter == "torchscript":
                raise SkipDynamo
            prog = torch.onnx.export(model, (example,), dynamo=True, external_data=False, verbose=False, optimize=optimize,
                                     dynamic_shapes=({0: torch.export.Dim("batch")},))
            proto = prog.model_proto
            # the exporter's value_info can disagree with ONNX shape inference (Gemm transB), which
            # onnxruntime.quantization runs; shapes are re-inferred from the graph anyway
            del proto.graph.value_info[:]
            return proto
        except SkipDynamo:
            pass
        except Exception as exc:  # noqa: BLE001 - fall back to the TorchScript exporter below
            errors.append(f"torch.export-based exporter: {type(exc).__name__}: {str(exc)[:200]}")
        if exporter == "dynamo":
            raise NetdietError(f"cannot export the model to ONNX ({errors[0]}); try exporter torchscript or mode int8-weight")
        try:
            buf = io.BytesIO()
            # TrainingMode.EVAL runs the peephole pass that folds BatchNorm into the conv; PRESERVE exports the
            # (eval-mode) model as it is
            mode = torch.onnx.TrainingMode.EVAL if optimize else torch.onnx.TrainingMode.PRESERVE
            torch.onnx.export(model, (example,), buf, dynamo=False, input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17,
                              training=mode)
            return onnx.load_from_string(buf.getvalue())
        except Exception as exc:  # noqa: BLE001
            errors.append(f"TorchScript exporter: {type(exc).__name__}: {str(exc)[:200]}")
    raise NetdietError(f"cannot export the model to ONNX ({'; '.join(errors)}); use mode int8-weight instead")


def fold_initializer_shapes(proto) -> int:
    """Replace every Shape node that reads an initializer by a constant of its dims; returns how many.

    The unoptimized dynamo export builds a bias-free conv's zero bias from Shape(weight): that second use kept
    the fp32 weight in the int8 graph after ORT quantized the conv (a ResNet's int8 archive came out 0.9x "smaller"
    than fp32). The shape of an initializer is a constant, so the weight is then read by the conv alone."""
    from onnx import helper, numpy_helper

    dims = {i.name: list(i.dims) for i in proto.graph.initializer}
    folded = 0
    for k, node in enumerate(proto.graph.node):
        if node.op_type != "Shape" or not node.input or node.input[0] not in dims:
            continue
        shape = dims[node.input[0]]
        attrs = {a.name: a.i for a in node.attribute}
        shape = shape[attrs.get("start", 0):attrs["end"] if "end" in attrs else None]
        value = numpy_helper.from_array(np.asarray(shape, dtype=np.int64), name=f"{node.output[0]}_value")
        proto.graph.node[k].CopyFrom(helper.make_node("Constant", [], [node.output[0]], name=node.name or None, value=value))
        folded += 1
    used = {i for node in proto.graph.node for i in node.input} | {o.name for o in proto.graph.output}
    keep = [i for i in proto.graph.initializer if i.name in used]
    if len(keep) != len(proto.graph.initializer):
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
    return folded


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


def ort_quantize(proto, mode: str, calibration: list[torch.Tensor] | None, method: str) -> bytes:
    """ORT's int8 model (bytes) of an fp32 ONNX model: quantize_dynamic, or quantize_static (QDQ, per channel)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    input_name = proto.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="netdiet-q-") as tmp, quiet():
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


# ------------------------------------------------------------------ reading the int8 graph
@dataclass
class GraphWeight:
    """One int8 weight as the graph holds it: codes, scale and zero point initializers, channel axis."""

    codes: str
    scale: str
    zero_point: str | None
    axis: int | None      # channel axis in the graph's layout; None: one scale for the whole tensor
    node: str             # the consuming node (op type and name), for messages


def _node_label(node) -> str:
    return f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node"


def _downstream_scale(output: str, consumers: dict, producers: dict, float_inits: set, depth: int = 4) -> str | None:
    """The float initializer multiplied into an integer MatMul/Conv result: Cast -> Mul(result, s) where s is
    the weight scale or Mul(input_scale, weight_scale)."""
    frontier = [output]
    for _ in range(depth):
        nxt = []
        for value in frontier:
            for node in consumers.get(value, []):
                if node.op_type == "Cast":
                    nxt.extend(node.output)
                elif node.op_type == "Mul":
                    other = [i for i in node.input if i != value]
                    for o in other:
                        if o in float_inits:
                            return o
                        prod = producers.get(o)
                        if prod is not None and prod.op_type == "Mul":
                            found = [i for i in prod.input if i in float_inits]
                            if len(found) == 1:
                                return found[0]
        frontier = nxt
    return None


def find_int8_weights(proto) -> list[GraphWeight]:
    """Every int8 weight initializer of the graph with its scale and zero point, found by the nodes that read it."""
    import onnx

    inits = {i.name: i for i in proto.graph.initializer}
    int8 = {n for n, i in inits.items() if i.data_type == onnx.TensorProto.INT8}
    float_inits = {n for n, i in inits.items() if i.data_type == onnx.TensorProto.FLOAT}
    producers = {o: node for node in proto.graph.node for o in node.output}
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    found: dict[str, GraphWeight] = {}
    for node in proto.graph.node:
        reads = [k for k, i in enumerate(node.input) if i in int8]
        if not reads:
            continue
        layout = _WEIGHT_INPUTS.get(node.op_type)
        if layout is None or layout[0] not in reads:
            raise NetdietError(f"onnxruntime {ort_version()} wrote a graph netdiet cannot read: {_node_label(node)} "
                               f"takes int8 initializer {node.input[reads[0]]!r} at input {reads[0]} (netdiet reads "
                               f"ORT {ORT_TESTED}); {LOCKED_HINT} or use mode int8-weight")
        w_idx, s_idx, zp_idx, axis = layout
        codes = node.input[w_idx]
        if s_idx is None:
            scale = _downstream_scale(node.output[0], consumers, producers, float_inits)
        else:
            scale = node.input[s_idx] if s_idx < len(node.input) and node.input[s_idx] in float_inits else None
        if scale is None:
            raise NetdietError(f"onnxruntime {ort_version()} wrote a graph netdiet cannot read: no scale found for the "
                               f"int8 weight {codes!r} of {_node_label(node)} (netdiet reads ORT {ORT_TESTED}); "
                               f"{LOCKED_HINT} or use mode int8-weight")
        zp = node.input[zp_idx] if zp_idx < len(node.input) and node.input[zp_idx] in inits else None
        if axis is None:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if int(np.prod(inits[scale].dims or [1])) == 1:
            axis = None
        elif axis < 0:
            axis += len(inits[codes].dims)
        found.setdefault(codes, GraphWeight(codes, scale, zp, axis, _node_label(node)))
    return list(found.values())


def _digest(a: np.ndarray) -> tuple:
    return a.shape, hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def harvest_onnx_weights(model: nn.Module, int8) -> tuple[dict[str, Encoding], list[dict], list[str]]:
    """Read ORT's int8 weight codes back as PyTorch-layout Encodings; `int8` is the model's bytes or, when the
    caller has parsed them already, the onnx.ModelProto (so the graph is parsed once).

    Returns (encodings by parameter name, fill records for every initializer the archive can refill from the
    model, so the ONNX blob it stores holds only the graph and small constants, and the int8 weights that
    round no parameter of the model and so live only in the graph)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(int8) if isinstance(int8, (bytes, bytearray)) else int8
    inits = {i.name: i for i in proto.graph.initializer}
    tensors = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    by_shape: dict[tuple, list[str]] = {}
    for name, t in tensors.items():
        by_shape.setdefault(tuple(t.shape), []).append(name)
    encodings: dict[str, Encoding] = {}
    fill: list[dict] = []
    graph_only: list[str] = []
    for gw in find_int8_weights(proto):
        raw = torch.from_numpy(numpy_helper.to_array(inits[gw.codes]).copy())
        scale = torch.from_numpy(numpy_helper.to_array(inits[gw.scale]).astype(np.float32)).reshape(-1)
        zp = None
        if gw.zero_point is not None:
            zp = torch.from_numpy(numpy_helper.to_array(inits[gw.zero_point]).astype(np.int64)).reshape(-1)
            if not torch.any(zp != 0):
                zp = None
        layouts = [(raw, gw.axis, False)]
        if raw.dim() == 2:
            layouts.append((raw.t().contiguous(), None if gw.axis is None else 1 - gw.axis, True))
        best = None
        for codes, axis, transpose in layouts:
            if axis not in (None, 0):
                continue  # the archive keeps per-output-channel scales (PyTorch's dim 0)
            trial = Encoding(kind="quant", bits=8, q=codes.to(torch.int8), scale=scale, zero_point=zp, axis=0)
            value = trial.dequantize()
            step = scale.view([-1] + [1] * (codes.dim() - 1))
            for pname in by_shape.get(tuple(codes.shape), []):
                if pname in encodings:
                    continue
                err = (value - tensors[pname].float()).abs()
                # a rounding of *this* parameter; BatchNorm folded into a conv weight by an exporter is not
                if torch.all(err <= step * 0.5001 + 1e-7):
                    worst = float(err.max()) if err.numel() else 0.0
                    if best is None or worst < best[0]:
                        best = (worst, pname, trial, transpose)
        if best is None:
            graph_only.append(gw.codes)
            continue
        _, pname, enc, transpose = best
        encodings[pname] = enc
        fill.append({"init": gw.codes, "param": pname, "transpose": transpose})
    # float initializers that equal a model tensor exactly (biases, BatchNorm statistics) are refilled too
    by_value = {_digest(t.detach().float().contiguous().numpy()): name for name, t in tensors.items()}
    for name, init in inits.items():
        if init.data_type != onnx.TensorProto.FLOAT or not init.dims:
            continue
        target = by_value.get(_digest(numpy_helper.to_array(init)))
        if target is not None and target not in encodings:
            fill.append({"init": name, "tensor": target})
    return encodings, fill, graph_only
