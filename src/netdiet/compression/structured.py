"""Structured pruning through Torch-Pruning: whole channels / neurons leave the network, so it is physically
smaller and faster (unlike masks, which only store zeros).

Torch-Pruning builds the dependency graph (residual adds, depthwise convolutions, concatenations, BN after conv,
the Linear after a Flatten) so coupled layers lose the same channels. Importance: `magnitude` (L2 norm of the
group's weights), `bn-scale` (|gamma| of the BatchNorm after each channel; Network Slimming) or `taylor`
(|w * dL/dw|, first-order Taylor, from a few batches of training data). Amount: `ratio` of channels per layer,
or `target_macs` (the smallest ratio whose MACs reach the target, found by bisection on copies).

The result is recorded as a replayable structure edit: for every module whose shape changed, its changed integer
attributes (out_channels, in_features, groups, ...) and the new shapes of its parameters and buffers. Replaying it
on the factory's dense model gives a module tree whose `load_state_dict` accepts the pruned weights — no pickle.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from netdiet.analysis.counter import count_ops
from netdiet.compression.base import (
    CompressionState,
    StageContext,
    Technique,
    register_structure_op,
    register_technique,
)
from netdiet.compression.prune import MaskHold
from netdiet.errors import NetdietError
from netdiet.training.loop import TrainConfig, fit

IMPORTANCES = ("magnitude", "bn-scale", "taylor")
EDIT_OP = "structured"
_TAYLOR_BATCHES = 4
_TAYLOR_BATCH_SIZE = 128


# ------------------------------------------------------------------ counting
def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """MACs of one forward pass, by netdiet's counter (the same figure `netdiet profile` reports)."""
    return int(count_ops(model, example_inputs).macs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ recording and replaying shapes
def _int_attrs(module: nn.Module) -> dict[str, Any]:
    """A module's plain integer / integer-tuple attributes: what Torch-Pruning rewrites besides tensors."""
    out = {}
    for key, value in vars(module).items():
        if key.startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, int) or (isinstance(value, tuple) and value and all(isinstance(v, int) and not isinstance(v, bool)
                                                                                 for v in value)):
            out[key] = value
    return out


def snapshot(model: nn.Module) -> dict[str, dict]:
    return {name: {"type": type(mod).__name__, "attrs": _int_attrs(mod),
                   "params": {k: list(p.shape) for k, p in mod.named_parameters(recurse=False)},
                   "buffers": {k: list(b.shape) for k, b in mod.named_buffers(recurse=False) if b is not None}}
            for name, mod in model.named_modules()}


def structure_edit(before: dict[str, dict], model: nn.Module) -> dict:
    """The replayable edit: every module whose attributes or tensor shapes differ from `before`."""
    after = snapshot(model)
    if set(after) != set(before):
        raise NetdietError("structured pruning added or removed modules; only shape changes can be replayed")
    modules = {}
    for name, now in after.items():
        was = before[name]
        attrs = {k: list(v) if isinstance(v, tuple) else v for k, v in now["attrs"].items() if was["attrs"].get(k) != v}
        params = {k: s for k, s in now["params"].items() if was["params"].get(k) != s}
        buffers = {k: s for k, s in now["buffers"].items() if was["buffers"].get(k) != s}
        if attrs or params or buffers:
            modules[name] = {"type": now["type"], "attrs": attrs, "params": params, "buffers": buffers}
    return {"op": EDIT_OP, "modules": modules}


@register_structure_op(EDIT_OP)
def replay_structured(model: nn.Module, edit: dict) -> nn.Module:
    """Give the factory's modules the recorded shapes (values are filled by load_state_dict afterwards)."""
    modules = edit.get("modules")
    if not isinstance(modules, dict):
        raise NetdietError("structured edit in the archive has no 'modules' table; the file is damaged")
    for name, change in modules.items():
        try:
            mod = model.get_submodule(name) if name else model
        except AttributeError:
            raise NetdietError(f"structured edit names module '{name}' which the model does not have; "
                               "rebuild with the same model spec and --model-kw as when compressing") from None
        if type(mod).__name__ != change.get("type"):
            raise NetdietError(f"structured edit expects '{name}' to be {change.get('type')} but the model has "
                               f"{type(mod).__name__}; use the same model spec as when compressing")
        for key, value in change.get("attrs", {}).items():
            setattr(mod, key, tuple(value) if isinstance(value, list) else value)
        for key, shape in change.get("params", {}).items():
            old = getattr(mod, key)
            setattr(mod, key, nn.Parameter(torch.zeros(shape, dtype=old.dtype), requires_grad=old.requires_grad))
        for key, shape in change.get("buffers", {}).items():
            old = getattr(mod, key)
            mod.register_buffer(key, torch.zeros(shape, dtype=old.dtype))
    return model


