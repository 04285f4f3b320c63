"""Evaluate a (compressed) model: accuracy, bytes on disk, ratio to the dense fp32 file, MACs, latency.

An archive is evaluated as it is stored: the model is rebuilt from the file (so the figures are those of the
bytes on disk), and when the file carries an int8 ONNX model (quantize mode dynamic/static) that model is run on
ONNX Runtime and its accuracy is the headline one, next to the PyTorch model rebuilt from the same codes.

The compression ratio of netdiet is defined here once (compression_ratio) and used by compress, evaluate, the
report and the demo. PyTorch and ONNX Runtime are timed interleaved (A B A B) until both medians are stable
(netdiet.analysis.latency); their ratio, `latency_speedup.value`, exists only when both are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netdiet.analysis.counter import count_ops
from netdiet.analysis.latency import DEFAULT_TIME_LIMIT_S, ratio_of, time_interleaved, timing_threads
from netdiet.compression import archive
from netdiet.compression.quantize import export_onnx, ort_predict, ort_session
from netdiet.data import get_dataset
from netdiet.environment import environment
from netdiet.errors import NetdietError
from netdiet.training.loop import evaluate_accuracy

SCHEMA = "netdiet.evaluate/1"
_STORE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "float64": 64, "int64": 64, "int32": 32, "int16": 16,
               "int8": 8, "uint8": 8, "bool": 8}


@dataclass
class EvaluateResult:
    accuracy: float | None                   # of the runtime that deploys the file (ORT int8 when stored, else PyTorch)
    bytes_on_disk: int                       # the archive's size (a plain model: its dense fp32 safetensors size)
    dense_fp32_bytes: int                    # the uncompressed model as dense fp32 safetensors
    ratio: float                             # compression_ratio(dense_fp32_bytes, bytes_on_disk)
    macs: int | None                         # per sample, dense count of the rebuilt architecture
    latency_ms: dict[str, float | None] = field(default_factory=lambda: {"pytorch": None, "onnxruntime": None})
    source: str = "model"
    model: dict | None = None
    dataset: str | None = None
    samples: int = 0
    runtime: str = "pytorch"
    accuracy_pytorch: float | None = None
    accuracy_onnxruntime: float | None = None
    params: int = 0
    nonzero_params: int = 0
    latency_batch: int = 0
    latency_detail: dict[str, dict] = field(default_factory=dict)   # per runtime: median, p95, ci, stable, threads...
    latency_speedup: dict | None = None      # PyTorch median / ORT median (ratio_of): value None unless both stable
    threads: int = 0                         # compute threads (accuracy); timings name their own in latency_detail
    timing_threads: int = 0
    tensors: list[dict] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)   # netdiet.environment.environment(), set by evaluate()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_params / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "source": self.source, "model": self.model, "dataset": self.dataset,
            "samples": self.samples, "runtime": self.runtime,
            "accuracy": self.accuracy, "accuracy_pytorch": self.accuracy_pytorch,
            "accuracy_onnxruntime": self.accuracy_onnxruntime,
            "bytes_on_disk": self.bytes_on_disk, "dense_fp32_bytes": self.dense_fp32_bytes, "ratio": self.ratio,
            "params": self.params, "nonzero_params": self.nonzero_params, "sparsity": self.sparsity,
            "macs": self.macs, "latency_ms": dict(self.latency_ms), "latency_batch": self.latency_batch,
            "latency_detail": self.latency_detail, "latency_speedup": self.latency_speedup, "threads": self.threads,
            "timing_threads": self.timing_threads,
            "tensors": self.tensors, "stages": self.stages, "warnings": self.warnings,
            "environment": self.environment or environment(),
        }


def compression_ratio(dense_fp32_bytes: int | None, bytes_on_disk: int | None) -> float | None:
    """THE compression ratio of netdiet: the model before compression, as the dense fp32 safetensors file of its
    dense architecture (archive.dense_fp32_bytes / dense_baseline_bytes), over the whole .ndz file on disk
    (header, every stream, any ONNX artifact). None without a file. Every ratio shown anywhere is this one."""
    if not bytes_on_disk or not dense_fp32_bytes:
        return None
    return dense_fp32_bytes / bytes_on_disk


def _detail(raw: dict) -> dict:
    """One runtime's timing (netdiet.analysis.latency.time_interleaved, the one timer of netdiet) in milliseconds."""
    ci = None if raw["ci_low_ms"] is None else [raw["ci_low_ms"], raw["ci_high_ms"]]
    return {"median": raw["median_ms"], "p95": raw["p95_ms"], "min": raw["min_ms"], "ci": ci, "ci_rel": raw["ci_rel"],
            "stable": raw["stable"], "repeats": raw["repeats"], "warmup": raw["warmup"], "threads": raw["threads"],
            "seconds": raw["seconds"], "time_limit_s": raw["time_limit_s"], "target": raw["target"]}


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    return int(count_ops(model, x).macs)


