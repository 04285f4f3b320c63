"""Tensor-parallel split (analysis/tensor_parallel.py): hand counts of the per-rank parameters, activations and
all-reduce messages, the refusals, and (slow) the real layout run by torch.distributed.tensor.parallel."""
import pytest
import torch
from torch import nn

from netdiet.analysis.memory import estimate_memory
from netdiet.analysis.tensor_parallel import find_regions, measure_split, split, tp_heads
from netdiet.errors import NetdietError
from netdiet.models.registry import create_model
from netdiet.models.zoo import transformer


@pytest.fixture(scope="module")
def tiny():
    """layers=1, d_model=8, heads=4, seq_len=4, vocab=16 (d_ff=32), batch 2 -> 8 tokens, fp32."""
    net = transformer(layers=1, d_model=8, heads=4, seq_len=4, vocab=16)
    return net, estimate_memory(net, torch.randint(0, 16, (2, 4)))


def test_parameter_split_equals_hand_count(tiny):
    net, est = tiny
    # elements: tok 16x8=128, pos 4x8=32, ln1 16, qkv 24x8+24=216, proj 8x8+8=72, ln2 16, mlp.0 32x8+32=288,
    # mlp.2 8x32+8=264, ln_f 16, head 16x8=128 -> 1176 elements = 4704 B on one device
    assert est.weights == 4704
    one = split(net, 1, est)
    assert (one["sharded_params"], one["replicated_params"]) == (0, 4704)
    s = split(net, 2, est)
    # sharded per rank: tok 64 (vocab rows) + qkv 108 (weight and bias by output) + proj weight 32 (by input)
    #   + mlp.0 144 + mlp.2 weight 128 + head 64 (vocab) = 540 elements = 2160 B
    # replicated: pos 32 + ln1 16 + proj bias 8 + ln2 16 + mlp.2 bias 8 + ln_f 16 = 96 elements = 384 B
    assert (s["sharded_params"], s["replicated_params"], s["params_per_rank"]) == (2160, 384, 2544)
    assert s["per_module"]["blocks.0.attn.qkv"]["rule"] == "colwise"
    # mlp.2: weight 8x32 split by input (128 elements = 512 B), bias 8 whole (32 B); its saved input 1024 B / 2;
    # its forward all-reduce 8 tokens x 8 x 4 B
    assert s["per_module"]["blocks.0.mlp.2"] == {"rule": "rowwise", "sharded_params": 512, "replicated_params": 32,
                                                 "activations": 512, "all_reduce": 256}
    flat = split(net, 2, est, vocab_parallel=False)   # embedding and head replicated: + 64 + 64 elements
    assert (flat["sharded_params"], flat["replicated_params"]) == (2160 - 512, 384 + 1024)


def test_activation_split_equals_hand_count(tiny):
    net, est = tiny
    # what the single-device estimate saved (fp32, batch 2 x seq 4): attention q,k,v,out 4 x (2x4x4x2)x4 B + the
    # log-sum-exp 2x4x4x4 B = 1152; GELU input and mlp.2 input 2x4x32x4 = 1024 each; each LayerNorm its input 256 +
    # mean/rstd 64; qkv, mlp.0 and head their input 256; the loss log_softmax 8x16x4=512 + target 64 + weight 4 = 580
    acts = est.module_activations
    assert acts["blocks.0.attn"] == 1152 and acts["blocks.0.mlp.1"] == acts["blocks.0.mlp.2"] == 1024
    assert acts["(outside the model)"] == 580 and acts["blocks.0.ln1"] == 320 and acts["blocks.0.attn.qkv"] == 256
    s = split(net, 2, est)
    # split by 2: attention 576 + GELU 512 + mlp.2 512 + log_softmax 256 = 1856
    # replicated: 3 LayerNorms 960 + qkv/mlp.0/head inputs 768 + position arange 32 + target and weight 68 = 1828
    assert (s["activations_sharded"], s["activations_replicated"]) == (1856, 1828)
    assert s["activations_per_rank"] == 3684 and split(net, 1, est)["activations_per_rank"] == est.activations


