"""Data-parallel training through torch.distributed (gloo on CPU, NCCL on CUDA): DDP and FSDP2.

Two ways in, one code path:
  * `netdiet train ... --nproc 2` spawns the workers itself (torch.multiprocessing, a free localhost port);
  * `torchrun --nproc-per-node 2 -m netdiet train ...` sets RANK/WORLD_SIZE/MASTER_ADDR and we join that group.
Each worker runs the same `fit`; the DistributedSampler order in `data.epoch_batches` gives each worker its shard of
every global batch, and only rank 0 shows progress and writes files. Two strategies (`--parallel`):
  * ddp (the default): DistributedDataParallel keeps a full replica per rank and all-reduces the gradients;
  * fsdp: PyTorch's FSDP2 `fully_shard` on every repeated block (`fsdp_units`) and then the root, so each rank holds
    1/N of the parameters, gradients and optimizer state; parameters are all-gathered per block for forward and
    backward, gradients reduce-scattered. Parameters and gradient reduction stay fp32; `--precision bf16` is the
    same autocast as a single process (no MixedPrecisionPolicy), so FSDP computes what DDP computes.
Checkpoints hold the gathered full model and optimizer state in the one-process layout (`gather_state`), so a run
resumes under either strategy; `load_state` re-shards it. `StepPeak` measures one steady-state step's tensor peak on
every rank.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from netdiet.analysis.measurement import cpu_allocation_peak
from netdiet.analysis.step import unique_storage_bytes
from netdiet.errors import NetdietError
from netdiet.fileio import atomic_write_json

STRATEGIES = ("ddp", "fsdp")
# strategies `netdiet profile --parallel` estimates but train does not run, and what to use instead
NOT_TRAINED = {"zero1": "ZeRO stage 1 (optimizer state sharded)", "zero2": "ZeRO stage 2 (+ gradients sharded)",
               "zero3": "ZeRO stage 3 (+ parameters sharded)", "tp": "tensor parallel"}


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the current process group, or (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_from_env(device_type: str = "cpu") -> tuple[int, int]:
    """Join the process group torchrun describes in the environment: NCCL when training on CUDA, else gloo."""
    if not dist.is_initialized():
        cuda = device_type == "cuda" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist_info()


def check_parallel(parallel: str, nproc: int, batch_size: int, device_type: str = "cpu", precision: str = "fp32") -> None:
    """A train run's strategy checked before any work: a known name ("ddp", "fsdp"), two or more processes (--nproc N
    or torchrun) for fsdp (ddp on one process is the plain loop), a global batch the processes split evenly, and
    FSDP on CUDA under torchrun (NCCL; --nproc's own workers join a gloo group), and not with fp16's gradient scaler
    (it would look for inf/NaN in each rank's shard alone, so ranks could disagree about skipping a step)."""
    if parallel not in STRATEGIES:
        if isinstance(parallel, str) and parallel in NOT_TRAINED:
            hint = ("use --parallel fsdp: FSDP2 shards parameters, gradients and optimizer state, which is ZeRO-3-like"
                    if parallel.startswith("zero") else "train with --parallel ddp or fsdp")
            raise NetdietError(f"--parallel {parallel} ({NOT_TRAINED[parallel]}) is estimated by `netdiet profile "
                               f"--parallel {parallel}` but not trained by netdiet train; {hint}")
        raise NetdietError(f"--parallel {parallel!r} is unknown; choose one of: {', '.join(STRATEGIES)}")
    world = int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else nproc
    if parallel == "fsdp" and world < 2:
        raise NetdietError(f"--parallel {parallel} needs 2 or more processes: add --nproc N (N >= 2) or launch with "
                           f"torchrun --nproc-per-node N -m netdiet train ...")
    check_batch_split(batch_size, world)
    if parallel == "fsdp" and device_type == "cuda" and not launched_by_torchrun():
        raise NetdietError("--parallel fsdp on CUDA runs under torchrun (NCCL): torchrun --nproc-per-node N -m netdiet "
                           "train ... --parallel fsdp --device cuda (--nproc's workers use gloo, for CPU)")
    if parallel == "fsdp" and precision == "fp16":
        raise NetdietError("--precision fp16 is not supported with --parallel fsdp (its gradient scaler would check each "
                           "rank's gradient shard alone); use --precision bf16")


def check_batch_split(batch_size: int, world: int) -> None:
    """The batch is global: every process takes batch_size / world of it."""
    if world > 1 and batch_size % world:
        raise NetdietError(f"batch size {batch_size} does not split evenly over {world} processes; "
                           f"use a multiple of {world}")


def wrap(model: nn.Module, device: torch.device, strategy: str, world: int) -> nn.Module:
    """The module the loop calls: the model itself on one process, else its DDP wrapper or (FSDP2, in place) itself."""
    if world < 2:
        return model
    return wrap_fsdp(model, device) if strategy == "fsdp" else wrap_ddp(model, device)


def fsdp_units(model: nn.Module) -> list[str]:
    """The modules FSDP2 shards as units, by name (the root comes after them, holding what is left).

    The rule: the entries of the model's outermost block containers (nn.Sequential, nn.ModuleList) that hold
    parameters: a Sequential model's layers, a transformer's blocks. Each unit is all-gathered on its own in forward
    and backward and freed after, so at most about one unit is whole at a time."""
    units: list[str] = []

    def walk(mod: nn.Module, prefix: str) -> None:
        for name, child in mod.named_children():
            full = f"{prefix}{name}"
            if isinstance(mod, (nn.Sequential, nn.ModuleList)) and next(child.parameters(), None) is not None:
                units.append(full)
            else:
                walk(child, full + ".")
    walk(model, "")
    return units


def wrap_fsdp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for name in fsdp_units(model):
        fully_shard(model.get_submodule(name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def gradient_sync(net: nn.Module, strategy: str, world: int, sync: bool):
    """A context in which backward reduces gradients across ranks (sync) or only accumulates them locally (the
    micro-batches of --grad-accum before the last): DDP's no_sync, FSDP2's set_requires_gradient_sync."""
    if world < 2 or sync:
        return contextlib.nullcontext()
    if strategy == "fsdp":
        return _fsdp_no_sync(net)
    return net.no_sync()


@contextlib.contextmanager
def _fsdp_no_sync(net: nn.Module):
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_sharded(model: nn.Module) -> bool:
    if not _distributed():      # one process: nothing is sharded (and torch's FSDP package is not imported)
        return False
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def gather_state(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """(model state, optimizer state) whole, on CPU, in the one-process layout (optimizer state keyed by parameter
    index, as `opt.state_dict()`): what a checkpoint holds, whoever trained. Under FSDP every rank must call it
    (it all-gathers); rank 0 gets the tensors, the other ranks empty dicts."""
    if not _is_sharded(model):
        return model.state_dict(), (opt.state_dict() if opt is not None else None)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    if opt is None:
        return model_state, None
    by_name = get_optimizer_state_dict(model, opt, options=options)
    if not by_name:
        return model_state, {}
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
    return model_state, {"state": {index[n]: v for n, v in by_name["state"].items()}, "param_groups": groups}


def gather_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole CPU copies of tensors that may be FSDP shards (a callback's saved weights); collective under FSDP, so
    walked in sorted order (a dict loaded from safetensors has no order every rank shares)."""
    if not _distributed():
        return {k: v.detach().cpu() for k, v in tensors.items()}
    from torch.distributed.tensor import DTensor
    return {k: (tensors[k].full_tensor() if isinstance(tensors[k], DTensor) else tensors[k]).detach().cpu()
            for k in sorted(tensors)}


def shard_like(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors named like the model's state laid out as the model holds it (its FSDP shards), e.g. a
    checkpointed early-stopping best state before the callback loads it back into the sharded model."""
    if not _is_sharded(model):
        return dict(tensors)
    from torch.distributed.tensor import DTensor, distribute_tensor
    own = model.state_dict()
    out = {}
    for k, v in tensors.items():
        ref = own.get(k)
        out[k] = (distribute_tensor(v.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)
                  if isinstance(ref, DTensor) else v)
    return out


def load_state(model: nn.Module, opt: torch.optim.Optimizer, model_state: dict, opt_state: dict) -> None:
    """Load whole state (the one-process layout, as `gather_state` returns) into the model and optimizer; under FSDP
    each rank keeps its shards of it. Every rank passes the same whole state."""
    if not _is_sharded(model):
        model.load_state_dict(model_state)
        opt.load_state_dict(opt_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True)
    # every rank must walk the tensors in one order (each is scattered from rank 0 in turn), and a safetensors
    # file's key order is not fixed from process to process: take the model's own order
    set_model_state_dict(model, {k: model_state[k] for k in model.state_dict()}, options=options)
    names = [name for name, _ in model.named_parameters()]
    by_name = {"state": {names[i]: opt_state["state"][i] for i in sorted(opt_state["state"], key=int)},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in opt_state["param_groups"]]}
    set_optimizer_state_dict(model, opt, by_name, options=options)


class StepPeak:
    """The measured tensor peak of one training step on this rank, and every rank's figure gathered.

    CPU: the tensors the rank holds when the step starts (parameters -- its FSDP shards --, buffers, optimizer state,
    the batch, and DDP's gradient buckets, measured when DDP was built), counted by storage, plus the highest total
    the profiler's allocator events reach during the step (analysis.measurement's reading). CUDA:
    torch.cuda.max_memory_allocated over the step. Only that one step runs under the profiler."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self.held_by_wrapper, self.seconds = device, None, 0, None
        self._stack: contextlib.ExitStack | None = None
        self._base, self._probe = 0, None

    def wrap(self, model: nn.Module, strategy: str, world: int) -> nn.Module:
        """`wrap`, noting the bytes the wrapper allocates and keeps (DDP's buckets; FSDP's shards are parameters)."""
        if self.device.type == "cuda" or world < 2 or strategy == "fsdp":
            return wrap(model, self.device, strategy, world)
        with cpu_allocation_peak() as probe:
            net = wrap(model, self.device, strategy, world)
        self.held_by_wrapper = probe["live"]
        return net

    @property
    def running(self) -> bool:
        return self._stack is not None

    def start(self, model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...]) -> None:
        self._stack, self._t0 = contextlib.ExitStack(), time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        held = [_local(t) for t in [*model.parameters(), *model.buffers(), *state, *batch]]
        self._base = unique_storage_bytes(held)[0] + self.held_by_wrapper
        self._probe = self._stack.enter_context(cpu_allocation_peak())

    def stop(self) -> None:
        if self._stack is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stack.close()
            self.peak = self._base + self._probe["peak"]
        self._stack, self.seconds = None, time.perf_counter() - self._t0

    method = property(lambda self: (
        "torch.cuda.max_memory_allocated over one steady-state step" if self.device.type == "cuda" else
        "tensors held at the step's start (by storage) + torch.profiler CPU allocator events over one steady-state step"))

    def gather(self) -> list[int | None]:
        """Every rank's peak (None where a rank measured none), on every rank."""
        rank, world = dist_info()
        mine = torch.full((world,), 0, dtype=torch.int64)
        mine[rank] = -1 if self.peak is None else self.peak
        all_reduce_sum(mine)
        return [None if v < 0 else int(v) for v in mine.tolist()]


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel
    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index or 0])
    return DistributedDataParallel(model)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks, in place (a CPU tensor travels through the GPU when the group is NCCL's)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            t.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _report(path: str, status: str, payload: Any) -> None:
    atomic_write_json(path, {"status": status, "payload": payload})


def _worker(rank: int, world: int, port: int, threads: int, fn: Callable[..., Any], args: tuple, result_path: str) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = fn(*args)
        if rank == 0:
            _report(result_path, "ok", out)
    except NetdietError as exc:
        if rank == 0:
            _report(result_path, "bad", str(exc))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as an internal error
        if rank == 0:
            _report(result_path, "error", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], args: tuple, nproc: int, threads_per_proc: int | None = None) -> Any:
    """Run `fn(*args)` on `nproc` CPU processes joined in a gloo group; return rank 0's result.

    `fn` must be importable (module level); its result must be plain JSON (dicts, lists, numbers): rank 0 hands it
    back through a JSON file, not a pickle.
    """
    import json
    import tempfile

    import torch.multiprocessing as mp
    if nproc < 2:
        raise NetdietError(f"--nproc must be 2 or more for a distributed run, got {nproc}")
    threads = threads_per_proc or max(1, torch.get_num_threads() // nproc)
    with tempfile.TemporaryDirectory(prefix="netdiet-ddp-") as tmp:
        result_path = os.path.join(tmp, "rank0.json")
        try:
            mp.start_processes(_worker, args=(nproc, _free_port(), threads, fn, args, result_path), nprocs=nproc,
                               join=True, start_method="spawn")
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            pass  # rank 0's report below says what went wrong
        if os.path.isfile(result_path):
            with open(result_path, encoding="utf-8") as fh:
                doc = json.load(fh)
            status, payload = doc["status"], doc["payload"]
        else:
            status, payload = "error", "rank 0 returned nothing"
    if status == "bad":
        raise NetdietError(payload)
    if status == "error":
        raise RuntimeError(f"distributed worker failed: {payload}")
    return payload
