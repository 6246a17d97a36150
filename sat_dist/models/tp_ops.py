"""Tensor-parallel forward collectives (SAT's mpu mappings, inference only: no backward) and the
sequence-parallel (Ulysses) all-to-all, next to the layers that call them. Load-time and engine
collectives live in `sat_dist.collectives`. Each counts the bytes it sends (`sat_dist.commcount`)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import commcount


def tp_world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Sum partial results across the TP group (RowParallelLinear, VocabParallelEmbedding)."""
    if tp_world(group) == 1:
        return x
    x = x.contiguous()
    commcount.add("tp", commcount.all_reduce_bytes(x.numel() * x.element_size(), tp_world(group)))
    dist.all_reduce(x, group=group)
    return x


def gather_last_dim_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate TP shards along the last dim (vocab-parallel logits)."""
    n = tp_world(group)
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    commcount.add("tp", commcount.all_gather_bytes(x.numel() * x.element_size(), n))
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


def all_to_all(x: torch.Tensor, out_sizes: list[int], in_sizes: list[int], group) -> torch.Tensor:
    """One all-to-all over `group` of the flat `x`: its first `in_sizes[0]` elements to the group's
    rank 0, the next `in_sizes[1]` to rank 1, ...; returns what rank i sent here (`out_sizes[i]`
    elements each), concatenated in group order. Uneven sizes allowed (the Ulysses exchange of a video
    whose token rows do not divide by the SP size; models/cogvideox/sequence.py)."""
    x = x.contiguous()
    out = x.new_empty(sum(out_sizes))
    me = dist.get_group_rank(group, dist.get_rank()) if len(in_sizes) > 1 else 0
    commcount.add("sp", commcount.all_to_all_bytes(list(in_sizes), me, x.element_size()))
    dist.all_to_all_single(out, x, out_sizes, in_sizes, group=group)
    return out
