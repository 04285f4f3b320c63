"""Unstructured magnitude pruning: zero the smallest weights, per layer or across layers, on a schedule.

Masks are plain bool keep-masks in `state.masks[param_name]`; the pruned weights are written as zeros into the
model itself, and `MaskHold` keeps them at zero through any later fine-tuning (QAT, clustering, distillation),
so the sparsity is real in the model that is evaluated and in the archive that stores it sparsely.

Schedules follow TF-MOT's semantics, with the training step t counted in optimizer steps:

    one-shot     prune to `sparsity` once, before fine-tuning.
    constant     prune to `sparsity` at begin_step and every `frequency` steps until end_step.
    polynomial   s_t = s_f + (s_i - s_f) * (1 - (t - t0) / n) ** power, n = end_step - t0, t clipped to
                 [t0, end_step]; masks are recomputed at t0 and every `frequency` steps until end_step.

Whatever the schedule, the final sparsity is applied once more when fine-tuning ends, so the promised
sparsity is reached exactly (TF-MOT misses it when (end - begin) is not a multiple of the frequency).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from netdiet.compression.base import (CompressionState, StageContext, Technique, check_name_patterns, prunable_parameters,
                                   register_technique, select_by_patterns)
from netdiet.errors import NetdietError
from netdiet.training.loop import Callback, TrainConfig, fit

SCHEDULES = ("one-shot", "constant", "polynomial")
SCOPES = ("layer", "global")


# ------------------------------------------------------------------ schedule
def polynomial_sparsity(step: int, initial: float, final: float, begin_step: int, end_step: int, power: float) -> float:
    """TF-MOT's PolynomialDecay value at `step` (clipped to [begin_step, end_step])."""
    if end_step <= begin_step:
        return final
    progress = min(1.0, max(0.0, (step - begin_step) / (end_step - begin_step)))
    return final + (initial - final) * (1.0 - progress) ** power


def should_prune(step: int, begin_step: int, end_step: int, frequency: int) -> bool:
    """TF-MOT's pruning turn: inside [begin_step, end_step] and on a multiple of `frequency` from begin_step."""
    return begin_step <= step <= end_step and (step - begin_step) % frequency == 0


# ------------------------------------------------------------------ masks
def keep_count(numel: int, sparsity: float) -> int:
    """How many weights survive at `sparsity` (round(n * (1 - s)), as TF-MOT)."""
    return int(round(numel * (1.0 - sparsity)))


def _scores(param: torch.Tensor, old_mask: torch.Tensor | None) -> torch.Tensor:
    # weights pruned earlier rank below every live weight, so sparsity only ever grows
    score = param.detach().abs().flatten().float().cpu()  # masks live on the CPU (state, archive)
    if old_mask is not None:
        score = torch.where(old_mask.flatten(), score, torch.full_like(score, -1.0))
    return score


def _mask_from_scores(score: torch.Tensor, keep: int) -> torch.Tensor:
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    if keep > 0:
        # stable sort: among equal magnitudes the later index survives, so the same input gives the same mask
        order = torch.argsort(score, stable=True)
        mask[order[score.numel() - keep:]] = True
    return mask


