"""Data-parallel training through torch.distributed (gloo on CPU, NCCL on CUDA).

Two ways in, one code path:
  * `netdiet train ... --nproc 2` spawns the workers itself (torch.multiprocessing, a free localhost port);
  * `torchrun --nproc-per-node 2 -m netdiet train ...` sets RANK/WORLD_SIZE/MASTER_ADDR and we join that group.
Each worker runs the same `fit`; DistributedDataParallel averages gradients across workers in backward, the
DistributedSampler order in `data.epoch_batches` gives each worker its shard of every global batch, and only
rank 0 shows progress and writes files.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from netdiet.errors import NetdietError
from netdiet.fileio import atomic_write_json


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the current process group, or (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes in the environment."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist_info()


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel
    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index or 0])
    return DistributedDataParallel(model)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
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
        except mp.ProcessException:
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
