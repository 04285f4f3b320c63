"""Every aten op that real models emit, forward, backward and optimizer step, has a formula (or is cost-free).

An uncounted op is a silent hole in every total that contains it, so this test runs the models importable here
under a dispatch mode of its own (independent of the counter's bookkeeping) and fails naming each op without an
entry in analysis/ops.py: the netdiet zoo, HF transformers architectures built from tiny configs (BERT, GPT-2,
Llama with grouped-query attention, T5, ViT; no download), and, where they import, torchvision's classification
models and timm's common families. The step is the trainer's: train-mode forward, a scalar loss, backward and
an Adam step; the eval forward runs under no_grad as inference does. Models run on the meta device where they
build there (nothing allocated, seconds), HF models on small real tensors. The whole torchvision zoo and timm
families are under `slow` (benchmarks/zoo_coverage.py covers them with MACs against published figures).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from netdiet.analysis import ops
from netdiet.models import create_model, default_inputs, list_models, make_inputs


class _Ops(TorchDispatchMode):
    """Records every OpOverload dispatched while active."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        key = str(func)
        self.seen[key] = self.seen.get(key, 0) + 1
        if ops.lookup(func) is None:
            self.missing.add(f"aten.{func.overloadpacket.__name__}" if hasattr(func, "overloadpacket") else key)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.missing: set[str] = getattr(self, "missing", set())
        return super().__enter__()


def _loss(out) -> torch.Tensor:
    leaves, _ = tree_flatten(out)
    floats = [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    total = floats[0].float().sum()
    for t in floats[1:]:
        total = total + t.float().sum()
    return total


def uncounted_ops(model: torch.nn.Module, inputs) -> tuple[set[str], int]:
    """(ops without a formula, distinct op overloads seen) over eval forward + one training step with Adam."""
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,) if isinstance(inputs, torch.Tensor)
                                                                  else tuple(inputs), {})
    rec = _Ops()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.eval()
        with rec, torch.no_grad():
            model(*args, **kwargs)
        model.train()
        with rec:
            _loss(model(*args, **kwargs)).backward()
            opt.step()
            opt.step()          # the second step is the steady state (state already created)
    return rec.missing, len(rec.seen)


def _meta(t):
    return t.to("meta") if isinstance(t, torch.Tensor) else {k: v.to("meta") for k, v in t.items()}


# ------------------------------------------------------------------ the netdiet zoo (meta device)
@pytest.mark.parametrize("name", [e.name for e in list_models()])
def test_every_zoo_model_op_has_a_formula(name):
    with torch.device("meta"):
        model = create_model(name)
    shape, dtype, high = default_inputs(name, {})
    shape = (2,) + tuple(shape[1:])        # batch 2: BatchNorm trains on more than one value per channel
    x = _meta(make_inputs(shape, dtype, high=high))
    missing, seen = uncounted_ops(model, x)
    assert seen > 5 and missing == set(), f"{name}: no formula for {sorted(missing)}"


# ------------------------------------------------------------------ HF transformers from tiny configs
def _hf_cases():
    transformers = pytest.importorskip("transformers")
    t = transformers
    ids = lambda n=8: torch.randint(0, 96, (2, n), generator=torch.Generator().manual_seed(0))  # noqa: E731
    text = lambda: {"input_ids": ids(), "attention_mask": torch.ones(2, 8, dtype=torch.long)}  # noqa: E731
    common = dict(vocab_size=96, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32)
    return {
        "bert": (t.BertConfig(hidden_size=16, max_position_embeddings=16, **common), t.AutoModelForMaskedLM, text),
        "gpt2": (t.GPT2Config(vocab_size=96, n_embd=16, n_layer=1, n_head=4, n_positions=16, bos_token_id=0,
                              eos_token_id=0), t.AutoModelForCausalLM, text),
        "llama_gqa": (t.LlamaConfig(hidden_size=16, num_key_value_heads=2, max_position_embeddings=16, **common),
                      t.AutoModelForCausalLM, text),
        "t5": (t.T5Config(vocab_size=96, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4),
               t.AutoModelForSeq2SeqLM, lambda: {"input_ids": ids(), "decoder_input_ids": ids(4)}),
        "vit": (t.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32,
                            image_size=16, patch_size=8), t.AutoModelForImageClassification,
                lambda: {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}),
    }


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama_gqa", "t5", "vit"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_hf_architecture_op_has_a_formula(arch, attn):
    config, auto, inputs = _hf_cases()[arch]
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = auto.from_config(config)
    missing, seen = uncounted_ops(model, inputs())
    assert seen > 10 and missing == set(), f"{arch} ({attn} attention): no formula for {sorted(missing)}"


