"""ZeRO flat partitions as byte ranges: the geometry both index builders share.

ZeRO keeps fp32 master weights as flat 1-D tensors, each dp rank saving a contiguous slice
(microsoft/DeepSpeed deepspeed/utils/zero_to_fp32.py rebuilds a param by concatenating them).
Flat elements [a, b) of one param become, through `placement.flat_range_boxes`, a few Pieces whose
StoredTensor is one box (contiguous) at the file offset of the box's first element; the planner
then reads only the byte ranges overlapping a rank's TP shard, like any other checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ...errors import CheckpointError
from ...index import Piece, StoredTensor
from ...placement import Box, Fragment, flat_range_boxes
from ..torchfile import locate


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


def _compose(box: Box, saved: Sequence[Fragment]) -> tuple[Fragment, ...]:
    """Fragments (logical box, offset inside `box`) of the part of a saved local tensor that
    `box` (in that local tensor's coordinates) covers; `saved` maps the saved local tensor to
    the logical one (its TP placement when the run used Megatron-style model parallelism)."""
    out = []
    for f in saved:
        inter = box.intersect(f.local_box())
        if inter is None:
            continue
        logical = tuple(l + i - o for l, i, o in zip(f.logical.offsets, inter.offsets, f.local_offsets))
        out.append(Fragment(Box(logical, inter.sizes), tuple(i - o for i, o in zip(inter.offsets, box.offsets))))
    return tuple(out)


def flat_pieces(name: str, local_shape: Sequence[int], start: int, stop: int, file: str, byte_offset: int,
                dtype: torch.dtype, saved: Sequence[Fragment]) -> list[Piece]:
    """Pieces for flat elements [start, stop) of a param of `local_shape`, stored contiguously in
    `file` from `byte_offset` (the offset of element `start`)."""
    out = []
    for flat, box in flat_range_boxes(tuple(local_shape), start, stop):
        st = StoredTensor(file, byte_offset + dtype.itemsize * (flat - start), dtype, box.sizes,
                          _contiguous_stride(box.sizes))
        frags = _compose(box, saved)
        if frags:
            out.append(Piece(name, st, frags))
    return out


@dataclass
class Segment:
    """Part of one flat partition tensor: `length` elements from `byte_offset`."""

    file: str
    byte_offset: int
    dtype: torch.dtype
    length: int


class FlatFile:
    """One dp rank's list of flat fp32 tensors (one per group), addressable as one concatenation
    (ZeRO-3's sub-groups split the param list at arbitrary points)."""

    def __init__(self, path: str, tensors: Sequence[Any], what: str):
        size = os.path.getsize(path)
        self.path = path
        self.stored = [locate(path, t, f"{what}[{i}]", size) for i, t in enumerate(tensors)]
        for i, st in enumerate(self.stored):
            if len(st.shape) != 1:
                raise CheckpointError(f"{path}: {what}[{i}] has shape {list(st.shape)}, expected a flat 1-D partition")
        self.lengths = [st.shape[0] for st in self.stored]
        self.starts = [0]
        for n in self.lengths:
            self.starts.append(self.starts[-1] + n)

    def group_segment(self, g: int, start: int, stop: int) -> Segment:
        """Elements [start, stop) of group `g`'s tensor."""
        st = self.stored[g]
        return Segment(self.path, st.byte_offset + st.itemsize * start, st.dtype, stop - start)

    def segments(self, start: int, stop: int) -> Iterator[tuple[int, Segment]]:
        """(element offset, segment) covering [start, stop) of the concatenation."""
        for g, st in enumerate(self.stored):
            lo, hi = max(start, self.starts[g]), min(stop, self.starts[g + 1])
            if lo < hi:
                yield lo, Segment(self.path, st.byte_offset + st.itemsize * (lo - self.starts[g]), st.dtype, hi - lo)
