"""Start-up and imports: the profile path keeps torch._dynamo (2 s of imports) and every optional heavy package out,
and `netdiet models` reads stored parameter counts instead of building the zoo (issue 13).

Each check runs in a fresh interpreter: what a process imports is only visible from its own sys.modules.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from netdiet.models import create_model, list_models

# imported only when something compiles or draws or needs that package: never on the profile path. (sympy is not
# here: torch's own Python meta kernel of convolution calls torch._check, which imports torch.fx's symbolic shapes
# and sympy, so any convolution simulated on the meta device imports it)
HEAVY = ["torch._dynamo", "torch._inductor", "matplotlib", "transformers", "onnxruntime", "onnx", "scipy", "pandas"]


def _fresh(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NETDIET_PROGRESS": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_api_profile_imports_no_heavy_module_and_gives_the_figures_torch_dynamo_would():
    got = _fresh(
        "import json, sys, torch, netdiet\n"
        f"HEAVY = {HEAVY!r}\n"
        "doc = netdiet.profile('lenet5', progress=False).to_dict()\n"
        "heavy = [m for m in HEAVY if m in sys.modules]\n"
        # the block leaves torch as it found it: its own wrappers import torch._dynamo again outside the profile
        "raw = torch.optim.Optimizer.add_param_group.__wrapped__\n"
        "seed_left = '__dynamo_disable' in raw.__dict__\n"
        "torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)\n"
        "dynamo_after = 'torch._dynamo' in sys.modules\n"
        # the same profile with torch._dynamo imported (the block then does nothing): the same figures
        "again = netdiet.profile('lenet5', progress=False).to_dict()\n"
        "keys = ('totals', 'memory', 'operators', 'modules')\n"
        "print(json.dumps({'heavy': heavy, 'seed_left': seed_left, 'dynamo_after': dynamo_after,\n"
        "                  'same': all(doc[k] == again[k] for k in keys), 'macs': doc['totals']['macs']}))\n")
    assert got["heavy"] == []
    assert got["seed_left"] is False and got["dynamo_after"] is True
    assert got["same"] is True
    # LeNet-5 forward MACs at batch 1, by hand: conv1 24*24*20*25 = 288,000; conv2 8*8*50*20*25 = 1,600,000;
    # fc1 800*500 = 400,000; fc2 500*10 = 5,000: 2,293,000
    assert got["macs"] == 2_293_000


def test_the_cli_profile_imports_no_heavy_module():
    got = _fresh(
        "import io, json, sys, contextlib\n"
        "from netdiet.cli import main\n"
        f"HEAVY = {HEAVY!r}\n"
        "with contextlib.redirect_stdout(io.StringIO()) as table:\n"
        "    rc = main(['profile', 'lenet5'])\n"
        "print(json.dumps({'rc': rc, 'heavy': [m for m in HEAVY if m in sys.modules],\n"
        "                  'printed': '2.29M' in table.getvalue()}))\n")
    assert got == {"rc": 0, "heavy": [], "printed": True}


def test_netdiet_models_builds_nothing_and_imports_no_engine(tmp_path):
    out = tmp_path / "models.json"
    got = _fresh(
        "import io, json, sys, contextlib\n"
        "from netdiet.cli import main\n"
        "from netdiet.models import list_models\n"
        "built = []\n"
        "for e in list_models():  # every factory notes a call: listing the zoo must make none\n"
        "    e.factory = (lambda f, n: lambda **kw: (built.append(n), f(**kw))[1])(e.factory, e.name)\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    rc = main(['models', '--json', {str(out)!r}])\n"
        "engines = ['netdiet.api', 'netdiet.analysis.counter', 'netdiet.analysis.memory', 'netdiet.analysis.profile',\n"
        "           'netdiet.compression', 'netdiet.training', 'netdiet.incremental', 'torch._dynamo']\n"
        "print(json.dumps({'rc': rc, 'built': built, 'imported': [m for m in engines if m in sys.modules]}))\n")
    assert got == {"rc": 0, "built": [], "imported": []}
    rows = {r["name"]: r for r in json.loads(out.read_text())["models"]}
    # LeNet-5 by hand: conv1 20*1*5*5 + 20 = 520; conv2 50*20*5*5 + 50 = 25,050; fc1 800*500 + 500 = 400,500;
    # fc2 500*10 + 10 = 5,010: 431,080
    assert rows["lenet5"]["params"] == 431_080
    assert rows["lenet5"]["input"] == [1, 1, 28, 28] and rows["transformer"]["input_dtype"] == "int64"


def test_every_stored_parameter_count_is_the_built_models_count():
    # the counts `netdiet models` shows are stored with each factory; building every default model (on the meta
    # device: no memory) and counting its parameters keeps them from going stale
    entries = list_models()
    assert entries and all(e.params is not None for e in entries)
    for e in entries:
        with torch.device("meta"):
            model = create_model(e.name)
        assert e.params == sum(p.numel() for p in model.parameters()), e.name
        assert e.row()["params"] == e.params
