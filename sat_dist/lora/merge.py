"""LoRA on materialized shards: merge ΔW into the weights, or hand the low-rank factors to the layers.

Merged (the default): ΔW = (B·A)·scale in fp32 on the rank's slice, added to the fp32 base before the cast to
the run's dtype — SAT's `merge_linear_lora` (`mB.float() @ mA.float() * scaling`, then `weight + ΔW`) and
PEFT's `get_delta_weight` compute the same; several adapters add one after the other, as PEFT's fuse does.
Unmerged (`lora_merge: false`): the layers run x·Aᵀ·Bᵀ·scale beside their weight (layers.lora_delta), TP-split
the same way, so adapters can be many or switched without touching the base.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping, MutableMapping

import torch
from torch import nn

from ..errors import LoraError
from .plan import LoraPlan


def _slices(box) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))


def apply(lp: LoraPlan, tensors: MutableMapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype],
          model: nn.Module, merge: bool) -> None:
    """Rename the base tensors read under other names, then merge every MergeOp into `tensors` (cast to
    `dtypes`, the run's dtype per touched tensor) or attach the factors to `model`'s layers; the LoRA
    tensors leave `tensors` either way."""
    for stored, name in lp.renames.items():
        if stored in tensors:
            tensors[name] = tensors.pop(stored)
    lora = {n: tensors.pop(n) for n in lp.lora_names() if n in tensors}
    if merge:
        by_base = defaultdict(list)
        for op in lp.merges:
            by_base[op.base].append(op)
        for base, ops in by_base.items():
            w = tensors[base].float()
            for op in ops:
                a, b = lora[op.a].float(), lora[op.b].float()
                for box, (b0, b1), (a0, a1) in op.boxes:
                    w[_slices(box)] += (b[b0:b1] @ a[:, a0:a1]) * op.scale
            tensors[base] = w.to(dtypes[base])
        return
    attach(model, lp, lora, dtypes)


def attach(model: nn.Module, lp: LoraPlan, lora: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype]) -> None:
    """Give each adapted layer its (A, B, scale, boxes) list, in the run's dtype (replacing any before)."""
    layers = {}
    for op in lp.merges:
        path = op.base.rsplit(".", 1)[0]
        module = model.get_submodule(path)
        if not hasattr(module, "lora") or not op.base.endswith(".weight"):
            raise LoraError(f"unmerged LoRA: {op.base} is not the weight of a tensor-parallel linear "
                            f"({type(module).__name__}); merge this adapter (lora_merge: true)")
        layers.setdefault(path, (module, []))[1].append(
            (lora[op.a].to(dtypes[op.base]), lora[op.b].to(dtypes[op.base]), op.scale, op.boxes))
    clear(model)
    for module, items in layers.values():
        module.lora = items


def clear(model: nn.Module) -> None:
    """Remove every attached adapter (unmerged mode)."""
    for module in model.modules():
        if getattr(module, "lora", None):
            module.lora = []
