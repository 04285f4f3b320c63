"""Strategies that make more of few exemplars, each keeping every byte it uses in the ledger.

name          trains on                                 keeps (besides the weights)              answers with
rehearsal     new data + the whole buffer each epoch    class-balanced exemplars                 softmax
replay-wa     new data + the whole buffer each epoch    class-balanced exemplars                 softmax, new-class rows weight-aligned
nme           new data + the whole buffer each epoch    exemplars + float16 class means          nearest mean of exemplars (iCaRL)
der++         new data + the whole buffer each epoch    exemplars + their int8 logits            softmax, weight-aligned
lwf-logits    new data, distilled to stored logits      int8 logits of the old model on the      softmax
                                                        new task's data (while it learns)

Rehearsal here is not one replay batch per step (strategy `replay`, which shows each exemplar only a few times per
task) but one pass over new data and buffer together per epoch, so the exemplars weigh as much as their count.
Bias correction is weight aligning (Zhao et al. 2020): after each class-IL task the new classes' rows of the last
Linear layer are scaled so their mean norm equals the old classes' (no bytes kept). NME classifies by the
nearest L2-normalised mean of the exemplars' features (the input of the last Linear layer; Rebuffi et al. 2017).
DER++ (Buzzega et al. 2020) adds alpha * MSE between the model's logits on an exemplar and the logits stored with
it (int8 codes + one float16 scale per exemplar, over the outputs seen when it was stored). LwF-logits computes
the old model's outputs on the new data once, before training, and keeps them as int8 codes instead of a teacher
copy of the whole model.

With `same_view` (strategy auto always) the new task's images are trained, and every test image is answered, as
the exemplar format keeps them (encoded, decoded; an input transform that keeps no bytes), so the model cannot learn
"crisp image = new class" from crisp new data beside coarse exemplars.

Samples carry their index through the trainer: targets are encoded label + C * index (C = outputs), so the loss
finds each sample's stored logits; fit's running train accuracy is then meaningless and is not used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from netdiet.errors import NetdietError
from netdiet.incremental.ledger import KeptState
from netdiet.incremental.strategies import LwF, Replay, Work, register
from netdiet.training import predict


def last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise NetdietError("this strategy needs a model whose last layer is nn.Linear (its rows are the classes)")
    return linears[-1]


def quantize_rows(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) float -> int8 codes and one float16 scale per row (symmetric: value = code * scale)."""
    # floor in float16 itself: a floor applied before the cast (1e-8) rounds to 0 there, and an all-zero row then
    # divided 0 by 0 into NaN codes; 2**-24 (float16's smallest step) changes only scales that would have been 0
    scale = (z.abs().amax(1) / 127).half().clamp(min=2.0 ** -24)
    q = torch.clamp(torch.round(z / scale.float()[:, None]), -127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


class Rehearsal(Replay):
    """Class-balanced buffer; each epoch runs over the new task's data and every exemplar together."""
    name = "rehearsal"
    align = False          # weight aligning after each class-IL task

    def learn(self, model: nn.Module, task: int) -> Work:
        work = Work()
        t = self.scenario.tasks[task]
        x, y = (self.buffer.view(t.x_train) if self.cfg.same_view else t.x_train), t.y_train
        if len(self.buffer):
            xb, yb = self.buffer.decode()
            x, y = torch.cat([x, xb]), torch.cat([y, yb])
        self.fit_indexed(model, task, x, y, len(t.y_train), work)
        return work

    def replay_loss(self, logits: torch.Tensor, buffer_index: torch.Tensor) -> torch.Tensor | None:
        """Extra loss on the rows that are exemplars (their buffer positions in `buffer_index`)."""
        return None

    def fit_indexed(self, model: nn.Module, task: int, x: torch.Tensor, y: torch.Tensor, n_new: int, work: Work) -> None:
        scenario, C = self.scenario, self.scenario.num_outputs
        encoded = y + C * torch.arange(len(y))

        def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            label, index = target % C, target // C
            loss = F.cross_entropy(scenario.train_logits(logits, label, task), label)
            old = index >= n_new
            if old.any():
                extra = self.replay_loss(logits[old], index[old] - n_new)
                if extra is not None:
                    loss = loss + extra
            return loss

        self.fit_task(model, task, x, encoded, work, loss_fn=loss_fn)

    def answer(self, model: nn.Module) -> nn.Module:
        return model

    def eval_model(self, model: nn.Module, task: int) -> nn.Module:
        m = self.answer(model)
        return _Viewed(m, self.buffer.view) if self.cfg.same_view else m

    def after_task(self, model: nn.Module, task: int) -> Work:
        if self.align and self.scenario.setting == "class" and task > 0:
            weight_align(model, self.scenario.seen_outputs(task - 1), torch.tensor(self.scenario.tasks[task].outputs))
        return super().after_task(model, task)


@register
class WeightAligned(Rehearsal):
    """Rehearsal with weight aligning of the new classes' rows after each class-IL task."""
    name = "replay-wa"
    align = True


@torch.no_grad()
def weight_align(model: nn.Module, old: torch.Tensor, new: torch.Tensor) -> float:
    """Scale the new classes' rows (weight and bias) of the last Linear so their mean norm is the old classes'."""
    head = last_linear(model)
    norms = head.weight.norm(dim=1)
    old_idx = torch.nonzero(old).flatten()
    gamma = (norms[old_idx].mean() / norms[new].mean().clamp(min=1e-12)).item()
    head.weight[new] *= gamma
    return gamma


class _Viewed(nn.Module):
    """The model behind an input transform (same_view: test images pass through the exemplar format)."""

    def __init__(self, model: nn.Module, view) -> None:
        super().__init__()
        self.model, self.view = model, view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.view(x))


