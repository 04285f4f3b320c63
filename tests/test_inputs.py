"""Typed, named and dict inputs for `netdiet profile`, and what is still reported when a part cannot be known.

Every model here is small enough to count by hand; the hand count stands beside each assertion."""
import json
import textwrap

import pytest
import torch
from torch import nn

import netdiet
from netdiet.analysis.profile import prepare_call
from netdiet.cli import main
from netdiet.errors import NetdietError
from netdiet.models import InputSpec, input_specs, parse_input


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_exit_2(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


USER_MODELS = textwrap.dedent('''
    import torch
    from torch import nn


    class Pair(nn.Module):
        """Two named inputs, as a Hugging Face encoder takes them."""
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, input_ids, attention_mask):
            return self.fc(self.emb(input_ids) * attention_mask.unsqueeze(-1))


    class DictNet(nn.Module):
        """One argument: a dict of tensors."""
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.b = nn.Linear(5, 2)

        def forward(self, batch):
            return self.a(batch["x"]) + self.b(batch["y"])


    class LSTMText(nn.Module):
        def __init__(self, vocab=50, emb=8, hidden=16, classes=3):
            super().__init__()
            self.emb = nn.Embedding(vocab, emb)
            self.lstm = nn.LSTM(emb, hidden, batch_first=True)
            self.fc = nn.Linear(hidden, classes)

        def forward(self, ids):
            out, _ = self.lstm(self.emb(ids))
            return self.fc(out[:, -1])


    class RegNetLike(nn.Module):
        """Widths computed from a tensor with .tolist(), as torchvision's RegNet does: no meta build."""
        def __init__(self):
            super().__init__()
            widths = torch.linspace(8, 16, 2).round().int().tolist()   # [8, 16]
            self.fc1 = nn.Linear(4, widths[0])
            self.fc2 = nn.Linear(widths[0], widths[1])

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))


    class AuxBN(nn.Module):
        """An auxiliary head with batch norm that runs only in train mode, like inception_v3's AuxLogits."""
        def __init__(self):
            super().__init__()
            self.c = nn.Linear(4, 4)
            self.aux = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))

        def forward(self, x):
            y = self.c(x)
            return (y, self.aux(y)) if self.training else y


    def pair():
        return Pair()


    def dictnet():
        return DictNet()


    def lstm():
        return LSTMText()


    def regnet():
        return RegNetLike()


    def aux():
        return AuxBN()
''')


@pytest.fixture
def user_file(tmp_path):
    f = tmp_path / "nets.py"
    f.write_text(USER_MODELS)
    return f


# ------------------------------------------------------------------ parsing --input
def test_input_text_carries_shape_dtype_and_name():
    assert parse_input("1,128:int64") == InputSpec((1, 128), torch.int64)
    assert parse_input("1,3,224,224:bf16") == InputSpec((1, 3, 224, 224), torch.bfloat16)
    assert parse_input("attention_mask=2x6:float32") == InputSpec((2, 6), torch.float32, "attention_mask")
    assert parse_input("1,4") == InputSpec((1, 4), None)


def test_an_unknown_dtype_lists_the_valid_ones(capsys):
    code, _, err = run_cli(capsys, "profile", "lenet300", "--input", "1,784:int46")
    line = one_line_exit_2(code, err, "unknown dtype 'int46'", "int64", "bf16", "float32")
    assert "shape" not in line  # a dtype is not a shape


def test_a_dtype_written_as_a_size_is_named_a_dtype(capsys):
    code, _, err = run_cli(capsys, "profile", "lenet300", "--input", "1,784,int64")
    one_line_exit_2(code, err, "'int64'", "is a dtype, not a size", "1,784:int64")


def test_a_named_input_the_forward_does_not_take_names_the_forward_parameters(capsys, user_file):
    code, _, err = run_cli(capsys, "profile", f"{user_file}:pair", "--input", "input_idz=2,6:int64",
                           "--input", "attention_mask=2,6")
    one_line_exit_2(code, err, "'input_idz'", "Pair.forward(input_ids, attention_mask)")


def test_float_token_ids_are_blamed_on_the_dtype_not_the_shape(capsys, user_file):
    code, _, err = run_cli(capsys, "profile", f"{user_file}:lstm", "--input", "2,32")
    one_line_exit_2(code, err, "integer token ids", "float32", "--input 2,32:int64")


def test_api_refusal_of_a_non_input_names_its_type_not_its_values():
    with pytest.raises(NetdietError) as e:
        netdiet.profile(nn.Linear(3, 2), (torch.randn(2, 3), object()), progress=False)
    assert "object" in str(e.value) and "tensor(" not in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ named, dict and token inputs
def test_user_file_with_two_named_inputs_from_the_cli(capsys, user_file, tmp_path):
    out_json = tmp_path / "pair.json"
    code, out, err = run_cli(capsys, "profile", f"{user_file}:pair", "--input", "input_ids=2,6:int64",
                             "--input", "attention_mask=2,6", "--json", str(out_json))
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    assert doc["inputs"] == [{"name": "input_ids", "shape": [2, 6], "dtype": "int64"},
                             {"name": "attention_mask", "shape": [2, 6], "dtype": "float32"}]
    # fc on 2x6x4: 2*6*4*2 = 96 MACs; FLOPs: embedding*mask 2*6*4 = 48, addmm 2*96 + 2*6*2 bias = 216 -> 264
    assert doc["totals"]["macs"] == 96 and doc["totals"]["flops"] == 264
    assert doc["memory"]["peak_estimated"] > doc["memory"]["inference_peak"] > 0  # kwargs reach the estimate
    assert "input_ids=2x6 int64; attention_mask=2x6 float32" in out


def test_named_inputs_by_the_api_as_a_dict_agree_with_the_cli_counts(user_file):
    model = netdiet.create_model(f"{user_file}:pair")
    r = netdiet.profile(model, {"input_ids": torch.randint(0, 30, (2, 6)), "attention_mask": torch.ones(2, 6)},
                        progress=False)
    assert r.totals["macs"] == 96 and r.totals["flops"] == 264
    assert [i["name"] for i in r.inputs] == ["input_ids", "attention_mask"]
    assert "forward" not in model.__dict__  # the caller's model is left as it was


def test_forward_taking_a_dict(capsys, user_file):
    # a.x: 4x3 -> 4x2 = 24 MACs, b.y: 4x5 -> 4x2 = 40 MACs; at --batch-size 8 twice that: 128
    code, out, err = run_cli(capsys, "profile", f"{user_file}:dictnet", "--input", "x=4,3", "--input", "y=4,5")
    assert code == 0, err
    model = netdiet.create_model(f"{user_file}:dictnet")
    r = netdiet.profile(model, ({"x": (4, 3), "y": (4, 5)},), progress=False)
    assert r.totals["macs"] == 64 and [i["name"] for i in r.inputs] == ["x", "y"]
    r8 = netdiet.profile(model, {"x": "4,3", "y": "4,5"}, batch_size=8, progress=False)
    assert r8.totals["macs"] == 128 and r8.inputs[0]["shape"] == [8, 3]
    assert r8.memory["peak_estimated"] is not None


def test_lstm_text_classifier_from_the_cli_with_int64_tokens(capsys, user_file, tmp_path):
    out_json = tmp_path / "lstm.json"
    code, _, err = run_cli(capsys, "profile", f"{user_file}:lstm", "--input", "2,32:int64", "--json", str(out_json))
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    assert doc["inputs"] == [{"shape": [2, 32], "dtype": "int64"}]
    # LSTM: T*B*4H*(I + H) = 32*2*64*(8 + 16) = 98,304 MACs; fc on the last step: 2*16*3 = 96
    assert doc["totals"]["macs"] == 98_304 + 96
    assert doc["totals"]["backward_flops"] > 0 and doc["training_unavailable"] is None


def test_integer_inputs_are_drawn_below_the_first_embedding_size_or_input_range(user_file):
    model = netdiet.create_model(f"{user_file}:lstm")   # nn.Embedding(50, 8)
    ids = prepare_call("64,32:int64", None, None, None, torch.device("cpu"), 0, model=model).flat[0]
    assert ids.dtype == torch.int64 and int(ids.max()) < 50 and int(ids.max()) >= 40   # 2048 draws in [0, 50)
    ids = prepare_call(InputSpec((64, 32), torch.int64, high=7), None, None, None, torch.device("cpu"), 0,
                       model=model).flat[0]
    assert int(ids.max()) == 6


# ------------------------------------------------------------------ never lose what can be known
def test_constructor_that_reads_tensor_values_is_built_on_the_cpu(capsys, user_file, tmp_path):
    out_json = tmp_path / "regnet.json"
    code, _, err = run_cli(capsys, "profile", f"{user_file}:regnet", "--input", "1,4", "--json", str(out_json))
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    assert doc["model"]["built_on"] == "cpu" and "meta" in doc["model"]["built_on_reason"]
    assert doc["totals"]["macs"] == 4 * 8 + 8 * 16   # fc1 4->8, fc2 8->16 at batch 1: 160
    assert netdiet.profile("lenet300", progress=False).model["built_on"] == "meta"


def test_aux_batch_norm_at_batch_1_keeps_the_inference_figures(capsys, user_file, tmp_path):
    out_json = tmp_path / "aux.json"
    code, out, err = run_cli(capsys, "profile", f"{user_file}:aux", "--input", "1,4", "--json", str(out_json))
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    why = doc["training_unavailable"]
    assert "aux.1" in why and "BatchNorm1d" in why and "--batch-size 2" in why and "\n" not in why
    assert "training figures unavailable" in out
    # inference (eval: the aux head does not run): Linear 4->4 = 16 MACs, 2*16 + 4 bias = 36 FLOPs
    assert doc["totals"]["macs"] == 16 and doc["totals"]["flops"] == 36
    assert doc["totals"]["train_flops"] is None and doc["totals"]["backward_flops"] is None
    # inference peak: weights 164 B (41 floats) + buffers 32 B (running mean/var 6 floats + an int64 count)
    # + input 16 B + output 16 B = 228 B
    m = doc["memory"]
    assert (m["weights"], m["buffers"], m["inference_peak"]) == (164, 32, 228)
    assert m["peak_estimated"] is None and m["not_estimated"].startswith("training memory not estimated")
    # at batch 2 the training step runs
    r = netdiet.profile(netdiet.create_model(f"{user_file}:aux"), (2, 4), progress=False)
    assert r.training_unavailable is None and r.totals["backward_flops"] > 0


def test_frozen_model_reports_inference_and_says_why_there_is_no_training():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    for p in model.parameters():
        p.requires_grad_(False)
    r = netdiet.profile(model, (3, 6), progress=False)
    assert r.totals["macs"] == 3 * 6 * 4 and "frozen" in r.training_unavailable
    assert r.memory["inference_peak"] is not None and r.memory["peak_estimated"] is None


def test_a_forward_reading_tensor_values_is_simulated_on_a_real_copy():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 5)

        def forward(self, x):
            y = self.fc(x)
            return y if float(y.sum().item()) > -1e9 else -y   # a value read: impossible on the meta device

    r = netdiet.profile(Gate(), (2, 5), progress=False, measure=True, repeats=1, warmup=0)
    assert r.totals["macs"] == 2 * 5 * 5 and r.training_unavailable is None
    m = r.memory
    # the meta simulation stops at .item(); the same tracked step runs on a real copy and says so
    assert m["not_estimated"] is None and m["simulation"] == "cpu" and "item()" in m["simulation_reason"]
    # weights 30 floats = 120 B, and the tracked real step agrees with the allocator's events within 2 %
    # (772 vs 784 B here)
    assert m["weights"] == 120 and abs(m["peak_estimated"] - m["peak_measured"]) <= 0.02 * m["peak_measured"]


