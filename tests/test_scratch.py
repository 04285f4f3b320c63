"""CPU kernel-scratch rules (analysis/scratch.py) against scratch measured with the profiler's allocator events.

The AVX2 rows were measured on this project's AVX512-BF16 CPU with oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA=AVX2,
the documented way to make oneDNN dispatch its jit:avx2 kernels), torch 2.13 and 2.14, each op run alone after a
warm-up call: scratch = peak of the running allocation total minus the bytes of the op's output.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from netdiet.analysis import scratch


def _avx2(threads=2):
    return scratch.CpuCapability(isa="avx2", onednn=True, onednn_bf16=False, onednn_fp16=False, aten="AVX2",
                                 threads=threads)


@pytest.mark.parametrize("shape,o,k,s,groups,measured", [
    # MobileNetV3-small at batch 16, 224x224: a 1x1 projection 144 -> 48 at 14x14 holds the input reordered to
    # nChw8c (16·144·196·4 = 1,806,336) and the weights (48·144·4 = 27,648): 1,833,984; the old rule said the
    # output's 16·48·196·4 = 602,112
    ((16, 144, 14, 14), 48, 1, 1, 1, 1_833_984),
    # depthwise 5x5 stride 2 on 288 channels: input 16·288·196·4 = 3,612,672 + weights 288·25·4 = 28,800
    ((16, 288, 14, 14), 288, 5, 2, 288, 3_641_472),
    # the squeeze-excite 1x1 conv 576 -> 144 on 1x1: input 16·576·4 = 36,864 + weights 144·576·4 = 331,776
    ((16, 576, 1, 1), 144, 1, 1, 1, 368_640),
    # an expanding 1x1 conv 48 -> 288 peaks at the blocked output, 16·288·196·4 (above input + weights 657,408)
    ((16, 48, 14, 14), 288, 1, 1, 1, 3_612_672),
    # the stem (3 channels, 3x3 stride 2) reads the plain input: the blocked output 16·16·112·112·4
    ((16, 3, 224, 224), 16, 3, 2, 1, 12_845_056),
    # channels not a multiple of 8: input padded to 16 channels 16·16·784·4 = 802,816, weights 16·16·4 = 1,024,
    # and the output's 6 padding channels 16·6·784·4 = 301,056
    ((16, 12, 28, 28), 10, 1, 1, 1, 1_104_896),
    # depthwise on 20 channels, one image: input 24·196·4 = 18,816 + weights 24·25·4 = 2,400 + padding 4·196·4
    ((1, 20, 14, 14), 20, 5, 1, 20, 24_352),
    # a 1x1 conv on 3 channels is reordered: input 2·8·784·4 = 50,176 + weights 8·8·4 = 256
    ((2, 3, 28, 28), 8, 1, 1, 1, 50_432),
])
def test_avx2_onednn_forward_holds_the_reordered_input_and_weights(shape, o, k, s, groups, measured):
    n, c, h, w = shape
    x = torch.empty(shape, device="meta")
    wt = torch.empty(o, c // groups, k, k, device="meta")
    args = (x, wt, None, [s, s], [k // 2, k // 2], [1, 1], False, [0, 0], groups)
    got, missing = scratch.kernel_scratch(torch.ops.aten.convolution.default, args, _avx2())
    assert missing is None
    assert got == measured


# ------------------------------------------------------------------ the MobileNetV3 blocks, end to end
def _cba(i, o, k, s=1, g=1, act=nn.Hardswish):
    layers = [nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o)]
    return nn.Sequential(*layers, act(inplace=True)) if act else nn.Sequential(*layers)


class _SqueezeExcite(nn.Module):
    def __init__(self, c, squeeze):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        gate = self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(x, 1))))
        return x * nn.functional.hardsigmoid(gate)


class _InvertedResidual(nn.Module):
    """MobileNetV3's block: 1x1 expand + hardswish, depthwise kxk + hardswish, SE with hardsigmoid, 1x1 project."""

    def __init__(self, i, e, o, k, s):
        super().__init__()
        self.body = nn.Sequential(_cba(i, e, 1), _cba(e, e, k, s, g=e), _SqueezeExcite(e, e // 4),
                                  _cba(e, o, 1, act=None))
        self.residual = s == 1 and i == o

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


def mobilenetv3_like():
    torch.manual_seed(0)
    return nn.Sequential(_cba(3, 16, 3, 2), _InvertedResidual(16, 72, 24, 3, 2), _InvertedResidual(24, 96, 40, 5, 2),
                         _InvertedResidual(40, 240, 40, 5, 1), _InvertedResidual(40, 144, 48, 5, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))


def _measure_in_this_process() -> dict:
    from netdiet.analysis.measurement import measure_memory
    from netdiet.analysis.memory import estimate_memory

    torch.set_num_threads(2)
    model, x = mobilenetv3_like(), torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    est = estimate_memory(model, x, optimizer="sgd")
    meas = measure_memory(model, x, optimizer="sgd")
    return {"isa": scratch.probe_cpu().isa, "estimated": est.inference_peak,
            "measured": meas["inference_peak_measured"], "unmodelled": est.unmodelled}


@pytest.mark.slow
def test_mobilenetv3_blocks_inference_peak_matches_measurement_on_avx2():
    # regression (issue 10 item 6): on oneDNN's AVX2 kernels the inference estimate of these blocks was 8.4 % low
    # (MobileNetV3-small at batch 16: 6.5 %) because the forward conv rule held only an output-sized buffer
    if not torch.backends.mkldnn.is_available() or not scratch._cpu_flags().get("avx2"):
        pytest.skip("needs a CPU with AVX2 and PyTorch built with oneDNN")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = (f"import json, runpy; ns = runpy.run_path({__file__!r}); "
            "print('RESULT', json.dumps(ns['_measure_in_this_process']()))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    assert result["isa"] == "avx2" and result["unmodelled"] == []
    assert abs(result["estimated"] - result["measured"]) <= 0.01 * result["measured"], result

