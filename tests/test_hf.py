"""HF transformers (and timm) models through netdiet, as a user brings them: `hf:FOLDER` specs built from a
config (no weights, nothing downloaded), their default inputs, forward MACs against a count written out by hand,
the training-memory estimate against `--measure`, the CLI end to end, and every bad input as one line, exit 2.

The configs are written here (2 layers, hidden 64, 4 heads of 16, vocabulary 1000) so the file stays fast.
What is a MAC (README, "Units and formulas"): one multiply-accumulate of a matmul, linear, convolution or
attention (QK^T and AV). Embedding lookups, layer/RMS norms, activations, softmax, bias and residual adds and the
rotary embedding (an elementwise outer product in transformers 5) are FLOPs, not MACs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import netdiet
from netdiet.analysis.memory import MetaDeviceLimit, estimate_memory
from netdiet.analysis.profile import prepare_call
from netdiet.cli import main
from netdiet.errors import NetdietError

torch.set_num_threads(1)

B, T, D, H, HD, V, L = 2, 16, 64, 4, 16, 1000, 2   # batch, tokens, hidden, heads, head dim, vocabulary, layers


def _configs() -> dict[str, transformers.PretrainedConfig]:
    return {
        "gpt2": transformers.GPT2Config(n_layer=L, n_embd=D, n_head=H, vocab_size=V, n_positions=128,
                                        bos_token_id=0, eos_token_id=0, architectures=["GPT2LMHeadModel"]),
        "llama": transformers.LlamaConfig(num_hidden_layers=L, hidden_size=D, intermediate_size=128,
                                          num_attention_heads=H, num_key_value_heads=2, vocab_size=V,
                                          max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
                                          architectures=["LlamaForCausalLM"]),
        "bert": transformers.BertConfig(num_hidden_layers=L, hidden_size=D, intermediate_size=128,
                                        num_attention_heads=H, vocab_size=V, architectures=["BertForMaskedLM"]),
        "t5": transformers.T5Config(num_layers=L, num_decoder_layers=L, d_model=D, d_ff=128, num_heads=H, d_kv=HD,
                                    vocab_size=V, eos_token_id=1, pad_token_id=0, decoder_start_token_id=0,
                                    architectures=["T5ForConditionalGeneration"]),
        "vit": transformers.ViTConfig(num_hidden_layers=L, hidden_size=D, intermediate_size=128,
                                      num_attention_heads=H, image_size=32, patch_size=8, num_labels=10,
                                      architectures=["ViTForImageClassification"]),
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, config in _configs().items():
        config.save_pretrained(root / name)
        out[name] = root / name
    return out


# ------------------------------------------------------------------ forward MACs, written out by hand
CAUSAL_PAIRS = T * (T + 1) // 2   # query i attends keys 0..i: the CPU flash kernel computes only those pairs

HAND_MACS = {
    # per token per layer: c_attn D x 3D + attention c_proj D x D + c_fc D x 4D + mlp c_proj 4D x D = 12 D^2
    #   = 49,152; x B*T = 32 tokens x L = 2: 3,145,728
    # attention (causal SDPA): per head and pair QK^T HD + AV HD: B*H*136*32 = 34,816 per layer, x 2 = 69,632
    # LM head D x V per token: 32 * 64 * 1000 = 2,048,000
    "gpt2": (L * B * T * 12 * D * D + L * B * H * CAUSAL_PAIRS * 2 * HD + B * T * D * V, 5_263_360),
    # q D x 4*16 (4,096), k and v D x 2*16 (2,048 each, GQA: 2 key/value heads), o 4,096, SwiGLU gate, up
    #   D x 128 and down 128 x D (8,192 each): 36,864 per token per layer -> x 32 x 2 = 2,359,296
    # attention (causal SDPA; the query heads attend): 2 * 4 * 136 * 32 = 34,816 per layer -> 69,632
    # LM head 2,048,000; the rotary embedding multiplies positions by frequencies elementwise: no MAC
    "llama": (L * B * T * (4096 + 2048 + 2048 + 4096 + 3 * 8192) + L * B * H * CAUSAL_PAIRS * 2 * HD
              + B * T * D * V, 4_476_928),
    # Q, K, V, O D x D (4 x 4,096) + intermediate D x 128 + output 128 x D (2 x 8,192): 32,768 per token per
    #   layer -> 2,097,152; attention bidirectional (the all-ones mask is dropped): B*H*T*T*2*HD = 65,536
    #   per layer -> 131,072; MLM head: transform D x D (131,072) + decoder D x V (2,048,000); no pooler
    "bert": (L * B * T * 32768 + L * B * H * T * T * 2 * HD + B * T * D * D + B * T * D * V, 4_407_296),
    # encoder per token per layer: q k v o 4 x 4,096 + FFN wi D x 128 + wo 128 x D: 32,768 -> 2,097,152;
    #   attention (T5 computes QK^T and AV with matmuls: every pair): 65,536 per layer -> 131,072
    # decoder per token per layer: self q k v o 16,384 + cross q and o 8,192 + FFN 16,384 = 40,960, plus the
    #   cross-attention k and v over the encoder's tokens 8,192 per encoder token: (40,960 + 8,192) x 32 =
    #   1,572,864 per layer -> 3,145,728; self (all pairs, masked after the matmul) and cross attention
    #   65,536 each per layer -> 262,144; LM head 2,048,000
    "t5": (L * B * T * 32768 + L * B * H * T * T * 2 * HD + L * B * T * (40960 + 8192)
           + L * 2 * B * H * T * T * 2 * HD + B * T * D * V, 7_684_096),
    # patch embedding conv 8x8 stride 8 on 32x32: 16 patches x 64 out x 3*8*8 = 196,608 per image -> 393,216
    # 17 tokens (16 patches + CLS): per token per layer 32,768 (as BERT) -> 2 x 34 x 32,768 = 2,228,224;
    #   attention B*H*17*17*2*HD = 73,984 per layer -> 147,968; classifier on CLS only: B x D x 10 = 1,280
    "vit": (B * 16 * 64 * 3 * 8 * 8 + L * B * 17 * 32768 + L * B * H * 17 * 17 * 2 * HD + B * D * 10, 2_770_688),
}

# which inputs each model is profiled with: None = its default (input_ids + attention_mask, decoder_input_ids for
# T5, pixel_values for ViT) at batch B x seq-len T; GPT-2 gets input_ids only
INPUTS = {"gpt2": {"input_ids": f"{B},{T}:int64"}, "llama": None, "bert": None, "t5": None, "vit": None}
# where the memory step is simulated: transformers' masking utilities ask .item() whether an attention mask is all
# ones; the real inputs' twins answer on meta (analysis/meta_values.py), so every model here runs on meta
SIMULATION = {"gpt2": "meta", "llama": "meta", "bert": "meta", "t5": "meta", "vit": "meta"}

_RESULTS: dict[str, dict] = {}


def _profiled(folders, name: str) -> dict:
    if name not in _RESULTS:
        inputs = INPUTS[name]
        kw = {} if inputs is not None else {"batch_size": B, **({"seq_len": T} if name != "vit" else {})}
        r = netdiet.profile(f"hf:{folders[name]}", inputs, measure=True, repeats=1, warmup=0, progress=False, **kw)
        _RESULTS[name] = r.to_dict()
    return _RESULTS[name]


@pytest.mark.parametrize("name", list(HAND_MACS))
def test_forward_macs_equal_the_hand_count(folders, name):
    expression, written = HAND_MACS[name]
    assert expression == written
    doc = _profiled(folders, name)
    assert doc["totals"]["macs"] == written
    assert doc["uncounted"] == {}, f"ops without a formula in {name}: {doc['uncounted']}"
    assert doc["model"]["built_on"] == "meta" and doc["training_unavailable"] is None


@pytest.mark.parametrize("name", list(HAND_MACS))
def test_training_memory_estimate_is_within_5_percent_of_measured(folders, name):
    m = _profiled(folders, name)["memory"]
    assert m["not_estimated"] is None and m["peak_measured"] and m["batch_size"] == B
    assert abs(m["estimate_error"]) < 0.05, (name, m["peak_estimated"], m["peak_measured"])
    assert abs(m["inference_peak"] - m["inference_peak_measured"]) < 0.05 * m["inference_peak_measured"]
    assert m["simulation"] == SIMULATION[name]
    if m["simulation"] == "cpu":
        assert "value-dependent" in m["simulation_reason"] and "item()" in m["simulation_reason"]
    else:
        assert m["simulation_reason"] is None


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_spec_kept_on_the_meta_device_keeps_its_mask_and_equals_the_cpu_build(folders, name, monkeypatch):
    # a spec over the size threshold stays on meta; its default all-ones mask carries its values there
    # (models.inputs.make_input), so transformers' .item() on it is answered and the profile is the CPU build's.
    # Llama's grouped-query attention runs as the CPU flash kernel on meta too: the causal pairs of the hand count
    spec = f"hf:{folders[name]}"
    cpu = netdiet.profile(spec, seq_len=T, batch_size=B, progress=False).to_dict()
    monkeypatch.setattr("netdiet.analysis.profile.META_THRESHOLD_BYTES", 0)
    doc = netdiet.profile(spec, seq_len=T, batch_size=B, progress=False).to_dict()
    assert doc["device"] == "meta" and cpu["device"] == "cpu"
    assert doc["inputs"] == cpu["inputs"] == [{"name": n, "shape": [B, T], "dtype": "int64"}
                                              for n in ("input_ids", "attention_mask")]
    assert doc["model"].get("inputs_note") is None
    assert doc["totals"]["macs"] == HAND_MACS[name][1] and doc["memory"]["simulation"] == "meta"
    assert doc["totals"] == cpu["totals"] and doc["operators"] == cpu["operators"]
    for key in ("peak_estimated", "inference_peak", "activations", "temporaries"):
        assert doc["memory"][key] == cpu["memory"][key], key
    if name == "gpt2":   # the budget search's meta inputs at each batch carry the mask's values too
        on_meta = netdiet.profile(spec, seq_len=T, batch_size=B, max_batch_for="5MiB", progress=False).max_batch
        monkeypatch.undo()
        assert on_meta == netdiet.profile(spec, seq_len=T, batch_size=B, max_batch_for="5MiB",
                                          progress=False).max_batch


def test_default_inputs_follow_the_config(folders):
    doc = _profiled(folders, "t5")
    assert doc["inputs"] == [{"name": n, "shape": [B, T], "dtype": "int64"}
                             for n in ("input_ids", "attention_mask", "decoder_input_ids")]
    assert _profiled(folders, "vit")["inputs"] == [{"name": "pixel_values", "shape": [B, 3, 32, 32],
                                                    "dtype": "float32"}]
    model = netdiet.create_model(f"hf:{folders['bert']}")
    call = prepare_call(None, f"hf:{folders['bert']}", {}, None, torch.device("cpu"), 0, model=model, seq_len=128)
    ids, mask = call.kwargs["input_ids"], call.kwargs["attention_mask"]
    assert ids.shape == (1, 128) and ids.dtype == torch.int64 and mask.shape == (1, 128)
    assert 0 <= int(ids.min()) and int(ids.max()) < V and int(ids.max()) > 2   # drawn below the vocabulary
    assert bool((mask == 1).all())                                              # every position attended
    # a bare shape for an hf: text model is token ids
    call = prepare_call(["3,8"], f"hf:{folders['bert']}", {}, None, torch.device("cpu"), 0, model=model)
    assert call.flat[0].dtype == torch.int64 and int(call.flat[0].max()) < V


def test_head_and_config_fields_are_overridden_by_model_kw(folders):
    spec = f"hf:{folders['gpt2']}"
    base = netdiet.create_model(spec, task="base", n_layer=1)
    assert type(base).__name__ == "GPT2Model" and base.config.n_layer == 1 and len(base.h) == 1
    head = netdiet.create_model(spec, scale_attn_weights="false")
    assert type(head).__name__ == "GPT2LMHeadModel" and head.config.scale_attn_weights is False


def test_a_hub_name_in_the_local_cache_is_found_without_downloading(folders, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    snapshot = tmp_path / "models--tiny--gpt2" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((folders["gpt2"] / "config.json").read_text())
    (tmp_path / "models--tiny--gpt2" / "refs").mkdir()
    (tmp_path / "models--tiny--gpt2" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    model = netdiet.create_model("hf:tiny/gpt2")
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_embd == D


def test_cli_profile_hf_folder_with_a_named_input_and_measure(folders, tmp_path, capsys):
    out = tmp_path / "p.json"
    code = main(["profile", f"hf:{folders['gpt2']}", "--input", "input_ids=2,64:int64", "--measure",
                 "--repeats", "1", "--warmup", "0", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == "netdiet.profile/1"
    assert doc["model"]["spec"] == f"hf:{folders['gpt2']}" and doc["model"]["class"] == "GPT2LMHeadModel"
    assert doc["inputs"] == [{"name": "input_ids", "shape": [2, 64], "dtype": "int64"}]
    # the GPT-2 hand count above at T = 64: 2 x 128 x 49,152 + 2 x 2 x 4 x 2,080 x 32 + 128 x 64 x 1000
    assert doc["totals"]["macs"] == 2 * 128 * 49152 + 2 * 2 * 4 * (64 * 65 // 2) * 32 + 128 * 64 * 1000 == 21_839_872
    m = doc["memory"]
    assert m["simulation"] == "meta" and m["peak_measured"] and abs(m["estimate_error"]) < 0.05
    assert doc["latency"] is not None and doc["training_unavailable"] is None


# ------------------------------------------------------------------ the meta simulation's fallback
class _Gate(nn.Module):
    """A forward that reads values (.tolist()) to decide what to keep, values of what a weight computed: no real
    twin has them (an input's values would be answered on meta, see tests/test_meta_values.py)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        y = self.fc(x)
        kept = [row for row, total in enumerate(y.sum(dim=1).tolist()) if total > -1e9]
        return y[kept]


def test_a_value_read_on_the_meta_device_needs_a_real_model_and_room_for_it(monkeypatch):
    with torch.device("meta"):
        meta_model = _Gate()
    with pytest.raises(MetaDeviceLimit, match="on the meta device, so no real-tensor step"):
        estimate_memory(meta_model, torch.empty(2, 5, device="meta"), real_step_bytes=10_000)
    with pytest.raises(MetaDeviceLimit, match="value-dependent op"):   # no bound given: the caller decides
        estimate_memory(_Gate(), torch.randn(2, 5))
    monkeypatch.setattr("netdiet.analysis.memory.available_ram", lambda: 100)
    with pytest.raises(MetaDeviceLimit, match="needs up to 9.77 KiB but only 100 B of RAM"):
        estimate_memory(_Gate(), torch.randn(2, 5), real_step_bytes=10_000)
    r = netdiet.profile(_Gate(), (2, 5), progress=False)   # the profile keeps its MACs and says why
    assert r.totals["macs"] == 50 and "of RAM is available" in r.memory["not_estimated"]


def test_the_real_step_fallback_leaves_the_random_state_alone():
    model, x = nn.Sequential(_Gate(), nn.Dropout(0.5)), torch.randn(4, 5)
    state = torch.get_rng_state()
    est = estimate_memory(model, x, real_step_bytes=1 << 20)   # the real step draws dropout masks
    assert est.simulation == "cpu" and torch.equal(state, torch.get_rng_state())


def test_the_budget_search_with_a_mask_agrees_with_the_search_without(folders, monkeypatch):
    # the search's meta inputs carry no mask values: each batch it tries gets the real inputs, whose twins answer
    spec = f"hf:{folders['gpt2']}"
    with_mask = netdiet.profile(spec, seq_len=8, max_batch_for="5MiB", progress=False)   # input_ids + mask
    without = netdiet.profile(spec, {"input_ids": "1,8:int64"}, max_batch_for="5MiB", progress=False)
    assert with_mask.memory["simulation"] == "meta" and without.memory["simulation"] == "meta"
    # only the inputs at each tried batch must be real (int64 ids + mask, 128 B per sample), not a real step: a
    # RAM far below a step's peak does not stop the search (it did while a real-tensor step stood in)
    monkeypatch.setattr("netdiet.analysis.profile.available_ram", lambda: 256 << 10)
    assert netdiet.profile(spec, seq_len=8, max_batch_for="5MiB", progress=False).max_batch == with_mask.max_batch
    # the mask adds 8 int64 = 64 bytes per sample: the same largest batch, peaks within 1 %
    a, b = with_mask.max_batch, without.max_batch
    assert a["fits"] and a["batch_size"] == b["batch_size"] > 2
    assert abs(a["peak_estimated"] - b["peak_estimated"]) < 0.01 * b["peak_estimated"]


# ------------------------------------------------------------------ bad input: one line, exit 2
def _bad(capsys, argv: list[str], *phrases: str) -> None:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("[transformers]")]   # transformers' own config notes
    assert code == 2 and len(err) == 1 and err[0].startswith("netdiet: error:"), (code, err)
    for phrase in phrases:
        assert phrase in err[0], (phrase, err[0])