def test_activation_split_under_autocast_splits_the_weight_copies():
    net = transformer(layers=1, d_model=8, heads=4, seq_len=4, vocab=16)
    est = estimate_memory(net, torch.randint(0, 16, (2, 4)), amp=True)
    # bf16 autocast: each projection also saves its bf16 weight copy, which a rank holds for its shard only
    # qkv: input 8x8x2 = 128 B (whole on every rank) + weight copy 24x8x2 = 384 B (split)
    assert est.module_activations["blocks.0.attn.qkv"] == 128 + 384
    s = split(net, 2, est)
    assert s["per_module"]["blocks.0.attn.qkv"]["activations"] == 128 + 192
    # split: qkv copy 192 + attention (bf16 q,k,v,out 512 + fp32 lse 128) / 2 = 320 + proj copy 128 / 2 = 64
    #   + mlp.0 copy 512 / 2 = 256 + GELU input 512 / 2 = 256 + mlp.2 (input 512 + copy 512) / 2 = 512
    #   + head copy 256 / 2 = 128 + fp32 log_softmax 512 / 2 = 256 -> 1984
    # whole: qkv, mlp.0, head inputs 3 x 128 + 3 LayerNorms 960 + pos 32 + target and weight 68 -> 1444
    assert (s["activations_sharded"], s["activations_replicated"]) == (1984, 1444)
    # bf16 messages: 8 tokens x 8 x 2 B = 128, six of them, + loss_parallel's fp32 3 x 8 x 4 = 96
    assert s["activation_bytes_per_element"] == 2 and s["all_reduce_bytes_per_step"] == 6 * 128 + 96


def test_split_of_a_checkpointed_estimate():
    net = transformer(layers=2, d_model=8, heads=4, seq_len=4, vocab=16)
    est = estimate_memory(net, torch.randint(0, 16, (2, 4)), checkpointing=True)
    # checkpointing keeps each block's input (8 tokens x 8 x 4 B = 256) and nothing inside the regions, so the
    # tokens come from the loss: log_softmax 8 x 16 x 4 + targets 8 x 8 + weight 4 = 580 -> 8 tokens
    assert est.module_activations == {"(outside the model)": 580, "ln_f": 320, "blocks.0": 256, "blocks.1": 256,
                                      "head": 256, "pos": 32}
    s = split(net, 2, est)
    # per rank: log_softmax 512 / 2 + 68, everything else whole: 324 + 320 + 2 x 256 + 256 + 32
    assert s["tokens"] == 8 and s["activations_per_rank"] == 1444
    # 4 regions: forward 4 + embedding, backward 4 + head, 256 B each, + loss_parallel 96
    assert s["all_reduce_bytes_per_step"] == 10 * 256 + 96


def test_all_reduce_bytes_equal_hand_count(tiny):
    net, est = tiny
    s = split(net, 2, est)
    # 8 tokens x d_model 8 x 4 B = 256 B a message. forward: attention-out, MLP-down, the vocab-parallel embedding
    # (3 x 256) + loss_parallel's max, sum-exp, target logit 3 x 8 x 4 B = 864; backward: the two region inputs and
    # the LM head input 3 x 256 = 768
    assert s["tokens"] == 8
    assert (s["all_reduce_forward"], s["all_reduce_backward"], s["all_reduce_bytes_per_step"]) == (864, 768, 1632)
    assert s["all_reduce_count"] == 9                      # 2 regions x 2 + embedding + head + 3 loss
    assert s["all_reduce_sent_per_rank"] == 1632           # ring: 2 (tp-1)/tp = 1 x the messages at tp 2
    assert split(net, 4, est)["all_reduce_sent_per_rank"] == 1632 * 3 // 2
    assert split(net, 1, est)["all_reduce_bytes_per_step"] == 0


def test_uneven_vocab_is_the_largest_rank():
    net = transformer(layers=1, d_model=8, heads=4, seq_len=4, vocab=17)
    s = split(net, 2, None, tokens=8)
    # DTensor shards like torch.chunk: 17 rows -> 9 on rank 0; embedding and head 9 x 8 elements each instead of
    # 8 x 8 -> 2160 B (the even case above) + 2 x 8 x 4 B
    assert s["sharded_params"] == 2160 + 64
    assert any(n.startswith("tok: dimension 17 does not divide by tp=2; the largest rank holds 9") for n in s["notes"])


def test_refuses_a_degree_the_heads_do_not_divide(tiny):
    net, est = tiny
    with pytest.raises(NetdietError, match=r"--tp 3 does not divide the model's 4 attention heads and 4 KV heads; "
                                           r"choose one of: 1, 2, 4$"):
        split(net, 3, est)
    with pytest.raises(NetdietError, match="positive integer"):
        split(net, 0, est)
    with pytest.raises(NetdietError, match="no attention or MLP projections"):
        split(nn.Sequential(nn.Conv2d(1, 4, 3)), 2, None)


