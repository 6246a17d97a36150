"""The process group's lifecycle and every collective of a load (and the engine's CFG gather).

Keeping them in one module makes the communication pattern auditable. Two planes:

- the control plane, a gloo group over the world on every backend (`Runtime.ctrl_group`): the setup
  agreement (mesh, GPUs), the `latest` tag with every rank's load options, the plan agreement with
  the exchange offers, the read agreement (exchange on), the final agreement; one all-gather of a
  host frame each (`all_gather_objects`). A timeout there raises, and the error names who never came;
- the data plane, the device groups (NCCL on CUDA; gloo on CPU, separate objects): the exchange's
  broadcasts, the TP forward collectives and the Ulysses all-to-alls (`models/tp_ops.py`), the CFG
  pairs' one all-gather per denoising step (`all_gather_pair`) and the SP group's one gather of the
  latents' rows per sample (`all_gather_rows`). Only tensors travel there.

No wait on a peer is unbounded: collectives carry their group's timeout (the load's during a load,
the runtime timeout after it), store calls run bounded (`rendezvous.bounded`), a device collective of the load is
polled against the load's deadline (`wait`), and each rank marks its arrival at every agreement point.
"""
from __future__ import annotations

import datetime
import os
import pickle
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from . import commcount
from .errors import ConfigError, GroupLoadError
from .launch import LaunchInfo
from . import groups as G
from . import rendezvous as R
from .pause import pause_point
from .runtime import Mesh, Runtime, device_identity, pick_backend, pick_device, setup_problems


def setup(
    launch: LaunchInfo,
    tp: int,
    device: Optional[str] = None,
    timeout_s: float = 300.0,
    cfg_parallel: bool = False,
    runtime_timeout_s: Optional[float] = None,
    sp: int = 1,
) -> Runtime:
    """Join (or create) the default process group, the control group and every device group a load
    (and with `cfg_parallel`, the engine's CFG pairs; with `sp` > 1, its SP groups) will use, all
    inside the load's bound. The mesh is `Mesh.for_job(world, tp, sp, cfg_parallel)` (runtime.py).

    The control plane is a gloo group beside the device groups on every backend: every agreement,
    arrival and error object travels there, where a timeout raises; the device groups (NCCL on CUDA)
    carry only tensors. Before any NCCL communicator exists the ranks agree, on the control plane,
    on the mesh and on their GPUs (two ranks on one GPU are refused); the device groups are then
    connected eagerly, so a missing peer is named here, not found in the first forward. An existing
    default group (a user's script that called init_process_group) is reused and left alone."""
    mesh = Mesh.for_job(launch.world_size, tp, sp, cfg_parallel)
    pause_point("rendezvous", launch.rank)
    dev, dev_error = device_for(launch, device)
    if dev.type == "cuda" and dev_error is None:
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
            store = R.rendezvous(launch, addr, port, backend, timeout_s, dev)
    elif dist.get_world_size() != launch.world_size or dist.get_rank() != launch.rank:
        launch = LaunchInfo(
            launch.launcher, dist.get_rank(), launch.local_rank, dist.get_world_size(),
            launch.local_world_size, launch.node_rank, launch.master_addr, launch.master_port,
        )
        mesh = Mesh.for_job(launch.world_size, tp, sp, cfg_parallel)
    rt = Runtime(launch=launch, mesh=mesh, device=dev, owns_process_group=owns, load_timeout_s=timeout_s,
                 runtime_timeout_s=G.RUNTIME_TIMEOUT_S if runtime_timeout_s is None else runtime_timeout_s)
    rt.store, rt.arrivals = store or R.default_store(), f"sat_dist/{next(R.LOADS)}"
    G.prune()
    try:  # a store whose host stopped answers nothing: bounded, like every store wait here
        rt.ctrl_group = R.bounded(lambda: G.group(rt, "ctrl", list(range(mesh.world_size)), "gloo"), timeout_s + 2,
                                 f"rank {launch.rank}: creating the control group", dev)
        _agree_setup(rt, tp, cfg_parallel, dev_error)
        R.bounded(lambda: _device_groups(rt, cfg_parallel), timeout_s + 2,
                 f"rank {launch.rank}: creating and connecting the TP, DP, SP and CFG groups", dev)
        enter_load(rt)
    except BaseException:
        teardown(rt)
        raise
    return rt


