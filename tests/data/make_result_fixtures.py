# Writes tests/data/results/*.json: one real result document of every kind `netdiet report` reads, made by the CLI
# on small settings (run from the repository root: python tests/data/make_result_fixtures.py). The fuzz of the
# result readers (tests/test_fuzz_readers.py) starts its cases from these files.
import pathlib, subprocess, sys
out = pathlib.Path("tests/data/results")
out.mkdir(parents=True, exist_ok=True)
tmp = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/netdiet-result-fixtures")
tmp.mkdir(parents=True, exist_ok=True)
mlp = ["--data", "digits", "--model-kw", "in_features=64", "--model-kw", "widths=[16]"]
runs = {
    "profile": ["profile", "mlp", "--model-kw", "in_features=64", "--model-kw", "widths=[16]", "--input", "1,64",
                "--batch-sizes", "1,8"],
    "train": ["train", "mlp", *mlp, "--epochs", "2", "--out", str(tmp / "train"), "--projection-steps", "0"],
    "sweep": ["sweep", "mlp", "--data", "digits", "--model-kw", "in_features=64", "--knob", "widths=[[4],[16]]",
              "--folds", "2", "--epochs", "1"],
    "compress": ["compress", "mlp", *mlp, "--recipe", "deep-compression", "--baseline-epochs", "1",
                 "--finetune-epochs", "1", "--out", str(tmp / "m.ndz"), "--no-latency"],
    "evaluate": ["evaluate", str(tmp / "m.ndz"), "--data", "digits", "--no-latency"],
    "continual": ["continual", "--data", "digits", "--strategy", "replay", "--budget", "64KiB", "--epochs", "1"],
    "data": ["data", "digits"], "models": ["models"], "recipes": ["recipes"], "datasets": ["data", "--list"],
    "plan": ["plan", "transformer", "--devices", "4xl4", "--micro-batch", "1,2"],
}
for name, argv in runs.items():
    subprocess.run([sys.executable, "-m", "netdiet", *argv, "--json", str(out / f"{name}.json")], check=True,
                   stdout=subprocess.DEVNULL)
subprocess.run([sys.executable, "-m", "netdiet", "report", *[str(out / f"{n}.json") for n in runs], "-o",
                str(tmp / "r.html"), "--json", str(out / "report.json")], check=True, stdout=subprocess.DEVNULL)
# demo.json is the netdiet.demo/1 summary of a real `make demo` run (netdiet-demo/demo.json), copied as it was written.
