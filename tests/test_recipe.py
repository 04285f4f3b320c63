"""Recipes: built-ins parse, every validation error names the YAML line, the Pareto set, and a real small run."""
import pytest
import torch

from netdiet.compression import archive
from netdiet.compression.recipe import list_recipes, load_recipe, pareto_front, parse_recipe, run_recipe
from netdiet.data import Dataset
from netdiet.errors import NetdietError
from netdiet.fileio import dumps_json
from netdiet.models import create_model


# one torch thread: these train end to end, and two threads thrash on a loaded 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_four_builtin_recipes_parse_into_their_stages():
    assert {"deep-compression", "int8", "structured-50", "seed-incremental"} <= set(list_recipes())
    assert [s.technique for s in load_recipe("deep-compression").stages] == ["prune", "cluster"]
    assert [s.technique for s in load_recipe("int8").stages] == ["quantize"]
    assert [s.technique for s in load_recipe("structured-50").stages] == ["structured"]
    seed = load_recipe("seed-incremental")
    assert [s.technique for s in seed.stages] == ["prune", "quantize"]
    prune = seed.stages[0].options
    assert (prune["schedule"], prune["initial_sparsity"], prune["sparsity"]) == ("polynomial", 0.5, 0.8)
    assert seed.stages[1].options["mode"] == "int8-weight" and seed.stages[1].name == "quantize-int8-weight"
    assert load_recipe("structured-50").stages[0].options["ratio"] == 0.5


GOOD = """\
name: tiny
baseline: {epochs: 1}
stages:
  - technique: prune
    options: {sparsity: 0.5}
    finetune: {epochs: 1, lr: 0.001}
"""


@pytest.mark.parametrize("text, line, fragment", [
    ("stages:\n  - technique: prune\n  - technique: prunee\n", 3, "unknown technique 'prunee' (did you mean 'prune'?)"),
    ("name: x\nstages:\n  - technique: prune\n    options:\n      sparsity: 1.0\n", 5, "sparsity 1.0 is outside [0, 1)"),
    ("stages:\n  - technique: prune\n    options: {sparsity: -0.1}\n", 3, "outside [0, 1)"),
    ("stages:\n  - technique: cluster\n    options:\n      bits: 9\n", 4, "bits 9 is outside 1..8"),
    ("stages:\n  - technique: quantize\n    options: {mode: int8-weight, bits: 0}\n", 3, "bits 0 is outside 1..8"),
    ("stages:\n  - technique: cluster\n    options: {bits: 4.5}\n", 3, "outside 1..8"),
    ("stages:\n  - technique: prune\n    finetune: {epochs: -1}\n", 3, "epochs -1 must be an integer >= 0"),
    ("stages:\n  - technique: prune\n    finetune:\n      optimizer: rmsprop\n", 4, "optimizer 'rmsprop' is unknown"),
    ("stages:\n  - technique: prune\n    finetun: {epochs: 1}\n", 3, "unknown stage key 'finetun'"),
    ("name: x\nstage:\n  - technique: prune\n", 2, "unknown key 'stage'"),
    ("stages:\n  - technique: lowrank\n    options: {energy: 2.0}\n", 3, "energy 2.0 is outside (0, 1]"),
    ("stages:\n  - technique: prune\n    options: {sparsty: 0.5}\n", 3, "has no option(s) sparsty"),
    ("stages:\n  - technique: prune\n    evaluate: maybe\n", 3, "evaluate must be true or false"),
    ("stages:\n  - technique: [prune\n", 3, "not valid YAML"),
    ("name: x\nstages: []\n", 2, "non-empty list"),
    ("name: x\n", 1, "no `stages:`"),
    ("stages:\n  - technique: prune\n  - technique: distill\n    options: {student: mlp}\n", 3, "distill trains the student"),
])
def test_validation_errors_name_the_yaml_line(text, line, fragment):
    with pytest.raises(NetdietError) as err:
        parse_recipe(text, source="r.yaml")
    message = str(err.value)
    assert message.startswith(f"r.yaml line {line}: "), message
    assert fragment in message
    assert "\n" not in message


