"""Continual-learning strategies. Each trains a model task after task through the one trainer
(`netdiet.training.fit` with callbacks) and says exactly what it keeps between tasks (`kept`), for the byte ledger.

name              keeps (besides the weights)                        settings
naive             nothing (fine-tuning: the lower bound)              all
joint             every training sample so far (the upper bound)     all
ewc               online-EWC Fisher diagonal + anchor weights         all
lwf               a teacher copy of the previous model                all
replay            class-balanced exemplar buffer (compressed codes)   all
replay-reservoir  reservoir-sampled exemplar buffer                   all
packnet           one bit-packed mask per task (weights frozen)       task
shrink            class-balanced replay + int8 weights after each task (through the compress interface)  all
(rehearsal, replay-wa, nme, der++, lwf-logits: rehearsal.py; auto, the automatic budget split: autosplit.py)
A byte budget is a hard cap: replay sizes its buffer to what is left after the weights; EWC and LwF keep their
extra copies at float32, or at bfloat16 if only that fits; anything that cannot fit raises NetdietError."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from netdiet.compression.base import prunable_parameters
from netdiet.errors import NetdietError
from netdiet.incremental.buffer import ExemplarBuffer
from netdiet.incremental.ledger import KeptState, item_bytes, state_dict_item
from netdiet.incremental.packing import pack_mask
from netdiet.incremental.scenarios import SETTINGS, Scenario
from netdiet.incremental.shrink import Shrinker
from netdiet.training import Callback, TrainConfig, fit


@dataclass
class ContinualConfig:
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    seed: int = 0
    progress: bool = True
    budget: int | None = None                # hard cap in bytes on what the strategy keeps
    exemplar_bits: int = 32                  # 32 | 16 | 8 | 4 | 2 | 1
    exemplar_downsample: int = 1
    same_view: bool = False                  # rehearsal: train and test every image as the exemplar format keeps it
    exemplars: int | None = None             # at most this many exemplars (None: as many as the budget allows, else 200)
    exemplar_schedule: dict = field(default_factory=dict)  # task index -> {"bits", "exemplars", "downsample"} from then on
    ewc_lambda: float = 5000.0
    ewc_gamma: float = 1.0                   # online EWC: F <- gamma * F + F_task
    fisher_samples: int = 256
    lwf_temperature: float = 2.0
    lwf_alpha: float = 1.0
    packnet_finetune_epochs: int | None = None   # None: max(1, epochs // 2)
    shrink: str | None = None                # None | int8 | int4 | prune=S | prune=S+int8|int4 (after every task)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["exemplar_schedule"] = {str(k): v for k, v in self.exemplar_schedule.items()}
        return d


@dataclass
class Work:
    """Samples pushed through the model while learning one task (turned into training FLOPs by the runner)."""
    train_samples: int = 0      # forward + backward
    steps: int = 0              # optimizer steps
    forward_samples: int = 0    # forward only (teacher outputs, Fisher sampling)
    backward_samples: int = 0   # extra forward + backward without an optimizer step (Fisher)


class _Replay(Callback):
    """Adds the loss on one batch of exemplars to every training step (experience replay)."""

    def __init__(self, scenario: Scenario, task: int, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int, work: Work):
        self.scenario, self.task, self.x, self.y, self.batch, self.work = scenario, task, x, y, batch, work
        self.gen = torch.Generator().manual_seed(seed + 7919)

    def extra_loss(self, model, x, y, logits):
        idx = torch.randint(0, len(self.y), (min(self.batch, len(self.y)),), generator=self.gen)
        xr, yr = self.x[idx], self.y[idx]
        self.work.train_samples += len(idx)
        return F.cross_entropy(self.scenario.train_logits(model(xr), yr, self.task), yr)


class Strategy:
    name: ClassVar[str] = ""
    settings: ClassVar[tuple[str, ...]] = SETTINGS
    supports_shrink: ClassVar[bool] = True

    def __init__(self, scenario: Scenario, cfg: ContinualConfig) -> None:
        if scenario.setting not in self.settings:
            raise NetdietError(f"strategy '{self.name}' does not apply to {scenario.setting}-incremental learning; "
                               f"it needs --setting {' or '.join(self.settings)}")
        self.scenario, self.cfg = scenario, cfg
        self.shrinker = Shrinker(cfg.shrink) if cfg.shrink else None
        if self.shrinker and not self.supports_shrink:
            raise NetdietError(f"strategy '{self.name}' cannot be combined with --shrink; drop --shrink")
        self._weights: dict[str, torch.Tensor] | None = None    # set by the shrinker; None = state dict as is

    # ---------------------------------------------------------------- budget
    def model_bytes(self, model: nn.Module) -> int:
        return item_bytes(state_dict_item(model))

    def check_start(self, model: nn.Module) -> None:
        budget = self.cfg.budget
        if budget is None:
            return
        need = self.model_bytes(model) if not self.shrinker else self.shrinker.estimate(model)
        if need > budget:
            how = "" if self.shrinker else " or keep the weights as int8 with --shrink int8"
            raise NetdietError(f"budget {budget} bytes is smaller than the model itself ({need} bytes as kept); "
                               f"raise --budget, choose a smaller model{how}")

    def room(self, model: nn.Module, *other: int) -> int | None:
        """Bytes left in the budget after the weights and `other` items (None: no budget)."""
        if self.cfg.budget is None:
            return None
        return self.cfg.budget - item_bytes(self.weights_item(model)) - sum(other)

    # ---------------------------------------------------------------- training
    def train_config(self, task: int, epochs: int | None = None, what: str = "") -> TrainConfig:
        c = self.cfg
        return TrainConfig(epochs=c.epochs if epochs is None else epochs, batch_size=c.batch_size, lr=c.lr,
                           optimizer=c.optimizer, seed=c.seed * 1000 + task, progress=c.progress,
                           description=f"{self.name}{what} task {task + 1}/{len(self.scenario.tasks)}")

    def fit_task(self, model: nn.Module, task: int, x: torch.Tensor, y: torch.Tensor, work: Work,
                 callbacks: list[Callback] | None = None, epochs: int | None = None, what: str = "",
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        def task_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:     # unless `loss_fn` is given
            return F.cross_entropy(self.scenario.train_logits(logits, target, task), target)

        cfg = self.train_config(task, epochs, what)
        result = fit(model, x, y, cfg, callbacks=callbacks or [], loss_fn=loss_fn or task_loss)
        work.steps += result.steps
        work.train_samples += len(x) * len(result.history)

    def learn(self, model: nn.Module, task: int) -> Work:
        work = Work()
        t = self.scenario.tasks[task]
        self.fit_task(model, task, t.x_train, t.y_train, work)
        return work

    def after_task(self, model: nn.Module, task: int) -> Work:
        """Shrink (if asked) and update what is kept; called after `learn`, before testing. Returns extra work done."""
        if self.shrinker:
            self._weights = self.shrinker.apply(model, self.cfg.seed)
        return Work()

    # ---------------------------------------------------------------- what is kept
    def weights_item(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self._weights if self._weights is not None else state_dict_item(model)

    def kept(self, model: nn.Module) -> KeptState:
        return {"weights": self.weights_item(model)}

    def eval_model(self, model: nn.Module, task: int) -> nn.Module:   # the model that answers for `task`
        return model


# -------------------------------------------------------------------- bounds
class Naive(Strategy):
    name = "naive"


class Joint(Strategy):
    """Retrains on every sample seen so far; keeps the data (8-bit codes when that is lossless, else float32)."""
    name = "joint"

    def __init__(self, scenario: Scenario, cfg: ContinualConfig) -> None:
        super().__init__(scenario, cfg)
        x0 = scenario.tasks[0].x_train
        lossless = torch.allclose(torch.round(x0 * 255) / 255, x0, atol=1e-6) and x0.min() >= 0 and x0.max() <= 1
        self.data = ExemplarBuffer(scenario.sample_shape, scenario.num_outputs, bits=8 if lossless else 32)
        if lossless:
            self.data.value_range = torch.tensor([0.0, 1.0])

    def learn(self, model: nn.Module, task: int) -> Work:
        t = self.scenario.tasks[task]
        room = self.room(model, self.data.fixed_bytes(), item_bytes(self.data.tensors()))
        need = len(t.y_train) * self.data.bytes_per_exemplar()
        if room is not None and need > room:
            raise NetdietError(f"joint training keeps every sample: task {task + 1} needs {need} more bytes but only "
                               f"{max(room, 0)} are left in the budget; run joint without --budget (it is the upper bound)")
        self.data.add(t.x_train, t.y_train)
        x, y = self.data.decode()
        work = Work()
        self.fit_task(model, task, x, y, work)
        return work

    def kept(self, model: nn.Module) -> KeptState:
        return {"weights": self.weights_item(model), "data": self.data.tensors()}


# -------------------------------------------------------------------- regularisers
def _state_dtype(strategy: Strategy, model: nn.Module, copies: int, what: str) -> torch.dtype:
    """float32 if `copies` extra copies of the parameters fit the budget, else bfloat16, else a clear error."""
    n = sum(p.numel() for p in model.parameters())
    room = strategy.room(model)
    for dtype in (torch.float32, torch.bfloat16):
        if room is None or copies * n * torch.tensor([], dtype=dtype).element_size() <= room:
            return dtype
    raise NetdietError(f"strategy '{strategy.name}' keeps {what} ({copies} x {n} values, {copies * n * 2} bytes at bfloat16) "
                       f"but only {max(room, 0)} bytes of the budget are left after the weights; raise --budget")


class _EWCPenalty(Callback):
    def __init__(self, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], lam: float) -> None:
        self.fisher, self.anchor, self.lam = fisher, anchor, lam

    def extra_loss(self, model, x, y, logits):
        total = 0.0
        for name, p in model.named_parameters():
            if name in self.fisher:
                total = total + (self.fisher[name].float() * (p - self.anchor[name].float()) ** 2).sum()
        return 0.5 * self.lam * total


class EWC(Strategy):
    """Online EWC (Schwarz et al. 2018): one running Fisher diagonal F <- gamma F + F_task and one anchor."""
    name = "ewc"

    def __init__(self, scenario: Scenario, cfg: ContinualConfig) -> None:
        super().__init__(scenario, cfg)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def learn(self, model: nn.Module, task: int) -> Work:
        work = Work()
        t = self.scenario.tasks[task]
        cbs = [_EWCPenalty(self.fisher, self.anchor, self.cfg.ewc_lambda)] if self.fisher else []
        self.fit_task(model, task, t.x_train, t.y_train, work, cbs)
        return work

    def after_task(self, model: nn.Module, task: int) -> Work:
        work = super().after_task(model, task)
        dtype = _state_dtype(self, model, 2, "a Fisher diagonal and an anchor copy")
        new = fisher_diagonal(model, self.scenario, task, self.cfg.fisher_samples, self.cfg.seed)
        g = self.cfg.ewc_gamma
        self.fisher = {k: ((g * self.fisher[k].float() + v) if k in self.fisher else v).to(dtype) for k, v in new.items()}
        self.anchor = {k: p.detach().clone().to(dtype) for k, p in model.named_parameters()}
        n = min(self.cfg.fisher_samples, len(self.scenario.tasks[task].y_train))
        work.forward_samples += n          # the forward pass that samples y_hat
        work.backward_samples += n         # one forward + backward per sample for its gradient
        return work

    def kept(self, model: nn.Module) -> KeptState:
        return {"weights": self.weights_item(model), "fisher": dict(self.fisher), "anchors": dict(self.anchor)}


def fisher_diagonal(model: nn.Module, scenario: Scenario, task: int, samples: int, seed: int) -> dict[str, torch.Tensor]:
    """Mean squared per-sample gradient of log p(y_hat | x), y_hat drawn from the model (the true Fisher), via torch.func."""
    from torch.func import functional_call, grad, vmap

    t = scenario.tasks[task]
    gen = torch.Generator().manual_seed(seed + 104729 + task)
    idx = torch.randperm(len(t.y_train), generator=gen)[:samples]
    x, y = t.x_train[idx], t.y_train[idx]
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        add_mask = scenario.train_logits(torch.zeros(len(y), scenario.num_outputs), y, task)   # 0 or -inf
        probs = F.softmax(model(x) + add_mask, dim=1)
        y_hat = torch.multinomial(probs, 1, generator=gen).squeeze(1)

    def nll(p, xi, mi, yi):
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),)) + mi
        return F.cross_entropy(logits, yi.unsqueeze(0))

    per_sample = vmap(grad(nll), in_dims=(None, 0, 0, 0))
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(0, len(y), 64):
        grads = per_sample(params, x[i:i + 64], add_mask[i:i + 64], y_hat[i:i + 64])
        for k, g in grads.items():
            fisher[k] += (g ** 2).sum(0)
    model.train(was_training)
    return {k: v / len(y) for k, v in fisher.items()}


class _Distill(Callback):
    def __init__(self, teacher: nn.Module, groups: list[torch.Tensor], temperature: float, alpha: float, work: Work):
        self.teacher, self.groups, self.T, self.alpha, self.work = teacher, groups, temperature, alpha, work

    def extra_loss(self, model, x, y, logits):
        with torch.no_grad():
            t_logits = self.teacher(x)
        self.work.forward_samples += len(x)
        T, loss = self.T, 0.0
        for outs in self.groups:
            loss = loss + F.kl_div(F.log_softmax(logits[:, outs] / T, 1), F.softmax(t_logits[:, outs] / T, 1),
                                   reduction="batchmean") * T * T
        return self.alpha * loss / len(self.groups)


class LwF(Strategy):
    """Learning without Forgetting (Li & Hoiem 2017): distil the previous model's outputs on the new data."""
    name = "lwf"

    def __init__(self, scenario: Scenario, cfg: ContinualConfig) -> None:
        super().__init__(scenario, cfg)
        self.teacher: nn.Module | None = None
        self.teacher_dtype = torch.float32

    def _groups(self, task: int) -> list[torch.Tensor]:
        s = self.scenario
        if s.setting == "task":
            return [torch.tensor(s.tasks[k].outputs) for k in range(task)]
        if s.setting == "class":
            return [torch.nonzero(s.seen_outputs(task - 1)).flatten()]
        return [torch.arange(s.num_outputs)]

    def learn(self, model: nn.Module, task: int) -> Work:
        work = Work()
        t = self.scenario.tasks[task]
        cbs = []
        if task > 0:
            self.teacher_dtype = _state_dtype(self, model, 1, "a teacher copy of the model")
            self.teacher = copy.deepcopy(model).to(self.teacher_dtype).float().eval()  # values as kept
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            cbs = [_Distill(self.teacher, self._groups(task), self.cfg.lwf_temperature, self.cfg.lwf_alpha, work)]
        self.fit_task(model, task, t.x_train, t.y_train, work, cbs)
        return work

    def kept(self, model: nn.Module) -> KeptState:
        out = {"weights": self.weights_item(model)}
        if self.teacher is not None:
            # the teacher used for this task, held alongside the model while it learned
            out["teacher"] = {k: v.to(self.teacher_dtype) for k, v in self.teacher.state_dict().items()}
        return out


