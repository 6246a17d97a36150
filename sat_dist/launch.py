"""Launch detection: who am I (rank, local rank, world, node) and where is rank 0's rendezvous.

One explicit list of detectors, tried in order, so the same command line works under every launcher:

- torchrun (and anything that exports RANK/WORLD_SIZE) first, so torchrun started inside an salloc,
  or one torchrun per node started by srun, keeps its own numbering;
- SLURM (a task of an `srun` step): SLURM_PROCID/LOCALID/NODEID/STEP_NUM_TASKS; the master is the
  first host of the step's node list (`scontrol show hostnames`), the port a function of the job
  and step id, so every task computes the same address without talking to the others;
- Open MPI (OMPI_COMM_WORLD_*) and MPICH/Hydra (PMI_RANK, PMI_SIZE, MPI_LOCALRANKID): no variable
  names a host, so rank 0 broadcasts its address and a free port with mpi4py (bounded by a timeout).
Explicit MASTER_ADDR/MASTER_PORT always win. Nothing here creates a process group (`collectives`).
"""
from __future__ import annotations

import fcntl
import functools
import ipaddress
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional

from .errors import LaunchError


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


def from_torchrun(env: Mapping[str, str], exchange: Optional["Exchange"] = None) -> Optional[LaunchInfo]:
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


SLURM_PORT_BASE = 10000  # below Linux's ephemeral range (32768+), so a derived port is rarely taken


# --- SLURM ------------------------------------------------------------------------------------

def tasks_on_node(tasks_per_node: Optional[str], node: int) -> Optional[int]:
    """Tasks on relative node `node` from SLURM's compressed form, e.g. '2(x3),1' -> [2,2,2,1]."""
    if not tasks_per_node:
        return None
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return None
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts[node] if 0 <= node < len(counts) else None


def first_host_of_nodelist(nodelist: str) -> str:
    """First host of a SLURM hostlist ('gpu[003-005,9],cpu1' -> 'gpu003') without scontrol.

    Only used when `scontrol` is absent or cannot run (e.g. inside a container image without the
    SLURM client or its slurm.conf): it handles SLURM's bracket ranges, zero padding and several
    bracket groups per name, which covers the node lists SLURM itself prints.
    """
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first top-level comma ends the first name
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0].strip(), first)


def slurm_first_host(nodelist: str) -> str:
    """First host of `nodelist` as SLURM expands it (`scontrol show hostnames`)."""
    if re.fullmatch(r"[^\[\],\s]+", nodelist):  # one plain host name: nothing to expand
        return nodelist
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=15, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass  # scontrol present but unusable (no slurm.conf in a container): parse it ourselves
    # scontrol absent (container images, login-less compute images) or failed: the parser below
    # handles SLURM's hostlist syntax; tests check it agrees with real scontrol.
    return first_host_of_nodelist(nodelist)


def slurm_port(env: Mapping[str, str]) -> int:
    """A port every task of a step derives alike: distinct for 1000 consecutive jobs x 20 steps."""
    job = env_int(env, "SLURM_JOB_ID") or env_int(env, "SLURM_JOBID") or 0
    step = env_int(env, "SLURM_STEP_ID") or env_int(env, "SLURM_STEPID") or 0
    return SLURM_PORT_BASE + (job % 1000) * 20 + step % 20


def _mpi_identity(env: Mapping[str, str]) -> Optional[tuple[int, int]]:
    """(rank, world) as an MPI launcher numbered this process, if one did."""
    for rank_key, size_key in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")):
        rank, size = env_int(env, rank_key), env_int(env, size_key)
        if rank is not None and size is not None:
            return rank, size
    return None


