"""Named accelerators as data: memory, peak dense FLOP/s per dtype, memory bandwidth, links, devices per node, and
where each number comes from. `cpu` is measured on the spot (a short matmul per dtype, a copy, the machine's RAM).

Conventions (every figure below follows them; `source` names the document of each):
- memory_bytes: the datasheet's GB as decimal bytes (80 GB = 80e9 B). Real cards show a little more (nvidia-smi
  counts binary MiB), the CUDA context and allocator fragmentation take some of it: decimal is the cautious side.
- peak_flops: DENSE peaks only (vendor tables print 2:4-sparsity figures, twice the dense ones, marked with an
  asterisk; those are halved here or taken from the dense column). `fp32` is the non-tensor-core FP32 rate, what
  PyTorch's default float32 matmul precision ("highest") runs at; `tf32` is the tensor-core rate that
  `torch.backends.cuda.matmul.allow_tf32` opts into. A dtype a device has no figure for is absent.
- link bandwidths are bytes per second in ONE direction per device (datasheets print NVLink and ICI as the
  bidirectional total: halved here), which is what a ring collective's bus bandwidth is bounded by.
  `intra_node` is the link between devices of one node (NVLink, Infinity Fabric, ICI, PCIe), `inter_node` the
  network link per device when a group spans nodes (InfiniBand/RoCE NIC per GPU, data-centre network).
"""
from __future__ import annotations

import difflib
import functools
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from netdiet.errors import NetdietError

GB = 10**9
TERA = 10**12

_NV_H100 = "NVIDIA H100 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/h100/)"
_NV_H200 = "NVIDIA H200 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/h200/)"
_NV_A100 = ("NVIDIA A100 Tensor Core GPU datasheet (https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/"
            "a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf)")
_NV_L4 = "NVIDIA L4 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/l4/)"
_NV_DGX_H100 = ("NVIDIA DGX H100 datasheet: 8x ConnectX-7 400 Gb/s InfiniBand/Ethernet per 8 GPUs "
                "(https://www.nvidia.com/en-us/data-center/dgx-h100/)")
_NV_DGX_A100 = ("NVIDIA DGX A100 datasheet: 8x ConnectX-6 200 Gb/s HDR InfiniBand per 8 GPUs "
                "(https://www.nvidia.com/en-us/data-center/dgx-a100/)")
_AMD_MI300X = ("AMD Instinct MI300X data sheet (https://www.amd.com/content/dam/amd/en/documents/instinct-tech-docs/"
               "data-sheets/amd-instinct-mi300x-data-sheet.pdf)")
_TPU_V5E = "Google Cloud TPU v5e system architecture (https://cloud.google.com/tpu/docs/v5e)"
_SPARSE_HALVED = " (table shows 2:4 sparsity; dense = half)"


@dataclass(frozen=True)
class Device:
    """One accelerator. `source` maps each figure ("memory_bytes", "peak_flops.bf16", "memory_bandwidth",
    "interconnect.intra_node", "interconnect.inter_node", "devices_per_node") to the document it comes from."""

    name: str
    description: str
    memory_bytes: int
    peak_flops: dict[str, float]                         # dtype -> dense FLOP/s (int8: OP/s)
    memory_bandwidth: float                              # B/s
    interconnect: dict[str, tuple[str, float]]           # intra_node / inter_node -> (kind, B/s per direction)
    devices_per_node: int
    source: dict[str, str]
    measured: bool = False
    notes: list[str] = field(default_factory=list)

    def peak(self, dtype: str) -> float:
        """Dense peak FLOP/s for `dtype` (fp32, tf32, bf16, fp16, fp8, int8); one line naming those it has else."""
        key = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
        if key not in self.peak_flops:
            raise NetdietError(f"device {self.name} has no peak FLOP/s figure for {dtype}; choose one of "
                               f"{', '.join(self.peak_flops)}")
        return self.peak_flops[key]

    def link(self, spans_nodes: bool) -> tuple[str, float]:
        return self.interconnect["inter_node" if spans_nodes else "intra_node"]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "memory_bytes": self.memory_bytes,
                "peak_flops": dict(self.peak_flops), "memory_bandwidth": self.memory_bandwidth,
                "interconnect": {k: {"kind": kind, "bandwidth": bw} for k, (kind, bw) in self.interconnect.items()},
                "devices_per_node": self.devices_per_node, "source": dict(self.source), "measured": self.measured,
                "notes": list(self.notes)}


