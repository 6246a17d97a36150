"""Pure planning: (this rank's placements, a CheckpointIndex) -> ReadPlan.

No I/O and no process group: the plan for any rank of any world size can be computed and tested
in one process. A plan is a list of copy ops "byte runs of a stored piece -> a box of a local
tensor", sorted by (file, offset) so reads are sequential, split so no op exceeds the staging
budget, and validated before any byte moves: every local element is covered exactly once.
"""
from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import torch

from .errors import PlanError
from .index import CheckpointIndex, Piece, StoredTensor
from .placement import Box, TensorSpec

Shape = tuple[int, ...]


@dataclass(frozen=True)
class RunSet:
    """`count` byte runs of `length` bytes starting at `first`, `first + step`, ..."""

    first: int
    length: int
    step: int
    count: int

    @property
    def nbytes(self) -> int:
        return self.length * self.count

    @property
    def strided(self) -> bool:
        """More than one run, with gaps between them (a row split: one run per row)."""
        return self.count > 1 and self.step > self.length

    def span(self, start: int = 0, stop: Optional[int] = None) -> tuple[int, int]:
        """File bytes [lo, hi) from the first byte of run `start` to the end of run `stop - 1`."""
        stop = self.count if stop is None else stop
        return self.first + start * self.step, self.first + (stop - 1) * self.step + self.length

    def runs(self) -> Iterator[tuple[int, int]]:
        for i in range(self.count):
            yield self.first + i * self.step, self.length


@dataclass(frozen=True)
class CopyOp:
    """Read `runs` of `file` (a row-major region of shape `shape`, dtype `src_dtype`) into box
    `dst` of local tensor `name`."""

    name: str
    file: str
    runs: tuple[RunSet, ...]
    src_dtype: torch.dtype
    shape: Shape
    dst: Box

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.runs)

    @property
    def first_byte(self) -> int:
        return self.runs[0].first if self.runs else 0


@dataclass(frozen=True)
class Target:
    """One local tensor to materialize."""

    name: str
    shape: Shape
    dtype: torch.dtype  # what it will be on the device
    stored_dtype: torch.dtype

    @property
    def stored_nbytes(self) -> int:
        return math.prod(self.shape) * self.stored_dtype.itemsize


@dataclass
class ReadPlan:
    targets: dict[str, Target]
    ops: list[CopyOp] = field(default_factory=list)

    @property
    def bytes_to_read(self) -> int:
        return sum(op.nbytes for op in self.ops)

    @property
    def bytes_needed(self) -> int:
        return sum(t.stored_nbytes for t in self.targets.values())

    @property
    def files(self) -> list[str]:
        return sorted({op.file for op in self.ops})


# --- byte runs of a box inside a stored tensor ---------------------------------------------------

def byte_runs(st: StoredTensor, box: Box) -> tuple[RunSet, ...]:
    """Exact byte runs covering `box` of stored tensor `st`, in row-major order of the box."""
    item, dims = st.itemsize, len(st.shape)
    if dims == 0:
        return (RunSet(st.byte_offset, item, item, 1),)
    if box.numel == 0:
        return ()
    # Trailing dims j.. that form one contiguous chunk of the box.
    j, length = dims, 1
    if st.stride[-1] == 1:
        j, length = dims - 1, box.sizes[-1]
        while j > 0 and box.sizes[j] == st.shape[j] and st.stride[j - 1] == st.stride[j] * st.shape[j]:
            j -= 1
            length *= box.sizes[j]
    base = st.byte_offset + item * sum(o * s for o, s in zip(box.offsets[j:], st.stride[j:]))
    if j == 0:
        return (RunSet(base, length * item, length * item, 1),)
    step_dim = j - 1
    step = st.stride[step_dim] * item
    count = box.sizes[step_dim]
    base += box.offsets[step_dim] * step
    out = []
    for idx in itertools.product(*(range(o, o + s) for o, s in zip(box.offsets[:step_dim], box.sizes[:step_dim]))):
        first = base + item * sum(i * s for i, s in zip(idx, st.stride[:step_dim]))
        if step == length * item:  # consecutive runs touch: one contiguous run
            out.append(RunSet(first, length * item * count, length * item * count, 1))
        else:
            out.append(RunSet(first, length * item, step, count))
    return tuple(out)


