"""`netdiet data`: the document, the exit codes, and figures checked against the dataset itself."""
import json

from netdiet.cli import main


def test_data_digits_json_has_counts_bytes_and_preprocessing(tmp_path):
    out = tmp_path / "digits.json"
    assert main(["data", "digits", "--samples", "3", "--repeats", "2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == "netdiet.data/1"
    train, test = doc["splits"]["train"], doc["splits"]["test"]
    assert train["samples"] + test["samples"] == 1797 and sum(train["class_counts"]) == train["samples"]
    assert train["storage"]["dense_bytes"] == train["samples"] * 64 * 4
    assert len(doc["samples"]) == 3
    from netdiet.data import get_dataset
    first = get_dataset("digits").x_train[0, 0]
    pixels = doc["preview"]["pixels"]
    assert len(pixels) == 8 and len(pixels[0]) == 8
    assert abs(pixels[3][4] - float(first[3, 4])) < 1e-3 and doc["preview"]["label"] == doc["samples"][0]["label"]
    flops = {r["step"]: r["flops_per_sample"] for r in doc["preprocessing"]}
    assert flops["standardise: fit"] == 4 * 64 and flops["standardise: apply"] == 2 * 64
    assert all(r["ns_per_sample"] >= 0 for r in doc["preprocessing"])


def test_data_list_and_bad_names_exit_codes(tmp_path, capsys):
    out = tmp_path / "list.json"
    assert main(["data", "--list", "--json", str(out)]) == 0
    names = {d["name"] for d in json.loads(out.read_text())["datasets"]}
    assert {"mnist5k", "digits", "synthetic"} <= names
    assert main(["data", "no-such-set"]) == 2
    assert main(["data"]) == 2
    assert main(["data", "mnist"]) == 2          # needs --data-dir
    err = capsys.readouterr().err
    assert "unknown dataset" in err and "--data-dir" in err