_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
                  "float8": "fp8", "float8_e4m3fn": "fp8"}


def _sources(flops: str, memory: str, intra: str, inter: str, node: str | None = None) -> dict[str, str]:
    return {"peak_flops": flops, "memory_bytes": memory, "memory_bandwidth": memory, "interconnect.intra_node": intra,
            "interconnect.inter_node": inter, "devices_per_node": node or inter}


def _nvidia_hopper(name: str, description: str, memory_gb: int, bandwidth_tbs: float, datasheet: str) -> Device:
    """H100 SXM5 and H200 SXM share the GH100 compute rates and NVLink 4; they differ in HBM size and speed."""
    return Device(
        name, description, memory_gb * GB,
        {"fp32": 67 * TERA, "tf32": 494.7 * TERA, "bf16": 989.4 * TERA, "fp16": 989.4 * TERA,
         "fp8": 1978.9 * TERA, "int8": 1978.9 * TERA},
        bandwidth_tbs * TERA,
        {"intra_node": ("NVLink 4 (900 GB/s bidirectional)", 450 * GB),
         "inter_node": ("InfiniBand NDR 400 Gb/s per GPU", 50 * GB)},
        8,
        _sources(datasheet + _SPARSE_HALVED, datasheet, datasheet + ": NVLink 900 GB/s, halved per direction",
                 _NV_DGX_H100, "HGX/DGX H100 and H200 boards: 8 GPUs per node (" + _NV_DGX_H100 + ")"))


def _nvidia_a100(name: str, description: str, memory_gb: int, bandwidth_tbs: float) -> Device:
    """A100 SXM4 40 GB and 80 GB share the GA100 compute rates and NVLink 3; they differ in HBM size and speed."""
    return Device(
        name, description, memory_gb * GB,
        {"fp32": 19.5 * TERA, "tf32": 156 * TERA, "bf16": 312 * TERA, "fp16": 312 * TERA, "int8": 624 * TERA},
        bandwidth_tbs * TERA,
        {"intra_node": ("NVLink 3 (600 GB/s bidirectional)", 300 * GB),
         "inter_node": ("InfiniBand HDR 200 Gb/s per GPU", 25 * GB)},
        8,
        _sources(_NV_A100 + " (dense column)", _NV_A100, _NV_A100 + ": NVLink 600 GB/s, halved per direction",
                 _NV_DGX_A100, "HGX/DGX A100: 8 GPUs per node (" + _NV_DGX_A100 + ")"))


