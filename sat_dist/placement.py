"""Placements: how a local (or stored) tensor relates to the logical, full tensor.

Every placement is described the same way, as fragments: a box of the logical tensor and the
offset where that box sits inside the local tensor. Resharding N -> M is then box intersection,
with no format- or layer-specific cases. All of this is pure: no I/O, no process group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Box:
    """A hyper-rectangle [offsets, offsets + sizes) in some tensor's coordinates."""

    offsets: Shape
    sizes: Shape

    @staticmethod
    def full(shape: Sequence[int]) -> "Box":
        return Box(tuple(0 for _ in shape), tuple(shape))

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def intersect(self, other: "Box") -> Optional["Box"]:
        lo = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        hi = tuple(
            min(a + s, b + t) for a, s, b, t in zip(self.offsets, self.sizes, other.offsets, other.sizes)
        )
        if any(h <= l for l, h in zip(lo, hi)):
            return None
        return Box(lo, tuple(h - l for l, h in zip(lo, hi)))


@dataclass(frozen=True)
class Fragment:
    """`logical` box of the full tensor stored at `local_offsets` in the local tensor."""

    logical: Box
    local_offsets: Shape

    def local_box(self) -> Box:
        return Box(self.local_offsets, self.logical.sizes)


@dataclass(frozen=True)
class Replicate:
    """The rank holds the whole logical tensor."""

    def local_shape(self, shape: Shape) -> Shape:
        return tuple(shape)

    def fragments(self, shape: Shape) -> list[Fragment]:
        return [Fragment(Box.full(shape), tuple(0 for _ in shape))]


@dataclass(frozen=True)
class Split:
    """SAT tensor parallel: along `dim`, the full extent is cut into consecutive blocks sized in
    proportion to `blocks` (SAT's stride: (1,) plain, (1,1,1) fused QKV, (heads, kv, kv) for GQA),
    and rank `index` of `parts` holds the `index`-th 1/parts of every block, concatenated."""

    dim: int
    parts: int
    index: int
    blocks: tuple[int, ...] = (1,)

    def block_sizes(self, shape: Shape) -> list[int]:
        total = shape[self.dim]
        unit, rem = divmod(total, sum(self.blocks))
        sizes = [unit * b for b in self.blocks]
        if rem or any(s % self.parts for s in sizes):
            raise ValueError(
                f"dim {self.dim} of size {total} cannot be split {self.parts} ways in blocks {list(self.blocks)}"
            )
        return sizes

    def local_shape(self, shape: Shape) -> Shape:
        out = list(shape)
        out[self.dim] = sum(self.block_sizes(shape)) // self.parts
        return tuple(out)

    def fragments(self, shape: Shape) -> list[Fragment]:
        frags = []
        start = local = 0
        for size in self.block_sizes(shape):
            part = size // self.parts
            offsets = [0] * len(shape)
            sizes = list(shape)
            offsets[self.dim] = start + self.index * part
            sizes[self.dim] = part
            loc = [0] * len(shape)
            loc[self.dim] = local
            frags.append(Fragment(Box(tuple(offsets), tuple(sizes)), tuple(loc)))
            start += size
            local += part
        return frags


Placement = Union[Replicate, Split]


@dataclass(frozen=True)
class Layout:
    """How a model parameter is sharded, independent of the TP size: `split_dim is None` means
    replicated. `placement(parts, index)` gives the concrete Placement for one rank."""

    split_dim: Optional[int] = None
    blocks: tuple[int, ...] = (1,)

    def placement(self, parts: int, index: int) -> Placement:
        if self.split_dim is None or parts == 1:
            return Replicate()
        return Split(self.split_dim, parts, index, self.blocks)

    @property
    def replicated(self) -> bool:
        return self.split_dim is None


REPLICATED = Layout()


@dataclass(frozen=True)
class TensorSpec:
    """What planning needs to know about one model tensor: its full shape and how it is split."""

    global_shape: Shape
    layout: Layout
    # Non-empty for a tensor SAT's model has but released files may lack (SAT's load tolerates it):
    # what the model uses instead. Readers then report it absent rather than missing.
    if_absent: str = ""

    def placement(self, tp: int, tp_rank: int) -> Placement:
        return self.layout.placement(tp, tp_rank)


def files_needed(specs: Mapping[str, TensorSpec], saved_parts: int, tp: int, tp_rank: int) -> list[int]:
    """Which of `saved_parts` TP-sharded files this rank must open (from layouts alone).

    A file is needed if one of its split fragments overlaps this rank's; replicated tensors are
    read from the first needed file (every SAT mp file holds them)."""
    needed: set[int] = set()
    for spec in specs.values():
        if spec.layout.replicated or saved_parts == 1:
            continue
        mine = spec.placement(tp, tp_rank).fragments(spec.global_shape)
        for r in range(saved_parts):
            theirs = spec.layout.placement(saved_parts, r).fragments(spec.global_shape)
            if any(a.logical.intersect(b.logical) for a in mine for b in theirs):
                needed.add(r)
    first = tp_rank * saved_parts // tp
    if not needed:
        needed.add(first)
    return sorted(needed, key=lambda r: (r != first, r))


def flat_range_boxes(shape: Shape, start: int, stop: int) -> list[tuple[int, Box]]:
    """Decompose the row-major flat element range [start, stop) of a tensor of `shape` into
    boxes, each contiguous in flat order: returns (flat offset of the box's first element, box).

    ZeRO stores parameters as flat ranges; expressed as boxes they plan like any other piece.
    """
    shape = tuple(shape)
    if start >= stop:
        return []
    if len(shape) == 0:
        return [(0, Box((), ()))]
    if len(shape) == 1:
        return [(start, Box((start,), (stop - start,)))]
    inner = math.prod(shape[1:])
    rest = len(shape) - 1
    out: list[tuple[int, Box]] = []

    def partial_row(lo: int, hi: int) -> None:  # [lo, hi) within one row
        row = lo // inner
        for off, sub in flat_range_boxes(shape[1:], lo - row * inner, hi - row * inner):
            out.append((row * inner + off, Box((row,) + sub.offsets, (1,) + sub.sizes)))

    if start % inner:  # head: the rest of a partial first row
        end = min(stop, (start // inner + 1) * inner)
        partial_row(start, end)
        start = end
    rows = (stop - start) // inner
    if rows:  # body: whole rows, one box
        out.append((start, Box((start // inner,) + (0,) * rest, (rows,) + shape[1:])))
        start += rows * inner
    if start < stop:  # tail: the start of a partial last row
        partial_row(start, stop)
    return out
