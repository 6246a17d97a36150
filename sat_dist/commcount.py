"""Bytes each device collective sends from this rank, by kind, counted where the collective is issued
(`models/tp_ops.py`: TP and Ulysses; `collectives.py`: the CFG pair, the SP latents' gather, the
decode gather). `sat_dist.engine.comm` predicts the same numbers from the configs with the same rules.

"Bytes sent" by one rank, for a tensor of `n` bytes on a group of `g` ranks (`g` = 1: nothing):

- all-reduce: 2 (g - 1) n // g — a ring's reduce-scatter plus all-gather (integer division);
- all-gather: (g - 1) n — this rank's `n` bytes go to each other rank ((g - 1)/g of the output);
- all-to-all: the bytes of the input addressed to other ranks (sum of its `in_sizes` but its own;
  (g - 1)/g of the input when even);
- gather to the group's first rank: `n` (its own tile bytes) on every other rank, 0 on the root.

Kinds: "tp" (TP all-reduce / all-gather in the DiT and T5 forwards), "sp" (the Ulysses all-to-alls
and the SP latents' gather), "cfg" (the CFG pair's gather), "decode" (the decode's gathers). The
counter is per process (one rank), always on (an addition per collective); read `snapshot()`s and
subtract them to count a phase.
"""
from __future__ import annotations

KINDS = ("tp", "sp", "cfg", "decode")

_COUNTS = {k: 0 for k in KINDS}


def all_reduce_bytes(n: int, g: int) -> int:
    return 2 * (g - 1) * n // g if g > 1 else 0


def all_gather_bytes(n: int, g: int) -> int:
    return (g - 1) * n if g > 1 else 0


def all_to_all_bytes(in_sizes: list[int], me: int, itemsize: int) -> int:
    return (sum(in_sizes) - in_sizes[me]) * itemsize if len(in_sizes) > 1 else 0


def gather_bytes(n: int, g: int, root: bool) -> int:
    return 0 if g <= 1 or root else n


def add(kind: str, nbytes: int) -> None:
    _COUNTS[kind] += int(nbytes)


def snapshot() -> dict[str, int]:
    return dict(_COUNTS)


def since(before: dict[str, int]) -> dict[str, int]:
    """Bytes per kind counted since `before` (a `snapshot()`)."""
    return {k: _COUNTS[k] - before.get(k, 0) for k in KINDS}


def reset() -> None:
    for k in KINDS:
        _COUNTS[k] = 0