# ------------------------------------------------------------------ helpers
def output_layers(model: nn.Module, example_inputs: torch.Tensor) -> list[nn.Module]:
    """Modules whose output is a model output (the classifier, detection heads): their outputs must keep their width."""
    produced: dict[int, nn.Module] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: produced.__setitem__(id(out), mod))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example_inputs)
    except Exception as exc:  # noqa: BLE001 - the user's model failing on the inputs is bad input
        raise NetdietError(f"structured: the model fails on the example inputs {tuple(example_inputs.shape)} "
                           f"({type(exc).__name__}: {exc}); give inputs of the shape it expects") from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [produced[id(o)] for o in outs if id(o) in produced]


def _importance(kind: str):
    import torch_pruning as tp
    if kind == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "bn-scale":
        return tp.importance.BNScaleImportance()
    return tp.importance.GroupTaylorImportance()


def _accumulate_taylor_gradients(model: nn.Module, ctx: StageContext) -> None:
    if ctx.data is None:
        raise NetdietError("structured: taylor importance needs data (it uses gradients); pass a dataset or use magnitude")
    import torch.nn.functional as F
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(ctx.seed)
    x, y = ctx.data.x_train, ctx.data.y_train
    idx = torch.randperm(len(x), generator=gen)[:_TAYLOR_BATCHES * _TAYLOR_BATCH_SIZE]
    was_training = model.training
    model.eval()  # BN statistics must not move while we only look at gradients
    for i in range(0, len(idx), _TAYLOR_BATCH_SIZE):
        b = idx[i:i + _TAYLOR_BATCH_SIZE]
        F.cross_entropy(model(x[b]), y[b]).backward()
    model.train(was_training)


def _make_pruner(model: nn.Module, example_inputs: torch.Tensor, options: dict, ratio: float, steps: int):
    import torch_pruning as tp
    ignored = output_layers(model, example_inputs)
    for name in options["ignore"]:
        try:
            ignored.append(model.get_submodule(name))
        except AttributeError:
            raise NetdietError(f"structured: ignore names module '{name}' which the model does not have") from None
    return tp.pruner.MetaPruner(model, example_inputs, importance=_importance(options["importance"]),
                                pruning_ratio=ratio, iterative_steps=steps, ignored_layers=ignored,
                                global_pruning=options["global_pruning"], round_to=options["round_to"],
                                max_pruning_ratio=options["max_ratio"])


@contextmanager
def _pruning_errors():
    """Torch-Pruning failing on a model it cannot trace or slice is a limit of the model, not a crash of netdiet."""
    try:
        yield
    except NetdietError:
        raise
    except Exception as exc:  # noqa: BLE001 - Torch-Pruning raises many kinds
        raise NetdietError(f"structured: Torch-Pruning cannot prune this model ({type(exc).__name__}: {exc}); "
                           "list the modules it trips on in `ignore`, or use unstructured prune or lowrank") from None


def _prune_copy_macs(model: nn.Module, example_inputs: torch.Tensor, options: dict, ratio: float, ctx: StageContext) -> int:
    trial = copy.deepcopy(model)
    with _pruning_errors():
        pruner = _make_pruner(trial, example_inputs, options, ratio, 1)
        if options["importance"] == "taylor":
            _accumulate_taylor_gradients(trial, ctx)
        pruner.step()
    return count_macs(trial, example_inputs)


def ratio_for_macs(model: nn.Module, example_inputs: torch.Tensor, options: dict, target: int, ctx: StageContext,
                   tolerance: float = 0.01) -> float:
    """The smallest pruning ratio (within `tolerance`) whose pruned copy has MACs <= target (bisection: MACs fall
    as the ratio grows)."""
    lo, hi = 0.0, float(options["max_ratio"])
    if _prune_copy_macs(model, example_inputs, options, hi, ctx) > target:
        raise NetdietError(f"structured: target_macs {target:,} is below what pruning up to max_ratio {hi} reaches; "
                           "raise target_macs or max_ratio")
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if _prune_copy_macs(model, example_inputs, options, mid, ctx) <= target:
            hi = mid
        else:
            lo = mid
    return hi