def split_box(sizes: Shape, itemsize: int, limit: int) -> Iterator[tuple[Shape, Shape]]:
    """Cut a region into row-major sub-boxes (offset, size) of at most `limit` bytes each
    (a single element may exceed it). Bounds host staging memory regardless of tensor size."""
    if math.prod(sizes) * itemsize <= limit or all(s <= 1 for s in sizes):
        yield tuple(0 for _ in sizes), tuple(sizes)
        return
    d = next(i for i, s in enumerate(sizes) if s > 1)
    inner = math.prod(sizes[d + 1:]) * itemsize
    step = max(1, limit // inner) if inner <= limit else 1
    for start in range(0, sizes[d], step):
        n = min(step, sizes[d] - start)
        sub = sizes[:d] + (n,) + sizes[d + 1:]
        for off, size in split_box(sub, itemsize, limit):
            yield off[:d] + (off[d] + start,) + off[d + 1:], size


# --- planning ------------------------------------------------------------------------------------

def _choose_pieces(pieces: Sequence[Piece], prefer: Sequence[str]) -> list[Piece]:
    """One piece per distinct set of fragments (replicas of the same data are read once), taking
    the most preferred file."""
    rank = {f: i for i, f in enumerate(prefer)}
    ordered = sorted(pieces, key=lambda p: (rank.get(p.file, len(rank)), p.file))
    seen, chosen = set(), []
    for p in ordered:
        key = tuple(p.fragments)
        if key not in seen:
            seen.add(key)
            chosen.append(p)
    return chosen


def _check_exact_cover(name: str, shape: Shape, boxes: list[Box], files: Iterable[str]) -> None:
    total = math.prod(shape)
    covered = sum(b.numel for b in boxes)
    for a, b in itertools.combinations(boxes, 2):
        if a.intersect(b) is not None:
            raise PlanError(f"tensor {name!r}: checkpoint pieces overlap at {a.intersect(b)} (files {sorted(set(files))})")
    if covered != total:
        raise PlanError(
            f"tensor {name!r}: the checkpoint covers {covered} of its {total} local elements "
            f"(files {sorted(set(files))}); a model-parallel file is missing or holds a different split"
        )


def make_plan(
    specs: Mapping[str, TensorSpec],
    tp: int,
    tp_rank: int,
    index: CheckpointIndex,
    dtype: Optional[torch.dtype] = None,
    prefer: Sequence[str] = (),
    max_op_bytes: int = 64 << 20,
) -> ReadPlan:
    """Plan this rank's reads: for each local tensor, intersect its fragments with every chosen
    piece's fragments; each intersection becomes byte runs in the piece's file."""
    plan = ReadPlan(targets={})
    for name, spec in specs.items():
        placement = spec.placement(tp, tp_rank)
        local_shape = placement.local_shape(spec.global_shape)
        pieces = index.pieces.get(name)
        if not pieces:
            raise PlanError(f"tensor {name!r} is not in the checkpoint at {index.root}")
        chosen = _choose_pieces(pieces, prefer)
        stored_dtype = chosen[0].stored.dtype
        plan.targets[name] = Target(name, local_shape, dtype or stored_dtype, stored_dtype)
        boxes, files = [], []
        for piece in chosen:
            if piece.stored.dtype != stored_dtype:
                raise PlanError(f"tensor {name!r} is stored as {stored_dtype} in one file and {piece.stored.dtype} in {piece.file}")
            for pf in piece.fragments:
                for lf in placement.fragments(spec.global_shape):
                    inter = lf.logical.intersect(pf.logical)
                    if inter is None:
                        continue
                    src = tuple(p + i - o for p, i, o in zip(pf.local_offsets, inter.offsets, pf.logical.offsets))
                    dst = tuple(l + i - o for l, i, o in zip(lf.local_offsets, inter.offsets, lf.logical.offsets))
                    boxes.append(Box(dst, inter.sizes))
                    files.append(piece.file)
                    for off, size in split_box(inter.sizes, stored_dtype.itemsize, max_op_bytes):
                        src_box = Box(tuple(a + b for a, b in zip(src, off)), size)
                        dst_box = Box(tuple(a + b for a, b in zip(dst, off)), size)
                        plan.ops.append(CopyOp(name, piece.file, byte_runs(piece.stored, src_box),
                                               stored_dtype, size, dst_box))
        _check_exact_cover(name, local_shape, boxes, files)
    plan.ops.sort(key=lambda op: (op.file, op.first_byte))
    return plan


# --- who reads what: the exchange assignment (pure) ----------------------------------------------

def target_signatures(plan: ReadPlan) -> dict[str, str]:
    """name -> a hash of everything that determines the local tensor's bytes (its shape, dtypes and
    every copy op: file, byte runs, destination box). Equal signatures on two ranks mean equal bytes."""
    ops: dict[str, list] = {}
    for op in plan.ops:
        ops.setdefault(op.name, []).append((op.file, op.runs, str(op.src_dtype), op.shape, op.dst))
    out = {}
    for name, t in plan.targets.items():
        key = repr((name, t.shape, str(t.dtype), str(t.stored_dtype), ops.get(name, [])))
        out[name] = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    return out


@dataclass
class Exchange:
    """This rank's part of the exchange: which targets it reads from storage, and the broadcasts
    (target name, owner's global rank) it takes part in, in the same order on every rank of the group:
    `dp` over its DP group (ranks with its TP rank), `world` over all ranks."""

    read: set[str]
    dp: list[tuple[str, int]] = field(default_factory=list)
    world: list[tuple[str, int]] = field(default_factory=list)
    signatures: dict[str, str] = field(default_factory=dict)  # this rank's target_signatures, when exchanging

    def shared(self, world_only: bool = False) -> dict[str, str]:
        """name -> signature of the targets broadcast from one read: equal bytes on every rank of
        their group (the world's, or with `world_only=False` also the DP group's)."""
        return {n: self.signatures[n] for n, _ in (self.world if world_only else self.dp + self.world)}

    def received(self, rank: int) -> list[str]:
        return [n for n, owner in self.dp + self.world if owner != rank]


def _balanced_owners(names: Sequence[str], sizes: Mapping[str, int], loads: list[int]) -> list[int]:
    """Owner index per name: largest first, each to the least loaded owner so far (`loads`, updated;
    ties to the lower index). Each owner still reads its tensors in file order."""
    out = [0] * len(names)
    for i in sorted(range(len(names)), key=lambda i: (-sizes[names[i]], i)):
        owner = min(range(len(loads)), key=lambda o: (loads[o], o))
        out[i] = owner
        loads[owner] += sizes[names[i]]
    return out


def assign_exchange(plan: ReadPlan, tables: Sequence[Mapping[str, str]], rank: int, tp: int,
                    enabled: bool = True) -> Exchange:
    """Decide, from every rank's `target_signatures` (`tables[r]`), who reads each of this rank's
    targets so that each distinct tensor is read from storage once per job:

    * a target with the same signature on every rank (a replicated tensor every rank reads from the
      same file) is read once, by one rank, and broadcast to the world;
    * else, when every rank of this rank's DP group (same TP rank, strided) has the same signature
      (always, for an identical plan), it is read by one DP replica and broadcast over the DP group;
    * else (replicated tensors read from different mp files, which the agreement compares) it is
      read here.

    Owners are balanced by bytes (largest tensor first to the least loaded rank: the world's
    tensors first, then each DP group's on top of them). Every rank computes the same answer from
    the same tables; `enabled=False` reads everything locally."""
    world, mine = len(tables), tables[rank]
    order = sorted(plan.targets, key=_first_op_key(plan))
    if not enabled or world == 1:
        return Exchange(read=set(plan.targets))
    dp_ranks = list(range(rank % tp, world, tp))
    world_cls, dp_cls, local = [], [], []
    for n in order:
        sig = mine[n]
        if all(t.get(n) == sig for t in tables):
            world_cls.append(n)
        elif len(dp_ranks) > 1 and all(tables[r].get(n) == sig for r in dp_ranks):
            dp_cls.append(n)
        else:
            local.append(n)
    sizes = {n: math.prod(t.shape) * t.dtype.itemsize for n, t in plan.targets.items()}
    ex = Exchange(read=set(local), signatures=dict(mine))
    loads = [0] * world
    for n, o in zip(world_cls, _balanced_owners(world_cls, sizes, loads)):
        ex.world.append((n, o))
    dp_loads = [loads[r] for r in dp_ranks]
    for n, o in zip(dp_cls, _balanced_owners(dp_cls, sizes, dp_loads)):
        ex.dp.append((n, dp_ranks[o]))
    ex.read |= {n for n, owner in ex.dp + ex.world if owner == rank}
    return ex


def _first_op_key(plan: ReadPlan):
    first: dict[str, tuple] = {}
    for op in plan.ops:
        key = (op.file, op.first_byte)
        if op.name not in first or key < first[op.name]:
            first[op.name] = key
    return lambda n: (first.get(n, ("", 0)), n)
