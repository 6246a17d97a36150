"""Tensor-parallel forward collectives (SAT's mpu mappings, inference only: no backward), next to
the layers that call them. Load-time collectives live in `sat_dist.collectives`."""
from __future__ import annotations

import torch
import torch.distributed as dist


def tp_world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Sum partial results across the TP group (RowParallelLinear, VocabParallelEmbedding)."""
    if tp_world(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def gather_last_dim_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate TP shards along the last dim (vocab-parallel logits)."""
    n = tp_world(group)
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)
