"""The automatic budget split (`--strategy auto --budget 256KiB`): netdiet decides how the bytes are spent.

Before training on the first task, from that task's data only, it measures:
  1. a calibration run: a copy of the model trained (the run's epochs) on 80 % of task 1, tested on the other
     20 % (the held-out slice) -> reference accuracy;
  2. each kept-model precision (fp32, int8, int4, prune=0.5+int4, applied by the same Shrinker as after every task):
     its exact kept bytes and its held-out accuracy drop;
  3. each exemplar format (bits 8/4/2/1 x down-sampling 1/2): its exact bytes per exemplar and the held-out
     accuracy drop of a copy trained the same way on the 80 % as that format stores them (encoded, decoded),
     tested on the held-out images in the same format (auto trains and answers every image in its exemplar
     format: `same_view`).
The prediction is the bytes of a full buffer (the most the split can keep); a stream with fewer samples than the
buffer holds keeps less. Rule: among pairs whose two drops are each within `TOLERANCE`, pick the largest coverage = min(1, exemplars that
fit / exemplars needed to keep every old-class sample), where the need is (outputs - outputs of the last task) x
(task 1's samples per class); ties go to the smallest total drop, then to the fewest bytes. The prediction is exact
bytes: weights + fixed items + capacity x bytes per exemplar <= budget by construction; the ledger checks the actual
after every task. A budget below the smallest configuration (smallest weights + one 1-bit 14x14 exemplar per class)
is refused before any training, naming that smallest budget.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from netdiet.errors import NetdietError
from netdiet.incremental.buffer import ExemplarBuffer
from netdiet.incremental.ledger import item_bytes
from netdiet.incremental.rehearsal import NME, last_linear
from netdiet.incremental.shrink import Shrinker
from netdiet.incremental.strategies import Work, register
from netdiet.training import TrainConfig, fit, predict

MODEL_OPTIONS = (None, "int8", "int4", "prune=0.5+int4")
EXEMPLAR_FORMATS = tuple((bits, ds) for bits in (8, 4, 2, 1) for ds in (1, 2))
TOLERANCE = 0.01
HELD_OUT = 0.2


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, outputs: list[int]) -> float:
    logits = predict(model, x)[:, outputs]
    return (torch.tensor(outputs)[logits.argmax(1)] == y).float().mean().item()


def model_bytes(model: nn.Module, option: str | None, seed: int) -> tuple[int, nn.Module]:
    """Exact kept bytes of `model` under a model option, and the shrunk copy."""
    twin = copy.deepcopy(model)
    if option is None:
        return item_bytes({k: v for k, v in twin.state_dict().items()}), twin
    return item_bytes(Shrinker(option).apply(twin, seed)), twin


def smallest_budget(strategy: "AutoSplit", model: nn.Module) -> tuple[int, str]:
    """The fewest bytes any configuration keeps (smallest weights + one exemplar per class in the smallest format)
    and the weights option that gives it."""
    size, option = min((model_bytes(model, o, strategy.cfg.seed)[0], o or "fp32") for o in MODEL_OPTIONS)
    buf = ExemplarBuffer(strategy.scenario.sample_shape, strategy.scenario.num_outputs, 1, max(d for _b, d in EXEMPLAR_FORMATS))
    per = buf.bytes_per_exemplar() + strategy._extra_per_exemplar()
    return size + strategy.fixed_for(buf, last_linear(model).in_features) + strategy.scenario.num_outputs * per, option


def plan(strategy: "AutoSplit", model: nn.Module) -> dict:
    sc, cfg = strategy.scenario, strategy.cfg
    t = sc.tasks[0]
    gen = torch.Generator().manual_seed(cfg.seed + 4099)
    perm = torch.randperm(len(t.y_train), generator=gen)
    n_hold = max(1, int(round(len(perm) * HELD_OUT)))
    hold, train = perm[:n_hold], perm[n_hold:]
    scenario = sc
    work = Work()

    def loss_fn(logits, target):
        return torch.nn.functional.cross_entropy(scenario.train_logits(logits, target, 0), target)

    def calibrated(x: torch.Tensor) -> nn.Module:
        twin = copy.deepcopy(model)
        tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                         seed=cfg.seed * 1000 + 777, progress=False, description="auto split calibration")
        result = fit(twin, x, t.y_train[train], tc, loss_fn=loss_fn)
        work.steps += result.steps
        work.train_samples += len(x) * len(result.history)
        return twin

    calib = calibrated(t.x_train[train])
    xh, yh = t.x_train[hold], t.y_train[hold]
    ref = _accuracy(calib, xh, yh, t.outputs)
    models = []
    for option in MODEL_OPTIONS:
        nbytes, twin = model_bytes(calib, option, cfg.seed)
        models.append({"model": option or "fp32", "option": option, "bytes": nbytes,
                       "drop": ref - _accuracy(twin, xh, yh, t.outputs)})
    formats = []
    dim = last_linear(model).in_features
    for bits, ds in EXEMPLAR_FORMATS:
        buf = ExemplarBuffer(sc.sample_shape, sc.num_outputs, bits, ds)
        buf.value_range = torch.tensor([float(t.x_train.min()), float(t.x_train.max())])
        twin = calibrated(buf.view(t.x_train[train]))
        formats.append({"bits": bits, "downsample": ds, "fixed": strategy.fixed_for(buf, dim),
                        "per_exemplar": buf.bytes_per_exemplar() + strategy._extra_per_exemplar(),
                        "drop": ref - _accuracy(twin, buf.view(xh), yh, t.outputs)})
    per_class = len(t.y_train) / max(1, len(t.outputs))
    last = len(sc.tasks[-1].outputs) if sc.setting != "domain" else 0
    needed = max(1, math.ceil((sc.num_outputs - last) * per_class) if sc.setting != "domain"
                 else math.ceil(per_class * len(t.outputs) * (len(sc.tasks) - 1)))
    candidates = []
    for m in models:
        for f in formats:
            free = cfg.budget - m["bytes"] - f["fixed"]
            cap = max(0, free // f["per_exemplar"])
            if cap < sc.num_outputs:
                continue
            ok = m["drop"] <= TOLERANCE and f["drop"] <= TOLERANCE
            total = m["bytes"] + f["fixed"] + cap * f["per_exemplar"]
            candidates.append({"model": m["model"], "option": m["option"], "bits": f["bits"],
                               "downsample": f["downsample"], "exemplars": int(cap), "coverage": min(1.0, cap / needed),
                               "drop": m["drop"] + f["drop"], "within_tolerance": ok, "predicted_bytes": int(total)})
    if not candidates:
        raise NetdietError(f"budget {cfg.budget} bytes fits no configuration of this model; the smallest that fits is "
                           f"{smallest_budget(strategy, model)[0]} bytes; raise --budget")
    pool = [c for c in candidates if c["within_tolerance"]] or candidates
    best = min(pool, key=lambda c: (-round(c["coverage"], 6), round(c["drop"], 6), c["predicted_bytes"]))
    return {"rule": "max coverage of old-class samples among options within the held-out tolerance; ties: smallest "
                    "drop, then fewest bytes", "tolerance": TOLERANCE, "held_out_samples": int(n_hold),
            "calibration_epochs": cfg.epochs, "calibration_work": dict(work.__dict__), "reference_accuracy": ref, "exemplars_needed": int(needed),
            "models": models, "formats": formats, "chosen": best, "predicted_bytes": best["predicted_bytes"],
            "budget": cfg.budget}


@register
class AutoSplit(NME):
    """NME over class-balanced rehearsal, with model precision, pruning and exemplar format chosen by `plan`."""
    name = "auto"

    def __init__(self, scenario, cfg) -> None:
        if cfg.budget is None:
            raise NetdietError("strategy 'auto' splits a byte budget; give one, e.g. --budget 256KiB")
        cfg = copy.copy(cfg)
        cfg.same_view = True
        super().__init__(scenario, cfg)
        self.decision: dict | None = None

    def fixed_for(self, buf: ExemplarBuffer, dim: int) -> int:
        """Fixed bytes of the kept state besides the weights for a buffer format (NME means and their flags)."""
        return buf.fixed_bytes() + self.scenario.num_outputs * dim * 2 + self.scenario.num_outputs

    def check_start(self, model: nn.Module) -> None:
        need, option = smallest_budget(self, model)
        if self.cfg.budget < need:
            raise NetdietError(f"budget {self.cfg.budget} bytes is too small for any configuration of this model; "
                               f"the smallest that fits is {need} bytes (weights {option}, one 1-bit exemplar per "
                               f"class at 1/{EXEMPLAR_FORMATS[-1][1]} resolution); raise --budget or choose a smaller model")

    def learn(self, model: nn.Module, task: int) -> Work:
        if task == 0:
            self.decision = plan(self, model)
            c = self.decision["chosen"]
            self.cfg = copy.copy(self.cfg)
            self.cfg.shrink, self.cfg.exemplar_bits, self.cfg.exemplar_downsample = c["option"], c["bits"], c["downsample"]
            self.shrinker = Shrinker(c["option"]) if c["option"] else None
            self.buffer = ExemplarBuffer(self.scenario.sample_shape, self.scenario.num_outputs, c["bits"], c["downsample"])
        work = super().learn(model, task)
        if task == 0:      # the calibration runs are training work too
            calib = self.decision["calibration_work"]
            work.steps += calib["steps"]
            work.train_samples += calib["train_samples"]
        return work