def device_for(launch: LaunchInfo, requested: Optional[str]) -> tuple[torch.device, Optional[str]]:
    """This rank's device, or (the device type, why it has none) — the reason is agreed on the
    control plane so every rank fails with it, not only the ranks of the node that lacks GPUs."""
    try:
        return pick_device(launch.local_rank, launch.local_world_size, requested), None
    except ConfigError as exc:
        return torch.device("cuda"), str(exc)


def _agree_setup(rt: Runtime, tp: int, cfg_parallel: bool, dev_error: Optional[str]) -> None:
    """The first control-plane agreement: the same mesh on every rank (different --tp across nodes
    would create different groups), and every GPU used by one rank only (UUIDs, before NCCL)."""
    mine = {"rank": rt.rank, "tp": tp, "sp": rt.mesh.sp, "cfg_parallel": cfg_parallel, "error": dev_error,
            "device": device_identity(rt.device, rt.kernel, rt.host) if dev_error is None else None}
    t0 = time.monotonic()
    R.mark_arrival(rt, "setup")
    try:
        got = all_gather_objects(mine, rt.ctrl_group)
    except Exception as exc:
        raise R.unreachable(rt, "setup", exc, time.monotonic() - t0, rt.load_timeout_s) from exc
    problems = setup_problems(got)
    if problems:
        lines = [f"sat_dist: the job cannot form its groups: rank(s) {sorted(problems)} of {len(got)} during 'setup':"]
        lines += [f"  rank {r}: {msg}" for r, msg in sorted(problems.items())]
        raise GroupLoadError("\n".join(lines), problems, "setup")


def _device_groups(rt: Runtime, cfg_parallel: bool) -> None:
    """TP groups (consecutive ranks), DP groups (same TP rank: the exchange's broadcasts), SP groups
    (sp > 1: the Ulysses all-to-alls and the latents' gather) and, with `cfg_parallel` where the mesh
    pairs replicas (`Mesh.cfg` = 2), the CFG pairs; on CUDA each created with `device_id` (connected
    now) and the default group connected too. new_group must be called by every rank for every group,
    in one order (TP, DP, SP, CFG: at sp = 1 the groups and their order are those of the dp x tp mesh)."""
    mesh, dev = rt.mesh, rt.device
    backend = pick_backend(dev)
    if mesh.tp > 1:
        for ranks in mesh.tp_groups():
            group = G.group(rt, "tp", ranks, backend)
            if rt.rank in ranks:
                rt.tp_group = group
    if mesh.dp > 1:
        for ranks in mesh.dp_groups():
            group = G.group(rt, "dp", ranks, backend)
            if rt.rank in ranks:
                rt.dp_group = group
    if mesh.sp > 1:
        if mesh.replicas == 1:
            rt.sp_group = rt.dp_group  # one replica: the SP group is the DP group (no second communicator)
        else:
            for ranks in mesh.sp_groups():
                group = G.group(rt, "sp", ranks, backend)
                if rt.rank in ranks:
                    rt.sp_group = group
    if cfg_parallel and mesh.cfg == 2:
        if mesh.dp == 2:
            rt.cfg_group = rt.dp_group  # the pair is the DP group (sp = 1, two replicas)
        else:
            for ranks in mesh.cfg_pairs():
                group = G.group(rt, "cfg", ranks, backend)
                if rt.rank in ranks:
                    rt.cfg_group = group
    if dev.type == "cuda" and rt.owns_process_group:
        _connect(dist.distributed_c10d._get_default_group(), dev)


