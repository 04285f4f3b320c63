# Writes tests/data/ort-<release>-<mode>.onnx with the installed onnxruntime (run from the repository root:
# python tests/data/make_ort_fixtures.py); test_int8_harvest_reads_graphs_written_by_two_ort_releases reads them.
import sys, torch, onnxruntime
from torch import nn
from netdiet.compression.onnxrt import export_onnx, ort_quantize
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
calib = [torch.rand(8, 16)]
v = ".".join(onnxruntime.__version__.split(".")[:2])
for mode in ("dynamic", "static"):
    b = ort_quantize(export_onnx(m, torch.zeros(1, 16), "dynamo", optimize=False), mode, calib, "minmax")
    open(f"tests/data/ort-{v}-{mode}.onnx", "wb").write(b)