# -------------------------------------------------------------------- replay
class Replay(Strategy):
    """Experience replay from a class-balanced buffer of compressed exemplars, sized by the budget."""
    name = "replay"
    policy = "balanced"

    def __init__(self, scenario: Scenario, cfg: ContinualConfig) -> None:
        super().__init__(scenario, cfg)
        self.track_tasks = scenario.setting == "domain"   # domain-IL labels repeat across tasks: balance per (task, label)
        self.buffer = ExemplarBuffer(scenario.sample_shape, scenario.num_outputs, cfg.exemplar_bits, cfg.exemplar_downsample)
        self.groups = torch.zeros(0, dtype=torch.uint8)    # task id per exemplar, kept only in domain-IL
        self.seen = torch.zeros(1, dtype=torch.int64)       # reservoir: samples streamed so far
        self.gen = torch.Generator().manual_seed(cfg.seed + 31337)
        self.capacity_per_task: list[int] = []

    def learn(self, model: nn.Module, task: int) -> Work:
        work = Work()
        t = self.scenario.tasks[task]
        cbs = []
        if len(self.buffer):
            x, y = self.buffer.decode()
            cbs = [_Replay(self.scenario, task, x, y, self.cfg.batch_size, self.cfg.seed + task, work)]
        self.fit_task(model, task, t.x_train, t.y_train, work, cbs)
        return work

    def _fixed(self) -> int:
        return self.buffer.fixed_bytes() + (8 if self.policy == "reservoir" else 0)

    def _extra_per_exemplar(self) -> int:
        return 1 if self.track_tasks else 0     # the task id of each exemplar (domain-IL)

    def capacity(self, model: nn.Module, task: int) -> int:
        sched = {}
        for k in sorted(self.cfg.exemplar_schedule):
            if int(k) <= task:
                sched.update(self.cfg.exemplar_schedule[k])
        if "bits" in sched or "downsample" in sched:
            self.buffer.reformat(sched.get("bits"), sched.get("downsample"))
        limit = sched.get("exemplars", self.cfg.exemplars)
        room = self.room(model)
        per = self.buffer.bytes_per_exemplar() + self._extra_per_exemplar()
        by_budget = None if room is None else max(0, (room - self._fixed()) // per)
        if by_budget is None:
            cap = limit if limit is not None else 200
        else:
            cap = by_budget if limit is None else min(limit, by_budget)
        if by_budget is not None and by_budget == 0:
            raise NetdietError(f"strategy '{self.name}': the budget leaves {max(room, 0)} bytes after the weights, "
                               f"not enough for one {per}-byte exemplar; raise --budget or lower --exemplar-bits")
        return int(cap)

    def after_task(self, model: nn.Module, task: int) -> Work:
        work = super().after_task(model, task)   # shrink first: int8 weights leave more room for exemplars
        cap = self.capacity(model, task)
        self.capacity_per_task.append(cap)
        t = self.scenario.tasks[task]
        if self.policy == "reservoir":
            self._reservoir(t.x_train, t.y_train, task, cap)
        else:
            self._balanced(t.x_train, t.y_train, task, cap)
        return work

    def _keys(self, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        return labels.long() + (groups.long() * self.scenario.num_outputs if self.track_tasks else 0)

    def _balanced(self, x: torch.Tensor, y: torch.Tensor, task: int, cap: int) -> None:
        new_groups = torch.full((len(y),), task, dtype=torch.uint8)
        old_keys = self._keys(self.buffer.labels, self.groups)
        new_keys = self._keys(y, new_groups)
        keys = sorted(set(old_keys.tolist()) | set(new_keys.tolist()))
        quota = {k: cap // len(keys) + (1 if i < cap % len(keys) else 0) for i, k in enumerate(keys)}
        keep_old = []
        for k in sorted(set(old_keys.tolist())):
            keep_old.extend(torch.nonzero(old_keys == k).flatten()[: quota[k]].tolist())
        self._keep(torch.tensor(sorted(keep_old), dtype=torch.long))
        add = []
        perm = torch.randperm(len(y), generator=self.gen)
        for k in sorted(set(new_keys.tolist())):
            already = int((self._keys(self.buffer.labels, self.groups) == k).sum())
            take = perm[new_keys[perm] == k][: max(0, quota[k] - already)]
            add.extend(take.tolist())
        idx = torch.tensor(add, dtype=torch.long)
        self._add(x[idx], y[idx], new_groups[idx])

    def _reservoir(self, x: torch.Tensor, y: torch.Tensor, task: int, cap: int) -> None:
        if len(self.buffer) > cap:          # the capacity shrank (budget, bits or counts changed): drop at random
            self._keep(torch.randperm(len(self.buffer), generator=self.gen)[:cap].sort().values)
        seen = int(self.seen.item())
        slots: dict[int, int] = {}          # buffer slot -> sample index (last write wins)
        appended: list[int] = []
        n_buf = len(self.buffer)
        for i in torch.randperm(len(y), generator=self.gen).tolist():
            seen += 1
            if n_buf + len(appended) < cap:
                appended.append(i)
            else:
                j = int(torch.randint(0, seen, (1,), generator=self.gen))
                if j < cap:
                    if j < n_buf:
                        slots[j] = i
                    else:
                        appended[j - n_buf] = i
        groups = torch.full((len(y),), task, dtype=torch.uint8)
        for slot, i in slots.items():
            self.buffer.replace(slot, x[i], y[i])
            if self.track_tasks:
                self.groups[slot] = task
        idx = torch.tensor(appended, dtype=torch.long)
        self._add(x[idx], y[idx], groups[idx])
        self.seen = torch.tensor([seen], dtype=torch.int64)

    def _keep(self, idx: torch.Tensor) -> None:
        self.buffer.keep(idx)
        if self.track_tasks:
            self.groups = self.groups[idx].clone()

    def _add(self, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> None:
        self.buffer.add(x, y)
        if self.track_tasks:
            self.groups = torch.cat([self.groups, g])

    def kept(self, model: nn.Module) -> KeptState:
        ex = self.buffer.tensors()
        if ex and self.track_tasks:
            ex["tasks"] = self.groups
        if ex and self.policy == "reservoir":
            ex["seen"] = self.seen
        return {"weights": self.weights_item(model), "exemplars": ex}


class ReservoirReplay(Replay):
    name = "replay-reservoir"
    policy = "reservoir"


class ShrinkReplay(Replay):
    """Class-balanced replay whose weights are kept as int8 after every task, leaving room for more exemplars."""
    name = "shrink"

    def __init__(self, scenario: Scenario, cfg: ContinualConfig) -> None:
        if not cfg.shrink:
            cfg = copy.copy(cfg)
            cfg.shrink = "int8"
        super().__init__(scenario, cfg)


# -------------------------------------------------------------------- PackNet
class _PackNetHold(Callback):
    """Only this task's free weights (and its head rows) learn; everything else stays exactly as it was."""

    def __init__(self, trainable: dict[str, torch.Tensor]) -> None:
        self.trainable = trainable
        self.frozen: dict[str, torch.Tensor] = {}

    def on_train_begin(self, model, optimizer):
        self.frozen = {n: p.detach().clone() for n, p in model.named_parameters()}

    def before_step(self, model, step):
        for n, p in model.named_parameters():
            if p.grad is not None:
                p.grad.mul_(self.trainable[n])

    def after_step(self, model, step):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(torch.where(self.trainable[n], p, self.frozen[n]))


class PackNet(Strategy):
    """PackNet (Mallya & Lazebnik 2018), task-IL: train on the free weights, keep the largest 1/(T - t) of them for
    task t, retrain those, freeze them. Hidden biases learn on task 1 only; the last Linear layer is the
    multi-head (each task owns its output rows). Testing task j uses only the weights of tasks <= j, so earlier
    tasks see exactly the weights they were tested with: zero forgetting by construction."""
    name = "packnet"
    settings = ("task",)
    supports_shrink = False

    def __init__(self, scenario: Scenario, cfg: ContinualConfig) -> None:
        super().__init__(scenario, cfg)
        self.owner: dict[str, torch.Tensor] = {}      # hidden weight -> owning task (-1 free), int16 while training
        self.head: nn.Linear | None = None
        self.head_name = ""

    def _setup(self, model: nn.Module) -> None:
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears or linears[-1][1].out_features != self.scenario.num_outputs:
            raise NetdietError(f"packnet needs a model whose last layer is nn.Linear with {self.scenario.num_outputs} outputs")
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise NetdietError("packnet keeps one set of weights for all tasks and cannot freeze batch-norm statistics per task; "
                               "use a model without batch norm (e.g. mlp)")
        self.head_name = linears[-1][0]
        self.head = linears[-1][1]
        head_w = f"{self.head_name}.weight" if self.head_name else "weight"
        self.owner = {n: torch.full(p.shape, -1, dtype=torch.int16)
                      for n, p in prunable_parameters(model).items() if n != head_w}

    def _trainable(self, model: nn.Module, task: int) -> dict[str, torch.Tensor]:
        rows = torch.zeros(self.scenario.num_outputs, dtype=torch.bool)
        rows[torch.tensor(self.scenario.tasks[task].outputs)] = True
        out = {}
        for n, p in model.named_parameters():
            if n in self.owner:
                out[n] = (self.owner[n] == -1) | (self.owner[n] == task)
            elif n.startswith(f"{self.head_name}.") or (not self.head_name and n in ("weight", "bias")):
                out[n] = rows.view(-1, *([1] * (p.dim() - 1))).expand_as(p)
            else:
                out[n] = torch.full(p.shape, task == 0, dtype=torch.bool)   # hidden biases: first task only
        return out

    def learn(self, model: nn.Module, task: int) -> Work:
        if not self.owner:
            self._setup(model)
        work = Work()
        t = self.scenario.tasks[task]
        if task > 0:
            self._reinit_free(model, task)
        trainable = self._trainable(model, task)
        self.fit_task(model, task, t.x_train, t.y_train, work, [_PackNetHold(trainable)])
        # keep the largest 1/(T - task) of the free weights of every layer for this task; zero the rest
        share = 1.0 / (len(self.scenario.tasks) - task)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, own in self.owner.items():
                free = own == -1
                k = int(round(free.sum().item() * share))
                score = torch.where(free, params[n].abs(), torch.full_like(params[n], -1.0)).flatten()
                keep = torch.zeros(score.numel(), dtype=torch.bool)
                if k > 0:
                    keep[torch.argsort(score, stable=True)[score.numel() - k:]] = True
                keep = keep.view(own.shape) & free
                own[keep] = task
                params[n][free & ~keep] = 0.0
        epochs = self.cfg.packnet_finetune_epochs if self.cfg.packnet_finetune_epochs is not None else max(1, self.cfg.epochs // 2)
        if epochs > 0:
            trainable = {n: (self.owner[n] == task) if n in self.owner else m for n, m in self._trainable(model, task).items()}
            self.fit_task(model, task, t.x_train, t.y_train, work, [_PackNetHold(trainable)], epochs=epochs, what=" retrain")
        return work

    def _reinit_free(self, model: nn.Module, task: int) -> None:
        """Free weights were zeroed by the last pruning; give them a fresh U(-1/sqrt(fan_in), 1/sqrt(fan_in)) start
        (nn.Linear's default) from a seeded generator, so the new task does not start from zeros (costs no bytes)."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 7 + task)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, own in self.owner.items():
                p = params[n]
                bound = 1.0 / math.sqrt(max(1, p[0].numel()))
                fresh = (torch.rand(p.shape, generator=gen) * 2 - 1) * bound
                p.copy_(torch.where(own == -1, fresh, p))

    def eval_model(self, model: nn.Module, task: int) -> nn.Module:
        view = copy.deepcopy(model)
        params = dict(view.named_parameters())
        with torch.no_grad():
            for n, own in self.owner.items():
                params[n].mul_(((own >= 0) & (own <= task)).to(params[n].dtype))
        return view

    def kept(self, model: nn.Module) -> KeptState:
        done = max((int(o.max()) for o in self.owner.values()), default=-1)
        masks = {f"task{t}/{n}": pack_mask(own == t) for t in range(done + 1) for n, own in self.owner.items()}
        return {"weights": self.weights_item(model), "masks": masks}


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in
                                         (Naive, Joint, EWC, LwF, Replay, ReservoirReplay, PackNet, ShrinkReplay)}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: strategies defined in other modules (rehearsal.py, autosplit.py) join the registry."""
    STRATEGIES[cls.name] = cls
    return cls


def create_strategy(name: str, scenario: Scenario, cfg: ContinualConfig) -> Strategy:
    if name not in STRATEGIES:
        raise NetdietError(f"unknown strategy '{name}'; choose one of: {', '.join(STRATEGIES)} or all")
    return STRATEGIES[name](scenario, cfg)


def applicable(setting: str) -> list[str]:
    return [n for n, cls in STRATEGIES.items() if setting in cls.settings]