class _NMEClassifier(nn.Module):
    """Scores = minus the squared distance of the normalised feature to each class mean (-inf without a mean)."""

    def __init__(self, model: nn.Module, means: torch.Tensor, present: torch.Tensor) -> None:
        super().__init__()
        self.model, self.means, self.present = model, means, present

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.normalize(features(self.model, x), dim=1)
        d = torch.cdist(f, self.means.float()) ** 2
        return (-d).masked_fill(~self.present.unsqueeze(0), float("-inf"))


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of the last Linear layer (the penultimate features)."""
    got: list[torch.Tensor] = []
    handle = last_linear(model).register_forward_hook(lambda _m, inp, _out: got.append(inp[0].detach()))
    try:
        model(x)
    finally:
        handle.remove()
    return got[0].reshape(len(x), -1)


@register
class NME(Rehearsal):
    """iCaRL's nearest-mean-of-exemplars classifier over class-balanced rehearsal."""
    name = "nme"
    align = False

    def __init__(self, scenario, cfg) -> None:
        super().__init__(scenario, cfg)
        self.means: torch.Tensor | None = None     # float16 (outputs, feature dim), recomputed after each task
        self.present = torch.zeros(scenario.num_outputs, dtype=torch.bool)
        self._dim: int | None = None

    def _fixed(self) -> int:
        dim = self._dim or 0
        return super()._fixed() + self.scenario.num_outputs * dim * 2 + self.scenario.num_outputs   # means + present

    def after_task(self, model: nn.Module, task: int) -> Work:
        if self._dim is None:
            self._dim = last_linear(model).in_features
        work = super().after_task(model, task)
        x, y = self.buffer.decode()
        was = model.training
        model.eval()
        with torch.no_grad():
            f = F.normalize(torch.cat([features(model, x[i:i + 512]) for i in range(0, len(x), 512)]), dim=1)
        model.train(was)
        C = self.scenario.num_outputs
        means = torch.zeros(C, f.shape[1])
        present = torch.zeros(C, dtype=torch.bool)
        for c in range(C):
            rows = y == c
            if rows.any():
                means[c] = F.normalize(f[rows].mean(0), dim=0)
                present[c] = True
        self.means, self.present = means.half(), present
        work.forward_samples += len(x)
        return work

    def answer(self, model: nn.Module) -> nn.Module:
        return model if self.means is None else _NMEClassifier(model, self.means, self.present)

    def kept(self, model: nn.Module) -> KeptState:
        out = super().kept(model)
        if self.means is not None:
            out["class_means"] = {"means": self.means, "present": self.present.to(torch.uint8)}
        return out