DEVICES: dict[str, Device] = {
    "h100-sxm": _nvidia_hopper("h100-sxm", "NVIDIA H100 SXM5 80 GB (HBM3)", 80, 3.35, _NV_H100),
    "h200": _nvidia_hopper("h200", "NVIDIA H200 SXM 141 GB (HBM3e)", 141, 4.8, _NV_H200),
    "h100-pcie": Device(
        "h100-pcie", "NVIDIA H100 PCIe 80 GB (HBM2e)", 80 * GB,
        {"fp32": 51 * TERA, "tf32": 378 * TERA, "bf16": 756 * TERA, "fp16": 756 * TERA, "fp8": 1513 * TERA,
         "int8": 1513 * TERA},
        2.0 * TERA,
        {"intra_node": ("PCIe Gen5 x16 (128 GB/s bidirectional)", 64 * GB),
         "inter_node": ("400 Gb/s NIC per GPU (assumed)", 50 * GB)},
        8,
        _sources(_NV_H100 + " (H100 PCIe column)" + _SPARSE_HALVED, _NV_H100 + " (H100 PCIe column)",
                 _NV_H100 + ": PCIe Gen5 128 GB/s, halved per direction (the NVLink bridge joins pairs only, so a "
                            "group of more than two runs over PCIe)",
                 "assumed: one 400 Gb/s NIC per GPU, as in " + _NV_DGX_H100,
                 "assumed: 8 cards per server (common PCIe servers)")),
    "a100-40gb": _nvidia_a100("a100-40gb", "NVIDIA A100 SXM4 40 GB (HBM2)", 40, 1.555),
    "a100-80gb": _nvidia_a100("a100-80gb", "NVIDIA A100 SXM4 80 GB (HBM2e)", 80, 2.039),
    "l4": Device(
        "l4", "NVIDIA L4 24 GB (GDDR6)", 24 * GB,
        {"fp32": 30.3 * TERA, "tf32": 60 * TERA, "bf16": 121 * TERA, "fp16": 121 * TERA, "fp8": 242.5 * TERA,
         "int8": 242.5 * TERA},
        300 * GB,
        {"intra_node": ("PCIe Gen4 x16 (64 GB/s bidirectional)", 32 * GB),
         "inter_node": ("100 Gb/s network per 8-GPU VM (assumed)", 100 / 8 / 8 * GB)},
        8,
        _sources(_NV_L4 + _SPARSE_HALVED, _NV_L4, _NV_L4 + ": PCIe Gen4 x16 64 GB/s, halved per direction; no NVLink",
                 "assumed: a 100 Gb/s network shared by 8 GPUs (Google Cloud g2-standard-96: 8 L4, up to 100 Gbps)",
                 "assumed: 8 GPUs per node (Google Cloud g2-standard-96)")),
    "mi300x": Device(
        "mi300x", "AMD Instinct MI300X 192 GB (HBM3)", 192 * GB,
        {"fp32": 163.4 * TERA, "tf32": 653.7 * TERA, "bf16": 1307.4 * TERA, "fp16": 1307.4 * TERA,
         "fp8": 2614.9 * TERA, "int8": 2614.9 * TERA},
        5.3 * TERA,
        {"intra_node": ("Infinity Fabric, 7 links x 128 GB/s bidirectional (896 GB/s)", 448 * GB),
         "inter_node": ("400 Gb/s NIC per GPU (assumed)", 50 * GB)},
        8,
        _sources(_AMD_MI300X + " (dense figures; matrix FP32 for fp32)", _AMD_MI300X,
                 _AMD_MI300X + ": 896 GB/s peak aggregate Infinity Fabric, halved per direction",
                 "assumed: one 400 Gb/s NIC per GPU (8-GPU MI300X platforms)",
                 _AMD_MI300X + ": 8 OAM modules per platform")),
    "tpu-v5e": Device(
        "tpu-v5e", "Google Cloud TPU v5e chip 16 GB (HBM2)", 16 * GB,
        {"bf16": 197 * TERA, "int8": 393 * TERA},
        819 * GB,
        {"intra_node": ("ICI 2D torus (400 GB/s bidirectional per chip)", 200 * GB),
         "inter_node": ("data-centre network, 2 x 100 Gb/s per 8-chip host", 200 / 8 / 8 * GB)},
        256,
        _sources(_TPU_V5E + " (bf16 and int8 only: no fp32 matrix figure is published)", _TPU_V5E,
                 _TPU_V5E + ": ICI 400 GB/s bidirectional per chip, halved per direction",
                 _TPU_V5E + ": per-host NIC 2 x 100 Gbps, 8 chips per host",
                 _TPU_V5E + ": a pod of 256 chips shares the ICI torus; 'node' here is that ICI domain"),
        notes=["a ring over the ICI torus is modelled as a ring over one ICI link per direction"]),
}
ALIASES = {"h100": "h100-sxm", "h100-sxm5": "h100-sxm", "h200-sxm": "h200", "a100": "a100-80gb",
           "a100-sxm": "a100-80gb", "a100-40": "a100-40gb", "a100-80": "a100-80gb", "mi300": "mi300x",
           "v5e": "tpu-v5e", "tpuv5e": "tpu-v5e"}


