"""Run strategies through a scenario: train task after task, test on every task, measure the ledger and FLOPs."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from netdiet.analysis.counter import count_ops
from netdiet.checks import check_fields, check_seed
from netdiet.data import get_dataset
from netdiet.environment import environment
from netdiet.errors import NetdietError
from netdiet.incremental import autosplit, metrics, rehearsal  # noqa: F401 - they register auto, rehearsal, nme, der++, ...
from netdiet.incremental.ledger import enforce, measure
from netdiet.incremental.scenarios import Scenario, check_setting, make_scenario
from netdiet.incremental.strategies import STRATEGIES, ContinualConfig, Strategy, Work, applicable, create_strategy
from netdiet.models import create_model
from netdiet.progress import progress_bar
from netdiet.training import predict
from netdiet.training.run import eval_output, factory_accepts

SCHEMA = "netdiet.continual/1"


@dataclass
class StrategyResult:
    name: str
    status: str = "ok"                          # ok | stopped (could not fit the budget, or not available)
    message: str = ""
    accuracy_matrix: list[list[float]] = field(default_factory=list)
    baseline_accuracy: list[float] = field(default_factory=list)   # untrained model per task (for FWT)
    average_accuracy: float | None = None
    bwt: float | None = None
    forgetting: float | None = None
    forgetting_per_task: list[float] = field(default_factory=list)
    fwt: float | None = None
    bytes_per_task: list[int] = field(default_factory=list)
    ledger_per_task: list[dict[str, int]] = field(default_factory=list)
    train_flops_per_task: list[int | None] = field(default_factory=list)
    exemplars_per_task: list[int] | None = None
    decision: dict | None = None                # strategy auto: what it measured, chose and predicted (bytes)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ContinualResult:
    scenario: dict
    setting: str
    budget: int | None
    model: dict
    config: dict
    strategies: list[StrategyResult]
    flops_note: str = ""
    environment: dict = field(default_factory=environment)   # what decided the numbers (netdiet.environment)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "scenario": self.scenario, "setting": self.setting, "budget": self.budget,
                "model": self.model, "config": self.config, "flops_note": self.flops_note,
                "strategies": [s.to_dict() for s in self.strategies], "environment": self.environment or environment()}


class FlopMeter:
    """Training FLOPs from `netdiet.analysis.counter.count_ops`, linear in the batch: counting batches of 1 and 2
    separates the per-sample cost (forward + backward) from the per-step cost (the optimizer update)."""

    def __init__(self, model: nn.Module, sample_shape: tuple[int, ...], optimizer: str) -> None:
        self.per_sample_train = self.per_step = self.per_sample_forward = None
        self.note = ""
        try:
            x1, x2 = torch.zeros((1,) + sample_shape), torch.zeros((2,) + sample_shape)
            t1 = int(count_ops(model, x1, train=True, optimizer=optimizer).train_flops)
            t2 = int(count_ops(model, x2, train=True, optimizer=optimizer).train_flops)
            f1 = int(count_ops(model, x1).flops)
            f2 = int(count_ops(model, x2).flops)
        except Exception as exc:  # noqa: BLE001 - the counter is another team's; report, do not crash the run
            self.note = f"training FLOPs not counted: count_ops failed ({type(exc).__name__}: {exc})"
            return
        self.per_sample_train, self.per_step, self.per_sample_forward = t2 - t1, 2 * t1 - t2, f2 - f1
        self.note = ("train FLOPs = samples x (forward+backward per sample) + optimizer steps x (update per step) "
                     "+ forward-only samples x (forward per sample), from count_ops at batch 1 and 2")

    def flops(self, work: Work) -> int | None:
        if self.per_sample_train is None:
            return None
        return ((work.train_samples + work.backward_samples) * self.per_sample_train + work.steps * self.per_step
                + work.forward_samples * self.per_sample_forward)


def task_accuracy(model: nn.Module, scenario: Scenario, after: int, task: int) -> float:
    t = scenario.tasks[task]
    logits = predict(model, t.x_test)
    mask = scenario.eval_mask(after, task)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return (logits.argmax(1) == t.y_test).float().mean().item()


# ContinualConfig's numbers: (field, kind, low, high, example); kind int = whole number, real = finite, pos = finite > 0
_NUMBERS = [("epochs", "int", 1, None, 5), ("batch_size", "int", 1, None, 64), ("exemplar_downsample", "int", 1, None, 1),
            ("fisher_samples", "int", 1, None, 256), ("exemplars", "int", 1, None, 200), ("packnet_finetune_epochs", "int", 1, None, 2),
            ("budget", "int", 1, None, "256KiB"), ("exemplar_bits", "int", 1, 32, 8), ("lr", "pos", 0, None, 0.001),
            ("ewc_lambda", "real", 0, None, 5000), ("ewc_gamma", "real", 0, 1, 1.0), ("lwf_temperature", "pos", 0, None, 2.0),
            ("lwf_alpha", "real", 0, None, 1.0)]
_OPTIONAL = ("exemplars", "packnet_finetune_epochs", "budget")     # None = not set


def check_continual_config(cfg: ContinualConfig) -> None:
    """Every number of a ContinualConfig finite, in range and integer where meant (NetdietError naming the option).
    The one check for the CLI and the API: `continual` and `run_continual` run it before any work."""
    flags = {name: f"--{name.replace('_', '-')}" for name, *_ in _NUMBERS}
    check_fields(cfg, ((name, kind, low, high, flags[name], f"{flags[name]} {example}")
                       for name, kind, low, high, example in _NUMBERS), optional=_OPTIONAL)
    check_seed(cfg.seed)


def run_strategy(name: str, scenario: Scenario, model_fn: Callable[[], nn.Module], cfg: ContinualConfig,
                 on_task: Callable[[int], None] | None = None, meter: FlopMeter | None = None) -> StrategyResult:
    """Train `name` through every task. Raises NetdietError if it cannot fit the budget."""
    torch.manual_seed(cfg.seed)
    model = model_fn()
    strategy: Strategy = create_strategy(name, scenario, cfg)
    strategy.check_start(model)
    meter = meter or FlopMeter(model, scenario.sample_shape, cfg.optimizer)
    res = StrategyResult(name)
    t0 = time.perf_counter()
    T = len(scenario.tasks)
    res.baseline_accuracy = [task_accuracy(model, scenario, j if scenario.setting != "class" else 0, j) for j in range(T)]
    for i in range(T):
        work = strategy.learn(model, i)
        extra = strategy.after_task(model, i)
        entry = measure(i, strategy.kept(model))
        enforce(entry, cfg.budget, name)
        res.ledger_per_task.append(entry.items)
        res.bytes_per_task.append(entry.total)
        total = Work(work.train_samples + extra.train_samples, work.steps + extra.steps,
                     work.forward_samples + extra.forward_samples, work.backward_samples + extra.backward_samples)
        res.train_flops_per_task.append(meter.flops(total))
        res.accuracy_matrix.append([task_accuracy(strategy.eval_model(model, j), scenario, i, j) for j in range(T)])
        if on_task:
            on_task(i)
    if hasattr(strategy, "capacity_per_task"):
        res.exemplars_per_task = list(strategy.capacity_per_task)
    if getattr(strategy, "decision", None) is not None:
        res.decision = dict(strategy.decision, actual_bytes=max(res.bytes_per_task))
    summary = metrics.summarise(res.accuracy_matrix, res.baseline_accuracy if scenario.setting != "class" else None)
    res.average_accuracy, res.bwt, res.forgetting = summary["average_accuracy"], summary["bwt"], summary["forgetting"]
    res.forgetting_per_task, res.fwt = summary["forgetting_per_task"], summary["fwt"]
    res.seconds = time.perf_counter() - t0
    return res


def run_continual(scenario: Scenario, strategy: str, model_fn: Callable[[], nn.Module], cfg: ContinualConfig,
                  model_info: dict | None = None) -> ContinualResult:
    """One strategy, or `all` applicable ones. Under `all`, a strategy that cannot fit the budget is reported as
    stopped (with the reason) and the others still run; a single strategy raises instead."""
    check_continual_config(cfg)
    names = applicable(scenario.setting) if strategy == "all" else [strategy]
    # bad input (unknown or inapplicable strategy, a budget below the model itself) fails before any training
    create_strategy(names[0] if strategy == "all" else strategy, scenario, cfg).check_start(model_fn())
    results = []
    bar = progress_bar(len(names) * len(scenario.tasks), f"continual {strategy}") if strategy == "all" else None
    meter = FlopMeter(model_fn(), scenario.sample_shape, cfg.optimizer)   # same architecture for every strategy
    for n in names:
        try:
            results.append(run_strategy(n, scenario, model_fn, cfg, on_task=(lambda _i: bar.advance()) if bar else None,
                                        meter=meter))
        except NetdietError as exc:
            if strategy != "all":
                if bar:
                    bar.close()
                raise
            results.append(StrategyResult(n, status="stopped", message=str(exc)))
    if bar:
        bar.close()
    return ContinualResult(scenario.to_dict(), scenario.setting, cfg.budget, model_info or {}, cfg.to_dict(), results,
                           meter.note)


DEFAULT_MODEL = "mlp"
DEFAULT_MODEL_KW = {"widths": [64, 64]}
# strategy auto's default: a convnet of 8,834 parameters that reaches 97.7 % joint accuracy on mnist5k class-IL
# (the 55,050-parameter MLP: 92.0 %), so its int4 weights leave 95 % of 64 KiB to exemplars
AUTO_MODEL, AUTO_MODEL_KW = "cnn", {"channels": [8, 16, 32], "dropout": 0.0}


def default_model(strategy: str, scenario: Scenario) -> tuple[str, dict | None]:
    shape = scenario.sample_shape
    if strategy == "auto" and len(shape) == 3 and shape[1] == shape[2] and shape[1] >= 8:
        return AUTO_MODEL, dict(AUTO_MODEL_KW, in_channels=shape[0], image_size=shape[1])
    return DEFAULT_MODEL, None


def build_model_fn(spec: str, model_kw: dict | None, scenario: Scenario) -> tuple[Callable[[], nn.Module], dict]:
    """A factory for fresh models whose output matches the scenario. num_classes is passed (unless given) only to
    factories that take it; any other factory's output width is checked against the scenario."""
    kw = dict(DEFAULT_MODEL_KW if spec == DEFAULT_MODEL and not model_kw else (model_kw or {}))
    takes_classes = factory_accepts(spec, "num_classes")
    if takes_classes:
        kw.setdefault("num_classes", scenario.num_outputs)
    if spec == "mlp":
        kw.setdefault("in_features", int(torch.tensor(scenario.sample_shape).prod()))

    def make() -> nn.Module:
        return create_model(spec, **kw)

    probe = make()
    sample = scenario.tasks[0].x_train[:1]
    try:
        out = eval_output(probe, sample)
    except Exception as exc:  # noqa: BLE001 - a model that cannot take the samples is bad input, said in one line
        raise NetdietError(f"model '{spec}' cannot take the scenario's samples of shape {list(sample.shape[1:])}: "
                           f"{(str(exc).splitlines() or [type(exc).__name__])[0]}; adjust --model-kw or the model") from None
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape[1] != scenario.num_outputs:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        fix = (f"pass --model-kw num_classes={scenario.num_outputs}" if takes_classes else
               f"its factory takes no num_classes, so make it return {scenario.num_outputs} class scores "
               "(or give it a num_classes argument)")
        raise NetdietError(f"model '{spec}' gives outputs of shape {shape}; the {scenario.name}/{scenario.setting} "
                           f"scenario needs (batch, {scenario.num_outputs}); {fix}")
    return make, {"spec": spec, "kwargs": kw, "params": sum(p.numel() for p in probe.parameters())}