@register
class DERpp(Rehearsal):
    """DER++: rehearsal with cross-entropy on exemplars plus alpha * MSE to their stored int8 logits."""
    name = "der++"
    align = False
    alpha = 0.5

    def __init__(self, scenario, cfg) -> None:
        super().__init__(scenario, cfg)
        C = scenario.num_outputs
        self.logit_codes = torch.zeros(0, C, dtype=torch.int8)
        self.logit_scales = torch.zeros(0, dtype=torch.float16)
        self._targets: torch.Tensor | None = None
        self._model: nn.Module | None = None
        # the outputs an exemplar's stored logits cover: those seen up to its label's task (class-IL), else all
        self._seen = torch.ones(C, C, dtype=torch.bool)
        if scenario.setting == "class":
            for t in scenario.tasks:
                self._seen[torch.tensor(t.outputs)] = scenario.seen_outputs(t.index)

    def _extra_per_exemplar(self) -> int:
        return super()._extra_per_exemplar() + self.scenario.num_outputs + 2    # int8 logits + float16 scale

    def learn(self, model: nn.Module, task: int) -> Work:
        self._targets = dequantize_rows(self.logit_codes, self.logit_scales) if len(self.logit_scales) else None
        return super().learn(model, task)

    def replay_loss(self, logits: torch.Tensor, buffer_index: torch.Tensor) -> torch.Tensor | None:
        if self._targets is None:
            return None
        z = self._targets[buffer_index]
        seen = self._seen[self.buffer.labels[buffer_index].long()]
        return self.alpha * ((logits - z) ** 2 * seen).sum() / seen.sum().clamp(min=1)

    def after_task(self, model: nn.Module, task: int) -> Work:
        self._model = model
        try:
            return super().after_task(model, task)
        finally:
            self._model = None

    def _keep(self, idx: torch.Tensor) -> None:
        super()._keep(idx)
        self.logit_codes, self.logit_scales = self.logit_codes[idx].clone(), self.logit_scales[idx].clone()

    def _add(self, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> None:
        super()._add(x, y, g)
        if len(x):
            q, s = quantize_rows(predict(self._model, self.buffer.view(x) if self.cfg.same_view else x))
            self.logit_codes, self.logit_scales = torch.cat([self.logit_codes, q]), torch.cat([self.logit_scales, s])

    def kept(self, model: nn.Module) -> KeptState:
        out = super().kept(model)
        if len(self.logit_scales):
            out["exemplars"] = {**out["exemplars"], "logits": self.logit_codes, "logit_scales": self.logit_scales}
        return out


@register
class LwFLogits(LwF):
    """LwF whose teacher is the old model's int8 logits on the new data, computed once before the task."""
    name = "lwf-logits"

    def __init__(self, scenario, cfg) -> None:
        super().__init__(scenario, cfg)
        self.codes: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None

    def learn(self, model: nn.Module, task: int) -> Work:
        work = Work()
        t = self.scenario.tasks[task]
        if task == 0:
            self.fit_task(model, task, t.x_train, t.y_train, work)
            return work
        need = len(t.y_train) * (self.scenario.num_outputs + 2)
        room = self.room(model)
        if room is not None and need > room:
            raise NetdietError(f"strategy 'lwf-logits' keeps int8 logits of the old model on task {task + 1}'s data "
                               f"({need} bytes) but only {max(room, 0)} bytes are left after the weights; raise --budget")
        self.codes, self.scales = quantize_rows(predict(model, t.x_train))
        work.forward_samples += len(t.y_train)
        target = dequantize_rows(self.codes, self.scales)
        groups, T, alpha, C = self._groups(task), self.cfg.lwf_temperature, self.cfg.lwf_alpha, self.scenario.num_outputs
        scenario = self.scenario

        def loss_fn(logits: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
            label, index = enc % C, enc // C
            loss = F.cross_entropy(scenario.train_logits(logits, label, task), label)
            z = target[index]
            kd = sum(F.kl_div(F.log_softmax(logits[:, g] / T, 1), F.softmax(z[:, g] / T, 1), reduction="batchmean")
                     for g in groups) * T * T / len(groups)
            return loss + alpha * kd

        self.fit_task(model, task, t.x_train, t.y_train + C * torch.arange(len(t.y_train)), work, loss_fn=loss_fn)
        return work

    def kept(self, model: nn.Module) -> KeptState:
        out = super().kept(model)
        if self.codes is not None:
            # the old model's logits used for this task, held alongside the model while it learned
            out["old_logits"] = {"codes": self.codes, "scales": self.scales}
        return out


register(Rehearsal)
