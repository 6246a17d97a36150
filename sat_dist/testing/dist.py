"""Run a function on N forked ranks with a real gloo process group (about 0.1 s per launch).

Each rank gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT like torchrun would set, so
the code under test goes through its normal launcher detection. Results (or the exception type
and message) come back per rank; every rank destroys its process group before exiting.

Ranks run on the CPU (CUDA_VISIBLE_DEVICES="") unless the caller passes gpu=True: on a GPU host the
code under test would otherwise pick cuda:LOCAL_RANK by itself (sat_dist/runtime.py picks CUDA when
torch.cuda.is_available()), so CPU tests would quietly run on, and contend for, the GPUs.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass
class RankResult:
    rank: int
    value: Any = None
    error_type: Optional[str] = None
    error: Optional[str] = None
    traceback: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error_type is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, env: dict, conn, gpu: bool = False) -> None:
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    })
    if not gpu:  # before torch's lazy CUDA init reads it; overrides an inherited value
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.update(env.get(rank, {}))  # after the pin: a test may set its own CUDA_VISIBLE_DEVICES
    import torch

    torch.set_num_threads(1)
    result = RankResult(rank)
    try:
        result.value = fn(rank, *args)
    except BaseException as exc:  # reported to the parent, which asserts on it
        result.error_type = type(exc).__name__
        result.error = str(exc)
        result.traceback = traceback.format_exc()
    finally:
        try:
            import sat_dist

            sat_dist.shutdown()
        except Exception:
            pass
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    try:
        conn.send_bytes(pickle.dumps(result))
    except Exception as exc:  # unpicklable value: report that instead
        conn.send_bytes(pickle.dumps(RankResult(rank, error_type="PicklingError", error=str(exc))))
    conn.close()
    os._exit(0)


def run_ranks(world: int, fn: Callable, *args, timeout: float = 120.0, env: Optional[dict] = None,
              kill_rank: Optional[int] = None, gpu: bool = False) -> list[RankResult]:
    """Fork `world` ranks running `fn(rank, *args)`; return their results in rank order.

    `env` maps rank -> extra environment variables (applied last). `gpu`: keep the inherited
    CUDA_VISIBLE_DEVICES instead of hiding the GPUs. A rank that exits without reporting comes
    back with error_type 'Died'.

    The pin only takes effect if this (parent) process has not queried CUDA before forking: once
    `torch.cuda.is_available()` has run here, the CUDA runtime's device count is cached and forked
    children inherit it.
    """
    ctx = mp.get_context("fork")
    port = free_port()
    procs, pipes = [], []
    for rank in range(world):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(rank, world, port, fn, args, env or {}, child, gpu))
        p.start()
        child.close()
        procs.append(p)
        pipes.append(parent)
    results = []
    for rank, (p, conn) in enumerate(zip(procs, pipes)):
        if conn.poll(timeout):
            try:
                results.append(pickle.loads(conn.recv_bytes()))
            except EOFError:
                results.append(RankResult(rank, error_type="Died", error=f"exit code {p.exitcode}"))
        else:
            results.append(RankResult(rank, error_type="Timeout", error=f"no result within {timeout}s"))
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
    return results


def values(results: list[RankResult]) -> list[Any]:
    """The ranks' return values; fails with every rank's traceback if any rank failed."""
    bad = [r for r in results if not r.ok]
    if bad:
        raise AssertionError("\n".join(f"rank {r.rank}: {r.error_type}: {r.error}\n{r.traceback or ''}" for r in bad))
    return [r.value for r in results]


def timed_group_load(path: str, tp: int, timeout_s: float, exchange: Optional[str] = None) -> tuple[str, float]:
    """On a forked rank: load `path` and return (the GroupLoadError text, or "loaded"; seconds) —
    for tests where a peer dies mid-load and the survivors must fail within the timeout."""
    import time

    import sat_dist

    t = time.monotonic()
    try:
        sat_dist.load_model(path, tp=tp, timeout_s=timeout_s, exchange=exchange)
    except sat_dist.GroupLoadError as exc:
        return str(exc), time.monotonic() - t
    return "loaded", time.monotonic() - t
