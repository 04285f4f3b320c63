"""Knowledge distillation: train a smaller student on the teacher's softened outputs (Hinton et al., 2015).

    loss = (1 - alpha) * CE(student(x), y)  +  alpha * T^2 * KL( softmax(teacher(x)/T) || softmax(student(x)/T) )

The T^2 keeps the soft term's gradients on the same scale as the hard term's when T changes.

Students:
  student: copy            the model handed to this stage is the student (e.g. a pruned or factorised copy from an
                           earlier stage); the teacher is ctx.teacher (the recipe passes the dense baseline) or,
                           without one, a frozen copy of the model as it entered the stage.
  student: <zoo name>      a fresh model of that spec, with `student_kwargs` (e.g. mlp with widths [100, 30], lenet5
                           with conv_channels [10, 20] and fc 100); the archive then rebuilds that spec instead.

Teachers:
  teacher: baseline        (default) ctx.teacher as above.
  teacher: ensemble:PATH   the K members of `netdiet train MODEL --ensemble K --out PATH`, combined as the mean of
                           their probabilities; its "logits" are the log of that mean, so softmax(logits / T) is the
                           mean sharpened or softened by T (the vote is not differentiable and is not used here).
                           The stage report copies the ensemble's own figures (accuracy, bytes, MACs, latency) from
                           PATH/ensemble.json, so one compress document holds one model -> K models -> one student.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netdiet.compression.base import CompressionState, StageContext, Technique, register_technique
from netdiet.compression.finetune import finetune
from netdiet.errors import NetdietError
from netdiet.models import create_model
from netdiet.training.ensemble import INDEX as ENSEMBLE_INDEX
from netdiet.training.ensemble import load_ensemble
from netdiet.training.loop import Callback

ENSEMBLE_PREFIX = "ensemble:"


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), averaged over the batch."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


class _SoftTargets(Callback):
    """Adds alpha * the distillation term; the teacher runs frozen, in eval mode, on the same batch."""

    def __init__(self, teacher: nn.Module, temperature: float, alpha: float) -> None:
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha

    def extra_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        if self.alpha == 0:
            return None
        with torch.no_grad():
            t_logits = self.teacher(x)
        return self.alpha * distillation_loss(logits, t_logits, self.temperature)


@register_technique
class Distill(Technique):
    name = "distill"
    defaults: dict[str, Any] = {"student": "copy", "student_kwargs": {}, "temperature": 4.0, "alpha": 0.9,
                                "teacher": "baseline"}

    def validate(self) -> None:
        o = self.options
        if not isinstance(o["student"], str) or not o["student"]:
            raise NetdietError(f"distill student {o['student']!r} is not a model spec; give 'copy' or a zoo name such as mlp")
        if not isinstance(o["student_kwargs"], dict):
            raise NetdietError("distill student_kwargs must be a mapping, e.g. {widths: [100, 30]}")
        if o["student"] == "copy" and o["student_kwargs"]:
            raise NetdietError("distill student_kwargs only applies to a zoo student; set student to a zoo name or drop student_kwargs")
        t = o["temperature"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise NetdietError(f"distill temperature {t!r} must be a positive number, e.g. 4")
        a = o["alpha"]
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
            raise NetdietError(f"distill alpha {a!r} is outside [0, 1]; it is the weight of the soft-target loss, e.g. 0.9")
        teacher = o["teacher"]
        if not isinstance(teacher, str) or not (teacher == "baseline" or teacher.startswith(ENSEMBLE_PREFIX)):
            raise NetdietError(f"distill teacher {teacher!r} is neither 'baseline' nor 'ensemble:PATH' "
                               "(PATH: the --out folder of `netdiet train MODEL --ensemble K`)")
        if teacher.startswith(ENSEMBLE_PREFIX):
            folder = Path(teacher[len(ENSEMBLE_PREFIX):])
            if not (folder / ENSEMBLE_INDEX).is_file():
                raise NetdietError(f"distill teacher {teacher!r}: {folder} holds no {ENSEMBLE_INDEX}; give the --out "
                                   "folder of `netdiet train MODEL --ensemble K`")

    def apply(self, model: nn.Module, state: CompressionState, ctx: StageContext) -> nn.Module:
        if ctx.finetune is None or ctx.finetune.epochs <= 0:
            raise NetdietError("distill trains the student, so the stage needs finetune epochs >= 1")
        o = self.options
        ensemble_info = None
        if o["teacher"].startswith(ENSEMBLE_PREFIX):
            teacher, ensemble_info = _ensemble_teacher(o["teacher"][len(ENSEMBLE_PREFIX):], state, ctx)
            w = next(model.parameters(), None)
            teacher = teacher.to(device=w.device) if w is not None else teacher
        else:
            teacher = ctx.teacher if ctx.teacher is not None else model
        teacher = copy.deepcopy(teacher)  # frozen snapshot: the student may be the very same module
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

        if o["student"] == "copy":
            student = model
        else:
            torch.manual_seed(ctx.seed)
            student = create_model(o["student"], **o["student_kwargs"])
            w = next(model.parameters(), None)
            if w is not None:
                student = student.to(device=w.device)
            # a fresh architecture: nothing recorded for the old model applies any more
            state.spec = {"spec": o["student"], "kwargs": dict(o["student_kwargs"])}
            state.structure, state.encodings, state.masks = [], {}, {}

        hard_weight = 1.0 - float(o["alpha"])

        def hard_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return hard_weight * F.cross_entropy(logits, y)

        history = finetune(student, state, ctx, description="distill",
                           extra_callbacks=[_SoftTargets(teacher, float(o["temperature"]), float(o["alpha"]))],
                           loss_fn=hard_loss)
        self._report = {
            "student": o["student"], "student_kwargs": dict(o["student_kwargs"]),
            "teacher_params": int(sum(p.numel() for p in teacher.parameters())),
            "student_params": int(sum(p.numel() for p in student.parameters())),
            "temperature": float(o["temperature"]), "alpha": float(o["alpha"]),
            "finetune": history.history if history else [],
            "teacher": ensemble_info or {"kind": "baseline"},
        }
        return student


def _ensemble_teacher(path: str, state: CompressionState, ctx: StageContext) -> tuple[nn.Module, dict]:
    """The ensemble in `path` as a teacher (log of the mean probabilities), and what the report says of it."""
    own_spec = (state.spec or {}).get("spec")
    ensemble, doc = load_ensemble(path, allow_spec=own_spec)
    ensemble.log_probs = True
    data_name = getattr(ctx.data, "name", None)
    trained_on = (doc.get("data") or {}).get("name")
    if data_name is not None and trained_on != data_name:
        raise NetdietError(f"the ensemble in {path} was trained on {trained_on!r}, not on {data_name!r}; distil it on "
                           f"the data it learned (--data {trained_on})")
    cost, lat = doc.get("cost") or {}, doc.get("latency") or {}
    info = {"kind": "ensemble", "path": str(path), "k": doc.get("k"), "mode": doc.get("mode"),
            "model": doc.get("model"), "accuracy": (doc.get("accuracy") or {}).get("mean"),
            "accuracy_vote": (doc.get("accuracy") or {}).get("vote"),
            "members_accuracy_mean": (doc.get("accuracy") or {}).get("members_mean"),
            "cost": cost.get("ensemble"), "single_cost": cost.get("single"), "file_bytes": cost.get("file_bytes"),
            "latency_batch": lat.get("batch"),
            "latency_ms": {name: (lat.get(name) or {}).get("median_ms") for name in ("single", "loop", "vmap")},
            "latency_stable": {name: (lat.get(name) or {}).get("stable") for name in ("single", "loop", "vmap")},
            "training": {k: (doc.get("training") or {}).get(k) for k in ("seconds", "flops")},
            "source": f"{path}/{ENSEMBLE_INDEX}"}
    return ensemble, info
