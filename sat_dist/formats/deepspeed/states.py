"""DeepSpeed's pickled dicts, read from `data.pkl` only (tensors located, never loaded).

The model-states dict (`module`, `param_shapes`, `frozen_param_shapes`, `shared_params`,
`dp_world_size`, `ds_config`, ...) is written by `_save_checkpoint` and the optimizer-states dict
by `_save_zero_checkpoint` in microsoft/DeepSpeed deepspeed/runtime/engine.py; the latter's
`optimizer_state_dict` is the ZeRO optimizer's `state_dict()` (deepspeed/runtime/zero/
stage_1_and_2.py, stage3.py, deepspeed/runtime/bf16_optimizer.py). Errors name the file's role
so a user knows which of many partition files to copy again.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ...errors import CheckpointError, UnsafeCheckpointError
from ..ds_pickle import ZeroStageEnum
from ..torchfile import load_structure
from .discovery import DeepSpeedCheckpoint


def load(path: str, what: str) -> dict:
    """`load_structure` with the file's role in the message (truncated / unknown global / ...)."""
    try:
        obj = load_structure(path)
    except CheckpointError as exc:
        hint = "" if isinstance(exc, UnsafeCheckpointError) else \
            "; if the file is truncated or corrupt, copy it again from the training run"
        raise type(exc)(f"{what}: {exc}{hint}") from exc  # keeps UnsafeCheckpointError named
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path} holds a {type(obj).__name__}, not a DeepSpeed checkpoint dict; "
                              f"pass the folder of a DeepSpeed save (the one holding 'latest')")
    return obj


def optim_state(path: str, dp_rank: int) -> dict:
    """The ZeRO optimizer's state dict in an optim file of dp rank `dp_rank`."""
    obj = load(path, f"optimizer partition file of dp rank {dp_rank}")
    osd = obj.get("optimizer_state_dict")
    if not isinstance(osd, dict):
        raise CheckpointError(f"{path} has no 'optimizer_state_dict' (keys {sorted(obj)[:10]}): not a ZeRO "
                              f"optimizer file; remove stray *_optim_states.pt files from the tag folder")
    return osd


def stage_of(osd: Mapping, path: str) -> int:
    """1, 2 or 3; BF16_Optimizer files (no `zero_stage`) count as 1: same flat layout, padding kept."""
    stage = osd.get("zero_stage")
    if stage is None:
        if "single_partition_of_fp32_groups" in osd:
            return 1
        raise CheckpointError(f"{path}: no 'zero_stage' and no fp32 partitions: not a ZeRO optimizer file; "
                              f"load the module weights instead (--weights module)")
    if type(stage) is not int and not isinstance(stage, ZeroStageEnum):
        raise CheckpointError(f"{path}: zero_stage={stage!r} is not a ZeRO stage: the file is damaged or not a "
                              f"DeepSpeed optimizer file")
    stage = int(stage)
    if stage not in (1, 2, 3):
        raise CheckpointError(f"{path}: zero_stage={stage} has no fp32 partitions to read; load the module "
                              f"weights instead (--weights module)")
    return stage


def run_dtype(ckpt: DeepSpeedCheckpoint, model0: Mapping) -> torch.dtype:
    """The dtype the run trained in: bf16 optimizer files, else ds_config's fp16.enabled, else fp32."""
    if ckpt.bf16:
        return torch.bfloat16
    cfg = model0.get("ds_config") if isinstance(model0.get("ds_config"), dict) else {}
    return torch.float16 if (cfg.get("fp16") or {}).get("enabled") else torch.float32


def check_dp(path: str, key: str, value: Any, dp: int, tag_dir: str) -> None:
    """A file's own record of the data-parallel size (`dp_world_size`, `partition_count`) must
    match the number of partition files: otherwise files are missing or left from another run."""
    counts = value if isinstance(value, (list, tuple)) else [value]
    try:
        counts = [int(c) for c in counts]
    except (TypeError, ValueError):
        counts = []
    if not counts:
        raise CheckpointError(f"{path}: {key}={value!r} is not a data-parallel size; the file is not a complete "
                              f"DeepSpeed save: copy this tag's files again from the training run")
    if max(counts) != dp:
        # the saved count is untrusted: name the first missing ranks without building the whole range
        gone = range(dp, max(counts))
        named = (f" (missing: the files of dp rank(s) {list(gone[:8])}, *zero_pp_rank_{gone[0]}_mp_rank_XX_*_states.pt"
                 f"{' ...' if len(gone) > 1 else ''})" if len(gone) > 0 else "")
        raise CheckpointError(
            f"{path} says {key}={max(counts)} (the data-parallel size it was saved with) but {tag_dir} holds {dp} "
            f"optimizer partition file(s) per model-parallel rank{named}: partition files are missing or left over "
            f"from another run; restore exactly the files of one save"
        )
    if min(counts) != dp:
        raise CheckpointError(
            f"{path}: param groups have different partition counts {counts} (MoE expert groups); "
            f"sat_dist reads dense ZeRO checkpoints only: convert it with DeepSpeed's ds_to_universal.py"
        )