def test_a_good_recipe_keeps_options_finetune_and_baseline():
    r = parse_recipe(GOOD, source="good.yaml")
    assert r.name == "tiny" and r.baseline["epochs"] == 1 and r.baseline["optimizer"] == "adam"
    (stage,) = r.stages
    assert (stage.name, stage.options, stage.finetune, stage.line) == ("prune", {"sparsity": 0.5}, {"epochs": 1, "lr": 0.001}, 4)
    cfg = stage.train_config(seed=7, progress=False)
    assert (cfg.epochs, cfg.lr, cfg.seed, cfg.batch_size) == (1, 0.001, 7, 64)


def test_repeated_techniques_get_distinct_stage_names():
    r = parse_recipe("stages:\n  - technique: prune\n  - technique: prune\n  - technique: prune\n")
    assert [s.name for s in r.stages] == ["prune", "prune-2", "prune-3"]


def test_missing_recipe_file_and_unknown_builtin_are_one_line_errors(tmp_path):
    with pytest.raises(NetdietError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.yaml"))
    with pytest.raises(NetdietError, match="did you mean 'deep-compression'"):
        load_recipe("deep-compresion")


def test_recipe_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stages:\n  - technique: cluster\n    options: {bits: 12}\n")
    with pytest.raises(NetdietError, match=r"bad\.yaml line 3: bits 12 is outside 1\.\.8"):
        load_recipe(str(path))


def test_pareto_front_keeps_points_no_other_beats_on_both_axes():
    points = [("a", 0.90, 100), ("b", 0.95, 200), ("c", 0.85, 150), ("d", 0.95, 250), ("e", 0.80, 90), ("f", None, 10)]
    # c is beaten by a (more accurate and smaller); d by b (same accuracy, smaller); f was not evaluated
    assert pareto_front(points) == ["a", "b", "e"]
    assert pareto_front([("x", 0.9, 100), ("y", 0.9, 100)]) == ["x", "y"]  # equal points do not dominate each other


def test_a_small_run_measures_each_stage_from_its_archive(mnist5k, tmp_path):
    data = Dataset(name="mnist5k-1k", x_train=mnist5k.x_train[:1000], y_train=mnist5k.y_train[:1000],
                   x_test=mnist5k.x_test[:500], y_test=mnist5k.y_test[:500], num_classes=10)
    recipe = parse_recipe("""\
name: small
baseline: {epochs: 2}
stages:
  - technique: prune
    options: {sparsity: 0.9, scope: global}
    finetune: {epochs: 1}
  - technique: cluster
    options: {bits: 4}
""")
    torch.manual_seed(0)
    model = create_model("lenet300")
    out = tmp_path / "m.ndz"
    result = run_recipe(model, recipe, data, spec={"spec": "lenet300", "kwargs": {}}, seed=0, out=out,
                        latency=False, progress=False)
    doc = result.to_dict()
    dumps_json(doc)  # JSON-clean (no NaN, no tensors)
    assert doc["schema"] == "netdiet.compress/1" and doc["baseline"]["trained_by_netdiet"] is True
    assert doc["baseline"]["bytes_on_disk"] == archive.dense_fp32_bytes(create_model("lenet300"))
    prune, cluster = result.stages
    weights = 784 * 300 + 300 * 100 + 100 * 10
    # 90 % of the weights are zero; the 410 biases are not pruned
    assert prune.nonzero_params == weights // 10 + 410
    assert prune.ratio == pytest.approx(doc["baseline"]["bytes_on_disk"] / prune.bytes_on_disk)
    assert cluster.bytes_on_disk < prune.bytes_on_disk
    # the final model uses at most 2^4 distinct values per weight matrix, and zeros stayed zero
    final = result.compressed_model
    for layer in (final[1], final[3], final[5]):
        assert len(torch.unique(layer.weight)) <= 16 + 1
    assert int(sum((p != 0).sum() for p in (final[1].weight, final[3].weight, final[5].weight))) <= prune.nonzero_params - 410
    # the file on disk is the last stage: reading it back gives the accuracy the stage reported
    size = out.stat().st_size   # the kept file's own ratio (evaluate.compression_ratio), beside the stage's own file
    assert doc["archive"] == {"path": str(out), "bytes": size, "dense_fp32_bytes": doc["baseline"]["bytes_on_disk"],
                              "ratio": doc["baseline"]["bytes_on_disk"] / size}
    loaded = archive.read(str(out))
    from netdiet.training import evaluate_accuracy
    assert evaluate_accuracy(loaded.model, data.x_test, data.y_test) == pytest.approx(cluster.accuracy)
    assert set(doc["pareto"]) >= {"cluster"}


@pytest.mark.slow
def test_builtin_deep_compression_reaches_50x_on_lenet300_without_losing_accuracy(mnist5k, tmp_path):
    recipe = load_recipe("deep-compression")
    torch.manual_seed(0)
    model = create_model("lenet300")
    result = run_recipe(model, recipe, mnist5k, spec={"spec": "lenet300", "kwargs": {}}, seed=0,
                        out=tmp_path / "dc.ndz", latency=False, progress=False)
    dense = result.baseline["bytes_on_disk"]
    size = (tmp_path / "dc.ndz").stat().st_size
    assert dense / size >= 50
    assert result.stages[-1].accuracy >= result.baseline["accuracy"] - 0.003


# ------------------------------------------------------------------ a strict YAML reader (issue 11)
def _billion_laughs(where: str) -> str:
    """Nine levels of nine-fold aliases: ~400 bytes that expand to 9**9 = 387 million strings."""
    lines = ['x0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"x{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\n" + where


@pytest.mark.parametrize("where, line", [
    ("name: *a8\nstages: [{technique: prune}]\n", 1),  # the first anchor is refused: line 1
    ("stages:\n  - technique: prune\n    options: {layers: *a8}\n", 1),
])
def test_a_billion_laughs_recipe_fails_fast_at_its_first_anchor(where, line):
    import time
    text = _billion_laughs(where)
    assert len(text) < 700
    start = time.perf_counter()
    with pytest.raises(NetdietError, match=rf"^<recipe> line {line}: YAML anchors \(&a0\) are not allowed"):
        parse_recipe(text)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("text, line, fragment", [
    ("name: x\ndescription: &d long\nstages: [{technique: prune, name: *d}]\n", 2, "anchors (&d) are not allowed"),
    ("stages:\n  - technique: prune\n    name: *d\n", 3, "aliases (*d) are not allowed"),
    ("stages:\n  - technique: prune\n    options: {sparsity: 0.5}\n    options: {sparsity: 0.9}\n", 4,
     "duplicate key 'options' (first given on line 3)"),
    ("name: a\nname: b\nstages: [{technique: prune}]\n", 2, "duplicate key 'name'"),
    ("name: !!python/object/apply:os.system ['true']\nstages: [{technique: prune}]\n", 1, "tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("name: !custom x\nstages: [{technique: prune}]\n", 1, "tag '!custom' is not allowed"),
    ("name: " + "[" * 5000 + "]" * 5000 + "\nstages: [{technique: prune}]\n", 1, "nests more than 32 levels"),
    ("name:\n" + "".join(" " * i + "- \n" for i in range(40)) + "stages: [{technique: prune}]\n", 33, "nests more than 32 levels"),
    ("? [a, b]\n: 1\nstages: [{technique: prune}]\n", 1, "a mapping key must be a plain name"),
    ("stages:\n  - technique: prune\n    options: {schedule: [1]}\n", 3, "schedule must be one of"),
])
def test_anchors_tags_duplicate_keys_and_deep_nesting_are_refused_with_their_line(text, line, fragment):
    with pytest.raises(NetdietError) as err:
        parse_recipe(text, source="r.yaml")
    message = str(err.value)
    assert message.startswith(f"r.yaml line {line}: ") and fragment in message and "\n" not in message


def test_plain_tags_and_a_long_recipe_file_are_handled():
    assert parse_recipe("name: !!str 12\nstages: [{technique: prune}]\n").name == "12"
    with pytest.raises(NetdietError, match="at most 1048576"):
        parse_recipe("# " + "x" * (1 << 20) + "\nstages: [{technique: prune}]\n")
