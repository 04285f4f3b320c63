"""Run one function on N local processes joined in a gloo process group, and collect every rank's result.

torch.multiprocessing starts the workers (spawn: a fresh interpreter each; or fork, which shares the caller's
objects without pickling them); they meet on a free localhost port. Each rank writes its result as JSON (atomically) into a private
temporary folder; the parent reads all of them after the workers have joined. `fn` must be importable at module
level and return plain JSON (dicts, lists, numbers, strings). A NetdietError on any rank becomes a NetdietError
in the parent (bad input, exit 2); any other failure a RuntimeError naming the rank (a bug, exit 1).
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
from typing import Any, Callable

from netdiet.errors import NetdietError
from netdiet.fileio import atomic_write_json


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, threads: int, fn: Callable[..., Any], args: tuple,
               folder: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    path = os.path.join(folder, f"rank{rank}.json")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        atomic_write_json(path, {"status": "ok", "result": fn(rank, world, *args)})
    except NetdietError as exc:
        atomic_write_json(path, {"status": "bad", "result": str(exc)})
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as an internal error
        atomic_write_json(path, {"status": "error", "result": f"{type(exc).__name__}: {exc}"})
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], args: tuple, world_size: int, *, threads_per_rank: int = 1,
              start_method: str = "spawn") -> list[Any]:
    """fn(rank, world_size, *args) on `world_size` gloo processes; the results in rank order.

    start_method "spawn" (a fresh interpreter per rank: `fn` and `args` travel pickled) or "fork" (the ranks
    inherit the caller's objects as they are, e.g. a model whose forward was replaced by a closure; each rank
    runs on `threads_per_rank` threads, 1 by default, so no OpenMP pool from before the fork is used)."""
    import torch.multiprocessing as mp

    if world_size < 1:
        raise NetdietError(f"world size must be 1 or more, got {world_size}")
    if start_method not in ("spawn", "fork"):
        raise NetdietError(f"start method must be spawn or fork, got {start_method!r}")
    with tempfile.TemporaryDirectory(prefix="netdiet-ranks-") as folder:
        failure = None
        try:
            mp.start_processes(_rank_main, args=(world_size, free_port(), threads_per_rank, fn, args, folder),
                               nprocs=world_size, join=True, start_method=start_method)
        except mp.ProcessRaisedException as exc:   # a rank died outside fn; its report (if any) says more
            failure = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        except mp.ProcessExitedException as exc:
            failure = f"a rank exited with code {exc.exit_code}"
        reports = []
        for rank in range(world_size):
            path = os.path.join(folder, f"rank{rank}.json")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {rank} of {world_size} wrote no result ({failure or 'no report'})")
            with open(path, encoding="utf-8") as fh:
                reports.append(json.load(fh))
    for rank, rep in enumerate(reports):
        if rep["status"] == "bad":
            raise NetdietError(str(rep["result"]))
        if rep["status"] != "ok":
            raise RuntimeError(f"rank {rank} of {world_size} failed: {rep['result']}")
    return [rep["result"] for rep in reports]
