"""`netdiet sweep`: k-fold cross-validation over one model knob, train and validation error against complexity.

Each knob value is trained k times (each fold held out once) with the same TrainConfig; the errors are the
fold means (and their standard deviations). Complexity is the model's parameter count and its counted forward
FLOPs per sample. The chosen point is the value with the lowest mean validation error (ties: fewer parameters).
This is the classic under/over-fitting curve: train error keeps falling with complexity, validation error
turns back up once the model starts to fit noise.
"""
from __future__ import annotations

import ast
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from netdiet.analysis.counter import count_ops
from netdiet.data import get_dataset
from netdiet.environment import environment
from netdiet.errors import NetdietError
from netdiet.models import ModelSpec
from netdiet.training.loop import TrainConfig, check_train_config, evaluate_accuracy, fit
from netdiet.training.precision import resolve_device
from netdiet.training.run import build_classifier, zoo_kwargs_for

SCHEMA = "netdiet.sweep/1"


@dataclass
class SweepPoint:
    value: Any
    kwargs: dict
    params: int
    flops: int | None                 # forward FLOPs per sample
    train_error: float
    val_error: float
    train_error_std: float
    val_error_std: float
    folds: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SweepResult:
    model: dict
    knob: str
    k: int
    data: dict
    config: dict
    points: list[SweepPoint]
    chosen: Any
    chosen_index: int
    rule: str = "lowest mean validation error; ties go to fewer parameters"
    flops_method: str | None = None
    environment: dict = field(default_factory=environment)   # what decided the numbers (netdiet.environment)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "model": self.model, "knob": self.knob, "k": self.k, "data": self.data,
                "config": self.config, "points": [p.to_dict() for p in self.points], "chosen": self.chosen,
                "chosen_index": self.chosen_index, "rule": self.rule, "flops_method": self.flops_method,
                "environment": self.environment or environment()}


def parse_knob(text: str) -> tuple[str, list[Any]]:
    """'widths=[[64],[256]]' -> ('widths', [[64], [256]])."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise NetdietError(f"cannot read --knob {text!r}; write NAME=[v1,v2,...], e.g. --knob widths=[[64],[256],[1024,256]]")
    try:
        values = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        raise NetdietError(f"cannot read the values of --knob {name}: {raw!r} is not a Python/JSON list; e.g. {name}=[1,2,4]") from None
    if not isinstance(values, (list, tuple)) or len(values) < 1:
        raise NetdietError(f"--knob {name} needs a list of values, e.g. {name}=[1,2,4]")
    return name, list(values)


def knob_kwargs(spec: str, base: dict, knob: str, value: Any) -> dict:
    """Factory kwargs for one knob value. `depth` on the mlp means `depth` hidden layers of the base width."""
    kw = dict(base)
    if spec == "mlp" and knob == "depth":
        if not isinstance(value, int) or value < 0:
            raise NetdietError(f"mlp depth must be a non-negative integer, got {value!r}")
        width = int(kw.pop("width", (list(kw.get("widths") or [256]) or [256])[0]))
        kw["widths"] = [width] * value
        return kw
    kw[knob] = value
    return kw


def stratified_folds(y: torch.Tensor, k: int, seed: int) -> list[np.ndarray]:
    """k disjoint index arrays covering y, each with about the same share of every class."""
    if k < 2:
        raise NetdietError(f"k-fold cross-validation needs k >= 2, got {k}")
    labels = y.numpy()
    rng = np.random.RandomState(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            folds[(j + offset) % k].append(int(i))
        offset += len(idx)
    if min(len(f) for f in folds) == 0:
        raise NetdietError(f"{len(labels)} samples cannot make {k} folds; lower --folds")
    return [np.sort(np.array(f)) for f in folds]


def forward_flops_per_sample(model: torch.nn.Module, x: torch.Tensor) -> tuple[int | None, str | None]:
    import copy
    probe = copy.deepcopy(model).eval()
    try:
        return int(count_ops(probe, x, train=False).flops) // len(x), "netdiet.analysis.counter"
    except Exception:  # noqa: BLE001 - complexity falls back to parameters only
        return None, None


def sweep(spec: str, knob: str, values: list[Any], *, model_kw: dict | None = None, data: str = "mnist5k",
          data_dir: str | None = None, k: int = 3, config: TrainConfig | None = None,
          log: Callable[[str], None] | None = None) -> SweepResult:
    cfg = config or TrainConfig()
    check_train_config(cfg)
    dataset = get_dataset(data, data_dir=data_dir, seed=cfg.seed)
    base = zoo_kwargs_for(spec, model_kw or {}, dataset.input_shape)
    folds = stratified_folds(dataset.y_train, k, cfg.seed)
    points, flops_method = [], None
    for value in values:
        kw = knob_kwargs(spec, base, knob, value)
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        probe = build_classifier(spec, kw, dataset.input_shape, dataset.num_classes)
        params = sum(p.numel() for p in probe.parameters())
        flops, method = forward_flops_per_sample(probe, dataset.x_train[:4])
        flops_method = flops_method or method
        rows = []
        for f in range(k):
            val_idx = torch.from_numpy(folds[f])
            tr_idx = torch.from_numpy(np.sort(np.concatenate([folds[j] for j in range(k) if j != f])))
            torch.manual_seed(cfg.seed)            # every fold starts from the same initial weights
            model = build_classifier(spec, kw, dataset.input_shape, dataset.num_classes)
            xt, yt = dataset.x_train[tr_idx], dataset.y_train[tr_idx]
            xv, yv = dataset.x_train[val_idx], dataset.y_train[val_idx]
            fold_cfg = TrainConfig(**{**cfg.to_dict(), "description": f"{knob}={value} fold {f + 1}/{k}",
                                      "checkpoint_dir": None, "resume": False, "projection_steps": 0,
                                      "patience": 0})       # the held-out fold only measures, it never steers training
            fit(model, xt, yt, fold_cfg)
            rows.append({"fold": f + 1, "train_error": 1.0 - evaluate_accuracy(model, xt, yt),
                         "val_error": 1.0 - evaluate_accuracy(model, xv, yv)})
        tr = [r["train_error"] for r in rows]
        va = [r["val_error"] for r in rows]
        point = SweepPoint(value, kw, params, flops, statistics.fmean(tr), statistics.fmean(va),
                           statistics.pstdev(tr), statistics.pstdev(va), rows, time.perf_counter() - t0)
        points.append(point)
        if log:
            log(f"{knob}={value}: params {params:,}, train error {point.train_error:.4f}, val error {point.val_error:.4f}")
    best = min(range(len(points)), key=lambda i: (round(points[i].val_error, 12), points[i].params))
    return SweepResult(ModelSpec(spec, base).to_dict(), knob, k, {**dataset.summary(), "cv_samples": len(dataset.y_train)},
                       cfg.to_dict(), points, points[best].value, best, flops_method=flops_method,
                       environment=environment(resolve_device(cfg.device)))
