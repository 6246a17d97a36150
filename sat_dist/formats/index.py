"""CheckpointIndex: logical tensor name -> the stored pieces that hold parts of it.

A Piece is one stored tensor (file, byte offset, dtype, shape, strides) plus the fragments of the
logical tensor it holds. Every reader (SAT, DeepSpeed, ...) produces this; the planner only sees it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..placement import Fragment
from .torchfile import StoredTensor

Shape = tuple[int, ...]


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
    root: str
    format: str
    pieces: dict[str, list[Piece]] = field(default_factory=dict)
    file_sizes: dict[str, int] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def add(self, piece: Piece) -> None:
        self.pieces.setdefault(piece.name, []).append(piece)