def test_a_float_dtype_that_differs_from_the_weights_is_named(capsys):
    code, _, err = run_cli(capsys, "profile", "resnet", "--input", "1,3,32,32:bf16")
    one_line_exit_2(code, err, "'conv1'", "float32 weights", "bfloat16 input", "--input 1,3,32,32:float32")


def test_a_meta_device_limit_is_not_called_a_bad_input():
    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            n = int(self.fc(x).sum().item() > 0)   # needs a value: the meta device holds none
            return self.fc(x) * (n + 1)

    with torch.device("meta"):
        model = Reads()
    with pytest.raises(NetdietError) as e:
        netdiet.profile(model, (2, 3), progress=False)
    msg = str(e.value)
    assert "meta-device limit, not a bad input" in msg and "does not fit" not in msg and "\n" not in msg


def test_input_range_reaches_each_input_and_a_zoo_models_default():
    assert input_specs(["1,8:int64", "m=1,8"], 7) == [InputSpec((1, 8), torch.int64, None, 7),
                                                      InputSpec((1, 8), None, "m", 7)]
    assert input_specs([], 10, "transformer") == [InputSpec((1, 64), torch.int64, None, 10)]  # tiny: seq 64
    assert input_specs([], None, "transformer") is None
    ids = prepare_call(input_specs([], 10, "transformer"), "transformer", None, None, torch.device("cpu"), 0).flat[0]
    assert int(ids.max()) == 9   # 64 draws in [0, 10) instead of the vocabulary's [0, 1000)
