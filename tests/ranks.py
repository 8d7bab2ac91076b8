"""Run a function on W real processes of one gloo process group (CPU) and collect what each returns."""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = fn(rank, world, *args)
    except BaseException:
        results[rank] = {"error": traceback.format_exc()}
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> list:
    """``fn(rank, world, *args)`` on ``world`` processes (torch.distributed initialised, gloo, 1 thread each);
    returns the W results (picklable). ``fn`` must be importable (a module-level function)."""
    manager = mp.Manager()
    results = manager.dict()
    try:
        mp.spawn(_worker, args=(world, free_port(), fn, args, results), nprocs=world, join=True)
    except mp.ProcessRaisedException:
        errors = [results[r]["error"] for r in range(world)
                  if isinstance(results.get(r), dict) and "error" in results[r]]
        raise AssertionError("\n".join(errors) or "a rank failed") from None
    return [results[r] for r in range(world)]
