"""SAT BaseModel-compatible transformer: same state_dict keys and shapes as SAT's
`BaseModel(args)` (transformer.* + empty mixins), tensor-parallel, built on the meta device.

The forward follows `sat/transformer_defaults.py` exactly (pre/post/sandwich orders as SAT
defines them, tanh-GELU, SAT's mask handling) so the TP forward equals the TP=1 forward.
Parameters are declared fp32 (shapes only, on the meta device); the load decides the real dtype.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ColumnParallelLinear, Embedding, LayerNorm, RowParallelLinear, TPInfo, VocabParallelEmbedding
from ..tp_ops import gather_last_dim_from_tp
from .config import TransformerConfig


class RotaryEmbedding(nn.Module):
    """GPT-NeoX style (non-interleaved) rotary, as SAT's FastRotaryEmbedding; `inv_freq` is a
    persistent buffer in SAT, so it is a state_dict key here too (and is loaded, not recomputed)."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids.to(torch.float32).unsqueeze(-1) * self.inv_freq.float()  # [b, s, d/2]
        cos, sin = freqs.cos()[:, None].to(q.dtype), freqs.sin()[:, None].to(q.dtype)  # [b,1,s,d/2]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1] * 2
    x1, x2, rest = x[..., : rot // 2], x[..., rot // 2 : rot], x[..., rot:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


MaskKind = Literal["full", "causal", "general"]


def mask_kind(mask: torch.Tensor) -> MaskKind:
    """Which of SAT's attention paths `mask` takes: "full" (every entry > 0: SDPA, the mask unused),
    "causal" (square and exactly the ones' lower triangle: causal SDPA) or "general" (the masked
    formula). Reading the answer syncs with the device once, so the transformer decides it once per
    forward (every layer gets the same mask) rather than in every layer's attention."""
    checks = [(mask > 0).all()]
    if mask.shape[-1] == mask.shape[-2]:
        checks.append((mask == torch.ones_like(mask, dtype=torch.float).tril()).all())
    flags = torch.stack(checks).tolist()  # one device -> host read for both checks
    if flags[0]:
        return "full"
    return "causal" if len(flags) > 1 and flags[1] else "general"


def attention_fn(q, k, v, mask: torch.Tensor, kind: Optional[MaskKind] = None) -> torch.Tensor:
    """SAT's attention_fn_default: SDPA for full/causal masks, else its masked formula. `kind`:
    `mask_kind(mask)`, decided by the caller once for all layers (None: decided here)."""
    if k.shape[1] != q.shape[1]:  # grouped-query: expand kv heads to query heads
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    kind = mask_kind(mask) if kind is None else kind
    if kind != "general":
        return F.scaled_dot_product_attention(q, k, v, is_causal=kind == "causal")
    scores = torch.matmul(q / math.sqrt(q.shape[-1]), k.transpose(-1, -2))
    scores = torch.mul(scores, mask) - 10000.0 * (1.0 - mask)
    return torch.matmul(F.softmax(scores, dim=-1), v)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig, tp: TPInfo):
        super().__init__()
        self.tp, self.head_dim = tp, cfg.head_dim
        heads, kv = cfg.num_attention_heads, cfg.num_multi_query_heads
        inner = heads * cfg.head_dim
        self.heads_local = heads // tp.size
        if kv == 0:
            out, blocks = 3 * inner, (1, 1, 1)
            self.split_sizes = [inner // tp.size] * 3
        else:
            out, blocks = inner + 2 * kv * cfg.head_dim, (heads, kv, kv)
            self.split_sizes = [inner // tp.size, kv * cfg.head_dim // tp.size, kv * cfg.head_dim // tp.size]
        self.query_key_value = ColumnParallelLinear(cfg.hidden_size, out, tp, cfg.use_bias or cfg.use_qkv_bias, blocks)
        self.dense = RowParallelLinear(inner, cfg.hidden_size, tp, cfg.use_bias)

    def forward(self, x, mask, position_ids, rotary: Optional[RotaryEmbedding], kind: Optional[MaskKind] = None):
        b, s, _ = x.shape
        q, k, v = self.query_key_value(x).split(self.split_sizes, dim=-1)
        q, k, v = (t.view(b, s, -1, self.head_dim).permute(0, 2, 1, 3) for t in (q, k, v))
        if rotary is not None:
            q, k = rotary(q, k, position_ids)
        ctx = attention_fn(q, k, v, mask, kind).permute(0, 2, 1, 3).reshape(b, s, -1)
        return self.dense(ctx)


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig, tp: TPInfo):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_size, tp, cfg.use_bias)
        self.dense_4h_to_h = RowParallelLinear(cfg.ffn_size, cfg.hidden_size, tp, cfg.use_bias)
        self.is_gated_mlp = cfg.is_gated_mlp
        if cfg.is_gated_mlp:  # SAT: a separate gate linear, no bias, act(gate(x)) * h_to_4h(x)
            self.dense_h_to_4h_gate = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_size, tp, False)

    def forward(self, x):
        h = self.dense_h_to_4h(x)
        if self.is_gated_mlp:
            h = F.gelu(self.dense_h_to_4h_gate(x), approximate="tanh") * h
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dense_4h_to_h(h)


