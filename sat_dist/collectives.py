"""The process group's lifecycle and every collective of a load (and the engine's CFG gather).

Keeping them in one module makes the communication pattern auditable. Two planes:

- the control plane, a gloo group over the world on every backend (`Runtime.ctrl_group`): the setup
  agreement (mesh, GPUs), the `latest` tag with every rank's load options, the plan agreement with
  the exchange offers, the read agreement (exchange on), the final agreement; one all-gather of a
  host frame each (`all_gather_objects`). A timeout there raises, and the error names who never came;
- the data plane, the device groups (NCCL on CUDA; gloo on CPU, separate objects): the exchange's
  broadcasts, the TP forward collectives (`models/tp_ops.py`) and the CFG pairs' one all-gather per
  denoising step (`all_gather_pair`). Only tensors travel there.

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

from .errors import ConfigError, GroupLoadError
from .launch import LaunchInfo
from . import rendezvous as R
from .pause import pause_point
from .runtime import Mesh, Runtime, device_identity, pick_backend, pick_device, setup_problems


# After a load's last agreement every group it made takes the runtime timeout (`--runtime-timeout`):
# the load's bound would otherwise cut off a long sampling run (a work group idle in `finish` while
# another renders, a leader's VAE decode that its TP peers wait out at their next collective).
RUNTIME_TIMEOUT_S = 7200.0
# On NCCL a collective that outlives its group's timeout is aborted by the watchdog, which kills the
# process; during a load the device groups' timeout is the load's plus this grace, so the host-side
# deadline of `wait` (the load's timeout) always comes first and ends in a named error.
DEVICE_GRACE_S = 30.0


def setup(
    launch: LaunchInfo,
    tp: int,
    device: Optional[str] = None,
    timeout_s: float = 300.0,
    cfg_parallel: bool = False,
    runtime_timeout_s: Optional[float] = None,
) -> Runtime:
    """Join (or create) the default process group, the control group and every device group a load
    (and with `cfg_parallel`, the engine's CFG pairs) will use, all inside the load's bound.

    The control plane is a gloo group beside the device groups on every backend: every agreement,
    arrival and error object travels there, where a timeout raises; the device groups (NCCL on CUDA)
    carry only tensors. Before any NCCL communicator exists the ranks agree, on the control plane,
    on the mesh and on their GPUs (two ranks on one GPU are refused); the device groups are then
    connected eagerly, so a missing peer is named here, not found in the first forward. An existing
    default group (a user's script that called init_process_group) is reused and left alone."""
    mesh = Mesh(launch.world_size, tp)
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
        mesh = Mesh(launch.world_size, tp)
    rt = Runtime(launch=launch, mesh=mesh, device=dev, owns_process_group=owns, load_timeout_s=timeout_s,
                 runtime_timeout_s=RUNTIME_TIMEOUT_S if runtime_timeout_s is None else runtime_timeout_s)
    rt.store, rt.arrivals = store or R.default_store(), f"sat_dist/{next(R.LOADS)}"
    _prune_groups()
    try:  # a store whose host stopped answers nothing: bounded, like every store wait here
        rt.ctrl_group = R.bounded(lambda: _group(rt, "ctrl", list(range(mesh.world_size)), "gloo"), timeout_s + 2,
                                 f"rank {launch.rank}: creating the control group", dev)
        _agree_setup(rt, tp, cfg_parallel, dev_error)
        R.bounded(lambda: _device_groups(rt, cfg_parallel), timeout_s + 2,
                 f"rank {launch.rank}: creating and connecting the TP, DP and CFG groups", dev)
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
    mine = {"rank": rt.rank, "tp": tp, "cfg_parallel": cfg_parallel, "error": dev_error,
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
    """TP groups (consecutive ranks), DP groups (same TP rank: the exchange's broadcasts) and, with
    `cfg_parallel`, the CFG pairs; on CUDA each created with `device_id` (connected now) and the
    default group connected too. new_group must be called by every rank for every group, in one order."""
    mesh, dev = rt.mesh, rt.device
    backend = pick_backend(dev)
    if mesh.tp > 1:
        for ranks in mesh.tp_groups():
            group = _group(rt, "tp", ranks, backend)
            if rt.rank in ranks:
                rt.tp_group = group
    if mesh.dp > 1:
        for ranks in (list(range(t, mesh.world_size, mesh.tp)) for t in range(mesh.tp)):
            group = _group(rt, "dp", ranks, backend)
            if rt.rank in ranks:
                rt.dp_group = group
    if cfg_parallel and mesh.dp >= 2 and mesh.dp % 2 == 0:
        if mesh.dp == 2:
            rt.cfg_group = rt.dp_group  # the pair is the DP group
        else:
            for ranks in mesh.cfg_pairs():
                group = _group(rt, "cfg", ranks, backend)
                if rt.rank in ranks:
                    rt.cfg_group = group
    if dev.type == "cuda" and rt.owns_process_group:
        _connect(dist.distributed_c10d._get_default_group(), dev)


def _connect(group, dev: torch.device) -> None:
    """Create `group`'s NCCL communicator now (what init_process_group's device_id does)."""
    backend = group._get_backend(dev)
    if getattr(backend, "supports_splitting", False) and hasattr(backend, "eager_connect_single_device"):
        backend.eager_connect_single_device(dev)


# Groups are shared by every load of the process that uses the same ranks (a second load_model reuses
# the first's groups instead of leaking new NCCL communicators); each Runtime holds a reference, and
# the last teardown destroys them. Keyed by (the default group, kind, backend, ranks).
_GROUPS: dict[tuple, Any] = {}
_REFS: dict[tuple, int] = {}


def _prune_groups() -> None:
    """Forget groups of a default group that no longer exists (destroyed by its owner)."""
    live = id(dist.distributed_c10d._get_default_group()) if dist.is_initialized() else None
    for key in [k for k in _GROUPS if k[0] != live]:
        _GROUPS.pop(key, None)
        _REFS.pop(key, None)


def _group(rt: Runtime, kind: str, ranks: list[int], backend: str):
    """The group of `ranks` (created by every rank, member or not, the first time); this runtime
    holds a reference to it."""
    key = (id(dist.distributed_c10d._get_default_group()), kind, backend, tuple(ranks))
    if key not in _GROUPS:
        cuda = backend == "nccl"
        _GROUPS[key] = dist.new_group(ranks, timeout=datetime.timedelta(seconds=rt.load_timeout_s), backend=backend,
                                      device_id=rt.device if cuda and rt.rank in ranks else None)
    _REFS[key] = _REFS.get(key, 0) + 1
    rt.group_keys.append(key)
    return _GROUPS[key]


def _member_groups(rt: Runtime) -> list[tuple[str, Any]]:
    """(kind, group) of every group this rank is a member of, the default one if this runtime made it."""
    out = []
    for key in dict.fromkeys(rt.group_keys):
        group = _GROUPS.get(key)
        if group is not None and rt.rank in key[3]:
            out.append((key[1], group))
    if rt.owns_process_group and dist.is_initialized():
        out.append(("default", None))
    return out


def _set_timeouts(rt: Runtime, ctrl_s: float, device_s: float) -> None:
    for kind, group in _member_groups(rt):
        seconds = ctrl_s if kind == "ctrl" else device_s
        try:
            dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=seconds), group)
        except (ValueError, RuntimeError, AttributeError):
            pass  # a backend without a settable timeout keeps the one it was created with


def enter_load(rt: Runtime) -> None:
    """Load phase: the control group and gloo device groups time out at `--timeout`; NCCL groups a
    grace later, so `wait`'s host-side deadline ends a stalled broadcast in a named error first."""
    grace = DEVICE_GRACE_S if rt.device.type == "cuda" else 0.0
    _set_timeouts(rt, rt.load_timeout_s, rt.load_timeout_s + grace)


def enter_runtime(rt: Runtime) -> None:
    """After the last agreement of a load: every group takes the runtime timeout (sampling, forwards)."""
    _set_timeouts(rt, rt.runtime_timeout_s, rt.runtime_timeout_s)


def teardown(rt: Runtime, abort: bool = False) -> None:
    """Drop this runtime's references to its groups (the last one destroys a group) and destroy the
    default group if this runtime created it (avoids gloo's abort-at-exit). `abort`: a device
    collective may still be in flight (a broadcast given up at the load's deadline): on NCCL the
    communicators are aborted first, since destroying them would wait for that collective."""
    rt.store = None
    if abort and rt.device.type == "cuda" and dist.is_initialized():
        _abort(rt)
    keys, rt.group_keys = rt.group_keys, []
    for key in keys:
        _REFS[key] = _REFS.get(key, 1) - 1
        if _REFS[key] <= 0:
            group = _GROUPS.pop(key, None)
            _REFS.pop(key, None)
            if group is not None and rt.rank in key[3] and dist.is_initialized() and not rt.owns_process_group:
                try:
                    dist.destroy_process_group(group)
                except Exception:
                    pass
    if rt.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
        _prune_groups()


def _abort(rt: Runtime) -> None:
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is None:
        return
    groups = [None] if rt.owns_process_group else [g for kind, g in _member_groups(rt) if kind != "ctrl"]
    for group in groups:
        try:
            abort(group)
        except Exception:
            pass  # already aborted by the watchdog, or destroyed
    if rt.owns_process_group:
        _GROUPS.clear()
        _REFS.clear()


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
    if x.device.type == "cuda":
        dist.all_gather_into_tensor(out, x, group=group)
    else:  # gloo: a list of views into `out`
        dist.all_gather(list(out.unbind(0)), x, group=group)
    return out


# The arrival marks and the error naming who never came, for the agreement points (agree, exchange).
mark_arrival, unreachable, not_arrived = R.mark_arrival, R.unreachable, R.not_arrived
