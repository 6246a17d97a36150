"""Each byte read from storage once per job: the ranks that need the same tensor bytes split the
reading and broadcast what they read (`load.exchange: auto|on|off`; `wanted` says when auto is on).

`plan.assign_exchange` decides (pure) who reads what from every rank's target signatures, which
the plan agreement's all-gather collects (`signatures` makes this rank's `Offer`). After
`materialize` has read this rank's share, `run` broadcasts each shared tensor from its owner: DP
replicas over their DP group, tensors that every rank reads from the same file (replicated tensors
of an mp=1 checkpoint) over the world. Tensors below `BUCKET_BYTES` travel packed, one broadcast
per owner. A peer that dies or stalls fails the broadcast within the process-group timeout; that
failure is raised as the same kind of GroupLoadError as the agreement's, naming the phase and the
rank(s) that never arrived.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from . import collectives as C
from .materialize import Stripe
from .plan import Exchange, ReadPlan, assign_exchange, target_signatures
from .runtime import Runtime

BUCKET_BYTES = 4 << 20  # tensors smaller than this are packed per owner into one broadcast


@dataclass(frozen=True)
class Offer:
    """What one rank brings to the exchange's planning (gathered with the plan agreement): its mode,
    the kernel it runs on (ranks on one kernel share a page cache), its device type, its target
    signatures (None when it reads everything itself) and a digest of the files it reads."""

    mode: str
    kernel: str
    device: str
    signatures: Optional[dict[str, str]]
    files: str = ""


def signatures(rt: Runtime, plan: ReadPlan, mode: str = "auto") -> Offer:
    """This rank's Offer for the plan agreement's all-gather."""
    sigs = None if mode == "off" or rt.world_size == 1 else target_signatures(plan)
    files = hashlib.blake2b("\n".join(sorted(plan.files)).encode(), digest_size=8).hexdigest()
    return Offer(mode, rt.kernel, rt.device.type, sigs, files)


def wanted(offers: Sequence[Offer]) -> bool:
    """Whether the ranks exchange (the same answer on every rank: all see the same offers). Any
    `off` reads everything locally; any `on` exchanges. `auto` exchanges when it moves fewer bytes
    from storage: only when the ranks span several kernels, since ranks on one kernel share its
    page cache (what one rank read from storage the others copy from memory), or on CUDA, where one
    NCCL broadcast may beat every rank copying the bytes through host memory (not yet measured).
    On one CPU host the broadcasts only add work (`sat-dist bench`, TP2 x DP2, 1.2 GiB: 0.89 s on,
    0.78 s off, the same storage bytes when cold)."""
    if len(offers) <= 1 or any(o.signatures is None for o in offers):  # `off` (or a world of one)
        return False
    if any(o.mode == "on" for o in offers):
        return True
    return len({o.kernel for o in offers}) > 1 or any(o.device == "cuda" for o in offers)


def plan_exchange(rt: Runtime, plan: ReadPlan, offers: Sequence[Offer]) -> Exchange:
    """This rank's share of the reading, from every rank's Offer (in rank order)."""
    if not wanted(offers):
        return assign_exchange(plan, [{}], 0, rt.tp, enabled=False)
    return assign_exchange(plan, [o.signatures for o in offers], rt.rank, rt.tp)


def stripe(rt: Runtime, offers: Sequence[Offer]) -> Optional[Stripe]:
    """This rank's turn among its TP peers that read the same files (they read the other slices of
    the same rows) when every rank reading those slices runs on its kernel, whose page cache then
    brings each its rows from whole-row requests of all: the TP group's, or with the exchange on
    (any DP replica may read a slice) the whole job's. None otherwise (TP=1, peers across kernels,
    no peer on the same files): the rank asks for its own rows only."""
    me = offers[rt.rank]
    group = next(g for g in rt.mesh.tp_groups() if rt.rank in g)
    peers = [r for r in group if offers[r].files == me.files]
    readers = range(len(offers)) if wanted(offers) else peers
    if len(peers) < 2 or any(offers[r].kernel != me.kernel for r in readers):
        return None
    return Stripe(peers.index(rt.rank), len(peers))


def run(rt: Runtime, ex: Exchange, tensors: Mapping[str, torch.Tensor], timeout_s: float) -> int:
    """Broadcast every shared tensor from its owner; returns the bytes this rank received."""
    received = 0
    C.mark_arrival(rt, "exchange")
    t0 = time.monotonic()
    # On NCCL a broadcast that waits past the group's timeout kills the process: poll it against the
    # load's deadline instead (the device groups' timeout is a grace later, collectives.enter_load).
    deadline = t0 + timeout_s if rt.device.type == "cuda" else None
    try:
        for items, group in ((ex.dp, rt.dp_group), (ex.world, None)):
            works = []
            for payload, src, unpack in _messages(items, tensors, rt.rank):
                works.append((C.broadcast_async(payload, src, group), unpack))
                if src != rt.rank:
                    received += payload.numel() * payload.element_size()
            for work, unpack in works:
                C.wait(work, deadline)
                unpack()
    except Exception as exc:  # names the rank(s) that never came (collectives.unreachable)
        raise C.unreachable(rt, "exchange", exc, time.monotonic() - t0, timeout_s) from exc
    return received


def _messages(items: list[tuple[str, int]], tensors: Mapping[str, torch.Tensor], rank: int):
    """(tensor to broadcast, owner, what to do once it arrived): large tensors in place as their bytes
    (uint8: NCCL has no uint16/uint32, and bytes are what the exchange moves), the small ones of each
    owner packed into one uint8 bucket (owners pack, receivers unpack)."""
    buckets: dict[int, list[str]] = {}
    for name, owner in items:
        t = tensors[name]
        if t.numel() * t.element_size() >= BUCKET_BYTES:
            yield _bytes_of(t), owner, _nothing
        else:
            buckets.setdefault(owner, []).append(name)
    for owner, names in sorted(buckets.items()):
        flat = [_bytes_of(tensors[n]) for n in names]
        if owner == rank:
            yield torch.cat(flat), owner, _nothing
        else:
            bucket = torch.empty(sum(f.numel() for f in flat), dtype=torch.uint8, device=flat[0].device)
            yield bucket, owner, _unpacker(bucket, flat)


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)  # targets are freshly allocated: contiguous views


def _unpacker(bucket: torch.Tensor, flat: list[torch.Tensor]):
    def unpack() -> None:
        pos = 0
        for f in flat:
            f.copy_(bucket[pos: pos + f.numel()])
            pos += f.numel()
    return unpack


def _nothing() -> None:
    return None
