"""The environment that decides a result's numbers — one record, in every result document.

Same seed, same numbers holds for one environment: the float sums inside a matmul or a reduction are split over
the threads that compute them, so a different intra-op thread count, BLAS build or CPU code path (AVX2 vs AVX-512)
changes the last bits of a loss, and training carries those bits on. `environment()` is the one producer of the
`environment` key of every result document (profile, train, sweep, compress, evaluate, continual, data, demo):

    netdiet, torch, numpy, onnxruntime        versions (onnxruntime from its package metadata: never imported here)
    python, platform, machine, cpu            interpreter, OS, architecture, CPU model
    blas{backend, version, lapack, onednn,    torch's BLAS/LAPACK build (from torch.__config__), its parallel backend
         parallel_backend, libraries[...]}    and the thread pools loaded in the process (threadpoolctl, if installed)
    threads, interop_threads                  torch.get_num_threads(), torch.get_num_interop_threads()
    openmp_dynamic                            whether OpenMP may hand out fewer threads than asked (None: not OpenMP)
    cpu_count, cpus_available                 logical CPUs of the machine, and those this process may run on
    thread_env{OMP_NUM_THREADS, ...}          the environment variables that set threads or code paths (None: unset)
    cpu_capability                            torch.backends.cpu.get_cpu_capability() (the ATen kernels' ISA)
    device, cuda_available, cuda              the device the numbers came from, and torch's CUDA build
    deterministic_algorithms,                 torch.are_deterministic_algorithms_enabled(),
    float32_matmul_precision                  torch.get_float32_matmul_precision()

`steady_threads()` is what keeps "same thread count, same numbers" true on a busy machine: with OpenMP's dynamic
adjustment on (`OMP_DYNAMIC=true`), the runtime gives a parallel region fewer threads when the machine is loaded,
while torch still reports its thread count — a side-by-side job would change the result without the record
showing it. Training (`fit`) and every CLI command run with the adjustment off.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import re
import sys
from typing import Any, Iterator

import numpy
import torch

from netdiet import __version__

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_DYNAMIC", "MKL_DYNAMIC", "MKL_CBWR",
              "ATEN_CPU_CAPABILITY", "KMP_AFFINITY", "GOMP_CPU_AFFINITY", "OMP_PROC_BIND")


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """The record of what decides this process's numbers now (see the module docstring for the keys)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cuda = torch.cuda.is_available()
    record: dict[str, Any] = {
        **_static(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "openmp_dynamic": openmp_dynamic(),
        "cpu_count": os.cpu_count(),
        "cpus_available": _cpus_available(),
        "thread_env": {k: os.environ.get(k) for k in THREAD_ENV},
        "cpu_capability": _cpu_capability(),
        "device": dev.type,
        "cuda_available": cuda,
        "cuda": torch.version.cuda,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if dev.type == "cuda" and cuda:
        record["device_name"] = torch.cuda.get_device_name(dev)
    record["blas"] = {**record["blas"], "libraries": _thread_pools()}
    return record


@functools.lru_cache(maxsize=1)
def _static() -> dict[str, Any]:
    """What cannot change while the process runs: versions, platform, torch's build."""
    return {"netdiet": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "onnxruntime": _package_version("onnxruntime"), "python": platform.python_version(),
            "platform": platform.platform(), "machine": platform.machine(), "cpu": _cpu_model(),
            "blas": _torch_blas()}


def _package_version(name: str) -> str | None:
    """An installed package's version from its metadata, without importing it (onnxruntime loads its native
    libraries and thread pools on import; the version is all the record needs)."""
    if name in sys.modules and getattr(sys.modules[name], "__version__", None):
        return str(sys.modules[name].__version__)
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    for dist in (name, f"{name}-gpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def _torch_blas() -> dict[str, Any]:
    """BLAS / LAPACK backend and versions torch was built with (parsed from torch.__config__.show())."""
    try:
        show = torch.__config__.show()
    except Exception:  # noqa: BLE001 - a build without the config string still gets a record
        show = ""
    def setting(name: str) -> str | None:
        m = re.search(rf"\b{name}=([^,\s]+)", show)
        return m.group(1) if m else None
    backend = setting("BLAS_INFO")
    version = None
    m = re.search(r"Math Kernel Library Version ([0-9][\w.]*)", show)
    if m:
        version = m.group(1)
    else:
        m = re.search(r"OpenBLAS\s+([0-9][\w.]*)", show)
        version = m.group(1) if m else None
    m = re.search(r"MKL-DNN v([0-9][\w.]*)", show) or re.search(r"oneDNN v([0-9][\w.]*)", show)
    try:
        parallel = torch.__config__.parallel_info()
        pm = re.search(r"ATen parallel backend: (.+)", parallel)
        parallel_backend = pm.group(1).strip() if pm else None
    except Exception:  # noqa: BLE001
        parallel_backend = None
    return {"backend": backend, "version": version, "lapack": setting("LAPACK_INFO"), "onednn": m.group(1) if m else None,
            "mkldnn_enabled": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
            "parallel_backend": parallel_backend}


def _thread_pools() -> list[dict[str, Any]]:
    """The BLAS / OpenMP libraries loaded in the process and their thread counts, from threadpoolctl when it is
    installed (scikit-learn brings it; netdiet does not depend on it). Empty when it is not."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    try:
        rows = threadpool_info()
    except Exception:  # noqa: BLE001 - a library threadpoolctl cannot read must not fail a result
        return []
    keys = ("user_api", "internal_api", "prefix", "version", "num_threads", "threading_layer", "architecture")
    return [{k: r.get(k) for k in keys if k in r} | {"library": os.path.basename(str(r.get("filepath", "")))} for r in rows]


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "Model", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _cpus_available() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _cpu_capability() -> str | None:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - older torch
        return None


# ---------------------------------------------------------------- OpenMP's dynamic thread adjustment
@functools.lru_cache(maxsize=1)
def _openmp() -> Any:
    """The OpenMP runtime torch uses (already loaded in the process), or None."""
    if "OpenMP" not in (_torch_blas().get("parallel_backend") or ""):
        return None
    paths = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                path = line.split()[-1] if line.strip() else ""
                name = os.path.basename(path)
                if name.startswith(("libgomp", "libiomp", "libomp")) and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            lib.omp_get_dynamic.restype = ctypes.c_int
            lib.omp_set_dynamic.argtypes = [ctypes.c_int]
            return lib
        except (OSError, AttributeError):
            continue
    return None


def openmp_dynamic() -> bool | None:
    """Whether OpenMP may give a parallel region fewer threads than torch asks for (None: no OpenMP runtime found)."""
    lib = _openmp()
    return None if lib is None else bool(lib.omp_get_dynamic())


@contextlib.contextmanager
def steady_threads() -> Iterator[None]:
    """Within the block, torch's parallel work runs on exactly torch.get_num_threads() threads however busy the
    machine is (OpenMP's dynamic adjustment off); afterwards the thread count and the adjustment are as before."""
    lib = _openmp()
    threads = torch.get_num_threads()
    dynamic = bool(lib.omp_get_dynamic()) if lib is not None else False
    if dynamic:
        lib.omp_set_dynamic(0)
    try:
        yield
    finally:
        if dynamic:
            lib.omp_set_dynamic(1)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
