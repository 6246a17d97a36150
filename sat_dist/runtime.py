"""Where this rank sits once launched: the dp x cfg x sp x tp mesh, its device, and its process groups.

Pure decisions (no process group is created here; `collectives` does that): TP groups are
consecutive ranks, SP groups the same TP rank within a replica (tp apart), CFG pairs neighbouring
replicas, the loader's DP replicas strided by tp; `cuda:LOCAL_RANK` with NCCL when CUDA is present
(one GPU per rank, checked), else CPU with gloo.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Optional

import torch

from .errors import ConfigError
from .launch import LaunchInfo


# After a load's last agreement every group it made takes the runtime timeout (`--runtime-timeout`):
# the load's bound would otherwise cut off a long sampling run (a work group idle in `finish` while
# another renders, a work group's ranks waiting at the decode gather for its slowest tile, the leader's
# blend and mp4 write that its peers wait out at their next collective).
RUNTIME_TIMEOUT_S = 7200.0


@dataclass(frozen=True)
class Mesh:
    """The dp x cfg x sp x tp layout of a job (as torchtitan's ParallelDims), TP innermost:

        rank = ((d * cfg + c) * sp + s) * tp + t

    t = `tp_rank`: TP groups are consecutive ranks (the weights' split: heads, MLP); s = `sp_rank`:
    an SP group is the `sp` ranks with the same TP rank in one replica, `tp` apart (the video tokens'
    split, Ulysses, inside the TP rank's heads); one *replica* is a tp x sp block of consecutive ranks
    (one copy of the DiT computing one pass); c: with `cfg` = 2, neighbouring replicas 2k and 2k+1
    form CFG pairs (the unconditional and the conditional pass at once); d = `work_group`: the work
    groups (cfg replicas each) that prompts are dealt to. At sp = 1, cfg = 1 this is the dp x tp mesh.

    The loader's DP (`dp`, `dp_rank`, `dp_groups`) is about the weights: every rank with the same TP
    rank holds the same TP shard — SP peers and CFG partners included — so a load sees all of them
    as DP replicas (dp = world / tp: the exchange splits their reads, the agreement compares them)."""

    world_size: int
    tp: int
    sp: int = 1
    cfg: int = 1  # 2: CFG pairs of neighbouring replicas

    def __post_init__(self) -> None:
        if self.tp < 1 or self.world_size % self.tp != 0:
            raise ConfigError(
                f"--tp {self.tp} does not divide the world size {self.world_size}: "
                f"launch a multiple of {self.tp} ranks or pick a TP size that divides {self.world_size}"
            )
        per = self.world_size // self.tp
        if self.sp < 1 or per % self.sp != 0:
            ok = [s for s in range(1, per + 1) if per % s == 0]
            raise ConfigError(
                f"--sp {self.sp}: a replica of --tp {self.tp} x --sp {self.sp} = {self.tp * max(self.sp, 1)} ranks "
                f"does not divide the world size {self.world_size}: launch a multiple of "
                f"{self.tp * max(self.sp, 1)} ranks, or use --sp in {ok} with {self.world_size} ranks at --tp {self.tp}")
        if self.cfg not in (1, 2) or (per // self.sp) % self.cfg != 0:
            raise ConfigError(
                f"CFG parallel pairs two replicas of --tp {self.tp} x --sp {self.sp} ranks: the world size "
                f"{self.world_size} is not a multiple of {2 * self.tp * self.sp}; launch a multiple of "
                f"{2 * self.tp * self.sp} ranks or turn CFG parallel off")

    @classmethod
    def for_job(cls, world_size: int, tp: int, sp: int = 1, cfg_parallel: bool = False) -> "Mesh":
        """The job's mesh: CFG pairs (cfg = 2) when asked for and the replicas pair up (an even
        number of them), else sequential CFG on every replica, as at sp = 1 before."""
        per = tp * sp
        even = per >= 1 and world_size % per == 0 and (world_size // per) % 2 == 0
        return cls(world_size, tp, sp, 2 if cfg_parallel and even else 1)

    # -- sizes -------------------------------------------------------------------------------------

    @property
    def dp(self) -> int:
        """The loader's DP: ranks holding the same TP shard (world / tp; SP peers and CFG partners included)."""
        return self.world_size // self.tp

    @property
    def replicas(self) -> int:
        """Copies of the DiT, each tp x sp ranks."""
        return self.world_size // (self.tp * self.sp)

    @property
    def work_groups(self) -> int:
        """Groups prompts are dealt to: replicas, or CFG pairs of them."""
        return self.replicas // self.cfg

    # -- a rank's coordinates ------------------------------------------------------------------------

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp

    def sp_rank(self, rank: int) -> int:
        return (rank // self.tp) % self.sp

    def replica(self, rank: int) -> int:
        return rank // (self.tp * self.sp)

    def cfg_rank(self, rank: int) -> int:
        """0: the unconditional pass of a CFG pair, 1: the conditional (0 without pairs)."""
        return self.replica(rank) % self.cfg

    def work_group(self, rank: int) -> int:
        return self.replica(rank) // self.cfg

    # -- groups (global ranks, in group order) -----------------------------------------------------------

    def tp_groups(self) -> list[list[int]]:
        return [list(range(d * self.tp, (d + 1) * self.tp)) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        """The loader's DP groups: every rank with TP rank t (the exchange's broadcasts)."""
        return [list(range(t, self.world_size, self.tp)) for t in range(self.tp)]

    def sp_groups(self) -> list[list[int]]:
        """Per replica and TP rank t: its sp ranks, `tp` apart (the Ulysses all-to-alls, the latents' gather)."""
        tp, sp = self.tp, self.sp
        return [[(p * sp + s) * tp + t for s in range(sp)] for p in range(self.replicas) for t in range(tp)]

    def cfg_pairs(self) -> list[list[int]]:
        """The CFG pairs: replicas 2k and 2k+1, the same SP and TP rank, run the unconditional and the
        conditional pass at once (the engine's CFG parallel). Defined whenever the replicas pair up;
        used when cfg = 2."""
        tp, sp = self.tp, self.sp
        return [[(2 * k * sp + s) * tp + t, ((2 * k + 1) * sp + s) * tp + t]
                for k in range(self.replicas // 2) for s in range(sp) for t in range(tp)]

    def work_group_ranks(self, rank: int) -> list[int]:
        """Every rank of `rank`'s work group (cfg x sp x tp consecutive ranks), in rank order."""
        n = self.cfg * self.sp * self.tp
        first = self.work_group(rank) * n
        return list(range(first, first + n))


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
    a rank without a device, a --tp, --sp or CFG choice unlike rank 0's, CPU and CUDA ranks mixed, or two
    ranks on one GPU. Pure: every rank computes the same answer from the same list."""
    out: dict[int, str] = {}
    ref = got[0]
    for g in got:
        if g["error"]:
            out[g["rank"]] = f"ConfigError: {g['error']}"
        elif g["tp"] != ref["tp"]:
            out[g["rank"]] = (f"ConfigError: started with --tp {g['tp']} where rank 0 has --tp {ref['tp']}: "
                              f"start every rank (every node) with the same --tp")
        elif g.get("sp", 1) != ref.get("sp", 1):
            out[g["rank"]] = (f"ConfigError: started with --sp {g.get('sp', 1)} where rank 0 has --sp "
                              f"{ref.get('sp', 1)}: start every rank (every node) with the same --sp")
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
    sp_group: object = None  # this rank's SP group (the Ulysses all-to-alls); None if sp == 1
    cfg_group: object = None  # this rank's CFG pair (the engine's CFG parallel); None without one
    ctrl_group: object = None  # the control plane: gloo over the world, for every agreement object
    group_keys: list = field(default_factory=list)  # the groups this runtime holds (collectives' registry)
    load_timeout_s: float = 300.0  # --timeout: every wait of the load
    runtime_timeout_s: float = RUNTIME_TIMEOUT_S  # --runtime-timeout: the groups' timeout once the load agreed
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

    @property
    def sp_rank(self) -> int:
        return self.mesh.sp_rank(self.rank)

    @property
    def sp(self) -> int:
        return self.mesh.sp