def test_unknown_hf_folder(capsys, tmp_path):
    _bad(capsys, ["profile", "hf:./no/such/folder"], "model folder ./no/such/folder does not exist")
    _bad(capsys, ["profile", f"hf:{tmp_path}"], "has no config.json")


def test_a_hub_name_not_cached_says_to_pass_a_folder(capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    _bad(capsys, ["profile", "hf:someone/some-model"], "not in the local HF cache", "never downloads",
         "pass a folder")


def test_a_config_transformers_rejects(capsys, folders, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((folders["gpt2"] / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "n_embd": 65}))   # 65 is not divisible by 4 heads
    _bad(capsys, ["profile", f"hf:{bad}"], "transformers rejected the config", "divisible")
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    _bad(capsys, ["profile", f"hf:{bad}"], "transformers cannot read the config")
    (bad / "config.json").write_text("{" + " " * (16 << 20) + "}")   # 16 MiB of nothing is no config
    _bad(capsys, ["profile", f"hf:{bad}"], "not a model config")
    _bad(capsys, ["profile", f"hf:{folders['gpt2']}", "--model-kw", "n_embd=abc"], "n_embd is an int")
    _bad(capsys, ["profile", f"hf:{folders['gpt2']}", "--model-kw", "n_emb=64"], "did you mean 'n_embd'")
    _bad(capsys, ["profile", f"hf:{folders['gpt2']}", "--model-kw", "task=masked-lm"], "no masked-lm head")
    _bad(capsys, ["profile", f"hf:{folders['gpt2']}", "--seq-len", "512"], "exceeds the model's 128 positions")
    # a layer count that would hang the build (each layer is a module, on meta too) is refused before it
    _bad(capsys, ["profile", f"hf:{folders['gpt2']}", "--model-kw", "n_layer=1000000000"], "more layers than")


def test_a_dtype_that_does_not_exist(capsys, folders):
    _bad(capsys, ["profile", f"hf:{folders['gpt2']}", "--input", "input_ids=2,16:int65"], "unknown dtype 'int65'")


def test_a_named_input_the_forward_does_not_take(capsys, folders):
    _bad(capsys, ["profile", f"hf:{folders['gpt2']}", "--input", "ids=2,16:int64"],
         "'ids' is not a parameter of GPT2LMHeadModel.forward(input_ids, past_key_values, attention_mask")


def test_seq_len_applies_to_hf_default_inputs_only(capsys, folders):
    _bad(capsys, ["profile", "lenet5", "--seq-len", "64"], "--seq-len sets the length of an hf: model")
    _bad(capsys, ["profile", f"hf:{folders['gpt2']}", "--seq-len", "64", "--input", "input_ids=1,8:int64"],
         "give the length in its shape")


def test_the_hf_extra_missing(capsys, folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)   # `import transformers` now raises ImportError
    with pytest.raises(NetdietError, match=r"pip install 'netdiet\[hf\]'"):
        netdiet.create_model(f"hf:{folders['gpt2']}")
    _bad(capsys, ["profile", f"hf:{folders['gpt2']}"], "needs the transformers package", "netdiet[hf]")


# ------------------------------------------------------------------ timm: where it imports
def _timm_importable() -> bool:
    try:
        import timm  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(_timm_importable(), reason="timm is installed here: its missing-extra message cannot show")
def test_the_timm_extra_missing(capsys):
    _bad(capsys, ["profile", "timm:resnet18"], "needs the timm package", "netdiet[timm]")


@pytest.mark.skipif(not _timm_importable(), reason="timm does not import here (it needs torchvision, which does "
                                                   "not import beside the torch 2.13.0 CPU build)")
def test_timm_resnet18_is_built_with_random_weights_and_counted():
    r = netdiet.profile("timm:resnet18", progress=False)
    # conv1 112^2 x 64 x 3 x 49 = 118,013,952; layer1 4 x 56^2 x 64 x 64 x 9 = 462,422,016; layers 2-4 each
    # 57,802,752 + 3 x 115,605,504 + downsample 6,422,528 = 411,041,792; fc 512 x 1000 = 512,000
    assert r.totals["params"] == 11_689_512 and r.inputs == [{"shape": [1, 3, 224, 224], "dtype": "float32"}]
    assert r.totals["macs"] == 118_013_952 + 462_422_016 + 3 * 411_041_792 + 512_000 == 1_814_073_344


@pytest.mark.slow
def test_gpt2_small_and_a_311m_llama_config_on_meta_equal_their_hand_counts(tmp_path, monkeypatch):
    """Real sizes, counted on the meta device (nothing allocated), default inputs of 1 x 128 tokens."""
    monkeypatch.setattr("netdiet.analysis.profile.META_THRESHOLD_BYTES", 0)
    transformers.GPT2Config(architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path / "gpt2")
    transformers.LlamaConfig(num_hidden_layers=4, hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
                             num_key_value_heads=4, vocab_size=32000,
                             architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "llama")
    gpt2 = netdiet.profile(f"hf:{tmp_path / 'gpt2'}", progress=False)
    # 12 layers x 128 tokens x 12 x 768^2 + 12 x 12 heads x 8,256 causal pairs x 2 x 64 + LM head 128 x 768 x 50,257
    assert gpt2.totals["params"] == 124_439_808
    assert gpt2.totals["macs"] == 12 * 128 * 12 * 768 * 768 + 12 * 12 * 8256 * 128 + 128 * 768 * 50257 \
        == 15_964_274_688
    llama = netdiet.profile(f"hf:{tmp_path / 'llama'}", progress=False)
    # per token per layer: q, o 2048^2; k, v 2048 x 512 (4 key/value heads of 128); gate, up, down 2048 x 5632
    # attention: 16 query heads x 8,256 causal pairs x 2 x 128; LM head 128 x 2048 x 32,000
    per_token = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 5632
    assert llama.totals["macs"] == 4 * 128 * per_token + 4 * 16 * 8256 * 256 + 128 * 2048 * 32000 == 31_609_323_520
    assert llama.memory["simulation"] == "meta" and llama.memory["peak_estimated"] > 4 * 4 * llama.totals["params"]
