"""Who am I: rank, local rank, world, node, device, and the dp x tp layout.

Launchers are detected from their own environment variables by small pure functions
(`detect_launch`), so the same command line works under torchrun, SLURM or MPI. Process
group creation itself lives in `collectives`; this module only decides what to ask for.
"""
from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Optional

import torch

from .errors import ConfigError, LaunchError


@dataclass(frozen=True)
class LaunchInfo:
    """What the launcher told this process about itself."""

    launcher: str
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: Optional[str] = None
    master_port: Optional[int] = None

    def to_dict(self) -> dict:
        return asdict(self)


def env_int(env: Mapping[str, str], key: str, default: Optional[int] = None) -> Optional[int]:
    """An integer launcher variable (unset or empty: `default`); anything else names itself."""
    value = env.get(key)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{key}={value!r} is not an integer; it comes from your launcher, check how it was set") from None


def from_torchrun(env: Mapping[str, str]) -> Optional[LaunchInfo]:
    """torchrun / torch.distributed.run (also any launcher that exports RANK and WORLD_SIZE)."""
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    world = env_int(env, "WORLD_SIZE")
    local_world = env_int(env, "LOCAL_WORLD_SIZE", world)
    rank = env_int(env, "RANK")
    return LaunchInfo(
        launcher="torchrun" if "TORCHELASTIC_RUN_ID" in env else "env",
        rank=rank,
        local_rank=env_int(env, "LOCAL_RANK", 0),
        world_size=world,
        local_world_size=local_world,
        node_rank=env_int(env, "GROUP_RANK", rank // max(local_world, 1)),
        master_addr=env.get("MASTER_ADDR"),
        master_port=env_int(env, "MASTER_PORT"),
    )


def single_process(env: Mapping[str, str]) -> LaunchInfo:
    """Plain `python -m sat_dist ...`: one rank, world of one."""
    return LaunchInfo("single", 0, 0, 1, 1, 0, env.get("MASTER_ADDR"), env_int(env, "MASTER_PORT"))


# Ordered: the first detector that recognises the environment wins. SLURM and MPI detectors are
# appended by `sat_dist.launchers` when it is importable (kept separate: one concept per module).
DETECTORS: list[Callable[[Mapping[str, str]], Optional[LaunchInfo]]] = [from_torchrun]


def detect_launch(env: Optional[Mapping[str, str]] = None) -> LaunchInfo:
    """Derive this process's identity from the launcher's environment."""
    env = os.environ if env is None else env
    from . import launchers  # noqa: F401  appends the SLURM/MPI detectors; lazy: it imports this module
    for detector in DETECTORS:
        info = detector(env)
        if info is not None:
            return info
    return single_process(env)


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

    def dp_groups(self) -> list[list[int]]:
        return [list(range(t, self.world_size, self.tp)) for t in range(self.tp)]


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


def pick_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass
class Runtime:
    """Everything a rank knows about its place in the job once the process group is up."""

    launch: LaunchInfo
    mesh: Mesh
    device: torch.device
    backend: str
    host: str = field(default_factory=socket.gethostname)
    tp_group: object = None  # torch.distributed.ProcessGroup, set by collectives.setup
    dp_group: object = None
    owns_process_group: bool = False

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