def test_hf_llama_gqa_and_gpt2_conv1d_tied():
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100))
        gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100,
                                                                    n_positions=32))
    assert tp_heads(llama) == (4, 2) and tp_heads(gpt2) == (4, 4)
    with pytest.raises(NetdietError, match="4 attention heads and 2 KV heads; choose one of: 1, 2$"):
        split(llama, 4, None, tokens=8)
    s = split(llama, 2, None, tokens=8)
    # Llama (no biases): embed 100x64 + q 64x64 + k 32x64 + v 32x64 + o 64x64 + gate/up/down 3 x 128x64 + lm_head
    # 100x64 = 49664 elements split in 2 = 24832 -> 99328 B; two RMSNorms + the final norm 3 x 64 -> 768 B
    assert (s["sharded_params"], s["replicated_params"]) == (99328, 768)
    # messages: 8 tokens x 64 x 4 B = 2048: 2 regions both ways + embedding + head = 6 x 2048 + loss 96
    assert s["all_reduce_bytes_per_step"] == 6 * 2048 + 96
    g = split(gpt2, 2, None, tokens=8)
    # GPT-2 (Conv1D weights are (in, out)): wte 6400 (tied to lm_head: once) + c_attn 64x192+192 + attn c_proj
    # 64x64 + c_fc 64x256+256 + mlp c_proj 256x64 = 56000 elements split -> 112000 B; replicated: wpe 32x64 +
    # the two c_proj biases 64 + 64 + three LayerNorms 3 x 128 = 2560 elements -> 10240 B
    assert (g["sharded_params"], g["replicated_params"]) == (112000, 10240)
    assert [r.row for r in find_regions(gpt2)] == ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"]
    # what runs on the all-reduced output (replicated): GPT-2's resid_dropout and mlp.dropout, not attn_dropout;
    # Llama's act_fn is registered after down_proj but runs before it (split)
    assert [r.after for r in find_regions(gpt2)] == [["transformer.h.0.attn.resid_dropout"],
                                                     ["transformer.h.0.mlp.dropout"]]
    assert [r.after for r in find_regions(llama)] == [[], []]


def test_multihead_attention_heads():
    net = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    assert tp_heads(net) == (2, 2)
    s = split(net, 2, None, tokens=4)
    # in_proj 24x8 + 24 split by output rows -> 108 elements; out_proj weight 8x8 by input -> 32; its bias 8 whole
    assert (s["sharded_params"], s["replicated_params"]) == ((108 + 32) * 4, 8 * 4)


@pytest.mark.slow
def test_measured_tensor_parallel_matches_the_split():
    """torch's parallelize_module on 2 gloo processes, zoo transformer preset tiny, batch 2 (128 tokens)."""
    net = transformer("tiny")
    est = estimate_memory(net, torch.randint(0, 1000, (2, 64)))
    _check_measured(split(net, 2, est), measure_split("transformer", {"preset": "tiny"}, batch=2, tp=2))


@pytest.mark.slow
def test_measured_tensor_parallel_hf_llama(tmp_path):
    """A 2-layer Llama with grouped KV heads (transformers, from a config folder) on 2 gloo processes."""
    transformers = pytest.importorskip("transformers")
    transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=1000, max_position_embeddings=64,
                             architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    spec = f"hf:{tmp_path}"
    net = create_model(spec)
    est = estimate_memory(net, torch.randint(0, 1000, (2, 32)))
    s = split(net, 2, est)
    # q/k/v and gate/up each take the region input: one backward all-reduce per region, as counted (5, not 11)
    assert s["all_reduce_count"] == 2 * 2 * 2 + 2 + 3
    _check_measured(s, measure_split(spec, batch=2, tp=2, seq=32))


def _check_measured(s: dict, measured: dict) -> None:
    want = sorted((m["phase"], m["bytes"]) for m in s["messages"])
    for rank in measured["ranks"]:
        assert rank["max_abs_diff_vs_unsharded"] < 1e-5          # the layout computes the unsharded model's output
        assert rank["param_bytes"] == s["params_per_rank"]       # exact
        # activations: within 2 % (measured on the real local shards)
        assert abs(rank["activations"] - s["activations_per_rank"]) <= 0.02 * s["activations_per_rank"]
        got = sorted((c["phase"], c["bytes"]) for c in rank["collectives"] if c["kind"] == "all_reduce")
        assert got == want
        assert {c["kind"] for c in rank["collectives"]} == {"all_reduce"}
