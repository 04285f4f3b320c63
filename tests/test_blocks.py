"""analysis/blocks.py: block signatures equal exactly when two calls are the same computation."""
from __future__ import annotations

import torch
from torch import nn

from netdiet.analysis.blocks import block_signature, repeated_blocks
from netdiet.models import create_model


def _block(stride: int = 1, p: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Conv2d(8, 8, 3, stride=stride, padding=1), nn.ReLU(), nn.Dropout(p))


def test_equal_structure_and_inputs_give_equal_signatures():
    x = torch.randn(2, 8, 16, 16)
    assert block_signature(_block(), (x,)) == block_signature(_block(), (torch.randn(2, 8, 16, 16),))


def test_what_changes_the_computation_changes_the_signature():
    x = torch.randn(2, 8, 16, 16)
    base = block_signature(_block(), (x,))
    assert block_signature(_block(stride=2), (x,)) != base                  # same weight shapes, other stride
    assert block_signature(_block(p=0.5), (x,)) != base                     # configuration in extra_repr
    assert block_signature(_block().eval(), (x,)) != base                   # training flag
    assert block_signature(_block().to(torch.bfloat16), (x,)) != base       # parameter dtype
    assert block_signature(_block(), (torch.randn(4, 8, 16, 16),)) != base  # input shape
    assert block_signature(_block(), (x.requires_grad_(),)) != base        # input requires grad
    frozen = _block()
    frozen[0].weight.requires_grad_(False)
    assert block_signature(frozen, (torch.randn(2, 8, 16, 16),)) != base
    assert block_signature(_block(), (torch.randn(2, 8, 16, 16),), {"scale": 2}) != base


def test_arguments_it_cannot_describe_give_no_signature():
    x = torch.randn(2, 8, 16, 16)
    assert block_signature(_block(), (x, object())) is None


def test_resnet_stages_repeat_after_their_first_block():
    # the zoo's CIFAR ResNet: 3 stages of 3 blocks; the first block of stages 2 and 3 changes width and stride
    # (a conv shortcut), so the repeats are blocks 0-2, 4-5 and 7-8 (top-most only: their convs are not listed)
    assert repeated_blocks(create_model("resnet")) == [["layers.0", "layers.1", "layers.2"],
                                                       ["layers.4", "layers.5"], ["layers.7", "layers.8"]]
    assert repeated_blocks(create_model("lenet5")) == []
