"""Step time of a training layout on a named device, projected from counted work: a per-operator roofline, ring
collectives over the device's links, a stated overlap model, and MFU as the literature defines it.

- Compute. For each aten operator of the counted step (counter.OpCounts.operators: its calls together, forward and
  backward), time = max(FLOPs / peak[dtype], (bytes read + bytes written) / memory bandwidth) (Williams, Waterman &
  Patterson, "Roofline", CACM 2009). `compute_s` sums the operators the peak bounds, `memory_s` those the bandwidth
  bounds. Counts made at another batch are scaled linearly to the micro-batch (every counted operator's FLOPs and
  bytes are linear in the batch); tensor parallelism divides every operator's work by tp (the replicated norms and
  embeddings make this slightly optimistic); checkpointing adds the recomputed forward FLOPs at the forward's
  time per FLOP. The optimizer step is priced once per step on the rank's shard of the parameters.
- Collectives (ring algorithms, NCCL's bus-bandwidth model): an all-reduce of S bytes over n ranks takes
  2 (n-1)/n * S / link, an all-gather or reduce-scatter whose full tensor is S bytes takes (n-1)/n * S / link.
  The link is the device's intra-node one (NVLink...) when the group lies inside a node, else the per-device
  network link: ranks are placed tensor-parallel first, so a tp group lies in one node and a data-parallel group
  spans dp / (devices_per_node / tp) nodes.
- Overlap (OVERLAP below, per strategy): what data-parallel communication hides behind compute; tensor-parallel
  all-reduces sit on the critical path (the next matmul needs their result).
- MFU (PaLM, Chowdhery et al. 2022, appendix B): model FLOPs per second / (devices x peak), model FLOPs = 6 N per
  token (N = parameters, no recompute; the attention term 12 L H Q T is left out), for token models; for other
  models netdiet's counted FLOPs of the step (forward + backward + optimizer, no recompute) stand in, and
  `mfu_definition` says which. `mfu_counted` is always the counted figure.
"""
from __future__ import annotations

from typing import Any

from netdiet.analysis.devices import Device
from netdiet.errors import NetdietError

SHARDED_OPTIMIZER = ("zero1", "zero2", "zero3", "fsdp")

OVERLAP = {
    "ddp": ("gradient all-reduce overlaps the last micro-batch's backward (bucketed; no_sync on the others): "
            "exposed = max(0, comm - backward compute of one micro-batch)"),
    "zero1": ("gradient all-reduce once per step overlaps the last micro-batch's backward; the all-gather of the "
              "updated parameter shards after the optimizer step is exposed"),
    "zero2": ("gradient reduce-scatter every micro-batch overlaps that micro-batch's backward; the all-gather of the "
              "updated parameter shards after the optimizer step is exposed"),
    "fsdp": ("parameter all-gathers overlap forward and backward compute (prefetch), gradient reduce-scatters "
             "overlap backward, every micro-batch: exposed = max(0, forward comm - forward compute) + "
             "max(0, backward comm - backward compute)"),
    "tp": "pure tensor parallel: every all-reduce is on the critical path",
}
OVERLAP["zero3"] = OVERLAP["fsdp"]
TP_NOTE = "; tensor-parallel all-reduces are on the critical path (not overlapped)"
TP_MODULE = "(tensor parallel)"        # parallel.per_rank's per-module name of the tp all-reduces
DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}


def ring_seconds(kind: str, message_bytes: float, ranks: int, bandwidth: float) -> float:
    """One ring collective over `ranks` ranks whose logical message is `message_bytes` (an all-reduce's buffer,
    an all-gather's gathered tensor, a reduce-scatter's input)."""
    if ranks <= 1 or message_bytes <= 0:
        return 0.0
    factor = 2.0 if kind == "all_reduce" else 1.0
    return factor * (ranks - 1) / ranks * float(message_bytes) / bandwidth


