"""Where this rank sits once launched: the dp x tp mesh, its device, and its process groups.

Pure decisions (no process group is created here; `collectives` does that): TP groups are
consecutive ranks, DP replicas are strided, CFG pairs are neighbouring DP replicas; `cuda:LOCAL_RANK`
with NCCL when CUDA is present (one GPU per rank, checked), else CPU with gloo.
"""
from __future__ import annotations

import os
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


    def cfg_pairs(self) -> list[list[int]]:
        """The CFG pairs: DP replicas 2k and 2k+1 with the same TP rank run the unconditional and the
        conditional pass at once (the engine's CFG parallel)."""
        return [[2 * k * self.tp + t, (2 * k + 1) * self.tp + t] for k in range(self.dp // 2) for t in range(self.tp)]


def visible_gpus() -> int:
    """How many GPUs this process sees (CUDA_VISIBLE_DEVICES applied)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pick_device(local_rank: int, local_world: int = 1, requested: Optional[str] = None,
                gpus: Optional[int] = None) -> torch.device:
    """This rank's device: `cuda:LOCAL_RANK` when the node's ranks each have a GPU, `cuda:0` when the
    launcher binds one GPU per rank (SLURM --gpus-per-task=1, CUDA_VISIBLE_DEVICES per rank), else
    CPU. More local ranks than visible GPUs is refused (ConfigError), never shared silently (NCCL
    cannot run two ranks on one GPU). An explicit request wins; a bare `cuda` maps like the default.
    `gpus`: the visible count (tests pass it)."""
    dev = torch.device(requested) if requested else None
    if dev is not None and dev.type != "cuda":
        return dev
    n = visible_gpus() if gpus is None else gpus
    if dev is None and n == 0:
        return torch.device("cpu")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    if dev is not None and dev.index is not None:
        if dev.index >= n:
            raise ConfigError(f"--device {requested}: this process sees {n} GPU(s){shown}; pick cuda:0..cuda:{n - 1}")
        return dev
    if n == 0:
        raise ConfigError(f"--device {requested}: no GPU is visible to local rank {local_rank}{shown}; "
                          f"check the allocation (nvidia-smi), or use --device cpu")
    if n >= local_world:
        return torch.device("cuda", local_rank)
    if n == 1:  # the launcher bound one GPU to each rank; two ranks on one GPU are refused at setup
        return torch.device("cuda", 0)
    raise ConfigError(
        f"{local_world} ranks on this node but only {n} GPUs visible{shown}: launch at most {n} ranks per "
        f"node (torchrun --nproc_per_node={n}), or bind one GPU per rank (srun --gpus-per-task=1), or --device cpu")


def device_identity(dev: torch.device, kernel: str, host: str) -> dict:
    """What the setup agreement compares: the GPU's UUID (the one nvidia-smi -L shows) on a kernel."""
    uuid = None
    if dev.type == "cuda":
        uuid = str(torch.cuda.get_device_properties(dev).uuid)
    return {"type": dev.type, "device": str(dev), "uuid": uuid, "kernel": kernel, "host": host,
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


def setup_problems(got: list[dict]) -> dict[int, str]:
    """Every rank's problem with the job's shape, from the setup agreement's objects (in rank order):
    a rank without a device, a --tp or CFG choice unlike rank 0's, CPU and CUDA ranks mixed, or two
    ranks on one GPU. Pure: every rank computes the same answer from the same list."""
    out: dict[int, str] = {}
    ref = got[0]
    for g in got:
        if g["error"]:
            out[g["rank"]] = f"ConfigError: {g['error']}"
        elif g["tp"] != ref["tp"]:
            out[g["rank"]] = (f"ConfigError: started with --tp {g['tp']} where rank 0 has --tp {ref['tp']}: "
                              f"start every rank (every node) with the same --tp")
        elif g["cfg_parallel"] != ref["cfg_parallel"]:
            mine, rank0 = ("on" if x["cfg_parallel"] else "off" for x in (g, ref))
            out[g["rank"]] = (f"ConfigError: CFG parallel {mine} where rank 0 has it {rank0}: start every rank "
                              f"with the same --no-cfg-parallel")
    devs = [g for g in got if g["device"] is not None]
    types = {g["device"]["type"] for g in devs}
    if len(types) > 1:
        for g in devs:
            if g["device"]["type"] != "cuda":
                out.setdefault(g["rank"], f"ConfigError: runs on {g['device']['device']} while other ranks use "
                                          f"CUDA (NCCL needs a GPU on every rank): give every rank a GPU, or "
                                          f"--device cpu on all")
    seen: dict[tuple, list[int]] = {}
    for g in devs:
        if g["device"]["uuid"]:
            seen.setdefault((g["device"]["kernel"], g["device"]["uuid"]), []).append(g["rank"])
    for (_, uuid), ranks in seen.items():
        if len(ranks) < 2:
            continue
        for r in ranks:
            d = got[r]["device"]
            out.setdefault(r, f"ConfigError: {d['device']} on host {d['host']} is GPU {uuid}, which rank(s) "
                              f"{[o for o in ranks if o != r]} use too (CUDA_VISIBLE_DEVICES={d['visible']!r}): one "
                              f"GPU per rank — fewer ranks per node, or a distinct CUDA_VISIBLE_DEVICES per rank")
    return out


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
    cfg_group: object = None  # this rank's CFG pair (the engine's CFG parallel); None without one
    ctrl_group: object = None  # the control plane: gloo over the world, for every agreement object
    group_keys: list = field(default_factory=list)  # the groups this runtime holds (collectives' registry)
    load_timeout_s: float = 300.0  # --timeout: every wait of the load
    runtime_timeout_s: float = 7200.0  # --runtime-timeout: the groups' timeout once the load agreed
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
