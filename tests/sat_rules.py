"""Test-side, independent implementation of SAT's tensor-parallel split (sat/mpu/layers.py
`partition()` as described in FORMATS.md §4), and a SAT-layout checkpoint writer built on it.
Deliberately shares no code with sat_dist so a wrong placement in sat_dist cannot hide."""
from __future__ import annotations

import json
import os

import torch


def qkv_ratios(cfg: dict) -> list[int]:
    kv = cfg.get("num_multi_query_heads", 0)
    return [1, 1, 1] if not kv else [cfg["num_attention_heads"], kv, kv]


def strided_split(full: torch.Tensor, n: int, r: int, ratios: list[int]) -> torch.Tensor:
    factor = full.shape[0] // sum(ratios)
    blocks = torch.split(full, [factor * s for s in ratios], dim=0)
    return torch.cat([b.chunk(n, dim=0)[r] for b in blocks], dim=0).clone()


def sat_split(name: str, full: torch.Tensor, n: int, r: int, cfg: dict) -> torch.Tensor:
    """Rank r of n's shard of tensor `name` by SAT's rules."""
    if n == 1:
        return full.clone()
    if ".attention.query_key_value." in name:
        return strided_split(full, n, r, qkv_ratios(cfg))
    if name.endswith("attention.dense.weight") or name.endswith("mlp.dense_4h_to_h.weight"):
        return full.chunk(n, dim=1)[r].clone()
    if ".mlp.dense_h_to_4h." in name or ".mlp.dense_h_to_4h_gate." in name:
        return full.chunk(n, dim=0)[r].clone()
    if name == "transformer.word_embeddings.weight" and cfg["vocab_size"] >= 1000:
        return full.chunk(n, dim=0)[r].clone()
    return full.clone()  # layer norms, position embeddings, row-parallel biases, small vocab


def full_state_dict(cfg: dict, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Full (mp=1) SAT BaseModel weights for `cfg`, keys and shapes per FORMATS.md §5."""
    g = torch.Generator().manual_seed(seed)
    h, L, V, S = cfg["hidden_size"], cfg["num_layers"], cfg["vocab_size"], cfg["max_sequence_length"]
    a = cfg["num_attention_heads"]
    d = cfg.get("hidden_size_per_attention_head") or h // a
    kv = cfg.get("num_multi_query_heads", 0)
    f = cfg.get("inner_hidden_size") or 4 * h
    bias, qkv_bias = cfg.get("use_bias", True), cfg.get("use_qkv_bias", False)
    shapes = {"transformer.word_embeddings.weight": (V, h)}
    if cfg.get("is_rotary_emb"):
        shapes["transformer.position_embeddings.inv_freq"] = ((h // a + 1) // 2,)
    else:
        shapes["transformer.position_embeddings.weight"] = (S, h)
    qkv_out = 3 * a * d if not kv else a * d + 2 * kv * d
    for i in range(L):
        p = f"transformer.layers.{i}."
        norms = ["input_layernorm", "post_attention_layernorm"]
        if cfg.get("layernorm_order") == "sandwich":
            norms += ["third_layernorm", "fourth_layernorm"]
        for nm in norms:
            shapes[p + nm + ".weight"] = (h,)
            shapes[p + nm + ".bias"] = (h,)
        shapes[p + "attention.query_key_value.weight"] = (qkv_out, h)
        if bias or qkv_bias:
            shapes[p + "attention.query_key_value.bias"] = (qkv_out,)
        shapes[p + "attention.dense.weight"] = (h, a * d)
        shapes[p + "mlp.dense_h_to_4h.weight"] = (f, h)
        shapes[p + "mlp.dense_4h_to_h.weight"] = (h, f)
        if bias:
            shapes[p + "attention.dense.bias"] = (h,)
            shapes[p + "mlp.dense_h_to_4h.bias"] = (f,)
            shapes[p + "mlp.dense_4h_to_h.bias"] = (h,)
        if cfg.get("is_gated_mlp"):
            shapes[p + "mlp.dense_h_to_4h_gate.weight"] = (f, h)
    if cfg.get("use_final_layernorm", True):
        shapes["transformer.final_layernorm.weight"] = (h,)
        shapes["transformer.final_layernorm.bias"] = (h,)
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g) * 0.05
        if name.endswith("layernorm.weight"):
            t += 1.0
        if name.endswith("inv_freq"):
            dim = h // a
            t = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        out[name] = t.to(dtype)
    return out


def write_sat_checkpoint(root: str, cfg: dict, full: dict, mp: int, iteration: str = "1000",
                         extra: dict | None = None) -> str:
    """Lay out a checkpoint as SAT's save_checkpoint does (split by the rules above)."""
    it = os.path.join(root, iteration)
    os.makedirs(it, exist_ok=True)
    for r in range(mp):
        shard = {k: sat_split(k, v, mp, r, cfg) for k, v in full.items()}
        torch.save({"module": shard, **(extra or {})}, os.path.join(it, f"mp_rank_{r:02d}_model_states.pt"))
    with open(os.path.join(root, "latest"), "w") as fh:
        fh.write(iteration)
    with open(os.path.join(root, "model_config.json"), "w") as fh:
        json.dump({"model_class": "BaseModel", **cfg, "model_parallel_size": mp}, fh)
    return it


CONFIGS = {
    "plain": dict(num_layers=2, hidden_size=64, num_attention_heads=8, vocab_size=1024, max_sequence_length=32),
    "gqa": dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_multi_query_heads=4, vocab_size=1024,
                max_sequence_length=32),
    "gated_nobias": dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1024, max_sequence_length=32,
                         is_gated_mlp=True, use_bias=False, use_qkv_bias=True, inner_hidden_size=96),
    "small_vocab_rotary": dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=100,
                               max_sequence_length=32, is_rotary_emb=True, use_final_layernorm=False),
    "sandwich": dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1024, max_sequence_length=32,
                     layernorm_order="sandwich"),
    "post_headdim": dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1024, max_sequence_length=32,
                         layernorm_order="post", hidden_size_per_attention_head=8),
}