def _connect(group, dev: torch.device) -> None:
    """Create `group`'s NCCL communicator now (what init_process_group's device_id does)."""
    backend = group._get_backend(dev)
    if getattr(backend, "supports_splitting", False) and hasattr(backend, "eager_connect_single_device"):
        backend.eager_connect_single_device(dev)


# The groups' registry, timeouts and teardown live in `groups` (re-exported: callers use collectives).
RUNTIME_TIMEOUT_S, DEVICE_GRACE_S = G.RUNTIME_TIMEOUT_S, G.DEVICE_GRACE_S
enter_load, enter_runtime, teardown = G.enter_load, G.enter_runtime, G.teardown


def broadcast_async(t: torch.Tensor, src: int, group=None):
    """Start broadcasting `t` from global rank `src` over `group` (None: the world's device group);
    `wait` ends it. The exchange's only weight-carrying collective."""
    return dist.broadcast(t, src=src, group=group, async_op=True)


def wait(work, deadline: Optional[float] = None) -> None:
    """End `work`. On NCCL (`deadline` given) it is polled against `deadline` (time.monotonic): a
    collective waited past its group's timeout would be a watchdog abort, so the deadline comes
    first and raises TimeoutError here (the caller names who never came)."""
    if deadline is None:
        work.wait()
        return
    pause = 1e-4
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise TimeoutError("a device collective did not complete before the load's timeout")
        time.sleep(pause)
        pause = min(pause * 2, 5e-3)
    work.wait()


# One all-gather carries a whole agreement object when it pickles to at most the frame's bytes: 64 KiB
# (a 5B DiT's plan offer is ~40 KB), less in worlds so large that world x frame would pass 16 MiB.
OBJECT_FRAME, FRAMES_BUDGET, MIN_FRAME = 64 << 10, 16 << 20, 4 << 10
_LEN = 8  # the frame's header: the pickle's length, int64