def magnitude_masks(params: dict[str, torch.Tensor], sparsity: float, scope: str = "layer",
                    old_masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Bool keep-masks pruning exactly n - round(n (1 - s)) weights of smallest |w| per layer, or over all layers."""
    old_masks = old_masks or {}
    if scope == "layer":
        return {name: _mask_from_scores(_scores(p, old_masks.get(name)), keep_count(p.numel(), sparsity)).view(p.shape)
                for name, p in params.items()}
    scores = [_scores(p, old_masks.get(name)) for name, p in params.items()]
    flat = torch.cat(scores) if scores else torch.zeros(0)
    mask = _mask_from_scores(flat, keep_count(flat.numel(), sparsity))
    out, offset = {}, 0
    for name, p in params.items():
        out[name] = mask[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()
    return out


def _named_params(model: nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Write zeros where a mask says prune (the weights themselves change: nothing to remove later)."""
    params = _named_params(model)
    for name, mask in masks.items():
        p = params.get(name)
        if p is not None and p.shape == mask.shape:
            p.mul_(mask.to(device=p.device, dtype=p.dtype))


def sparsity_report(model: nn.Module, names: list[str]) -> dict[str, Any]:
    """Zeros per layer and over the pruned layers, counted on the model's weights themselves."""
    params = _named_params(model)
    layers, zeros_total, n_total = {}, 0, 0
    for name in names:
        p = params[name].detach()
        zeros = int((p == 0).sum())
        layers[name] = {"shape": list(p.shape), "params": p.numel(), "zeros": zeros, "nonzero": p.numel() - zeros,
                        "sparsity": zeros / p.numel() if p.numel() else 0.0}
        zeros_total += zeros
        n_total += p.numel()
    return {"sparsity": zeros_total / n_total if n_total else 0.0, "params": n_total, "zeros": zeros_total,
            "nonzero": n_total - zeros_total, "layers": layers}


# ------------------------------------------------------------------ holding masks during training
class MaskHold(Callback):
    """Keeps pruned weights at zero while anything trains: zeroes their gradients before the optimizer step
    (so momentum/Adam state never builds up for them) and the weights after it.

        fit(model, x, y, cfg, callbacks=[MaskHold(state.masks)])
    """

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks
        self._pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def _bind(self, model: nn.Module) -> None:
        params = _named_params(model)
        self._pairs = []
        for name, mask in self.masks.items():
            p = params.get(name)
            if p is None:
                continue
            if p.shape != mask.shape:
                raise NetdietError(f"mask for '{name}' has shape {tuple(mask.shape)} but the weight is {tuple(p.shape)}; "
                                   "masks must be re-derived after a structural change")
            self._pairs.append((p, mask.to(device=p.device, dtype=p.dtype)))

    @torch.no_grad()
    def _zero_weights(self) -> None:
        for p, m in self._pairs:
            p.mul_(m)

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._bind(model)
        self._zero_weights()

    def before_step(self, model: nn.Module, step: int) -> None:
        for p, m in self._pairs:
            if p.grad is not None:
                p.grad.mul_(m)

    def after_step(self, model: nn.Module, step: int) -> None:
        self._zero_weights()

    def on_train_end(self, model: nn.Module) -> None:
        self._zero_weights()


class _PruningSchedule(Callback):
    """Recomputes the masks on the schedule's turns while fine-tuning, then holds them (MaskHold)."""

    def __init__(self, tech: "MagnitudePruning", names: list[str], start_masks: dict[str, torch.Tensor],
                 begin: int, end: int, frequency: int) -> None:
        self.tech, self.names, self.begin, self.end, self.frequency = tech, names, begin, end, frequency
        self.masks = dict(start_masks)
        self.hold = MaskHold(self.masks)
        self.events: list[dict] = []

    def _prune(self, model: nn.Module, step: int) -> None:
        target = self.tech.sparsity_at(step, self.begin, self.end)
        params = _named_params(model)
        new = magnitude_masks({n: params[n] for n in self.names}, target, self.tech.options["scope"], self.masks)
        self.masks.update(new)
        self.hold.masks = self.masks
        apply_masks(model, new)
        self.events.append({"step": step, "sparsity": target})

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if should_prune(0, self.begin, self.end, self.frequency):
            self._prune(model, 0)
        self.hold.on_train_begin(model, optimizer)

    def before_step(self, model: nn.Module, step: int) -> None:
        self.hold.before_step(model, step)

    def after_step(self, model: nn.Module, step: int) -> None:
        if should_prune(step, self.begin, self.end, self.frequency):
            self._prune(model, step)
            self.hold.on_train_begin(model, None)  # re-bind the new masks
        self.hold.after_step(model, step)


# ------------------------------------------------------------------ the technique
@register_technique
class MagnitudePruning(Technique):
    """Unstructured magnitude pruning with TF-MOT-style schedules and masks held through fine-tuning."""

    name = "prune"
    defaults = {
        "sparsity": 0.5,            # final fraction of zero weights, in [0, 1)
        "initial_sparsity": 0.0,    # polynomial schedule: sparsity at begin_step
        "scope": "layer",           # layer: each layer reaches `sparsity`; global: the smallest weights over all layers
        "schedule": "one-shot",     # one-shot | constant | polynomial
        "begin_step": 0,
        "end_step": None,           # None: the last fine-tuning step
        "frequency": None,          # None: about 10 mask updates between begin_step and end_step
        "power": 3.0,               # polynomial exponent (TF-MOT's default)
        "layers": None,             # glob patterns of parameter names to prune (None: every Linear/Conv/Embedding weight)
        "exclude": [],              # glob patterns of parameter names to leave dense
        "include_bias": False,
    }

    def validate(self) -> None:
        o = self.options
        for key in ("sparsity", "initial_sparsity"):
            v = o[key]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= float(v) < 1.0:
                raise NetdietError(f"prune: {key} must be a number in [0, 1), got {v!r}")
        if o["schedule"] not in SCHEDULES:
            raise NetdietError(f"prune: schedule must be one of {', '.join(SCHEDULES)}, got {o['schedule']!r}")
        if o["scope"] not in SCOPES:
            raise NetdietError(f"prune: scope must be one of {', '.join(SCOPES)}, got {o['scope']!r}")
        if o["schedule"] == "polynomial" and o["initial_sparsity"] > o["sparsity"]:
            raise NetdietError(f"prune: initial_sparsity {o['initial_sparsity']} exceeds the final sparsity {o['sparsity']}; "
                               "a polynomial schedule only increases sparsity")
        for key in ("begin_step", "end_step", "frequency"):
            v = o[key]
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise NetdietError(f"prune: {key} must be a non-negative integer, got {v!r}")
        if o["frequency"] is not None and o["frequency"] < 1:
            raise NetdietError("prune: frequency must be at least 1 step")
        if o["end_step"] is not None and o["end_step"] < o["begin_step"]:
            raise NetdietError(f"prune: end_step {o['end_step']} is before begin_step {o['begin_step']}")
        if not isinstance(o["power"], (int, float)) or isinstance(o["power"], bool) or o["power"] <= 0:
            raise NetdietError(f"prune: power must be a positive number, got {o['power']!r}")
        check_name_patterns("prune", o)
        self.masks: dict[str, torch.Tensor] = {}

    # -- schedule value
    def sparsity_at(self, step: int, begin: int, end: int) -> float:
        o = self.options
        if o["schedule"] == "polynomial":
            return polynomial_sparsity(step, float(o["initial_sparsity"]), float(o["sparsity"]), begin, end, float(o["power"]))
        return float(o["sparsity"])

    def select(self, model: nn.Module) -> dict[str, torch.nn.Parameter]:
        """The parameters this technique prunes, by the `layers` / `exclude` patterns."""
        o = self.options
        return select_by_patterns("prune", prunable_parameters(model, include_bias=o["include_bias"]), o["layers"], o["exclude"])

    def apply(self, model: nn.Module, state: CompressionState, ctx: StageContext) -> nn.Module:
        o = self.options
        params = self.select(model)
        names = list(params)
        old = {n: state.masks[n] for n in names if n in state.masks and state.masks[n].shape == params[n].shape}
        dense_before = sparsity_report(model, names)

        cfg: TrainConfig | None = ctx.finetune if ctx.finetune is not None and ctx.finetune.epochs > 0 else None
        events: list[dict] = []
        finetune_result = None
        if cfg is None or o["schedule"] == "one-shot":
            masks = magnitude_masks(params, float(o["sparsity"]), o["scope"], old)
            apply_masks(model, masks)
            events.append({"step": 0, "sparsity": float(o["sparsity"])})
            if cfg is not None:
                all_masks = {**state.masks, **masks}
                finetune_result = self._fit(model, ctx, cfg, [MaskHold(all_masks)])
        else:
            if ctx.data is None:
                raise NetdietError("prune: fine-tuning needs data; pass a dataset or set fine-tune epochs to 0")
            steps = cfg.epochs * math.ceil(len(ctx.data.x_train) / cfg.batch_size)
            begin = int(o["begin_step"])
            end = int(o["end_step"]) if o["end_step"] is not None else steps
            if begin > steps:
                raise NetdietError(f"prune: begin_step {begin} is after the last fine-tuning step {steps}; "
                                   "lower begin_step or fine-tune longer")
            frequency = int(o["frequency"]) if o["frequency"] is not None else max(1, (end - begin) // 10)
            others = {n: m for n, m in state.masks.items() if n not in params}
            sched = _PruningSchedule(self, names, old, begin, end, frequency)
            finetune_result = self._fit(model, ctx, cfg, [MaskHold(others), sched])
            events = sched.events
            masks = sched.masks
            # the promised final sparsity, exactly, whatever the step arithmetic
            final = magnitude_masks(params, float(o["sparsity"]), o["scope"], masks)
            apply_masks(model, final)
            masks = final
            if not events or events[-1]["sparsity"] != float(o["sparsity"]) or events[-1]["step"] != steps:
                events.append({"step": steps, "sparsity": float(o["sparsity"]), "final": True})

        self.masks = {n: m.clone() for n, m in masks.items()}
        state.masks.update(self.masks)
        after = sparsity_report(model, names)
        self._report = {
            "technique": self.name, "scope": o["scope"], "schedule": o["schedule"],
            "target_sparsity": float(o["sparsity"]), "sparsity": after["sparsity"],
            "params": after["params"], "nonzero": after["nonzero"], "zeros": after["zeros"],
            "nonzero_before": dense_before["nonzero"], "layers": after["layers"], "mask_updates": events,
            "finetune": finetune_result.to_dict() if finetune_result is not None else None,
        }
        return model

    @staticmethod
    def _fit(model: nn.Module, ctx: StageContext, cfg: TrainConfig, callbacks: list[Callback]):
        if ctx.data is None:
            raise NetdietError("prune: fine-tuning needs data; pass a dataset or set fine-tune epochs to 0")
        cfg = replace(cfg, seed=ctx.seed, description=f"{cfg.description} (prune)")
        return fit(model, ctx.data.x_train, ctx.data.y_train, cfg, callbacks=callbacks)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"mask.{n}": m for n, m in self.masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        bad = [k for k in state if not k.startswith("mask.")]
        if bad:
            raise NetdietError(f"prune: unexpected tensor(s) {bad[:3]} in its state; expected only mask.<param>")
        self.masks = {k[len("mask."):]: v.to(torch.bool).clone() for k, v in state.items()}