def _operator_times(counts: Any, peak: float, bandwidth: float, scale: float) -> dict[str, float]:
    """Forward and backward time of the counted operators (roofline per operator), split into compute- and
    memory-bound parts. An operator's time goes to forward and backward in the ratio of its FLOPs there (its
    bytes are counted for both together); one without FLOPs counts as forward."""
    out = {"forward_s": 0.0, "backward_s": 0.0, "compute_s": 0.0, "memory_s": 0.0, "forward_flops": 0.0}
    for row in counts.operators.values():
        f_fwd, f_bwd = float(row.get("flops", 0)) * scale, float(row.get("backward_flops", 0)) * scale
        moved = float(row.get("bytes_read", 0) + row.get("bytes_written", 0)) * scale
        t_flops, t_bytes = (f_fwd + f_bwd) / peak, moved / bandwidth
        t = max(t_flops, t_bytes)
        out["compute_s" if t_flops >= t_bytes else "memory_s"] += t
        share = f_fwd / (f_fwd + f_bwd) if f_fwd + f_bwd > 0 else 1.0
        out["forward_s"] += t * share
        out["backward_s"] += t * (1.0 - share)
        out["forward_flops"] += f_fwd
    return out


def _int(section: dict, *path: str, default: int = 0) -> int:
    cur: Any = section
    for p in path:
        cur = cur.get(p) if isinstance(cur, dict) else None
    return int(cur) if isinstance(cur, (int, float)) and not isinstance(cur, bool) else default


