"""Write SAT-format checkpoints exactly as SAT's `save_checkpoint` lays them out:
`<root>/latest`, `<root>/model_config.json`, `<root>/<iter>/mp_rank_XX_model_states.pt` holding
`{'module': shard}`. Used by the demo, the benchmark and tests (never by the load path)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

import torch

from .placement import TensorSpec


def shard_state_dict(full: Mapping[str, torch.Tensor], specs: Mapping[str, TensorSpec], parts: int,
                     index: int) -> dict[str, torch.Tensor]:
    """Rank `index` of `parts`'s shard of a full state dict, by each tensor's layout."""
    out = {}
    for name, tensor in full.items():
        placement = specs[name].layout.placement(parts, index)
        local = torch.empty(placement.local_shape(tuple(tensor.shape)), dtype=tensor.dtype)
        for frag in placement.fragments(tuple(tensor.shape)):
            src = tuple(slice(o, o + s) for o, s in zip(frag.logical.offsets, frag.logical.sizes))
            dst = tuple(slice(o, o + s) for o, s in zip(frag.local_offsets, frag.logical.sizes))
            local[dst] = tensor[src]
        out[name] = local
    return out


def model_config_dict(cfg) -> dict:
    """SAT's model_config.json: the required architecture args plus non-default optional ones."""
    d = dataclasses.asdict(cfg)
    required = ["model_class", "num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                "layernorm_order", "model_parallel_size", "max_sequence_length"]
    out = {k: d[k] for k in required}
    for f in dataclasses.fields(cfg):
        if f.name not in out and d[f.name] != f.default:
            out[f.name] = d[f.name]
    return out


def save_sat_checkpoint(root: str, full: Mapping[str, torch.Tensor], specs: Mapping[str, TensorSpec],
                        mp_size: int = 1, iteration: str = "1", model_config: dict | None = None,
                        extra: Mapping | None = None) -> str:
    """Write a SAT checkpoint split `mp_size` ways; returns the iteration folder."""
    it_dir = os.path.join(root, str(iteration))
    os.makedirs(it_dir, exist_ok=True)
    for r in range(mp_size):
        payload = {"module": shard_state_dict(full, specs, mp_size, r)}
        payload.update(extra or {})
        torch.save(payload, os.path.join(it_dir, f"mp_rank_{r:02d}_model_states.pt"))
    if model_config is not None:
        with open(os.path.join(root, "model_config.json"), "w") as f:
            json.dump({**model_config, "model_parallel_size": mp_size}, f, indent=2)
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(str(iteration))
    return it_dir


def random_state_dict(specs: Mapping[str, TensorSpec], seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Deterministic full weights for a spec table (normal(0, 0.02); norms near 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(specs):
        shape = specs[name].global_shape
        t = torch.randn(shape, generator=g) * 0.02
        if "layernorm" in name and name.endswith("weight"):
            t += 1.0
        if name.endswith("inv_freq"):
            dim = 2 * shape[0]
            t = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        out[name] = t.to(dtype)
    return out
