"""The built-in models. Each factory takes plain keyword arguments and returns an nn.Module."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from netdiet.models.registry import register_model


# ---------------------------------------------------------------- classic MNIST nets
@register_model("lenet300", (1, 1, 28, 28), description="LeNet-300-100: MLP 784-300-100-10 (Deep Compression's MNIST net)",
                params=266_610)
def lenet300(num_classes: int = 10, in_features: int = 784) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 300), nn.ReLU(),
        nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )


class LeNet5(nn.Module):
    """The Caffe LeNet-5 variant used in the pruning literature: 431,080 parameters."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, conv_channels: Sequence[int] = (20, 50), fc: int = 500,
                 image_size: int = 28):
        super().__init__()
        c1, c2 = conv_channels
        self.conv1 = nn.Conv2d(in_channels, c1, 5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.pool2 = nn.MaxPool2d(2)
        side = ((image_size - 4) // 2 - 4) // 2
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * side * side, fc)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(fc, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


@register_model("lenet5", (1, 1, 28, 28), description="LeNet-5 (Caffe variant): conv20-pool-conv50-pool-fc500-fc10, 431K params",
                input_for_kwargs=lambda kw: (1, kw.get("in_channels", 1), kw.get("image_size", 28), kw.get("image_size", 28)),
                params=431_080)
def lenet5(num_classes: int = 10, in_channels: int = 1, conv_channels: Sequence[int] = (20, 50), fc: int = 500,
           image_size: int = 28) -> nn.Module:
    return LeNet5(num_classes, in_channels, tuple(conv_channels), fc, image_size)


def _mlp_input(kw: dict) -> tuple[int, ...]:
    return (1, int(kw.get("in_features", 784)))


@register_model("mlp", (1, 784), description="MLP with widths=[...], optional batchnorm and dropout", input_for_kwargs=_mlp_input,
                params=235_146)
def mlp(widths: Sequence[int] = (256, 128), in_features: int = 784, num_classes: int = 10, dropout: float = 0.0,
        batchnorm: bool = False, activation: str = "relu") -> nn.Module:
    act = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}[activation]
    layers: list[nn.Module] = [nn.Flatten()]
    prev = in_features
    for w in widths:
        layers.append(nn.Linear(prev, w))
        if batchnorm:
            layers.append(nn.BatchNorm1d(w))
        layers.append(act())
        if dropout:
            layers.append(nn.Dropout(dropout))
        prev = w
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)


def _image_input(default_c: int, default_hw: int):
    def f(kw: dict) -> tuple[int, ...]:
        hw = int(kw.get("image_size", default_hw))
        return (1, int(kw.get("in_channels", default_c)), hw, hw)
    return f


@register_model("cnn", (1, 1, 28, 28), description="Small convnet: [conv-BN-ReLU-pool] x len(channels), dropout, linear",
                input_for_kwargs=_image_input(1, 28), params=50_282)
def cnn(channels: Sequence[int] = (32, 64), num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
        dropout: float = 0.25, batchnorm: bool = True) -> nn.Module:
    layers: list[nn.Module] = []
    prev, side = in_channels, image_size
    for c in channels:
        layers += [nn.Conv2d(prev, c, 3, padding=1, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(c))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        prev, side = c, side // 2
    layers += [nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(prev * side * side, num_classes))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- ResNet (CIFAR style)
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        blocks: list[nn.Module] = []
        cin = width
        for stage, mult in enumerate((1, 2, 4)):
            cout = width * mult
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.fc(self.flatten(self.pool(self.layers(x))))


@register_model("resnet", (1, 3, 32, 32), description="CIFAR-style ResNet (depth=6n+2, default 20)", input_for_kwargs=_image_input(3, 32),
                params=272_474)
def resnet(depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16, image_size: int = 32) -> nn.Module:
    return ResNet(depth, num_classes, in_channels, width)


# ---------------------------------------------------------------- depthwise-separable mobile net
class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn2(self.pointwise(self.act(self.bn1(self.depthwise(x))))))


@register_model("mobilenet", (1, 3, 32, 32), description="MobileNet-v1-style depthwise-separable convnet (grouped convolutions)",
                input_for_kwargs=_image_input(3, 32), params=279_466)
def mobilenet(num_classes: int = 10, in_channels: int = 3, width_mult: float = 0.5, image_size: int = 32) -> nn.Module:
    def c(n: int) -> int:
        return max(8, int(n * width_mult))
    plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (1024, 2)]
    layers: list[nn.Module] = [nn.Conv2d(in_channels, c(32), 3, 1, 1, bias=False), nn.BatchNorm2d(c(32)), nn.ReLU6()]
    prev = c(32)
    for out, stride in plan:
        layers.append(DepthwiseSeparable(prev, c(out), stride))
        prev = c(out)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, num_classes)]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- decoder-only transformer LM