# ------------------------------------------------------------------ the CPU, measured here
CPU_MATMUL_N = 512        # a square matmul large enough to leave the overheads behind, small enough for ~10 ms
CPU_COPY_BYTES = 64 * 2**20


def _best_seconds(fn, repeats: int = 5) -> float:
    fn()                                   # warm-up (allocator, kernel choice)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


def _total_ram() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


@functools.cache
def measure_cpu() -> Device:
    """This machine's CPU at torch's current thread count: peak FLOP/s per dtype from the best of 5 timed
    512 x 512 matmuls (2 n^3 FLOPs each), memory bandwidth from the best of 5 copies of 64 MiB (read + write),
    memory = the machine's physical RAM. Measured once per process."""
    n = CPU_MATMUL_N
    peaks: dict[str, float] = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(dt)
        peaks[name] = 2 * n**3 / _best_seconds(lambda a=a: torch.mm(a, a))
    src = torch.ones(CPU_COPY_BYTES // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    bandwidth = 2 * CPU_COPY_BYTES / _best_seconds(lambda: dst.copy_(src))
    threads = torch.get_num_threads()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    how = f"measured on this machine at {stamp}, {threads} torch thread{'s' if threads != 1 else ''}"
    return Device(
        "cpu", f"this machine's CPU ({threads} threads, measured)", _total_ram(), peaks, bandwidth,
        {"intra_node": ("shared memory (the measured copy bandwidth)", bandwidth),
         "inter_node": ("10 Gb/s Ethernet (assumed)", 1.25 * GB)},
        1,
        {"peak_flops": f"{how}: best of 5 {n}x{n} matmuls per dtype, 2n^3 FLOPs each",
         "memory_bytes": "the machine's physical RAM (sysconf SC_PHYS_PAGES x SC_PAGE_SIZE)",
         "memory_bandwidth": f"{how}: best of 5 copies of 64 MiB, bytes read + written",
         "interconnect.intra_node": "processes on one CPU exchange through shared memory: the measured copy rate",
         "interconnect.inter_node": "assumed: 10 Gb/s Ethernet between machines",
         "devices_per_node": "one CPU per machine"},
        measured=True, notes=["a matmul peak, not a vendor figure: vectorised kernels at this thread count"])


# ------------------------------------------------------------------ lookup
def device_names() -> list[str]:
    return [*DEVICES, "cpu"]


def get_device(name: str) -> Device:
    """The named device (aliases: h100 = h100-sxm, a100 = a100-80gb, ...); `cpu` is measured now. An unknown name
    is one line with the closest known one."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key == "cpu":
        return measure_cpu()
    if key in DEVICES:
        return DEVICES[key]
    close = difflib.get_close_matches(key, [*device_names(), *ALIASES], n=1, cutoff=0.4)
    hint = f"did you mean {ALIASES.get(close[0], close[0])}? " if close else ""
    raise NetdietError(f"unknown device '{name}'; {hint}known devices: {', '.join(device_names())}")


_SPEC = re.compile(r"^\s*(?:(\d+)\s*[x×*]\s*)?([A-Za-z][\w.-]*)\s*$")


def parse_devices(spec: str) -> tuple[int, Device]:
    """'64xh100' -> (64, h100-sxm); a bare name is one device."""
    m = _SPEC.match(str(spec))
    if not m:
        raise NetdietError(f"cannot read --devices '{spec}'; give COUNTxNAME, e.g. 64xh100 or 8xh200")
    count = int(m.group(1)) if m.group(1) else 1
    if count < 1:
        raise NetdietError(f"--devices '{spec}' has {count} devices; give at least one, e.g. 8xh100")
    return count, get_device(m.group(2))