# ------------------------------------------------------------------ the technique
@register_technique
class StructuredPruning(Technique):
    """Remove whole channels / neurons (Torch-Pruning), optionally iteratively with fine-tuning between steps."""

    name = "structured"
    defaults = {
        "ratio": 0.5,               # fraction of channels removed from each prunable layer (ignored if target_macs)
        "target_macs": None,        # MACs to reach: an integer, or a fraction in (0, 1) of the model's MACs
        "importance": "magnitude",  # magnitude | bn-scale | taylor
        "iterative_steps": 1,       # prune in this many steps, fine-tuning (ctx.finetune) after each
        "global_pruning": False,    # rank channels across layers instead of the same ratio in every layer
        "round_to": None,           # keep channel counts multiples of this (e.g. 8 for SIMD-friendly widths)
        "max_ratio": 0.9,           # no layer loses more than this fraction of its channels
        "ignore": [],               # module names never pruned (model outputs are always kept)
    }

    def validate(self) -> None:
        o = self.options
        r = o["ratio"]
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0.0 <= float(r) < 1.0:
            raise NetdietError(f"structured: ratio must be a number in [0, 1), got {r!r}")
        t = o["target_macs"]
        if t is not None and (not isinstance(t, (int, float)) or isinstance(t, bool) or t <= 0
                              or (isinstance(t, float) and t >= 1.0 and not t.is_integer())):
            raise NetdietError(f"structured: target_macs must be a MAC count (integer) or a fraction in (0, 1), got {t!r}")
        if o["importance"] not in IMPORTANCES:
            raise NetdietError(f"structured: importance must be one of {', '.join(IMPORTANCES)}, got {o['importance']!r}")
        s = o["iterative_steps"]
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise NetdietError(f"structured: iterative_steps must be an integer >= 1, got {s!r}")
        rt = o["round_to"]
        if rt is not None and (not isinstance(rt, int) or isinstance(rt, bool) or rt < 1):
            raise NetdietError(f"structured: round_to must be an integer >= 1 or null, got {rt!r}")
        m = o["max_ratio"]
        if not isinstance(m, (int, float)) or isinstance(m, bool) or not 0.0 < float(m) < 1.0:
            raise NetdietError(f"structured: max_ratio must be a number in (0, 1), got {m!r}")
        if not isinstance(o["ignore"], (list, tuple)) or not all(isinstance(s, str) for s in o["ignore"]):
            raise NetdietError(f"structured: ignore must be a list of module names, got {o['ignore']!r}")
        if not isinstance(o["global_pruning"], bool):
            raise NetdietError(f"structured: global_pruning must be true or false, got {o['global_pruning']!r}")
        self.edit: dict | None = None

    def apply(self, model: nn.Module, state: CompressionState, ctx: StageContext) -> nn.Module:
        o = self.options
        inputs = ctx.example_inputs
        if inputs is None:
            if ctx.data is None:
                raise NetdietError("structured: needs example inputs or data to trace the model's dependency graph")
            inputs = ctx.data.x_train[:1]
        if o["importance"] == "bn-scale" and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise NetdietError("structured: bn-scale importance needs BatchNorm layers and this model has none; "
                               "use importance magnitude or taylor")
        cfg: TrainConfig | None = ctx.finetune if ctx.finetune is not None and ctx.finetune.epochs > 0 else None
        if cfg is not None and ctx.data is None:
            raise NetdietError("structured: fine-tuning needs data; pass a dataset or set fine-tune epochs to 0")

        macs_before, params_before = count_macs(model, inputs), count_params(model)
        before = snapshot(model)
        target = None
        if o["target_macs"] is not None:
            t = o["target_macs"]
            target = int(t * macs_before) if isinstance(t, float) and t < 1.0 else int(t)
            ratio = ratio_for_macs(model, inputs, o, target, ctx)
        else:
            ratio = float(o["ratio"])

        steps = int(o["iterative_steps"])
        with _pruning_errors():
            pruner = _make_pruner(model, inputs, o, ratio, steps)
        history = []
        for i in range(steps):
            if o["importance"] == "taylor":
                _accumulate_taylor_gradients(model, ctx)
            with _pruning_errors():
                pruner.step()
            model.zero_grad(set_to_none=True)
            entry = {"step": i + 1, "macs": count_macs(model, inputs), "params": count_params(model)}
            self._invalidate_per_weight_state(model, state)
            if cfg is not None:
                step_cfg = replace(cfg, seed=ctx.seed, description=f"{cfg.description} (structured {i + 1}/{steps})")
                # weights pruned by an earlier stage stay pruned while the smaller network fine-tunes
                result = fit(model, ctx.data.x_train, ctx.data.y_train, step_cfg, callbacks=[MaskHold(state.masks)])
                entry["finetune"] = result.to_dict()
            history.append(entry)

        self.edit = structure_edit(before, model)
        state.structure.append(self.edit)
        macs_after, params_after = count_macs(model, inputs), count_params(model)
        layers = {name: {"type": ch["type"], "before": {k: before[name]["params"].get(k) for k in ch["params"]},
                         "after": ch["params"]}
                  for name, ch in self.edit["modules"].items()}
        self._report = {
            "technique": self.name, "importance": o["importance"], "ratio": ratio, "target_macs": target,
            "iterative_steps": steps, "params_before": params_before, "params_after": params_after,
            "macs_before": macs_before, "macs_after": macs_after,
            "macs_ratio": macs_before / macs_after if macs_after else None, "layers": layers, "steps": history,
        }
        return model

    @staticmethod
    def _invalidate_per_weight_state(model: nn.Module, state: CompressionState) -> None:
        """Masks and encodings of resized weights no longer fit: masks are re-read from the zeros that survived
        (slicing keeps pruned weights at zero); encodings of resized weights are dropped (the weight is dense again)."""
        params = dict(model.named_parameters())
        for name in list(state.masks):
            p = params.get(name)
            if p is None:
                del state.masks[name]
            elif p.shape != state.masks[name].shape:
                state.masks[name] = p.detach() != 0
        for name in list(state.encodings):
            p = params.get(name)
            enc = state.encodings[name]
            codes = enc.indices if enc.indices is not None else enc.q
            if p is None or (codes is not None and codes.shape != p.shape):
                del state.encodings[name]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
