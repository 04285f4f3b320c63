"""The one contract every compression technique keeps (scikit-learn's check_estimator, for netdiet).

Parametrised over `list_techniques()`, so a technique is checked the moment it registers. Each runs with its
default options (and in VARIANTS, with options that take other code paths), with one epoch of fine-tuning on 128 MNIST images, on a small LeNet-5 (conv + linear), and must:

- be configured by plain options: get_config() is JSON, names the technique, and rebuilds an equal technique;
  an unknown option is a one-line NetdietError;
- return a working nn.Module (finite logits of the right shape) and a JSON-serialisable report;
- leave a consistent CompressionState: bool masks shaped like their weights with zeros where they say so;
  encodings only for weights that exist, whose dequantized value is exactly the weight the model computes with;
  structure edits that rebuild the architecture from the factory's model (identical outputs, no pickle);
- save and restore its own tensors (state_dict -> load_state_dict -> the same state_dict);
- give the same result for the same seed.
"""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from netdiet.compression.base import (CompressionState, Encoding, StageContext, Technique, create_technique, list_techniques,
                                   replay_structure)
from netdiet.errors import NetdietError
from netdiet.fileio import dumps_json
from netdiet.models import ModelSpec, create_model
from netdiet.training import TrainConfig

SPEC = ModelSpec("lenet5", {"conv_channels": [6, 12], "fc": 32})
TECHNIQUES = list_techniques()
# besides the defaults, the options that take a technique down a different code path
VARIANTS: dict[str, list[dict]] = {
    "prune": [{"schedule": "polynomial", "initial_sparsity": 0.3, "sparsity": 0.6, "scope": "global", "frequency": 1}],
    "structured": [{"importance": "taylor", "iterative_steps": 2, "ratio": 0.3}],
    "cluster": [{"init": "kmeans++", "bits": 3, "conv_bits": 6}],
    "quantize": [{"mode": m} for m in ("int4-weight", "dynamic", "static", "qat", "fp16", "bf16")],
    "lowrank": [{"rank": 4}],
    "distill": [{"student": "lenet5", "student_kwargs": {"conv_channels": [4, 8], "fc": 16}}],
}
# variants that export to ONNX or trace the graph several times run with the slow tests
SLOW_VARIANTS = {("quantize", "dynamic"), ("quantize", "static"), ("quantize", "qat"), ("structured", "taylor")}


def _variant(name: str, opts: dict):
    label = "-".join(f"{k}={v}" for k, v in opts.items() if not isinstance(v, dict))
    slow = any((name, v) in SLOW_VARIANTS for v in opts.values() if isinstance(v, str))
    return pytest.param(name, opts, id=f"{name}-{label}", marks=[pytest.mark.slow] if slow else [])


CASES = [pytest.param(name, {}, id=name) for name in TECHNIQUES] + [
    _variant(name, opts) for name in TECHNIQUES for opts in VARIANTS.get(name, [])]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return create_model(SPEC.spec, **SPEC.kwargs)


def _context(mnist5k, seed: int = 0) -> StageContext:
    data = SimpleNamespace(x_train=mnist5k.x_train[:128], y_train=mnist5k.y_train[:128],
                           x_test=mnist5k.x_test[:64], y_test=mnist5k.y_test[:64], num_classes=10,
                           name="mnist5k", input_shape=tuple(mnist5k.x_train.shape[1:]))
    return StageContext(data=data, finetune=TrainConfig(epochs=1, batch_size=64, lr=1e-3, progress=False, description="contract"),
                        example_inputs=mnist5k.x_train[:1], teacher=_model(), seed=seed)


def _run(name: str, options: dict, mnist5k, seed: int = 0) -> tuple[Technique, nn.Module, CompressionState]:
    tech = create_technique(name, **options)
    state = CompressionState(spec=SPEC.to_dict())
    model = tech.apply(_model(), state, _context(mnist5k, seed))
    return tech, model, state


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def test_every_technique_named_in_the_design_is_registered_once_its_module_exists():
    import importlib.util
    expected = {"prune": "prune", "structured": "structured", "cluster": "cluster", "quantize": "quantize",
                "lowrank": "lowrank", "distill": "distill"}
    present = {name for name, mod in expected.items() if importlib.util.find_spec(f"netdiet.compression.{mod}") is not None}
    assert present <= set(TECHNIQUES)


@pytest.mark.parametrize("name, options", CASES)
def test_technique_keeps_the_compression_contract(name, options, mnist5k):
    # -- configuration: plain options, JSON, rebuildable
    tech = create_technique(name, **options)
    config = tech.get_config()
    assert config["technique"] == name
    assert json.loads(json.dumps(config)) == config
    again = create_technique(name, **{k: v for k, v in config.items() if k != "technique"})
    assert again.get_config() == config
    with pytest.raises(NetdietError) as info:
        create_technique(name, no_such_option_xyz=1)
    assert "\n" not in str(info.value) and "no_such_option_xyz" in str(info.value)

    # -- apply: a working model and a JSON report
    tech, model, state = _run(name, options, mnist5k)
    assert isinstance(model, nn.Module)
    x = mnist5k.x_test[:8]
    out = _logits(model, x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    report = tech.report()
    assert isinstance(report, dict) and report
    json.loads(dumps_json(report))

    # -- state: masks, encodings, structure edits
    params = dict(model.named_parameters())
    for pname, mask in state.masks.items():
        assert pname in params, f"{name}: mask for missing parameter {pname}"
        assert mask.dtype == torch.bool and mask.shape == params[pname].shape
        assert not params[pname][~mask].any(), f"{name}: {pname} is nonzero where its mask prunes"
    for pname, enc in state.encodings.items():
        assert isinstance(enc, Encoding) and pname in params, f"{name}: encoding for missing parameter {pname}"
        assert enc.kind in ("dense", "quant", "cluster")
        if enc.kind in ("quant", "cluster"):
            assert 1 <= enc.bits <= 8
            assert torch.equal(enc.dequantize().to(params[pname].dtype), params[pname].detach()), \
                f"{name}: {pname} dequantizes to something else than the weight the model computes with"
    json.loads(json.dumps(state.structure))
    spec = ModelSpec(**state.spec) if state.spec else SPEC
    fresh = replay_structure(create_model(spec.spec, **spec.kwargs), copy.deepcopy(state.structure))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(_logits(fresh, x), out), f"{name}: the replayed architecture computes something else"

    # -- its own tensors save and restore
    saved = tech.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in saved.values())
    restored = create_technique(name, **{k: v for k, v in config.items() if k != "technique"})
    restored.load_state_dict(saved)
    back = restored.state_dict()
    assert set(back) == set(saved) and all(torch.equal(back[k], saved[k]) for k in saved)

    # -- same seed, same result
    _, model2, _ = _run(name, options, mnist5k)
    assert torch.equal(_logits(model2, x), out), f"{name}: the same seed gave a different model"