def evaluate(model_or_archive_path: nn.Module | str | Path, data: Any, *, batch_size: int = 256, latency: bool = True,
             onnx: bool | None = None, model_spec: str | None = None, latency_batch: int = 64,
             warmup: int = 5, repeats: int = 30, data_dir: str | None = None,
             max_memory: int | None = None, time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> EvaluateResult:
    """Evaluate a model or a .ndz archive on `data` (a Dataset or a dataset name; its test split).

    onnx: None = run ONNX Runtime only when the archive carries an int8 ONNX model; True = also export an fp32
    model to ONNX Runtime for comparison; False = PyTorch only. max_memory: bytes reading the archive may take
    (default: the RAM available now; see archive.read). The dense fp32 size is recomputed from the rebuilt
    architecture, never taken from the header. Timings repeat (at least `repeats`) until stable or `time_limit_s`
    seconds, on timing_threads() threads; ONNX Runtime's session runs on the same count.
    """

    if batch_size < 1 or latency_batch < 1 or repeats < 1 or warmup < 0:
        raise NetdietError("batch_size, latency_batch and repeats must be positive (warmup >= 0)")
    result = EvaluateResult(accuracy=None, bytes_on_disk=0, dense_fp32_bytes=0, ratio=1.0, macs=None)
    onnx_bytes = None
    if isinstance(model_or_archive_path, nn.Module):
        model = model_or_archive_path
        result.dense_fp32_bytes = result.bytes_on_disk = archive.dense_fp32_bytes(model)
        result.warnings.append("a plain model is stored as dense fp32 safetensors; evaluate its .ndz for compressed bytes")
    elif isinstance(model_or_archive_path, (str, Path)):
        loaded = archive.read(model_or_archive_path, model_spec=model_spec, max_memory=max_memory)
        model, header = loaded.model, loaded.header
        result.source = str(model_or_archive_path)
        result.model = header.get("model")
        result.bytes_on_disk = loaded.nbytes
        # the header's own dense_fp32_bytes is a claim; the denominator is worked out from the rebuilt model
        result.dense_fp32_bytes = archive.dense_baseline_bytes(header.get("model"), header.get("structure"), model)
        result.stages = header.get("stages") or []
        result.warnings += [str(w) for w in header.get("warnings") or []]
        result.tensors = _tensor_rows(header)
        art = loaded.state.artifacts.get("onnx_int8")
        if art is not None and onnx is not False:
            onnx_bytes = art["model"]
    else:
        raise NetdietError(f"evaluate needs a model or a .ndz path, got {type(model_or_archive_path).__name__}")
    if isinstance(data, str):  # loaded after the archive, so a bad file fails before the data is read
        data = get_dataset(data, data_dir=data_dir)
    if data is not None and not hasattr(data, "x_test"):
        raise NetdietError(f"data must be a dataset name or a netdiet Dataset, got {type(data).__name__}")
    result.ratio = compression_ratio(result.dense_fp32_bytes, result.bytes_on_disk) or 0.0
    model.eval()
    result.params = sum(p.numel() for p in model.parameters())
    result.nonzero_params = int(sum(int((p != 0).sum()) for p in model.parameters()))
    result.threads = torch.get_num_threads()
    result.timing_threads = timing_threads()

    session = None
    if onnx_bytes is not None:
        session = ort_session(onnx_bytes, threads=result.timing_threads)
        result.runtime = "onnxruntime-int8"
    if data is None:
        return result
    x, y = data.x_test, data.y_test
    result.dataset, result.samples = getattr(data, "name", None), len(y)
    try:
        with torch.inference_mode():
            model(x[:1])
    except Exception as exc:  # noqa: BLE001 - a model/data mismatch is bad input, not an internal error
        raise NetdietError(f"the model cannot run on {result.dataset} inputs of shape {list(x.shape[1:])} "
                           f"({type(exc).__name__}: {str(exc)[:120]}); pass the dataset it was trained on with --data") from None
    result.accuracy_pytorch = evaluate_accuracy(model, x, y, batch_size)
    if session is None and onnx:
        session = ort_session(export_onnx(model, x[:1]).SerializeToString(), threads=result.timing_threads)
        result.runtime = "pytorch"
    if session is not None:
        result.accuracy_onnxruntime = (ort_predict(session, x, batch_size).argmax(1) == y).float().mean().item()
    result.accuracy = result.accuracy_onnxruntime if result.runtime == "onnxruntime-int8" else result.accuracy_pytorch
    result.macs = _macs(model, x[:1])

    if latency:
        xb = x[:latency_batch]
        if len(xb) < latency_batch:  # repeat samples so the batch has the asked size
            xb = xb.repeat((latency_batch + len(xb) - 1) // len(xb), *([1] * (xb.dim() - 1)))[:latency_batch]
        result.latency_batch = latency_batch

        def torch_fn() -> None:
            with torch.inference_mode():
                model(xb)
        fns = {"pytorch": torch_fn}
        if session is not None:
            name, xn = session.get_inputs()[0].name, xb.numpy()
            fns["onnxruntime"] = lambda: session.run(None, {name: xn})
        # interleaved, A B A B: a burst of load on a shared machine falls on both runtimes
        stats = time_interleaved(fns, warmup=warmup, repeats=repeats, time_limit_s=time_limit_s,
                                 threads=result.timing_threads)
        for key, raw in stats.items():
            result.latency_detail[key] = _detail(raw)
            result.latency_ms[key] = raw["median_ms"]
        if "onnxruntime" in stats:
            result.latency_speedup = {**ratio_of(stats["pytorch"], stats["onnxruntime"]), "interleaved": True,
                                      "of": "PyTorch median / ONNX Runtime median (above 1: ONNX Runtime is faster)"}
    result.environment = environment(next(model.parameters(), torch.empty(0)).device)
    return result


def _tensor_rows(header: dict) -> list[dict]:
    rows = []
    for e in header.get("tensors") or []:
        streams = [e.get(k) for k in ("values", "scale", "zero_point", "codebook")] + [(e.get("pos") or {}).get("stream")]
        streams = [s for s in streams if isinstance(s, dict)]
        numel = 1
        for d in e.get("shape") or []:
            numel *= int(d)
        rows.append({"name": e.get("name"), "encoding": e.get("kind") if e.get("kind") != "dense" else f"dense-{e.get('store')}",
                     "bits": e.get("bits") or _STORE_BITS.get(str(e.get("store")), 32), "numel": numel, "nonzero": e.get("nnz"),
                     "positions": (e.get("pos") or {}).get("method"), "bytes": sum(int(s.get("len", 0)) for s in streams),
                     "codecs": sorted({str(s.get("codec")) for s in streams})})
    for name, art in (header.get("artifacts") or {}).items():
        stream = art.get("stream") if isinstance(art, dict) else None
        if isinstance(stream, dict):
            rows.append({"name": f"artifact:{name}", "encoding": "onnx", "bits": None, "numel": 0, "nonzero": 0,
                         "positions": "-", "bytes": int(stream.get("len", 0)), "codecs": [str(stream.get("codec"))]})
    return rows