def project_step(counts: Any, section: dict, device: Device, *, dtype: str, micro_batch: int,
                 samples_unit: str = "samples", counts_batch: int | None = None, accumulation: int = 1,
                 tokens_per_sample: int | None = None, recompute_flops: int | None = None,
                 params: int | None = None) -> dict[str, Any]:
    """The projected step of one layout (`section`: parallel.per_rank's distributed section) on `device`.

    `counts`: the training OpCounts of one step at `counts_batch` samples (default: the section's `global_batch`
    as parallel.analyse sets it, else the micro-batch);
    `accumulation`: micro-batches per optimizer step; `samples_unit` "samples" or "tokens" (with
    `tokens_per_sample`, the sequence length; without it the throughput is in samples); `recompute_flops`: the checkpointed step's extra forward FLOPs
    at the micro-batch; `params`: the model's trainable parameters (default: the counter's root module).
    """
    if micro_batch < 1 or accumulation < 1:
        raise NetdietError(f"micro-batch and accumulation must be >= 1, got {micro_batch} and {accumulation}")
    if samples_unit not in ("samples", "tokens"):
        raise NetdietError(f"samples_unit must be 'samples' or 'tokens', got {samples_unit!r}")
    if samples_unit == "tokens" and not tokens_per_sample:
        samples_unit = "samples"        # the sequence length is unknown: samples/s, and the counted MFU
    peak, bw = device.peak(dtype), float(device.memory_bandwidth)
    strategy = str(section.get("strategy", "ddp"))
    world = max(1, _int(section, "world_size", default=1))
    tp = max(1, _int(section, "tp", default=1))
    dp = max(1, _int(section, "dp", default=world // tp))
    counts_batch = int(counts_batch or _int(section, "global_batch") or micro_batch)
    scale = micro_batch / float(counts_batch) / tp

    ops = _operator_times(counts, peak, bw, scale)
    recompute_s = 0.0
    if recompute_flops and ops["forward_flops"] > 0:
        recompute_s = ops["forward_s"] * float(recompute_flops) / tp / ops["forward_flops"]
    fwd_s, bwd_s = ops["forward_s"], ops["backward_s"] + recompute_s

    n_params = int(params if params is not None else _root_params(counts))
    shard = (dp if strategy in SHARDED_OPTIMIZER else 1) * tp
    opt_flops = float(counts.optimizer_flops) / shard
    state = _int(section, "per_rank", "optimizer_state")
    el = DTYPE_BYTES.get(dtype, 4)
    # read the parameter, its gradient and the state, write the parameter and the state (rank's shard)
    opt_bytes = 2 * state + 3 * el * n_params / shard
    optimizer_s = max(opt_flops / peak, opt_bytes / bw)
    opt_bound = "compute_s" if opt_flops / peak >= opt_bytes / bw else "memory_s"

    dp_spans_nodes = dp > max(1, device.devices_per_node // tp)   # does a data-parallel group leave its node?
    dp_kind, dp_bw = device.link(dp_spans_nodes)
    tp_kind, tp_bw = device.link(tp > device.devices_per_node)
    msgs = (section.get("collectives") or {}).get("messages") or {}
    ar, ag, rs = (float(msgs.get(k, 0) or 0) for k in ("all_reduce", "all_gather", "reduce_scatter"))
    # parallel.per_rank adds the tensor-parallel all-reduces to messages.all_reduce and names them per module
    tp_bytes = float(_int(section, "collectives", "per_module", TP_MODULE, "all_reduce")) if tp > 1 else 0.0
    ar = max(0.0, ar - tp_bytes)
    tp_s = ring_seconds("all_reduce", tp_bytes, tp, tp_bw) * accumulation
    t_ar, t_ag, t_rs = (ring_seconds(k, b, dp, dp_bw) for k, b in (("all_reduce", ar), ("all_gather", ag),
                                                                   ("reduce_scatter", rs)))
    if strategy == "ddp":
        comm_s = t_ar
        exposed = max(0.0, t_ar - bwd_s)
    elif strategy == "zero1":
        comm_s = t_ar + t_ag + t_rs
        exposed = max(0.0, t_ar + t_rs - bwd_s) + t_ag
    elif strategy == "zero2":
        comm_s = accumulation * t_rs + t_ag + t_ar
        exposed = accumulation * max(0.0, t_rs + t_ar - bwd_s) + t_ag
    elif strategy in ("fsdp", "zero3"):
        # the all-gathers happen once in forward and once in backward (half each); reduce-scatter in backward
        fwd_comm, bwd_comm = t_ag / 2, t_ag / 2 + t_rs + t_ar
        comm_s = accumulation * (t_ag + t_rs + t_ar)
        exposed = accumulation * (max(0.0, fwd_comm - fwd_s) + max(0.0, bwd_comm - bwd_s))
    else:   # tp alone: no data-parallel communication
        comm_s = t_ar + t_ag + t_rs
        exposed = comm_s
    compute_step = accumulation * (fwd_s + bwd_s) + optimizer_s
    step = compute_step + exposed + tp_s

    samples = micro_batch * accumulation * dp
    per_sample = tokens_per_sample if samples_unit == "tokens" else 1
    rate = samples * per_sample / step if step > 0 else None
    counted = float(counts.train_flops) * micro_batch / counts_batch * accumulation * dp
    counted_mfu = counted / (step * world * peak) if step > 0 else None
    if samples_unit == "tokens":
        model_flops = 6.0 * n_params * samples * per_sample
        mfu = model_flops / (step * world * peak) if step > 0 else None
        definition = ("PaLM appendix B: 6 N FLOPs per token (N = trainable parameters, no recompute, attention term "
                      "left out) x tokens per second / (devices x dense peak); mfu_counted uses netdiet's counted "
                      "step FLOPs (forward + backward + optimizer, no recompute) instead of 6 N")
    else:
        mfu = counted_mfu
        definition = ("netdiet's counted step FLOPs (forward + backward + optimizer, no recompute) per second / "
                      "(devices x dense peak); 6 N per token applies to token models only")
    return {
        "device": device.name, "dtype": dtype, "peak_flops": peak, "memory_bandwidth": bw,
        "micro_batch": micro_batch, "accumulation": accumulation, "samples_per_step": samples,
        "step_time_s": step,
        # the recomputed forward is matmul work: priced at the forward's time per FLOP and counted as compute
        **{k: accumulation * (ops[k] + (recompute_s if k == "compute_s" else 0.0)) + (optimizer_s if k == opt_bound
                                                                                      else 0.0)
           for k in ("compute_s", "memory_s")},
        "forward_s": accumulation * fwd_s, "backward_s": accumulation * bwd_s, "recompute_s": accumulation * recompute_s,
        "optimizer_s": optimizer_s, "comm_s": comm_s + tp_s, "comm_exposed_s": exposed + tp_s,
        "tp_comm_s": tp_s, "links": {"data_parallel": dp_kind if dp > 1 else None,
                                      "tensor_parallel": tp_kind if tp > 1 else None},
        "overlap": OVERLAP.get(strategy, OVERLAP["ddp"]) + (TP_NOTE if tp > 1 else ""),
        "tokens_or_samples_per_s": rate, "throughput_unit": f"{samples_unit}/s",
        "mfu": mfu, "mfu_counted": counted_mfu, "mfu_definition": definition,
    }


def _root_params(counts: Any) -> int:
    """Parameters of the counted model: its root module's (the counter lists it first, named '')."""
    for m in counts.modules:
        if m.name == "":
            return int(m.params)
    return int(sum(m.params for m in counts.modules if "." not in m.name))
