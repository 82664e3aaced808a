"""Run a function on N gloo ranks (spawned processes) and collect what each returns."""
from __future__ import annotations

import faulthandler
import os
import socket
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # one intra-op thread per rank, as torchrun gives a job of several ranks per node: with the
    # default (one per core) the ranks' threads contend for the same cores
    torch.set_num_threads(1)
    # a rank that hangs shows where, in the test's output, before the parent gives up on it
    faulthandler.dump_traceback_later(TIMEOUT_S - 30, exit=False)
    try:
        result = fn(*args)
        queue.put((rank, result, None))
    except BaseException:  # reported to the parent, which fails the test
        import traceback
        queue.put((rank, None, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, args: tuple = (), world: int = 2) -> List[Any]:
    """fn(*args) on `world` ranks with RANK/WORLD_SIZE/MASTER_* set (fn initialises the group,
    or lets the trainer do it); returns the results by rank, or raises with a rank's traceback."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: List[Any] = [None] * world
    errors = []
    for _ in range(world):
        rank, result, err = queue.get(timeout=TIMEOUT_S)
        results[rank] = result
        if err:
            errors.append(f"rank {rank}:\n{err}")
    for p in procs:
        p.join(timeout=60)
    if errors:
        raise AssertionError("\n".join(errors))
    return results


def init_gloo() -> None:
    dist.init_process_group("gloo")