def from_slurm(env: Mapping[str, str], exchange: Optional["Exchange"] = None) -> Optional[LaunchInfo]:
    """A task of an `srun` step (directly, or inside `sbatch`/`salloc`)."""
    # SLURM_STEP_ID marks a step task: the batch script itself has SLURM_PROCID=0 and
    # SLURM_NTASKS=N but is one process, and must not wait for N-1 peers that never come.
    if "SLURM_PROCID" not in env or ("SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env):
        return None
    rank = env_int(env, "SLURM_PROCID")
    world = env_int(env, "SLURM_STEP_NUM_TASKS") or env_int(env, "SLURM_NTASKS") or env_int(env, "SLURM_NPROCS")
    if rank is None or world is None:
        return None
    mpi = _mpi_identity(env)
    if mpi is not None and mpi != (rank, world):
        # mpirun inside an allocation: its ranks inherit the SLURM_* of the per-node daemon that
        # srun started, so MPI's numbering is the job's and the MPI detectors must answer.
        return None
    node = env_int(env, "SLURM_NODEID") or 0
    local_world = tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE"), node)
    addr = env.get("MASTER_ADDR") or None
    if addr is None:
        # The step's node list first: `srun -N1` inside a 2-node job runs on a subset of the job's
        # nodes, and rank 0 sits on the first node of the step, not necessarily of the job.
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if nodelist:
            addr = slurm_first_host(nodelist)
        else:  # no node list at all (very old SLURM): the node srun ran on, for sbatch the first node
            addr = env.get("SLURM_LAUNCH_NODE_IPADDR") or None
        if addr is None:
            raise LaunchError(
                f"SLURM task {rank}/{world}: no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST/SLURM_LAUNCH_NODE_IPADDR "
                f"to find rank 0's node; export MASTER_ADDR (rank 0's host) and MASTER_PORT before srun"
            )
    return LaunchInfo(
        launcher="slurm",
        rank=rank,
        local_rank=env_int(env, "SLURM_LOCALID") or 0,
        world_size=world,
        local_world_size=local_world or 1,
        node_rank=node,
        master_addr=addr,
        master_port=env_int(env, "MASTER_PORT") or slurm_port(env),
    )


# --- MPI (Open MPI, MPICH) ----------------------------------------------------------------------

@dataclass(frozen=True)
class MpiRendezvous:
    """What rank 0 broadcast: its reachable address and a free port, plus every rank's host."""

    master_addr: str
    master_port: int
    hosts: tuple[str, ...]

    def node_rank(self, rank: int) -> int:
        """Index of `rank`'s host in order of first appearance (node 0 holds rank 0)."""
        order = list(dict.fromkeys(self.hosts))
        return order.index(self.hosts[rank])

    def local(self, rank: int) -> tuple[int, int]:
        """(local rank, ranks on this host)."""
        host = self.hosts[rank]
        return self.hosts[:rank].count(host), self.hosts.count(host)


def _interface_ipv4(name: str) -> Optional[str]:
    """IPv4 address of interface `name` (Linux SIOCGIFADDR), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
        return socket.inet_ntoa(packed[20:24])
    except OSError:
        return None


def reachable_address() -> str:
    """This host's address other nodes can reach: the interface gloo/NCCL were told to use, else
    the hostname's address if it is not loopback, else the first non-loopback IPv4 interface."""
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        ifname = os.environ.get(var, "").split(",")[0].lstrip("^=")
        if ifname:
            ip = _interface_ipv4(ifname)
            if ip:
                return ip
    host = socket.gethostname()
    try:
        ip = socket.gethostbyname(host)
        if not ipaddress.ip_address(ip).is_loopback:
            return ip
    except OSError:
        pass
    try:
        names = [name for _, name in socket.if_nameindex() if name != "lo"]
    except OSError:
        names = []
    for name in names:
        ip = _interface_ipv4(name)
        if ip and not ipaddress.ip_address(ip).is_loopback:
            return ip
    return host


def free_port() -> int:
    """A port the kernel says is free now (rank 0 binds it for the store moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


_RENDEZVOUS: dict[tuple, MpiRendezvous] = {}
_HOST_BYTES = 256  # a host name or address, NUL-padded, in the fixed-size MPI buffers
DEFAULT_TIMEOUT_S = 300.0


def _wait(request, deadline: float, launcher: str, rank: int, world: int, what: str, timeout_s: float) -> None:
    """Poll a non-blocking MPI collective: a stopped or dead rank must not hang the others."""
    while not request.Test():
        if time.monotonic() > deadline:
            raise LaunchError(
                f"{launcher} rank {rank}/{world}: the MPI exchange of rank 0's address ({what}) did not complete "
                f"within {timeout_s:.0f}s: a rank is stopped, dead or still starting; check the other ranks' "
                f"output, or export MASTER_ADDR/MASTER_PORT to every rank to skip the exchange"
            )
        time.sleep(0.005)


def mpi_exchange(launcher: str, rank: int, world: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> MpiRendezvous:
    """Collective over MPI_COMM_WORLD: gather hosts, broadcast rank 0's address and a free port.

    Every rank must call it (detect_launch does, on every rank); the result is cached, so later
    detect_launch calls in the same process agree with the first without communicating again.
    Non-blocking collectives polled against a deadline: a rank that never arrives is a LaunchError
    after `timeout_s`, not a hang.
    """
    key = (launcher, rank, world)
    if key in _RENDEZVOUS:
        return _RENDEZVOUS[key]
    try:
        from mpi4py import MPI  # imported only here: initialising MPI is not free
    except ImportError as exc:
        raise LaunchError(
            f"{launcher} rank {rank}/{world}: mpi4py is needed to learn rank 0's address under mpirun "
            f"({exc}); `pip install mpi4py` (built for this MPI), or export MASTER_ADDR/MASTER_PORT to every "
            f"rank (Open MPI: mpirun -x MASTER_ADDR -x MASTER_PORT; MPICH: mpirun -genv MASTER_ADDR ...)"
        ) from exc
    comm = MPI.COMM_WORLD
    if (comm.Get_rank(), comm.Get_size()) != (rank, world):
        raise LaunchError(
            f"{launcher} says this is rank {rank} of {world}, but mpi4py's MPI_COMM_WORLD says rank "
            f"{comm.Get_rank()} of {comm.Get_size()}: mpi4py is linked against a different MPI than the "
            f"mpirun that started it (check `python -c 'import mpi4py; print(mpi4py.get_config())'` and "
            f"`which mpirun`), or export MASTER_ADDR/MASTER_PORT to skip the exchange"
        )
    deadline = time.monotonic() + timeout_s
    mine = bytearray(_HOST_BYTES)
    name = socket.gethostname().encode()[:_HOST_BYTES]
    mine[:len(name)] = name
    everyone = bytearray(_HOST_BYTES * world)
    _wait(comm.Iallgather(mine, everyone), deadline, launcher, rank, world, "host names", timeout_s)
    hosts = tuple(bytes(everyone[i * _HOST_BYTES:(i + 1) * _HOST_BYTES]).rstrip(b"\0").decode()
                  for i in range(world))
    payload = bytearray(_HOST_BYTES + 4)
    if rank == 0:
        addr = ("127.0.0.1" if len(set(hosts)) == 1 else reachable_address()).encode()[:_HOST_BYTES]
        payload[:len(addr)] = addr
        payload[_HOST_BYTES:] = struct.pack("<I", free_port())
    _wait(comm.Ibcast(payload, root=0), deadline, launcher, rank, world, "address and port", timeout_s)
    addr = bytes(payload[:_HOST_BYTES]).rstrip(b"\0").decode()
    port = struct.unpack("<I", bytes(payload[_HOST_BYTES:]))[0]
    result = MpiRendezvous(addr, int(port), hosts)
    _RENDEZVOUS[key] = result
    return result


Exchange = Callable[[str, int, int], MpiRendezvous]


def _from_mpi(env: Mapping[str, str], launcher: str, rank: int, world: int, local_rank: Optional[int],
              local_world: Optional[int], exchange: Exchange) -> LaunchInfo:
    addr, port = env.get("MASTER_ADDR") or None, env_int(env, "MASTER_PORT")
    node: Optional[int] = None
    if addr is None or port is None or local_rank is None or local_world is None:
        rdv = exchange(launcher, rank, world)
        addr, port = addr or rdv.master_addr, port or rdv.master_port
        node = rdv.node_rank(rank)
        if local_rank is None or local_world is None:
            local_rank, local_world = rdv.local(rank)
    if node is None:
        # No exchange (explicit MASTER_ADDR/PORT): exact for mpirun's default by-slot mapping with
        # equal ranks per node, which is what multi-node inference jobs use.
        node = rank // max(local_world, 1)
    return LaunchInfo(launcher, rank, local_rank, world, local_world, node, addr, port)


def from_openmpi(env: Mapping[str, str], exchange: Exchange = mpi_exchange) -> Optional[LaunchInfo]:
    """Open MPI's mpirun/mpiexec/prterun (OMPI_COMM_WORLD_*)."""
    rank, world = env_int(env, "OMPI_COMM_WORLD_RANK"), env_int(env, "OMPI_COMM_WORLD_SIZE")
    if rank is None or world is None:
        return None
    # OMPI_COMM_WORLD_NODE_RANK is the rank among processes on this node, not the node's index.
    return _from_mpi(env, "openmpi", rank, world, env_int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
                     env_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"), exchange)


def from_mpich(env: Mapping[str, str], exchange: Exchange = mpi_exchange) -> Optional[LaunchInfo]:
    """MPICH's Hydra mpirun/mpiexec (also Intel MPI): PMI_RANK, PMI_SIZE, MPI_LOCALRANKID."""
    rank, world = env_int(env, "PMI_RANK"), env_int(env, "PMI_SIZE")
    if rank is None or world is None:
        return None
    return _from_mpi(env, "mpich", rank, world, env_int(env, "MPI_LOCALRANKID"), env_int(env, "MPI_LOCALNRANKS"),
                     exchange)


Detector = Callable[[Mapping[str, str], Exchange], Optional[LaunchInfo]]

# Ordered: the first detector that recognises the environment wins.
DETECTORS: tuple[Detector, ...] = (from_torchrun, from_slurm, from_openmpi, from_mpich)


def detect_launch(env: Optional[Mapping[str, str]] = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> LaunchInfo:
    """Derive this process's identity from the launcher's environment (none: a single process).
    `timeout_s` bounds the MPI address exchange (a stopped rank fails the others, never hangs them)."""
    env = os.environ if env is None else env
    exchange = functools.partial(mpi_exchange, timeout_s=timeout_s)
    for detector in DETECTORS:
        info = detector(env, exchange)
        if info is not None:
            return info
    return single_process(env)


def rank_and_world(env: Optional[Mapping[str, str]] = None) -> tuple[int, Optional[int]]:
    """(rank, world size) as the launcher numbered this process, from its variables alone — no MPI
    exchange, so an error line after a failed exchange cannot start (and wait on) another one.
    (0, 1) without launcher variables; (-1, None) when they are malformed."""
    env = os.environ if env is None else env
    keys = (("RANK", "WORLD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
            ("SLURM_PROCID", "SLURM_NTASKS"))
    rank_key, size_key = next(((r, w) for r, w in keys if r in env), (None, None))
    if rank_key is None:
        return 0, 1
    try:
        rank = env_int(env, rank_key)
        return (-1, None) if rank is None else (rank, env_int(env, size_key))
    except LaunchError:
        return -1, None