def continual(scenario: str = "split", data: str = "mnist5k", setting: str = "class", strategy: str | None = None, *,
              model: str | None = None, model_kw: dict | None = None, data_dir: str | None = None,
              tasks: int | None = None, classes_per_task: int | None = None, order_seed: int | None = None,
              config: ContinualConfig | None = None) -> ContinualResult:
    """Build the scenario from a registered dataset and run one strategy (or `all`; default: `auto` under a budget,
    else `replay`)."""
    cfg = config or ContinualConfig()
    strategy = strategy or ("auto" if cfg.budget is not None else "replay")
    check_setting(scenario, setting)
    if strategy != "all" and strategy not in STRATEGIES:
        raise NetdietError(f"unknown strategy '{strategy}'; choose one of: {', '.join(STRATEGIES)} or all")
    if strategy != "all" and setting not in STRATEGIES[strategy].settings:
        raise NetdietError(f"strategy '{strategy}' does not apply to {setting}-incremental learning; "
                           f"it needs --setting {' or '.join(STRATEGIES[strategy].settings)}")
    check_continual_config(cfg)   # numbers first: finite, in range, integer where meant (before the dataset is loaded)
    ds = get_dataset(data, data_dir=data_dir, seed=cfg.seed)
    sc = make_scenario(scenario, ds, setting, num_tasks=tasks, classes_per_task=classes_per_task,
                       order_seed=order_seed, seed=cfg.seed)
    if model is None:
        model, auto_kw = default_model(strategy, sc)
        model_kw = model_kw or auto_kw
    model_fn, info = build_model_fn(model, model_kw, sc)
    return run_continual(sc, strategy, model_fn, cfg, info)
