"""The groups a load creates, as one registry per process: their references, timeouts and teardown.

Groups are shared by every load of the process that uses the same ranks (a second load_model reuses
the first's groups instead of leaking new NCCL communicators); each Runtime holds a reference, and
the last teardown destroys them. Which groups exist and in which order is `collectives.setup`'s.
"""
from __future__ import annotations

import datetime
from typing import Any

import torch.distributed as dist

from .runtime import RUNTIME_TIMEOUT_S, Runtime

__all__ = ["RUNTIME_TIMEOUT_S", "DEVICE_GRACE_S", "enter_load", "enter_runtime", "group", "prune", "teardown"]
# On NCCL a collective that outlives its group's timeout is aborted by the watchdog, which kills the
# process; during a load the device groups' timeout is the load's plus this grace, so the host-side
# deadline of `wait` (the load's timeout) always comes first and ends in a named error.
DEVICE_GRACE_S = 30.0


# Keyed by (the default group, kind, backend, ranks).
_GROUPS: dict[tuple, Any] = {}
_REFS: dict[tuple, int] = {}


def prune() -> None:
    """Forget groups of a default group that no longer exists (destroyed by its owner)."""
    live = id(dist.distributed_c10d._get_default_group()) if dist.is_initialized() else None
    for key in [k for k in _GROUPS if k[0] != live]:
        _GROUPS.pop(key, None)
        _REFS.pop(key, None)


def group(rt: Runtime, kind: str, ranks: list[int], backend: str):
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
        prune()


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
