"""transformers' `T5EncoderModel`, tensor-parallel, built on the meta device.

Follows huggingface/transformers src/transformers/models/t5/modeling_t5.py (T5LayerNorm,
T5DenseActDense, T5DenseGatedActDense, T5Attention, T5LayerSelfAttention, T5LayerFF, T5Block,
T5Stack, T5EncoderModel) and its default attention path, SDPA with the position bias as the float
mask (src/transformers/integrations/sdpa_attention.py, `create_position_bias_mask`):

- no 1/sqrt(d_kv) scaling (T5 folds it into the initialisation): SDPA runs with scale=1.0;
- the relative position bias is computed once, by block 0's `relative_attention_bias`, and reused
  by every block; a padding mask turns the bias of masked keys into finfo(dtype).min;
- RMS layer norm without mean or bias, variance in fp32, cast back to the weight's 16-bit dtype;
- the fp16 inf clamp after each sub-layer, and the activation cast to `wo`'s dtype, as in HF.

TP split (Megatron-style, as SAT's layers): q/k/v and wi/wi_0/wi_1 are column-parallel (heads,
resp. d_ff), o and wo row-parallel (all-reduced), so every block's output is complete on every
rank. `relative_attention_bias` [buckets, heads], the layer norms and the `shared` embedding are
replicated; each rank uses only its heads' columns of the bias.

State-dict names are T5EncoderModel's except its tie: `encoder.embed_tokens.weight` is the same
tensor as `shared.weight` in HF (`_tied_weights_keys`; save_pretrained writes only `shared.weight`),
so it exists here once, as `shared.weight`, and is read once.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ColumnParallelLinear, Embedding, RowParallelLinear, TPInfo
from .config import T5Config


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """transformers' NewGELUActivation (the "gelu_new" of T5 v1.1's "gated-gelu"), term for term."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACT_FNS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": _gelu_new, "silu": F.silu, "swish": F.silu,
           "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """T5Block's clamp of inf values in fp16 (a no-op in other dtypes)."""
    if x.dtype != torch.float16:
        return x
    big = torch.where(torch.isinf(x).any(), torch.finfo(x.dtype).max - 1000, torch.finfo(x.dtype).max)
    return torch.clamp(x, min=-big, max=big)


class T5LayerNorm(nn.Module):
    """RMS norm: no mean, no bias; the variance in fp32, the result in the weight's 16-bit dtype."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """T5Attention._relative_position_bucket (Mesh TensorFlow's), unchanged."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(relative_position_if_large,
                                           torch.full_like(relative_position_if_large, num_buckets - 1))
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, tp: TPInfo, has_relative_attention_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.d_kv, self.heads_local = cfg.d_kv, cfg.num_heads // tp.size
        self.head0 = tp.rank * self.heads_local
        self.num_buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        self.q = ColumnParallelLinear(cfg.d_model, inner, tp, bias=False)
        self.k = ColumnParallelLinear(cfg.d_model, inner, tp, bias=False)
        self.v = ColumnParallelLinear(cfg.d_model, inner, tp, bias=False)
        self.o = RowParallelLinear(inner, cfg.d_model, tp, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def compute_bias(self, query_length: int, key_length: int, device) -> torch.Tensor:
        """[1, local heads, q, k]: T5Attention.compute_bias (bidirectional), this rank's heads only."""
        context_position = torch.arange(query_length, dtype=torch.long, device=device)[:, None]
        memory_position = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
        bucket = relative_position_bucket(memory_position - context_position, True, self.num_buckets,
                                          self.max_distance)
        table = self.relative_attention_bias.weight[:, self.head0:self.head0 + self.heads_local]
        return F.embedding(bucket, table).permute([2, 0, 1]).unsqueeze(0)

    def forward(self, hidden_states: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, _ = hidden_states.shape
        q, k, v = (proj(hidden_states).view(b, s, -1, self.d_kv).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, tp: TPInfo, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, tp, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, hidden_states: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.SelfAttention(self.layer_norm(hidden_states), bias)


class _DenseOut(nn.Module):
    """`wo`, row-parallel; its input is cast to wo's dtype first, as HF does (a no-op here, where one
    load dtype holds for every tensor; HF keeps `wo` in fp32 only when loading fp16)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.act = ACT_FNS[cfg.act]

    def _out(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype != self.wo.weight.dtype:
            hidden_states = hidden_states.to(self.wo.weight.dtype)
        return self.wo(hidden_states)


class T5DenseActDense(_DenseOut):
    """relu T5: wo(act(wi(x))); `wi` column-, `wo` row-parallel."""

    def __init__(self, cfg: T5Config, tp: TPInfo):
        super().__init__(cfg)
        self.wi = ColumnParallelLinear(cfg.d_model, cfg.d_ff, tp, bias=False)
        self.wo = RowParallelLinear(cfg.d_ff, cfg.d_model, tp, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._out(self.act(self.wi(hidden_states)))


class T5DenseGatedActDense(_DenseOut):
    """T5 v1.1: wo(act(wi_0(x)) * wi_1(x)); `wi_0`/`wi_1` column-, `wo` row-parallel."""

    def __init__(self, cfg: T5Config, tp: TPInfo):
        super().__init__(cfg)
        self.wi_0 = ColumnParallelLinear(cfg.d_model, cfg.d_ff, tp, bias=False)
        self.wi_1 = ColumnParallelLinear(cfg.d_model, cfg.d_ff, tp, bias=False)
        self.wo = RowParallelLinear(cfg.d_ff, cfg.d_model, tp, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._out(self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config, tp: TPInfo):
        super().__init__()
        self.DenseReluDense = (T5DenseGatedActDense if cfg.gated else T5DenseActDense)(cfg, tp)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.DenseReluDense(self.layer_norm(hidden_states))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, tp: TPInfo, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, tp, has_relative_attention_bias), T5LayerFF(cfg, tp)])

    def forward(self, hidden_states: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        hidden_states = _clamp_fp16(self.layer[0](hidden_states, bias))
        return _clamp_fp16(self.layer[1](hidden_states))


class T5Stack(nn.Module):
    """The encoder stack without its `embed_tokens` (the tie with `shared`, module docstring)."""

    def __init__(self, cfg: T5Config, tp: TPInfo):
        super().__init__()
        self.block = nn.ModuleList([T5Block(cfg, tp, i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = inputs_embeds.shape[1]
        bias = self.block[0].layer[0].SelfAttention.compute_bias(s, s, inputs_embeds.device)
        if attention_mask is not None:  # [batch, keys], nonzero = attend (HF casts it to bool)
            keep = attention_mask.to(device=inputs_embeds.device, dtype=torch.bool)[:, None, None, :]
            bias = torch.where(keep, bias, torch.finfo(bias.dtype).min)
        bias = bias.contiguous()
        hidden_states = inputs_embeds
        for block in self.block:
            hidden_states = block(hidden_states, bias)
        return self.final_layer_norm(hidden_states)


class T5Encoder(nn.Module):
    """transformers' T5EncoderModel: `shared` (replicated) + `encoder`; forward returns the
    encoder's last_hidden_state [batch, seq, d_model], complete on every TP rank."""

    def __init__(self, cfg: T5Config, tp: TPInfo):
        super().__init__()
        self.cfg = cfg
        self.shared = Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, tp)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.encoder(self.shared(input_ids), attention_mask)