TRANSFORMER_PRESETS: dict[str, dict] = {
    "tiny": dict(layers=2, d_model=128, heads=4, seq_len=64, vocab=1000),
    "small": dict(layers=6, d_model=384, heads=6, seq_len=256, vocab=8192),
    "gpt2": dict(layers=12, d_model=768, heads=12, seq_len=1024, vocab=50257),
    # a LLaMA-7B-sized shape with a GELU MLP (d_ff = 4 d): 6.7e9 parameters; architecture only
    "7b": dict(layers=32, d_model=4096, heads=32, seq_len=2048, vocab=32000),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TransformerLM(nn.Module):
    def __init__(self, layers: int, d_model: int, heads: int, seq_len: int, vocab: int, d_ff: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by heads {heads}")
        self.seq_len = seq_len
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.Sequential(*[TransformerBlock(d_model, heads, d_ff or 4 * d_model, dropout) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's seq_len {self.seq_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        return self.head(self.ln_f(self.blocks(x)))


def _tf_cfg(kw: dict) -> dict:
    cfg = dict(TRANSFORMER_PRESETS[kw.get("preset", "tiny")])
    cfg.update({k: v for k, v in kw.items() if k in ("layers", "d_model", "heads", "seq_len", "vocab")})
    return cfg


@register_model("transformer", (1, 64), input_dtype=torch.int64, task="lm", input_high=1000,
                description="Decoder-only LM; preset=tiny|small|gpt2|7b or layers/d_model/heads/seq_len/vocab",
                input_for_kwargs=lambda kw: (1, _tf_cfg(kw)["seq_len"]),
                input_high_for_kwargs=lambda kw: _tf_cfg(kw)["vocab"], params=660_992)
def transformer(preset: str = "tiny", layers: int | None = None, d_model: int | None = None, heads: int | None = None,
                seq_len: int | None = None, vocab: int | None = None, d_ff: int | None = None, dropout: float = 0.0) -> nn.Module:
    if preset not in TRANSFORMER_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(TRANSFORMER_PRESETS)}")
    kw = {k: v for k, v in dict(preset=preset, layers=layers, d_model=d_model, heads=heads, seq_len=seq_len, vocab=vocab).items()
          if v is not None}
    cfg = _tf_cfg(kw)
    return TransformerLM(d_ff=d_ff, dropout=dropout, **cfg)


# ---------------------------------------------------------------- YOLOv3-tiny-style detector
def _cbl(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1))


class YoloTiny(nn.Module):
    """The YOLOv3-tiny layout: a 7-stage darknet backbone and two detection heads (13x13 and 26x26 at 416)."""

    def __init__(self, num_classes: int = 80, anchors_per_scale: int = 3, width_mult: float = 1.0):
        super().__init__()
        def c(n: int) -> int:
            return max(4, int(n * width_mult))
        out_ch = anchors_per_scale * (5 + num_classes)
        self.stage1 = nn.Sequential(
            _cbl(3, c(16), 3), nn.MaxPool2d(2, 2),
            _cbl(c(16), c(32), 3), nn.MaxPool2d(2, 2),
            _cbl(c(32), c(64), 3), nn.MaxPool2d(2, 2),
            _cbl(c(64), c(128), 3), nn.MaxPool2d(2, 2),
            _cbl(c(128), c(256), 3),
        )  # route 1: stride 16
        self.stage2 = nn.Sequential(
            nn.MaxPool2d(2, 2), _cbl(c(256), c(512), 3),
            nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(2, 1),
            _cbl(c(512), c(1024), 3), _cbl(c(1024), c(256), 1),
        )  # stride 32
        self.head1 = nn.Sequential(_cbl(c(256), c(512), 3), nn.Conv2d(c(512), out_ch, 1))
        self.lateral = _cbl(c(256), c(128), 1)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.head2 = nn.Sequential(_cbl(c(128) + c(256), c(256), 3), nn.Conv2d(c(256), out_ch, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        route = self.stage1(x)
        deep = self.stage2(route)
        out_large = self.head1(deep)
        up = self.upsample(self.lateral(deep))
        out_small = self.head2(torch.cat([up, route], dim=1))
        return out_large, out_small


@register_model("yolo", (1, 3, 416, 416), task="detection", description="YOLOv3-tiny-style detector (two heads, 80 classes)",
                input_for_kwargs=lambda kw: (1, 3, int(kw.get("image_size", 416)), int(kw.get("image_size", 416))),
                params=8_852_366)
def yolo(num_classes: int = 80, anchors_per_scale: int = 3, width_mult: float = 1.0, image_size: int = 416) -> nn.Module:
    if image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
    return YoloTiny(num_classes, anchors_per_scale, width_mult)


