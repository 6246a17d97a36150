"""ZeRO-3: the weights exist only as partitions, each param partitioned on its own.

A param of n elements is cut into dp slices of q = ceil(n/dp), the last one padded
(`zero3_partitioned_param_info` in microsoft/DeepSpeed deepspeed/utils/zero_to_fp32.py).
Trainable params: every dp rank's `fp32_flat_groups` concatenate their slices in `param_shapes`
order, sub-groups (sub_group_size) cutting that list at arbitrary points. Frozen params: each dp
rank's model-states file holds its 16-bit slice in `frozen_param_fragments`
(`_zero3_merge_frozen_params`). Buffers are real tensors in dp rank 0's `module`; params there
are size-0 placeholders.
"""
from __future__ import annotations

import math
import os

from ...errors import CheckpointError
from ..torchfile import locate
from .builder import Builder, RankFiles
from .discovery import DeepSpeedCheckpoint
from .partitions import Segment
from .states import load


def _slice(n: int, dp: int, d: int) -> tuple[int, int]:
    """Flat elements [lo, hi) of an n-element param held by dp rank d (lo >= hi: padding only)."""
    q = -(-n // dp)
    return d * q, min(n, (d + 1) * q)


def index_rank(ckpt: DeepSpeedCheckpoint, b: Builder, rank: RankFiles, mp: int, first: bool) -> int:
    """Index mp rank `mp`'s trainable, frozen and buffer tensors; returns the ZeRO stage (3).
    `first`: the first mp rank this TP rank reads (replicated tensors come from it)."""
    dp, model_path, files = ckpt.dp_size, rank.model_path, rank.files
    if any(f.lengths != files[0].lengths for f in files):
        raise CheckpointError(
            f"{ckpt.tag_dir}: the optimizer files' fp32_flat_groups sizes differ "
            f"({[f.lengths for f in files]}): the files come from different saves"
        )
    flat = [(n, s) for group in rank.param_shapes for n, s in group.items()]
    need = sum(-(-math.prod(s) // dp) for _, s in flat)
    if need != files[0].starts[-1]:
        raise CheckpointError(
            f"{ckpt.optim_files[mp][0]}: fp32_flat_groups hold {files[0].starts[-1]} elements per rank but "
            f"param_shapes in {model_path} need {need} (sum of ceil(numel/{dp})): the files come from different "
            f"saves or a different data-parallel size"
        )
    offset = 0
    for stored_name, shape in flat:
        n = math.prod(shape)
        b.check_shape(model_path, stored_name, shape, mp)
        name = b.model_name(stored_name)
        if b.wanted(name, first):
            for d in range(dp):
                lo, hi = _slice(n, dp, d)
                if lo < hi:  # the tail rank(s) may hold only (uninitialised) padding: never read it
                    for at, seg in files[d].segments(offset, offset + hi - lo):
                        start = lo + at - offset
                        b.add_flat(name, mp, start, start + seg.length, seg)
        offset += -(-n // dp)
    b.check_unexpected(model_path, [n for n, _ in flat])
    frozen = rank.model.get("frozen_param_shapes") or {}
    b.check_unexpected(model_path, list(frozen))
    for stored_name, shape in frozen.items():
        b.check_shape(model_path, stored_name, shape, mp)
    _index_frozen(ckpt, b, rank, mp, {n: s for n, s in frozen.items() if b.wanted(b.model_name(n), first)})
    module = rank.model.get("module") or {}
    size = os.path.getsize(model_path)
    partitioned = {n for n, _ in flat} | set(frozen)
    buffers = list(rank.model.get("buffer_names") or [])
    for stored_name in buffers:
        if stored_name in module and stored_name not in partitioned and b.wanted(b.model_name(stored_name), first):
            b.add_full(model_path, module, stored_name, mp, size)
    b.check_unexpected(model_path, buffers)
    return 3


def _index_frozen(ckpt: DeepSpeedCheckpoint, b: Builder, rank: RankFiles, mp: int, wanted: dict) -> None:
    """Frozen params: every dp rank's model-states file holds its padded 16-bit slice."""
    if not wanted:
        return
    dp = ckpt.dp_size
    for d, path in enumerate(ckpt.model_files[mp]):
        model = rank.model if d == 0 else load(path, f"model states file of dp rank {d}, mp rank {mp}")
        frags = model.get("frozen_param_fragments") or {}
        size = os.path.getsize(path)
        for stored_name, shape in wanted.items():
            n = math.prod(shape)
            lo, hi = _slice(n, dp, d)
            if lo >= hi:
                continue
            if stored_name not in frags:
                raise CheckpointError(f"{path} has no frozen_param_fragments entry for {stored_name!r}; the "
                                      f"file comes from another save: copy this tag's files again")
            st = locate(path, frags[stored_name], stored_name, size)
            if math.prod(st.shape) < hi - lo:
                raise CheckpointError(f"{path}: frozen fragment {stored_name!r} has {math.prod(st.shape)} "
                                      f"elements, dp rank {d} must hold {hi - lo} of {n}")
            b.add_flat(b.model_name(stored_name), mp, lo, hi, Segment(path, st.byte_offset, st.dtype, hi - lo))
