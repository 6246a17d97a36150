"""The rendezvous through the c10d store, and the arrival marks that name who never came.

A c10d store answers nothing while the process hosting it is stopped (SIGSTOP, a hung NFS read):
every blocking store call runs in `bounded`, so a rank never waits past its timeout. Each rank
marks its arrival at every agreement point (a `set`, which does not wait for an answer); after a
failed collective, the keys that are missing name the ranks that did not arrive (`unreachable`).
Store traffic only: the collectives themselves live in `collectives`.
"""
from __future__ import annotations

import datetime
import itertools
import os
import threading
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .errors import GroupLoadError, RendezvousError
from .launch import LaunchInfo
from .runtime import Runtime

LOADS = itertools.count()  # one arrival namespace per setup; every rank of a job counts alike


def bounded(fn: Callable[[], Any], seconds: float, what: str, device: Optional[torch.device] = None) -> Any:
    """`fn()` in a daemon thread (with `device` current, for process groups created there);
    RendezvousError if it has not returned within `seconds`."""
    box: dict = {}

    def run() -> None:
        try:
            if device is not None and device.type == "cuda":
                torch.cuda.set_device(device)
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc
    th = threading.Thread(target=run, name="sat_dist-store", daemon=True)
    th.start()
    th.join(seconds)
    if th.is_alive():
        raise RendezvousError(f"{what} did not finish within {seconds:.0f}s: the rendezvous store did not answer "
                              f"(its host, rank 0 or the launcher's agent, is stopped or hung)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def default_store() -> Any:
    """The store of a process group the caller created (None if torch does not expose it)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


def rendezvous(launch: LaunchInfo, addr: str, port: int, backend: str, timeout_s: float,
                device: Optional[torch.device] = None) -> Any:
    """Create the default process group through a store on which every rank marks its arrival, so
    a rank that never comes is named. Under torchrun the agent hosts the store (as torch's own
    tcp:// rendezvous does when TORCHELASTIC_USE_AGENT_STORE is set); otherwise rank 0 does."""
    rank, world = launch.rank, launch.world_size
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    host = "the torchrun agent of node 0" if agent else f"rank 0 ({launch.launcher})"
    where = f"tcp://{addr}:{port}"
    timeout = datetime.timedelta(seconds=timeout_s)
    deadline = time.monotonic() + timeout_s
    try:
        store = bounded(lambda: dist.TCPStore(addr, port, world, is_master=rank == 0 and not agent, timeout=timeout,
                                               wait_for_workers=False, multi_tenant=not agent),
                         timeout_s + 1, f"rank {rank}: connecting to the store at {where}")
    except Exception as exc:  # rendezvous failures are the first thing cluster users hit
        raise RendezvousError(
            f"rank {rank}: cannot reach the rendezvous store at {where}, hosted by {host}, within {timeout_s:.0f}s "
            f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}); check that it started, "
            f"MASTER_ADDR/MASTER_PORT, and that the address is reachable from {launch.launcher} rank {rank}"
        ) from exc
    prefix = f"sat_dist/{next(LOADS)}/rendezvous"
    arrived = False
    try:
        arrived = bounded(lambda: _arrive_all(store, prefix, rank, world, timeout), timeout_s + 1,
                           f"rank {rank}: the rendezvous at {where}")
    except RendezvousError:
        raise
    except Exception:
        arrived = False
    if not arrived:
        missing = missing_ranks(store, prefix, world, 0.0)
        who = f"rank(s) {missing}" if missing else f"{host} (the store) or some rank"
        raise RendezvousError(
            f"rank {rank}: {who} of {world} did not join the rendezvous at {where} within {timeout_s:.0f}s (dead, "
            f"stopped, or never started): check that every rank started (`sat-dist env` on each) and reaches {addr}")
    left = max(deadline - time.monotonic(), 1.0)
    bounded(lambda: dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank,
                                             world_size=world, timeout=timeout), left + 2,
             f"rank {rank}: joining the process group at {where}", device)
    return store


def _arrive_all(store: Any, prefix: str, rank: int, world: int, timeout: datetime.timedelta) -> bool:
    store.set(f"{prefix}/{rank}", "1")
    if store.add(f"{prefix}/count", 1) == world:
        store.set(f"{prefix}/all", "1")
    try:
        store.wait([f"{prefix}/all"], timeout)
    except Exception:  # the store's timeout: someone did not come
        return False
    return True


def mark_arrival(rt: Runtime, phase: str) -> None:
    """Record in the store that this rank reached agreement point `phase` (never blocks)."""
    if rt.store is not None:
        try:
            rt.store.set(f"{rt.arrivals}/{phase}/{rt.rank}", "1")
        except Exception:  # the store is gone: the collective that follows fails and says so
            pass


def missing_ranks(store: Any, prefix: str, world: int, grace_s: float) -> Optional[list[int]]:
    """Ranks whose arrival key under `prefix` is missing, waiting up to `grace_s` for stragglers;
    None when the store does not answer within a few seconds."""
    if store is None:
        return None

    def probe() -> list[int]:
        end = time.monotonic() + grace_s
        while True:
            missing = [r for r in range(world) if not store.check([f"{prefix}/{r}"])]
            if not missing or time.monotonic() >= end:
                return missing
            time.sleep(0.1)
    try:
        return bounded(probe, grace_s + 2, "the arrival check")
    except Exception:
        return None


def unreachable(rt: Runtime, phase: str, exc: BaseException, waited: float, timeout_s: float) -> GroupLoadError:
    """The error of a rank whose collective at `phase` failed after `waited` seconds: it names the
    rank(s) that never marked their arrival there. A fast failure is a broken connection (a peer
    died): live stragglers get a moment to arrive first."""
    missing = not_arrived(rt, phase, 0.0 if waited >= 0.9 * timeout_s else min(3.0, timeout_s))
    if missing:
        who = f"rank(s) {missing} did not reach it (dead, stopped or hung)"
    elif missing is None:
        who = ("no rank can be named: the store that records arrivals did not answer either, so its host "
               "(rank 0, or the launcher's agent under torchrun) is stopped, hung or dead")
    else:
        who = "every rank reached it, then a peer's connection broke (a rank died or was interrupted)"
    cause = (str(exc).strip().splitlines() or [""])[0][:300]
    return GroupLoadError(
        f"sat_dist: rank {rt.rank} could not reach its peers during '{phase}' after {waited:.1f}s: {who}; "
        f"--timeout is {timeout_s:.0f}s. Cause: {type(exc).__name__}: {cause}",
        {r: f"did not reach '{phase}'" for r in missing or []}, phase, agreed=False)


def not_arrived(rt: Runtime, phase: str, grace_s: float) -> Optional[list[int]]:
    """The ranks that have not reached agreement point `phase` (None: the store did not answer)."""
    return missing_ranks(rt.store, f"{rt.arrivals}/{phase}", rt.world_size, grace_s)
