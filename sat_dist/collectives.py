"""The process group's lifecycle and every load-time collective.

Keeping them in one module makes the communication pattern auditable: a load creates (or joins)
the default group, the TP groups and the DP groups, then does three object all-gathers (the
`latest` tag, the plan agreement carrying the exchange offers, the final agreement; one all-gather
each, `all_gather_objects`), plus, when the exchange is on, its broadcasts.
The TP forward collectives live with the models (`models/tp_ops.py`). The video engine adds its CFG
pairs (two DP replicas) and their one all-gather per denoising step (`cfg_pair_group`, `all_gather_pair`).
No wait on a peer is unbounded: collectives carry the group timeout, store calls run under `_bounded`,
and each rank marks its arrival at every agreement point so a failure names who never came.
"""
from __future__ import annotations

import datetime
import itertools
import os
import pickle
import threading
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .errors import GroupLoadError, RendezvousError
from .launch import LaunchInfo
from .pause import pause_point
from .runtime import Mesh, Runtime, pick_backend, pick_device


def setup(
    launch: LaunchInfo,
    tp: int,
    device: Optional[str] = None,
    timeout_s: float = 300.0,
) -> Runtime:
    """Join (or create) the default process group and build the TP groups.

    An existing default group (a user's script that already called init_process_group) is reused
    and left alone at the end; otherwise we create one and `teardown` destroys it.
    """
    mesh = Mesh(launch.world_size, tp)
    pause_point("rendezvous", launch.rank)
    dev = pick_device(launch.local_rank, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = pick_backend(dev)
    timeout = datetime.timedelta(seconds=timeout_s)
    owns, store = False, None
    if not dist.is_initialized():
        owns = True
        if launch.world_size == 1 and launch.master_addr is None:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            addr = launch.master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
            port = launch.master_port or int(os.environ.get("MASTER_PORT", "29500"))
            store = _rendezvous(launch, addr, port, backend, timeout_s, dev)
    elif dist.get_world_size() != launch.world_size or dist.get_rank() != launch.rank:
        launch = LaunchInfo(
            launch.launcher, dist.get_rank(), launch.local_rank, dist.get_world_size(),
            launch.local_world_size, launch.node_rank, launch.master_addr, launch.master_port,
        )
        mesh = Mesh(launch.world_size, tp)
    rt = Runtime(launch=launch, mesh=mesh, device=dev, owns_process_group=owns)
    rt.store, rt.arrivals = store or _default_store(), f"sat_dist/{next(_LOADS)}"

    def groups() -> None:  # new_group must be called by every rank for every group, in the same order.
        for ranks in mesh.tp_groups():
            group = dist.new_group(ranks, timeout=timeout) if mesh.tp > 1 else None
            if launch.rank in ranks:
                rt.tp_group = group
        # DP groups (ranks with the same TP rank) carry the exchange's broadcasts (sat_dist.exchange).
        for ranks in (list(range(t, mesh.world_size, mesh.tp)) for t in range(mesh.tp)):
            group = dist.new_group(ranks, timeout=timeout) if mesh.dp > 1 else None
            if launch.rank in ranks:
                rt.dp_group = group
    try:  # a store whose host stopped answers nothing: bounded, like every store wait here
        _bounded(groups, timeout_s + 2, f"rank {launch.rank}: creating the TP and DP groups", dev)
    except BaseException:
        teardown(rt)
        raise
    return rt


def teardown(rt: Runtime) -> None:
    """Destroy the process group if we created it (avoids gloo's abort-at-exit)."""
    rt.store = None
    if rt.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_async(t: torch.Tensor, src: int, group=None):
    """Start broadcasting `t` from global rank `src` over `group` (None: the world); `wait` ends it.
    The exchange's only weight-carrying collective."""
    return dist.broadcast(t, src=src, group=group, async_op=True)


def wait(work) -> None:
    work.wait()


# One all-gather carries a whole agreement object when it pickles to at most the frame's bytes: 64 KiB
# (a 5B DiT's plan offer is ~40 KB), less in worlds so large that world x frame would pass 16 MiB.
OBJECT_FRAME, FRAMES_BUDGET, MIN_FRAME = 64 << 10, 16 << 20, 4 << 10
_LEN = 8  # the frame's header: the pickle's length, int64


def object_frame(world: int) -> int:
    """The frame size every rank of a `world` uses (the same on all: it depends on nothing else)."""
    return max(MIN_FRAME, min(OBJECT_FRAME, FRAMES_BUDGET // max(1, world)))


def all_gather_objects(obj: Any) -> list[Any]:
    """Gather one picklable object from every rank (used for agreement, never for weights).

    One all-gather of a fixed-size frame (the pickle's length, then its first `object_frame` bytes)
    where `dist.all_gather_object` takes two (the sizes, then the padded pickles): each agreement
    point costs one round trip, which on a busy host is most of its cost. Only when some rank's
    object is larger does a second all-gather carry the rest; every rank reads every length from the
    first, so all of them take that branch together."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
    cap = object_frame(dist.get_world_size())
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    frame = torch.zeros(_LEN + cap, dtype=torch.uint8)
    frame[:_LEN] = torch.tensor([data.numel()], dtype=torch.int64).view(torch.uint8)
    frame[_LEN:_LEN + min(data.numel(), cap)] = data[:cap]
    frames = _all_gather(frame, dev)
    lengths = [int(f[:_LEN].view(torch.int64)[0]) for f in frames]
    parts = [bytes(f[_LEN:_LEN + min(n, cap)].numpy()) for f, n in zip(frames, lengths)]
    rest = max(lengths) - cap
    if rest > 0:  # every rank sends the longest tail's size; its own tail (empty when it fit) first
        tail = torch.zeros(rest, dtype=torch.uint8)
        tail[:max(0, data.numel() - cap)] = data[cap:]
        parts = [p + bytes(t[:max(0, n - cap)].numpy()) for p, t, n in zip(parts, _all_gather(tail, dev), lengths)]
    return [pickle.loads(p) for p in parts]


def _all_gather(t: torch.Tensor, dev: torch.device) -> list[torch.Tensor]:
    """All-gather host tensor `t` through `dev` (the backend's device); the results on the host."""
    t = t.to(dev)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


# --- the video engine's CFG parallelism (sat_dist.engine) -------------------------------------------

def cfg_pair_group(rt: Runtime, timeout_s: float = 300.0):
    """This rank's CFG pair: itself and the DP replica beside it with the same TP rank (DP ranks 2k and
    2k+1), which run the unconditional and conditional passes at once. Every rank must call it (each
    group is created by all ranks, in one order). None when there are fewer than 2 replicas."""
    dp, tp = rt.mesh.dp, rt.mesh.tp
    if dp < 2:
        return None
    if dp == 2 and getattr(rt, "dp_group", None) is not None:  # the pair is the DP group setup() made
        return rt.dp_group
    mine, timeout = None, datetime.timedelta(seconds=timeout_s)
    for k in range(dp // 2):
        for t in range(tp):
            ranks = [2 * k * tp + t, (2 * k + 1) * tp + t]
            group = dist.new_group(ranks, timeout=timeout)
            if rt.rank in ranks:
                mine = group
    return mine


def all_gather_pair(x: torch.Tensor, group) -> torch.Tensor:
    """Both halves of a CFG pair stacked on a new dim 0, in pair order (lower DP rank first): one all-gather."""
    x = x.contiguous()
    out = torch.empty((2, *x.shape), dtype=x.dtype, device=x.device)
    if x.device.type == "cuda":
        dist.all_gather_into_tensor(out, x, group=group)
    else:  # gloo: a list of views into `out`
        dist.all_gather(list(out.unbind(0)), x, group=group)
    return out


# --- rendezvous and arrival checks ---------------------------------------------------------------
# A c10d store answers nothing while the process hosting it is stopped (SIGSTOP, a hung NFS read):
# every blocking store call runs in `_bounded`, so a rank never waits past its timeout. Each rank
# marks its arrival at every agreement point (a `set`, which does not wait for an answer); after a
# failed collective, the keys that are missing name the ranks that did not arrive.

_LOADS = itertools.count()  # one arrival namespace per setup; every rank of a job counts alike


def _bounded(fn: Callable[[], Any], seconds: float, what: str, device: Optional[torch.device] = None) -> Any:
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


def _default_store() -> Any:
    """The store of a process group the caller created (None if torch does not expose it)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


def _rendezvous(launch: LaunchInfo, addr: str, port: int, backend: str, timeout_s: float,
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
        store = _bounded(lambda: dist.TCPStore(addr, port, world, is_master=rank == 0 and not agent, timeout=timeout,
                                               wait_for_workers=False, multi_tenant=not agent),
                         timeout_s + 1, f"rank {rank}: connecting to the store at {where}")
    except Exception as exc:  # rendezvous failures are the first thing cluster users hit
        raise RendezvousError(
            f"rank {rank}: cannot reach the rendezvous store at {where}, hosted by {host}, within {timeout_s:.0f}s "
            f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}); check that it started, "
            f"MASTER_ADDR/MASTER_PORT, and that the address is reachable from {launch.launcher} rank {rank}"
        ) from exc
    prefix = f"sat_dist/{next(_LOADS)}/rendezvous"
    arrived = False
    try:
        arrived = _bounded(lambda: _arrive_all(store, prefix, rank, world, timeout), timeout_s + 1,
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
    _bounded(lambda: dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank,
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
        return _bounded(probe, grace_s + 2, "the arrival check")
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
