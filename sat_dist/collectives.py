"""The process group's lifecycle and every load-time collective.

Keeping them in one module makes the communication pattern auditable: a load creates (or joins)
the default group, the TP groups and the DP groups, then does two object all-gathers (plan agreement,
final agreement), plus, when ranks share bytes, the exchange's signature all-gather and broadcasts.
The TP forward collectives live with the models (`models/tp_ops.py`). The video engine adds its CFG
pairs (two DP replicas) and their one all-gather per denoising step (`cfg_pair_group`, `all_gather_pair`).
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from .errors import RendezvousError
from .launch import LaunchInfo
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
    dev = pick_device(launch.local_rank, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = pick_backend(dev)
    timeout = datetime.timedelta(seconds=timeout_s)
    owns = False
    if not dist.is_initialized():
        owns = True
        if launch.world_size == 1 and launch.master_addr is None:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            addr = launch.master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
            port = launch.master_port or int(os.environ.get("MASTER_PORT", "29500"))
            try:
                dist.init_process_group(
                    backend,
                    init_method=f"tcp://{addr}:{port}",
                    rank=launch.rank,
                    world_size=launch.world_size,
                    timeout=timeout,
                )
            except Exception as exc:  # rendezvous failures are the first thing cluster users hit
                raise RendezvousError(
                    f"rank {launch.rank}: rendezvous with tcp://{addr}:{port} failed after at most "
                    f"{timeout_s:.0f}s ({type(exc).__name__}: {exc}); check MASTER_ADDR/MASTER_PORT "
                    f"and that the master node is reachable from {launch.launcher} rank {launch.rank}"
                ) from exc
    elif dist.get_world_size() != launch.world_size or dist.get_rank() != launch.rank:
        launch = LaunchInfo(
            launch.launcher, dist.get_rank(), launch.local_rank, dist.get_world_size(),
            launch.local_world_size, launch.node_rank, launch.master_addr, launch.master_port,
        )
        mesh = Mesh(launch.world_size, tp)
    rt = Runtime(launch=launch, mesh=mesh, device=dev, owns_process_group=owns)
    # new_group must be called by every rank for every group, in the same order.
    for ranks in mesh.tp_groups():
        group = dist.new_group(ranks, timeout=timeout) if mesh.tp > 1 else None
        if launch.rank in ranks:
            rt.tp_group = group
    # DP groups (ranks with the same TP rank) carry the exchange's broadcasts (sat_dist.exchange).
    for ranks in (list(range(t, mesh.world_size, mesh.tp)) for t in range(mesh.tp)):
        group = dist.new_group(ranks, timeout=timeout) if mesh.dp > 1 else None
        if launch.rank in ranks:
            rt.dp_group = group
    return rt


def teardown(rt: Runtime) -> None:
    """Destroy the process group if we created it (avoids gloo's abort-at-exit)."""
    if rt.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_async(t: torch.Tensor, src: int, group=None):
    """Start broadcasting `t` from global rank `src` over `group` (None: the world); `wait` ends it.
    The exchange's only weight-carrying collective."""
    return dist.broadcast(t, src=src, group=group, async_op=True)


def wait(work) -> None:
    work.wait()


def all_gather_objects(obj: Any) -> list[Any]:
    """Gather one picklable object from every rank (used for agreement, never for weights)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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
