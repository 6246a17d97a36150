"""Write a checkpoint in DeepSpeed 0.19.8's exact ZeRO-3 on-disk layout, without training.

Why: a >=500M-parameter model cannot be trained one step by DeepSpeed ZeRO-3 (dp=4) on this
24 GiB, 2-core CPU machine: the 4 ranks reached ~18 GiB RSS before the optimizer step (measured,
then stopped so as not to starve the machine). The benchmark needs the files, not the training, so
this writer produces them directly, mirroring DeepSpeed's partitioning and pickles:

- `Init._partition_param`: every param on its own, q = ceil(numel/dp), rank r holds flat elements
  [r*q, (r+1)*q); the tail of the last rank(s) is padding (DeepSpeed leaves it uninitialised, this
  writer zeroes it).
- `_create_fp16_sub_groups`: per optimizer param group, trainable params are cut into sub-groups,
  closing a sub-group when its partition elements reach `sub_group_size` (default 1e9) or at the
  group's last param; `fp32_flat_groups[sg]` = the sub-group's partitions concatenated, no padding.
- `_rigid_state_dict` / `_save_zero_checkpoint`: `[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`
  = {'optimizer_state_dict': {zero_stage, loss_scaler, dynamic_loss_scale, overflow,
  partition_count, optimizer_state_dict (torch Adam: state[sg] = step, exp_avg, exp_avg_sq),
  fp32_flat_groups}, 'ds_config', 'ds_version'}, pickling DeepSpeed's own ZeroStageEnum and
  LossScaler (imported from deepspeed, so the globals are the real ones).
- `_save_checkpoint`: `zero_pp_rank_R_mp_rank_00_model_states.pt` with the keys of
  `_common_checkpoint_state` in DeepSpeed's order: `module` (size-0 placeholders for params, real
  buffers), `param_shapes` (one OrderedDict per sub-group), `frozen_param_shapes`,
  `frozen_param_fragments` (this rank's padded 16-bit slice), ... `ds_config`, `ds_version`.
- `latest` holds the tag.

tests/test_deepspeed_writer.py checks this writer against real DeepSpeed fixtures: identical
param_shapes, identical partitions (outside padding), identical pickle structure and globals,
identical `zero_to_fp32` output and identical sat_dist loads.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch


@dataclass
class Zero3Spec:
    """What the writer needs to know about the model and the run."""

    param_shapes: "OrderedDict[str, tuple[int, ...]]"  # every param, in module.named_parameters() order
    groups: list[list[str]]  # optimizer param groups: trainable param names, in order
    frozen: list[str] = field(default_factory=list)  # params with requires_grad=False
    buffers: Mapping[str, torch.Tensor] = field(default_factory=dict)  # persistent buffers, as saved
    module_order: Optional[list[str]] = None  # state_dict key order (params and buffers)
    dp: int = 2
    bf16: bool = False
    sub_group_size: int = 1_000_000_000
    ds_config: dict = field(default_factory=dict)
    param_group_hparams: Optional[list[dict]] = None  # torch Adam param_groups entries (without 'params')
    global_steps: int = 1
    global_samples: int = 0
    client_state: dict = field(default_factory=dict)


def partition_size(numel: int, dp: int) -> int:
    """ZeRO-3 per-rank partition of one param (Init._partition_param)."""
    return math.ceil(numel / dp)


def sub_groups(names: Sequence[str], shapes: Mapping[str, Sequence[int]], dp: int,
               sub_group_size: int) -> list[list[str]]:
    """DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups for one param group."""
    total = sum(partition_size(math.prod(shapes[n]), dp) for n in names)
    if sub_group_size is None or sub_group_size >= total:
        return [list(names)]
    out, cur, size = [], [], 0
    for n in names:
        cur.append(n)
        size += partition_size(math.prod(shapes[n]), dp)
        if size >= sub_group_size or n == names[-1]:
            out.append(cur)
            cur, size = [], 0
    return out


def rank_slice(full: torch.Tensor, dp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s padded partition (length q) of a full tensor, zero-padded at the tail."""
    flat = full.reshape(-1)
    q = partition_size(flat.numel(), dp)
    out = torch.zeros(q, dtype=full.dtype)
    lo, hi = rank * q, min(flat.numel(), (rank + 1) * q)
    if lo < hi:
        out[: hi - lo] = flat[lo:hi]
    return out


