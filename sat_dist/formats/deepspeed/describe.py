"""`sat-dist inspect` for a DeepSpeed ZeRO folder: what each file holds and what would be read,
from the pickles' metadata only (no tensor byte is touched, deepspeed is not imported).

The summary says where the weights come from and how big the never-read optimizer moments are,
so a user can see why loading needs only a third of an optim file.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence

import torch

from ..torchfile import tensor_bytes
from .discovery import DeepSpeedCheckpoint, discover
from .states import load, optim_state, run_dtype, stage_of

ZERO_STAGE_NAMES = {1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}
# Model-states keys DeepSpeed itself writes (deepspeed/runtime/engine.py `_save_checkpoint`);
# the rest is the training script's client state.
ENGINE_KEYS = {
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
    "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
    "checkpoint_parallel_dimensions", "ds_config", "ds_version", "universal_checkpoint_info"}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def _dtypes(tensors: Any) -> list[str]:
    return sorted({str(t.dtype).removeprefix("torch.") for t in tensors if isinstance(t, torch.Tensor)})


def describe(path: str, tag: Optional[str] = None) -> dict:
    """What a DeepSpeed ZeRO checkpoint folder holds: the facts as JSON keys, `summary` as text."""
    ckpt = discover(path, tag)
    model0 = load(ckpt.model_files[0][0], "model states file")
    osd0 = optim_state(ckpt.optim_files[0][0], 0)
    stage = stage_of(osd0, ckpt.optim_files[0][0])
    param_shapes = model0.get("param_shapes") or []
    frozen = model0.get("frozen_param_shapes") or {}
    trainable = [(n, tuple(s)) for g in param_shapes for n, s in g.items()]
    info: dict[str, Any] = {
        "format": "deepspeed",
        "root": path, "tag": ckpt.tag, "tag_dir": ckpt.tag_dir,
        "stage": stage, "optimizer": "BF16_Optimizer" if "zero_stage" not in osd0 else "DeepSpeedZeroOptimizer"
        + ("_Stage3" if stage == 3 else ""),
        "dp_size": ckpt.dp_size, "mp_size": ckpt.mp_size,
        "saved_dp_world_size": model0.get("dp_world_size"), "saved_mp_world_size": model0.get("mp_world_size"),
        "run_dtype": DTYPE_NAMES[run_dtype(ckpt, model0)], "ds_version": model0.get("ds_version"),
        "param_groups": len(param_shapes),
        "trainable_params": len(trainable), "trainable_numel": sum(_numel(s) for _, s in trainable),
        "frozen_params": len(frozen), "frozen_numel": sum(_numel(s) for s in frozen.values()),
        "buffers": list(model0.get("buffer_names") or []),
        "shared_params": dict(model0.get("shared_params") or {}),
        "client_state_keys": sorted(set(model0) - ENGINE_KEYS),
        "default_source": "fp32 partitions" if ckpt.zero3 else "module (--weights fp32: fp32 partitions)",
        "files": _files(ckpt, path, stage, model0, osd0),
    }
    info["summary"] = _summary(info)
    return info


def _files(ckpt: DeepSpeedCheckpoint, path: str, stage: int, model0: dict, osd0: dict) -> list[dict]:
    """Per mp rank: its model-states file(s), then its dp ranks' optimizer files."""
    out = []
    for m in range(ckpt.mp_size):
        for d, f in enumerate(ckpt.model_files[m]):
            obj = model0 if (m, d) == (0, 0) else load(f, "model states file")
            mod = obj.get("module") or {}
            real = {k: t for k, t in mod.items() if isinstance(t, torch.Tensor) and t.numel()}
            dtypes = ", ".join(_dtypes(real.values())) or "-"
            holds = (f"module: {len(real)} real tensors ({tensor_bytes(real)} bytes, {dtypes})"
                     f"{'; ' + str(len(mod) - len(real)) + ' size-0 placeholders' if len(mod) > len(real) else ''}")
            ff = obj.get("frozen_param_fragments") or {}
            if ff:
                holds += f"; frozen_param_fragments: {len(ff)} ({tensor_bytes(ff)} bytes)"
            out.append({"file": os.path.relpath(f, path), "bytes": os.path.getsize(f), "mp_rank": m,
                        "dp_rank": d if ckpt.zero3 else None, "holds": holds})
        for d, f in enumerate(ckpt.optim_files[m]):
            osd = osd0 if (m, d) == (0, 0) else optim_state(f, d)
            key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
            parts = osd.get(key) or []
            inner = osd.get("optimizer_state_dict") if stage == 3 else osd.get("base_optimizer_state")
            out.append({
                "file": os.path.relpath(f, path), "bytes": os.path.getsize(f), "mp_rank": m, "dp_rank": d,
                "holds": f"{key}: {len(parts)} group(s), {sum(t.numel() for t in parts)} fp32 elements "
                         f"({tensor_bytes(parts)} bytes, the only bytes sat_dist reads); optimizer moments: "
                         f"{tensor_bytes(inner)} bytes (never read)",
                "partition_count": osd.get("partition_count"),
            })
    return out


def _summary(info: Mapping) -> list[str]:
    """The text lines `sat-dist inspect` prints between the header and the files."""
    lines = [
        f"format: DeepSpeed {ZERO_STAGE_NAMES[info['stage']]} ({info['optimizer']}), ds_version {info['ds_version']}",
        f"dp size {info['dp_size']} (files), mp size {info['mp_size']}; run dtype {info['run_dtype']}",
        f"params: {info['trainable_params']} trainable ({info['trainable_numel']:,} elements) in "
        f"{info['param_groups']} group(s), {info['frozen_params']} frozen ({info['frozen_numel']:,} elements), "
        f"{len(info['buffers'])} buffer(s)"
        f"{', shared: ' + str(info['shared_params']) if info['shared_params'] else ''}",
        f"weights come from: {info['default_source']}",
    ]
    if info["client_state_keys"]:
        lines.append(f"client state: {', '.join(info['client_state_keys'])}")
    return lines
