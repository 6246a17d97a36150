"""Where this rank sits once launched: the dp x tp mesh, its device, and its process groups.

Pure decisions (no process group is created here; `collectives` does that): TP groups are
consecutive ranks, DP replicas are strided; `cuda:LOCAL_RANK` with NCCL when CUDA is present,
else CPU with gloo.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Optional

import torch

from .errors import ConfigError
from .launch import LaunchInfo


@dataclass(frozen=True)
class Mesh:
    """The dp x tp layout: TP groups are consecutive ranks, DP replicas are strided."""

    world_size: int
    tp: int

    def __post_init__(self) -> None:
        if self.tp < 1 or self.world_size % self.tp != 0:
            raise ConfigError(
                f"--tp {self.tp} does not divide the world size {self.world_size}: "
                f"launch a multiple of {self.tp} ranks or pick a TP size that divides {self.world_size}"
            )

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp

    def tp_groups(self) -> list[list[int]]:
        return [list(range(d * self.tp, (d + 1) * self.tp)) for d in range(self.dp)]



def pick_device(local_rank: int, requested: Optional[str] = None) -> torch.device:
    """`cuda:LOCAL_RANK` when CUDA is present, else CPU; an explicit request wins."""
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def kernel_id() -> str:
    """Which running kernel this rank is on (its boot_id; the host name where there is none): ranks
    on one kernel share its page cache, so a byte one of them read from storage is in memory for all."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()


def pick_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass
class Runtime:
    """Everything a rank knows about its place in the job once the process group is up."""

    launch: LaunchInfo
    mesh: Mesh
    device: torch.device
    host: str = field(default_factory=socket.gethostname)
    kernel: str = field(default_factory=lambda: kernel_id())  # looked up per Runtime (tests simulate hosts)
    tp_group: object = None  # torch.distributed.ProcessGroup, set by collectives.setup
    dp_group: object = None  # this rank's DP group (same TP rank), set by collectives.setup; None if dp == 1
    owns_process_group: bool = False
    store: object = None  # the c10d store, for arrival checks (collectives.mark_arrival / not_arrived)
    arrivals: str = ""  # this load's namespace of arrival keys in `store`

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def tp_rank(self) -> int:
        return self.mesh.tp_rank(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.mesh.dp_rank(self.rank)

    @property
    def tp(self) -> int:
        return self.mesh.tp