def _layernorm(cfg: TransformerConfig) -> LayerNorm:
    return LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, dtype=torch.float32)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, tp: TPInfo):
        super().__init__()
        self.order = cfg.layernorm_order
        self.input_layernorm = _layernorm(cfg)
        self.attention = SelfAttention(cfg, tp)
        self.post_attention_layernorm = _layernorm(cfg)
        if self.order == "sandwich":
            self.third_layernorm = _layernorm(cfg)
            self.fourth_layernorm = _layernorm(cfg)
        self.mlp = MLP(cfg, tp)

    def forward(self, x, mask, position_ids, rotary, kind: Optional[MaskKind] = None):
        attn_in = self.input_layernorm(x)
        attn_out = self.attention(attn_in, mask, position_ids, rotary, kind)
        if self.order == "sandwich":
            attn_out = self.third_layernorm(attn_out)
        if self.order == "post":  # SAT's post order: residual from the normalised input
            x = attn_in + attn_out
            mlp_in = self.post_attention_layernorm(x)
        else:
            x = x + attn_out
            mlp_in = self.post_attention_layernorm(x)
        mlp_out = self.mlp(mlp_in)
        if self.order == "sandwich":
            mlp_out = self.fourth_layernorm(mlp_out)
        return (mlp_in if self.order == "post" else x) + mlp_out


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig, tp: TPInfo):
        super().__init__()
        self.tp, self.cfg = tp, cfg
        h = cfg.hidden_size
        if cfg.vocab_size < 1000:  # SAT: plain (replicated) embedding for small vocabularies
            self.word_embeddings = Embedding(cfg.vocab_size, h)
        else:
            self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, h, tp)
        if cfg.is_rotary_emb:
            self.position_embeddings = RotaryEmbedding(h // cfg.num_attention_heads)
        else:
            self.position_embeddings = Embedding(cfg.max_sequence_length, h)
        self.layers = nn.ModuleList([TransformerLayer(cfg, tp) for _ in range(cfg.num_layers)])
        if cfg.use_final_layernorm:
            self.final_layernorm = _layernorm(cfg)

    def forward(self, input_ids, position_ids, attention_mask=None):
        x = self.word_embeddings(input_ids)
        rotary = self.position_embeddings if self.cfg.is_rotary_emb else None
        if rotary is None:
            x = x + self.position_embeddings(position_ids)
        if attention_mask is None:
            attention_mask = torch.ones(1, 1, device=x.device)
        mask = attention_mask.to(x.dtype)
        kind = mask_kind(mask)  # once per forward: each layer deciding it was two host syncs per layer
        for layer in self.layers:
            x = layer(x, mask, position_ids, rotary, kind)
        if self.cfg.use_final_layernorm:
            x = self.final_layernorm(x)
        logits = F.linear(x, self.word_embeddings.weight)
        if isinstance(self.word_embeddings, VocabParallelEmbedding) and not self.cfg.parallel_output:
            logits = gather_last_dim_from_tp(logits, self.tp.group)
        return logits


class SATModel(nn.Module):
    """State-dict compatible with SAT's `BaseModel`: `transformer.*` plus an empty `mixins`."""

    def __init__(self, cfg: TransformerConfig, tp: TPInfo):
        super().__init__()
        self.transformer = Transformer(cfg, tp)
        self.mixins = nn.ModuleDict()

    def forward(self, input_ids, position_ids, attention_mask=None):
        """Returns logits [b, s, vocab] (full vocab unless parallel_output)."""
        return self.transformer(input_ids, position_ids, attention_mask)