# ------------------------------------------------------------------ torchvision and timm, where they import
def _import(name: str):
    try:
        return __import__(name)
    except Exception as exc:   # PyPI's torchvision raises at import beside a torch it was not built for
        pytest.skip(f"{name} does not import here ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                    "benchmarks/zoo_coverage.py runs it in a venv where it does")


def _build_on_meta(factory):
    try:
        with torch.device("meta"):
            return factory()
    except Exception:        # a constructor that reads tensor values (RegNet's widths): build for real, then move
        return factory().to("meta")


TORCHVISION_FEW = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny", "swin_t",
                   "vit_b_16", "inception_v3"]


def _check_torchvision(name: str):
    tv = _import("torchvision")
    model = _build_on_meta(lambda: tv.models.get_model(name))
    side = 299 if name == "inception_v3" else 224
    missing, _ = uncounted_ops(model, torch.empty(2, 3, side, side, device="meta"))
    return missing


def _failures(names, check) -> dict:
    """{model: its ops without a formula} over names, only the models with some."""
    found = {name: sorted(check(name)) for name in names}
    return {name: missing for name, missing in found.items() if missing}


@pytest.mark.parametrize("name", TORCHVISION_FEW)
def test_torchvision_representatives_ops_have_formulas(name):
    missing = _check_torchvision(name)
    assert missing == set(), f"torchvision {name}: no formula for {sorted(missing)}"


@pytest.mark.slow
def test_every_torchvision_classification_model_op_has_a_formula():
    tv = _import("torchvision")
    assert _failures(tv.models.list_models(module=tv.models), _check_torchvision) == {}


TIMM_FAMILIES = {"convnext": "convnext", "efficientnet": "efficientnet", "vit": "vision_transformer",
                 "swin": "swin_transformer", "swinv2": "swin_transformer_v2",
                 "mobilenetv3": "mobilenetv3", "regnet": "regnet", "resnet": "resnet"}
TIMM_FEW = ["convnext_atto", "efficientnet_b0", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
            "mobilenetv3_small_100", "regnety_002", "resnet18", "resnetblur18"]


def _check_timm(name: str):
    timm = _import("timm")
    model = _build_on_meta(lambda: timm.create_model(name, pretrained=False))
    side = model.pretrained_cfg.get("input_size", (3, 224, 224))
    missing, _ = uncounted_ops(model, torch.empty(2, *side, device="meta"))
    return missing


@pytest.mark.parametrize("name", TIMM_FEW)
def test_timm_representatives_ops_have_formulas(name):
    missing = _check_timm(name)
    assert missing == set(), f"timm {name}: no formula for {sorted(missing)}"


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TIMM_FAMILIES))
def test_every_timm_model_of_the_common_families_op_has_a_formula(family):
    timm = _import("timm")
    assert _failures(timm.list_models(module=TIMM_FAMILIES[family]), _check_timm) == {}


# ------------------------------------------------------------------ the check itself can fail
def test_an_op_without_a_formula_is_reported():
    class Cumprod(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4))

        def forward(self, x):
            return torch.cumprod(x * self.w, 0)      # aten.cumprod has no formula (tests/test_ops.py)

    missing, _ = uncounted_ops(Cumprod(), torch.randn(4))
    assert "aten.cumprod" in missing


def test_attention_with_wider_values_counts_the_same_on_meta_as_on_cpu():
    # timm's differential attention (vit_d*) gives F.scaled_dot_product_attention values twice the query head size;
    # the CPU flash op's meta output has q's head size, so the counter must not route such a call to it on meta
    # (it failed "normalized_shape=[64] ... got [.., 32]"); CPU runs the math path: bmm B·H·Lq·Lk·E + B·H·Lq·Lk·Ev
    from netdiet.analysis.counter import count_ops

    class Attend(torch.nn.Module):
        def forward(self, q, v):
            return torch.nn.functional.scaled_dot_product_attention(q, q, v)

    q, v = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 8)
    cpu = count_ops(Attend(), (q, v))
    meta = count_ops(Attend(), (q.to("meta"), v.to("meta")))
    assert cpu.macs == meta.macs == 2 * 8 * 8 * (4 + 8)
