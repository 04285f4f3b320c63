"""Continual-learning scenarios built from any registered dataset.

scenario            what arrives task after task                         settings that apply
split               disjoint groups of classes (Split-MNIST: 5 x 2)       task, domain, class
permuted            the whole dataset under a fixed pixel permutation    task, domain, class
incremental-data    new slices of the same classes (initial + later)      domain

Settings decide the output layer and what the model is told at test time:
  task    task-incremental: one shared output layer, and the task identity is used by masking the logits to
          the task's own outputs (the cheap multi-head: no extra parameters; a sample's task follows from its label).
  domain  domain-incremental: labels are the position within the task (split: 0..classes_per_task-1), one
          shared head, no task identity at test time.
  class   class-incremental: one output per class over all tasks; training and testing use every output
          seen so far (outputs of later tasks are masked), no task identity.

Task order and all seeds are fixed by `seed` / `order_seed` and recorded in `Scenario.to_dict()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from netdiet.errors import NetdietError

SCENARIOS = ("split", "permuted", "incremental-data")
SETTINGS = ("task", "domain", "class")
_APPLIES = {"split": SETTINGS, "permuted": SETTINGS, "incremental-data": ("domain",)}


@dataclass
class Task:
    index: int
    classes: list[int]            # dataset classes in this task
    outputs: list[int]            # model outputs this task's labels map to
    x_train: torch.Tensor
    y_train: torch.Tensor         # already mapped to output indices
    x_test: torch.Tensor
    y_test: torch.Tensor

    def to_dict(self) -> dict:
        return {"index": self.index, "classes": self.classes, "outputs": self.outputs,
                "train_samples": len(self.y_train), "test_samples": len(self.y_test)}


@dataclass
class Scenario:
    name: str
    setting: str
    dataset: str
    tasks: list[Task]
    num_outputs: int
    seed: int = 0
    order_seed: int | None = None
    options: dict = field(default_factory=dict)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.tasks[0].x_train.shape[1:])

    def output_owner(self) -> torch.Tensor:
        """For task-IL: the task that owns each output (-1 if none)."""
        owner = torch.full((self.num_outputs,), -1, dtype=torch.long)
        for t in self.tasks:
            owner[torch.tensor(t.outputs)] = t.index
        return owner

    def seen_outputs(self, upto: int) -> torch.Tensor:
        """Bool mask of the outputs of tasks 0..upto."""
        mask = torch.zeros(self.num_outputs, dtype=torch.bool)
        for t in self.tasks[: upto + 1]:
            mask[torch.tensor(t.outputs)] = True
        return mask

    def train_logits(self, logits: torch.Tensor, y: torch.Tensor, current: int) -> torch.Tensor:
        """Logits as the loss sees them while training task `current` (inactive outputs -> -inf)."""
        if self.setting == "domain":
            return logits
        if self.setting == "task":
            owner = self.output_owner()
            sample_task = owner[y]                                  # a label's own task (replayed ones too)
            keep = owner.unsqueeze(0) == sample_task.unsqueeze(1)
            return logits.masked_fill(~keep, float("-inf"))
        return logits.masked_fill(~self.seen_outputs(current), float("-inf"))

    def eval_mask(self, after: int, task: int) -> torch.Tensor | None:
        """Outputs used when testing `task` after training task `after` (None = all)."""
        if self.setting == "domain":
            return None
        if self.setting == "task":
            mask = torch.zeros(self.num_outputs, dtype=torch.bool)
            mask[torch.tensor(self.tasks[task].outputs)] = True
            return mask
        return self.seen_outputs(after)

    def to_dict(self) -> dict:
        return {"name": self.name, "setting": self.setting, "dataset": self.dataset, "num_tasks": len(self.tasks),
                "num_outputs": self.num_outputs, "seed": self.seed, "order_seed": self.order_seed,
                "options": dict(self.options), "tasks": [t.to_dict() for t in self.tasks]}


def check_setting(scenario: str, setting: str) -> None:
    if scenario not in SCENARIOS:
        raise NetdietError(f"unknown scenario '{scenario}'; choose one of: {', '.join(SCENARIOS)}")
    if setting not in SETTINGS:
        raise NetdietError(f"unknown setting '{setting}'; choose one of: {', '.join(SETTINGS)}")
    if setting not in _APPLIES[scenario]:
        raise NetdietError(f"setting '{setting}' does not apply to scenario '{scenario}'; "
                           f"use --setting {' or '.join(_APPLIES[scenario])}")


def make_scenario(name: str, dataset, setting: str = "class", *, num_tasks: int | None = None,
                  classes_per_task: int | None = None, order_seed: int | None = None, seed: int = 0,
                  initial_fraction: float = 0.5) -> Scenario:
    """Build a scenario from a `netdiet.data.Dataset`. `order_seed` shuffles the class order (None = 0, 1, 2, ...)."""
    check_setting(name, setting)
    if name == "split":
        return _split(dataset, setting, num_tasks, classes_per_task, order_seed, seed)
    if name == "permuted":
        return _permuted(dataset, setting, num_tasks or 5, seed)
    return _incremental(dataset, setting, num_tasks or 4, initial_fraction, seed)


def _split(ds, setting: str, num_tasks: int | None, cpt: int | None, order_seed: int | None, seed: int) -> Scenario:
    n = ds.num_classes
    if cpt is None:
        cpt = n // num_tasks if num_tasks else 2
    if num_tasks is None:
        num_tasks = n // cpt if cpt >= 1 else 0
    if cpt < 1 or num_tasks < 2 or num_tasks * cpt > n:
        raise NetdietError(f"cannot split {n} classes into {num_tasks} tasks of {cpt}; "
                           f"need at least 2 tasks and tasks x classes-per-task <= {n}")
    order = list(range(n))
    if order_seed is not None:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(order_seed)).tolist()
    tasks = []
    for t in range(num_tasks):
        classes = order[t * cpt:(t + 1) * cpt]
        outputs = list(range(cpt)) if setting == "domain" else classes
        lut = torch.full((n,), -1, dtype=torch.long)
        lut[torch.tensor(classes)] = torch.tensor(outputs)
        xtr, ytr = ds.subset(classes, "train")
        xte, yte = ds.subset(classes, "test")
        tasks.append(Task(t, classes, outputs, xtr, lut[ytr], xte, lut[yte]))
    return Scenario("split", setting, ds.name, tasks, cpt if setting == "domain" else n, seed, order_seed,
                    {"classes_per_task": cpt, "class_order": order[: num_tasks * cpt]})


def _permuted(ds, setting: str, num_tasks: int, seed: int) -> Scenario:
    if num_tasks < 2:
        raise NetdietError(f"permuted needs at least 2 tasks, got {num_tasks}; pass --tasks 2 or more")
    n = ds.num_classes
    shape = tuple(ds.x_train.shape[1:])
    pixels = int(torch.tensor(shape).prod())
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(num_tasks):
        # task 0 sees the images as they are; every later task a fixed random pixel permutation
        perm = torch.arange(pixels) if t == 0 else torch.randperm(pixels, generator=gen)
        def permute(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(len(x), -1)[:, perm].reshape((len(x),) + shape)
        offset = 0 if setting == "domain" else n * t
        outputs = list(range(offset, offset + n))
        tasks.append(Task(t, list(range(n)), outputs, permute(ds.x_train), ds.y_train + offset,
                          permute(ds.x_test), ds.y_test + offset))
    return Scenario("permuted", setting, ds.name, tasks, n if setting == "domain" else n * num_tasks, seed, None,
                    {"permutation_seed": seed})


def _incremental(ds, setting: str, num_tasks: int, initial_fraction: float, seed: int) -> Scenario:
    if num_tasks < 2 or not 0.0 < initial_fraction < 1.0:
        raise NetdietError("incremental-data needs --tasks >= 2 and an initial fraction strictly between 0 and 1")
    n_train = len(ds.y_train)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    first = int(round(n_train * initial_fraction))
    rest = order[first:]
    per = (len(rest) + num_tasks - 2) // (num_tasks - 1)
    slices = [order[:first]] + [rest[i * per:(i + 1) * per] for i in range(num_tasks - 1)]
    classes = list(range(ds.num_classes))
    # the same classes and the same test set for every slice: R[i][j] is equal across j
    tasks = [Task(t, classes, classes, ds.x_train[idx], ds.y_train[idx], ds.x_test, ds.y_test)
             for t, idx in enumerate(slices)]
    return Scenario("incremental-data", setting, ds.name, tasks, ds.num_classes, seed, None,
                    {"initial_fraction": initial_fraction, "slice_sizes": [len(s) for s in slices]})