def write_zero3_checkpoint(root: str, tag: str, spec: Zero3Spec, get_param: Callable[[str], torch.Tensor],
                           frozen_values: Optional[Mapping[str, torch.Tensor]] = None,
                           moments: str = "zeros") -> list[str]:
    """Write the files of one ZeRO-3 save into `root/tag` (+ `root/latest`); returns the paths.

    `get_param(name)` returns a trainable param's full fp32 value (called once per param, so a
    generator keeps memory at one param + the dp flat partitions). `frozen_values` holds the frozen
    params in the model dtype. `moments`: 'zeros' writes exp_avg/exp_avg_sq of the right sizes.
    """
    from deepspeed import __version__ as ds_version
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    dp, dtype = spec.dp, (torch.bfloat16 if spec.bf16 else torch.float32)
    tag_dir = os.path.join(root, tag)
    os.makedirs(tag_dir, exist_ok=True)
    all_sgs: list[list[str]] = []
    sg_group: list[int] = []
    for g, names in enumerate(spec.groups):
        for sg in sub_groups(names, spec.param_shapes, dp, spec.sub_group_size):
            all_sgs.append(sg)
            sg_group.append(g)
    # Flat fp32 partitions of every rank, filled param by param.
    flats = [[torch.zeros(sum(partition_size(math.prod(spec.param_shapes[n]), dp) for n in sg), dtype=torch.float32)
              for sg in all_sgs] for _ in range(dp)]
    for s, sg in enumerate(all_sgs):
        off = 0
        for n in sg:
            full = get_param(n).to(torch.float32)
            if tuple(full.shape) != tuple(spec.param_shapes[n]):
                raise ValueError(f"{n}: value shape {tuple(full.shape)} != {tuple(spec.param_shapes[n])}")
            q = partition_size(full.numel(), dp)
            for r in range(dp):
                flats[r][s][off: off + q] = rank_slice(full, dp, r)
            off += q
            del full
    hparams = spec.param_group_hparams or [{} for _ in spec.groups]
    param_groups = [{**hparams[g], "params": [s for s, gg in enumerate(sg_group) if gg == g]}
                    for g in range(len(spec.groups))]
    frozen_values = frozen_values or {}
    order = spec.module_order or list(spec.param_shapes) + list(spec.buffers)
    prefix = "bf16_" if spec.bf16 else ""
    paths = []
    for r in range(dp):
        module = OrderedDict()
        for n in order:
            module[n] = spec.buffers[n] if n in spec.buffers else torch.empty(0, dtype=dtype)
        model_state = {
            "module": module,
            "buffer_names": list(spec.buffers),
            "optimizer": None,
            "param_shapes": [OrderedDict((n, torch.Size(spec.param_shapes[n])) for n in sg) for sg in all_sgs],
            "frozen_param_shapes": OrderedDict((n, torch.Size(spec.param_shapes[n])) for n in spec.frozen),
            "shared_params": {},
            "frozen_param_fragments": OrderedDict((n, rank_slice(frozen_values[n].to(dtype), dp, r))
                                                  for n in spec.frozen),
            "lr_scheduler": None, "data_sampler": None, "random_ltd": None,
            "skipped_steps": 0, "global_steps": spec.global_steps, "global_samples": spec.global_samples,
            "dp_world_size": dp, "mp_world_size": 1,
            "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
            "ds_config": spec.ds_config, "ds_version": ds_version,
            **spec.client_state,
        }
        path = os.path.join(tag_dir, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        torch.save(model_state, path)
        paths.append(path)
        state = {}
        for s, flat in enumerate(flats[r]):
            if moments != "zeros":
                raise ValueError(f"moments={moments!r}: only 'zeros' is implemented")
            state[s] = {"step": torch.tensor(float(spec.global_steps)), "exp_avg": torch.zeros_like(flat),
                        "exp_avg_sq": torch.zeros_like(flat)}
        optim = {
            "optimizer_state_dict": {
                "zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(scale=1.0),
                "dynamic_loss_scale": False, "overflow": False, "partition_count": dp,
                "optimizer_state_dict": {"state": state, "param_groups": param_groups},
                "fp32_flat_groups": flats[r],
            },
            "ds_config": spec.ds_config, "ds_version": ds_version,
        }
        path = os.path.join(tag_dir, f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        torch.save(optim, path)
        paths.append(path)
        del state, optim
        flats[r] = []  # this rank is on disk: free its partitions
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(tag)
    return paths
