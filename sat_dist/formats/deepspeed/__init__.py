"""DeepSpeed ZeRO-1/2/3 checkpoints, read without DeepSpeed and without `zero_to_fp32`.

The reader interface of `formats.base`. A ZeRO-1/2 folder holds the complete weights in the
training dtype (`mp_rank_XX_model_states.pt['module']`, read by the SAT reader) and the fp32
master weights as dp partitions in `*_optim_states.pt`; a ZeRO-3 folder holds the weights only
as partitions. Partitions are located, never loaded: each rank reads only the byte ranges
overlapping its TP shard, and the Adam moments (2/3 of an optim file) are never touched. Only
`data.pkl` of each file is unpickled, with weights_only=True (DeepSpeed's own classes come from
`ds_pickle` stubs), so deepspeed is never imported. Layout checked against files written by
DeepSpeed 0.19.8 (microsoft/DeepSpeed deepspeed/runtime/engine.py, deepspeed/utils/zero_to_fp32.py).
"""
from __future__ import annotations

from typing import Mapping

import torch

from ...errors import ConfigError
from ...index import CheckpointIndex
from ...placement import files_needed
from .. import sat
from ..base import IndexRequest, folder_model_config
from .builder import Builder, open_rank
from .describe import describe
from .discovery import DeepSpeedCheckpoint, discover, recognise
from .states import load, run_dtype
from . import zero12, zero3

NAME = "deepspeed"
USES_LATEST = True  # `<root>/latest` names the tag folder: the loader agrees it once
# SAT-style trainings keep `model_config.json` beside `latest`.
model_config = folder_model_config
WEIGHTS = ("auto", "module", "fp32")


def source_for(ckpt: DeepSpeedCheckpoint, weights: str) -> str:
    """'module' or 'fp32': where the weights come from for this checkpoint and --weights choice."""
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights must be one of {list(WEIGHTS)}, got {weights!r}")
    if ckpt.zero3:
        if weights == "module":
            raise ConfigError(
                f"{ckpt.tag_dir} is a ZeRO-3 checkpoint: its model states hold only size-0 placeholders and the "
                f"weights exist only as fp32 optimizer partitions; use --weights fp32 (or auto)"
            )
        return "fp32"
    return "fp32" if weights == "fp32" else "module"


def index(req: IndexRequest) -> tuple[CheckpointIndex, list[str]]:
    """This rank's pieces: ZeRO-1/2 `module` weights through the SAT reader, else the fp32
    partitions of the mp ranks its TP shard overlaps."""
    ckpt = discover(req.path, req.tag)
    meta = {"tag": ckpt.tag, "mp_size": ckpt.mp_size, "dp_size": ckpt.dp_size, "zero3": ckpt.zero3,
            "bf16": ckpt.bf16}
    if source_for(ckpt, req.weights) == "module":
        # ZeRO-1/2 `module` is an ordinary SAT/DeepSpeed model-states file: the SAT reader's job.
        idx, files = sat.read_index(req.path, req.specs, req.tp, req.tp_rank, req.tag, req.prefix)
        idx.format = "deepspeed-zero12-module"
        idx.meta.update(meta, source="module")
        return idx, files
    idx = CheckpointIndex(root=req.path, format="deepspeed", meta={**meta, "source": "fp32"})
    # DeepSpeed records shared_params (tied weights) only in global rank 0's model states file.
    model00 = load(ckpt.model_files[0][0], "model states file of mp rank 0")
    shared = model00.get("shared_params") if isinstance(model00.get("shared_params"), Mapping) else {}
    b = Builder(req.specs, req.prefix, ckpt.mp_size, idx, dict(shared))
    index_rank = zero3.index_rank if ckpt.zero3 else zero12.index_rank
    stage = 0
    for i, mp in enumerate(files_needed(req.specs, ckpt.mp_size, req.tp, req.tp_rank)):
        stage = index_rank(ckpt, b, open_rank(ckpt, mp), mp, first=i == 0)
    b.alias_shared()
    idx.format, idx.meta["stage"] = f"deepspeed-zero{stage}", stage
    dtype = run_dtype(ckpt, model00)
    if dtype != torch.float32:  # a 16-bit run: serve its dtype unless --dtype says otherwise
        idx.meta["default_dtype"] = dtype
    b.check_complete(ckpt.tag_dir, stage)
    return idx, sorted({p.file for pieces in idx.pieces.values() for p in pieces})


__all__ = ["NAME", "DeepSpeedCheckpoint", "describe", "discover", "index", "recognise", "source_for"]
