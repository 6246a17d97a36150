"""The process group's lifecycle and every load-time collective.

Keeping them in one module makes the communication pattern auditable: a load creates (or joins)
the default group and the TP groups, then does exactly two object all-gathers (plan agreement,
final agreement). The TP forward collectives live with the models (`models/tp_ops.py`).
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
    return rt


def teardown(rt: Runtime) -> None:
    """Destroy the process group if we created it (avoids gloo's abort-at-exit)."""
    if rt.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(obj: Any) -> list[Any]:
    """Gather one picklable object from every rank (used for agreement, never for weights)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
