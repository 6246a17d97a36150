"""CheckpointIndex: the vocabulary shared by the readers (which produce it) and the planner
(which consumes it). A logical tensor name maps to the stored pieces that hold parts of it.

A StoredTensor is where one saved tensor's elements live (file, byte offset, dtype, shape,
strides); a Piece is a StoredTensor plus the fragments of the logical tensor it holds. Pure data:
no I/O, no process group.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .placement import Fragment

Shape = tuple[int, ...]


@dataclass(frozen=True)
class StoredTensor:
    """Where one saved tensor's elements live in its file."""

    file: str
    byte_offset: int  # file offset of element (0, ..., 0)
    dtype: torch.dtype
    shape: Shape
    stride: Shape

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def extent_bytes(self) -> int:
        """Bytes from byte_offset to the last element's end (what must exist in the file)."""
        if any(s == 0 for s in self.shape):
            return 0
        last = sum((s - 1) * st for s, st in zip(self.shape, self.stride))
        return (last + 1) * self.itemsize


@dataclass(frozen=True)
class Piece:
    name: str
    stored: StoredTensor
    fragments: tuple[Fragment, ...]

    @property
    def file(self) -> str:
        return self.stored.file


@dataclass
class CheckpointIndex:
    """What one rank's reader found: name -> pieces, plus facts for the report (`meta`: tag, mp/dp
    sizes, `absent` tensors the model fills itself, a reader's `default_dtype`)."""

    root: str
    format: str
    pieces: dict[str, list[Piece]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def add(self, piece: Piece) -> None:
        self.pieces.setdefault(piece.name, []).append(piece)