def object_frame(world: int) -> int:
    """The frame size every rank of a `world` uses (the same on all: it depends on nothing else)."""
    return max(MIN_FRAME, min(OBJECT_FRAME, FRAMES_BUDGET // max(1, world)))


def all_gather_objects(obj: Any, group) -> list[Any]:
    """Gather one picklable object from every rank of `group` — the control group (gloo, host
    tensors) on every backend: agreement objects never travel where a timeout kills the process.

    One all-gather of a fixed-size frame (the pickle's length, then its first `object_frame` bytes)
    where `dist.all_gather_object` takes two (the sizes, then the padded pickles): each agreement
    point costs one round trip, which on a busy host is most of its cost. Only when some rank's
    object is larger does a second all-gather carry the rest; every rank reads every length from the
    first, so all of them take that branch together."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    world = dist.get_world_size(group)
    data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
    cap = object_frame(world)
    frame = torch.zeros(_LEN + cap, dtype=torch.uint8)
    frame[:_LEN] = torch.tensor([data.numel()], dtype=torch.int64).view(torch.uint8)
    frame[_LEN:_LEN + min(data.numel(), cap)] = data[:cap]
    frames = _all_gather(frame, group)
    lengths = [int(f[:_LEN].view(torch.int64)[0]) for f in frames]
    parts = [bytes(f[_LEN:_LEN + min(n, cap)].numpy()) for f, n in zip(frames, lengths)]
    rest = max(lengths) - cap
    if rest > 0:  # every rank sends the longest tail's size; its own tail (empty when it fit) first
        tail = torch.zeros(rest, dtype=torch.uint8)
        tail[:max(0, data.numel() - cap)] = data[cap:]
        parts = [p + bytes(t[:max(0, n - cap)].numpy()) for p, t, n in zip(parts, _all_gather(tail, group), lengths)]
    return [pickle.loads(p) for p in parts]


def _all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    """All-gather host tensor `t` over the (gloo) control group."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return out


# --- the video engine's CFG parallelism (sat_dist.engine) -------------------------------------------
# The CFG pairs (two DP replicas with the same TP rank) are created by `setup(cfg_parallel=True)` with
# the other groups, inside the load's bound: `Runtime.cfg_group`.

def all_gather_pair(x: torch.Tensor, group) -> torch.Tensor:
    """Both halves of a CFG pair stacked on a new dim 0, in pair order (lower DP rank first): one all-gather."""
    x = x.contiguous()
    out = torch.empty((2, *x.shape), dtype=x.dtype, device=x.device)
    commcount.add("cfg", commcount.all_gather_bytes(x.numel() * x.element_size(), 2))
    if x.device.type == "cuda":
        dist.all_gather_into_tensor(out, x, group=group)
    else:  # gloo: a list of views into `out`
        dist.all_gather(list(out.unbind(0)), x, group=group)
    return out



# --- the video engine's sequence parallelism (Ulysses; sat_dist.engine, models/cogvideox/sequence.py) ---
# The SP groups (the sp ranks of one replica with the same TP rank) are created by `setup(sp=N)` with
# the other groups, inside the load's bound: `Runtime.sp_group`. In the DiT's forward, each attention
# layer's two all-to-alls (sequence-split Q/K/V -> head-split, and back) are `models/tp_ops.all_to_all`,
# next to the TP forward collectives: the model families sit below this module and never import it.

def all_gather_rows(x: torch.Tensor, sizes: list[int], dim: int, group) -> torch.Tensor:
    """The SP group's slices of `x` along `dim` — `sizes[i]` long on the group's i-th rank, uneven
    allowed — concatenated in group order: one all-gather of slices padded to the largest (the
    padding is dropped, never read). The engine's only SP collective outside the DiT: the latents'
    rows, once after denoising."""
    n = len(sizes)
    if n == 1:
        return x
    if x.shape[dim] != sizes[dist.get_group_rank(group, dist.get_rank())]:
        raise ValueError(f"this rank's slice has {x.shape[dim]} rows on dim {dim}; the split says "
                         f"{sizes[dist.get_group_rank(group, dist.get_rank())]} (of {sizes})")
    most = max(sizes)
    shape = list(x.shape)
    shape[dim] = most
    padded = x.new_zeros(shape)
    padded.narrow(dim, 0, x.shape[dim]).copy_(x)
    out = torch.empty((n, *shape), dtype=x.dtype, device=x.device)
    commcount.add("sp", commcount.all_gather_bytes(padded.numel() * padded.element_size(), n))
    if x.device.type == "cuda":
        dist.all_gather_into_tensor(out, padded, group=group)
    else:  # gloo: a list of views into `out`
        dist.all_gather(list(out.unbind(0)), padded, group=group)
    return torch.cat([out[i].narrow(dim, 0, sizes[i]) for i in range(n)], dim=dim)

# The arrival marks and the error naming who never came, for the agreement points (agree, exchange).
mark_arrival, unreachable, not_arrived = R.mark_arrival, R.unreachable, R.not_arrived


# --- the parallel VAE decode (sat_dist.engine.decode: a work group's stages, one gather each) -------
def gather_to_first(x: torch.Tensor, group) -> Optional[torch.Tensor]:
    """Every rank's `x` (one shape on all) stacked on a new dim 0 at `group`'s first rank (one gather); else None."""
    first = dist.get_global_rank(group, 0)
    n = dist.get_world_size(group) if dist.get_rank() == first else 0
    out = torch.empty((n, *x.shape), dtype=x.dtype, device=x.device) if n else None
    commcount.add("decode", commcount.gather_bytes(x.numel() * x.element_size(), dist.get_world_size(group),
                                                   dist.get_rank() == first))
    dist.gather(x.contiguous(), list(out.unbind(0)) if n else None, dst=first, group=group)
    return out
