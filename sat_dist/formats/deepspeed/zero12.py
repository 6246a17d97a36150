"""ZeRO-1/2 (and BF16_Optimizer) fp32 master partitions: where each trainable param lies.

Per param group, DeepSpeed concatenates the trainable params (in `param_shapes` order, which
already reflects `round_robin_gradients`, each followed by its `param_alignment_paddings`),
pads the flat group to a multiple of 2 x dp and cuts it into dp equal slices of P elements
(microsoft/DeepSpeed deepspeed/runtime/zero/stage_1_and_2.py; the inverse is
`_zero2_merge_trainable_params` in deepspeed/utils/zero_to_fp32.py). P and the valid elements
of each slice follow from param_shapes alone. The files' own slice lengths differ by DeepSpeed
version (padding stripped per rank, stripped on the last rank only, or kept by BF16_Optimizer),
so each file only has to hold at least its valid elements. Frozen params and buffers are whole
tensors in `module` (16-bit in 16-bit runs).
"""
from __future__ import annotations

import math
import os
from typing import Mapping

from ...errors import CheckpointError
from .builder import Builder, RankFiles
from .discovery import DeepSpeedCheckpoint


def index_rank(ckpt: DeepSpeedCheckpoint, b: Builder, rank: RankFiles, mp: int, first: bool) -> int:
    """Index mp rank `mp`'s fp32 master partitions, frozen params and buffers; returns the ZeRO
    stage (1 or 2). `first`: the first mp rank this TP rank reads (replicated tensors come from it)."""
    model_path, param_shapes = rank.model_path, rank.param_shapes
    for f in rank.files:
        if len(f.lengths) != len(param_shapes):
            raise CheckpointError(
                f"{f.path}: {len(f.lengths)} fp32 partition groups but {model_path} lists {len(param_shapes)} param "
                f"groups: the files come from different saves; restore exactly the files of one save"
            )
    align_pads = rank.optim0.get("param_alignment_paddings")
    for g, shapes in enumerate(param_shapes):
        gpads = [int(p) for p in align_pads[g]] if align_pads is not None else [0] * len(shapes)
        if len(gpads) != len(shapes):
            raise CheckpointError(f"{ckpt.optim_files[mp][0]}: param_alignment_paddings[{g}] has {len(gpads)} "
                                  f"entries for {len(shapes)} params: the files come from different saves")
        _index_group(ckpt, b, rank, g, shapes, gpads, mp, first)
    in_flat = {n for s in param_shapes for n in s}
    # Frozen params (not in the optimizer) and buffers. Tied aliases are skipped: they take the
    # owner's (fp32) pieces in Builder.alias_shared.
    module = rank.model.get("module") or {}
    size = os.path.getsize(model_path)
    for stored_name in module:
        if stored_name not in in_flat and stored_name not in b.shared and b.wanted(b.model_name(stored_name), first):
            b.add_full(model_path, module, stored_name, mp, size)
    b.check_unexpected(model_path, list(module))
    if len(rank.stages) != 1:
        raise CheckpointError(f"{ckpt.tag_dir}: the optimizer files of mp rank {mp} mix ZeRO stages "
                              f"{sorted(rank.stages)}: two runs were saved into the same tag folder; keep only "
                              f"the files of one run")
    return next(iter(rank.stages))


def _index_group(ckpt: DeepSpeedCheckpoint, b: Builder, rank: RankFiles, g: int, shapes: Mapping, gpads: list[int],
                 mp: int, first: bool) -> None:
    """Param group `g`: each param's flat range, cut at the dp slice boundaries."""
    dp, model_path = ckpt.dp_size, rank.model_path
    total = sum(math.prod(s) for s in shapes.values()) + sum(gpads)
    P = -(-total // (2 * dp)) * 2  # DeepSpeed pads each flat group to a multiple of 2 x dp
    valid = [min(P, max(0, total - d * P)) for d in range(dp)]
    short = [(f.path, f.lengths[g], valid[d]) for d, f in enumerate(rank.files) if not valid[d] <= f.lengths[g] <= P]
    if short:
        path, have, want = short[0]
        raise CheckpointError(
            f"{path}: param group {g} partition holds {have} fp32 elements but param_shapes in {model_path} "
            f"({len(shapes)} params, {total} elements over dp={dp}) put {want} (of at most {P}) on this rank: "
            f"the file is truncated or from another save; restore exactly the files of one save"
        )
    offset = 0
    for j, (stored_name, shape) in enumerate(shapes.items()):
        n = math.prod(shape)
        b.check_shape(model_path, stored_name, shape, mp)
        name = b.model_name(stored_name)
        if b.wanted(name, first) and n:
            for d in range(offset // P, (offset + n - 1) // P + 1):
                lo, hi = max(offset, d * P), min(offset + n, d * P + P)
                seg = rank.files[d].group_segment(g, lo - d * P, hi - d * P)
                b.add_flat(name, mp, lo - offset, hi - offset, seg)
        offset += n + gpads[j]
