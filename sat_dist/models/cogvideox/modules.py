"""The DiT's nn.Modules, each running its own part of SAT's forward (THUDM/CogVideo
sat/dit_video_concat.py, THUDM/SwissArmyTransformer sat/model/transformer.py).

Attribute names and registration order are SAT's, so `state_dict()` keys and order match SAT's
files. The four linears of each layer are TP-split by SAT's rules (QKV column stride 3, dense row,
h_to_4h column, 4h_to_h row); everything else (mixins, norms) is replicated and computed redundantly
on every TP rank, exactly as SAT does with mp > 1.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...placement import REPLICATED, TensorSpec
from ..layers import (ColumnParallelLinear, Embedding, GatheredColumnLinear, LayerNorm, RowParallelLinear,
                      ScatteredRowLinear, TPInfo)
from .config import DiTArch
from .sequence import SeqShard, ulysses_attention
from .tables import modulate, rope_freqs_3d, rope_video, sincos_3d

# (text/video split, cos, sin) for Rotary3D, or None
Rope = Optional[tuple[int, torch.Tensor, torch.Tensor]]
QKNorm = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def conditioning_linear(a: DiTArch, tp: TPInfo, d_in: int, d_out: int, dtype: torch.dtype) -> nn.Module:
    """A linear that SAT replicates on every TP rank (AdaLN modulations, text projection): with
    `adaln_split` (sat_dist's opt-in layout) column-split, its output all-gathered."""
    if a.adaln_split:
        return GatheredColumnLinear(d_in, d_out, tp, True, dtype=dtype)
    return nn.Linear(d_in, d_out, dtype=dtype)


def time_mlp(tp: TPInfo, dim_in: int, dim: int, dtype: torch.dtype, split: bool) -> nn.Sequential:
    """time_embed / ofs_embed: Linear, SiLU, Linear. With `split` (adaln_split on time_embed) the
    first linear is row-split on its input features (the hidden size, which TP divides) and
    all-reduced; the second [time_dim, time_dim] stays replicated: TP need not divide time_dim."""
    first = ScatteredRowLinear(dim_in, dim, tp, True, dtype=dtype) if split else nn.Linear(dim_in, dim, dtype=dtype)
    return nn.Sequential(first, nn.SiLU(), nn.Linear(dim, dim, dtype=dtype))


# --- transformer (SAT BaseTransformer after the mixins' reinit) ---------------------------------

class DiTAttention(nn.Module):
    """SAT SelfAttention: fused [Q;K;V] column-parallel (stride 3), dense row-parallel."""

    def __init__(self, a: DiTArch, tp: TPInfo, dtype: torch.dtype):
        super().__init__()
        self.arch = a
        inner = a.heads * a.head_dim
        self.query_key_value = ColumnParallelLinear(a.hidden, 3 * inner, tp, a.use_bias or a.qkv_bias, (1, 1, 1), dtype)
        self.dense = RowParallelLinear(inner, a.hidden, tp, a.use_bias, dtype)

    def forward(self, x: torch.Tensor, qk_norm: QKNorm, rope: Rope, seq: Optional[SeqShard] = None,
                text_length: int = 0) -> torch.Tensor:
        """This rank's heads: AdaLN's per-head q/k LayerNorm, then RoPE on video tokens, full
        attention; the row-parallel dense all-reduces the heads' partial outputs. With `seq` (sequence
        parallel), `x` is the text and this rank's video tokens and the attention runs over every
        rank's tokens (sequence.ulysses_attention)."""
        a = self.arch
        b, s, _ = x.shape
        q, k, v = self.query_key_value(x).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, s, -1, a.head_dim).permute(0, 2, 1, 3) for z in (q, k, v))
        q, k = qk_norm(q, k)
        if rope is not None:
            q, k = rope_video(q, *rope), rope_video(k, *rope)
            if a.rot_v:
                v = rope_video(v, *rope)
        if seq is not None and seq.sp.size > 1:
            ctx = ulysses_attention(q, k, v, text_length, seq)
        else:
            ctx = F.scaled_dot_product_attention(q, k, v)
        return self.dense(ctx.permute(0, 2, 1, 3).reshape(b, s, -1))


class DiTMLP(nn.Module):
    def __init__(self, a: DiTArch, tp: TPInfo, dtype: torch.dtype):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(a.hidden, a.ffn, tp, a.use_bias, dtype=dtype)
        self.dense_4h_to_h = RowParallelLinear(a.ffn, a.hidden, tp, a.use_bias, dtype)

    def forward(self, x: torch.Tensor, gate: Optional[nn.Module]) -> torch.Tensor:
        """tanh-GELU MLP, or with use_SwiGLU silu(gate(x)) * h_to_4h(x) (the gate is SwiGLU's w2.{i})."""
        h = self.dense_h_to_4h(x)
        if gate is not None:
            h = F.silu(gate(x)) * h
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dense_4h_to_h(h)


class DiTLayer(nn.Module):
    """SAT BaseTransformerLayer's parameters, run as AdaLNMixin.layer_forward: text and video tokens
    get their own modulation around the shared attention and MLP."""

    def __init__(self, a: DiTArch, tp: TPInfo, dtype: torch.dtype):
        super().__init__()
        self.arch = a
        self.input_layernorm = LayerNorm(a.hidden, eps=a.ln_eps, elementwise_affine=a.affine, dtype=dtype)
        self.attention = DiTAttention(a, tp, dtype)
        self.post_attention_layernorm = LayerNorm(a.hidden, eps=a.ln_eps, elementwise_affine=a.affine, dtype=dtype)
        if a.ln_order == "sandwich":
            self.third_layernorm = LayerNorm(a.hidden, eps=a.ln_eps, elementwise_affine=a.affine, dtype=dtype)
            self.fourth_layernorm = LayerNorm(a.hidden, eps=a.ln_eps, elementwise_affine=a.affine, dtype=dtype)
        self.mlp = DiTMLP(a, tp, dtype)

    def forward(self, hidden: torch.Tensor, text_length: int, mods: tuple[torch.Tensor, ...], qk_norm: QKNorm,
                rope: Rope, gate: Optional[nn.Module], seq: Optional[SeqShard] = None) -> torch.Tensor:
        """`mods`: this layer's 12 AdaLN chunks (AdaLN.modulations). `seq`: the video tokens' split
        (sequence parallel): `hidden` holds the text and this rank's tokens; only the attention mixes them."""
        sandwich = self.arch.ln_order == "sandwich"
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         t_shift_msa, t_scale_msa, t_gate_msa, t_shift_mlp, t_scale_mlp, t_gate_mlp) = mods
        text, img = hidden[:, :text_length], hidden[:, text_length:]

        attn_in = torch.cat((modulate(self.input_layernorm(text), t_shift_msa, t_scale_msa),
                             modulate(self.input_layernorm(img), shift_msa, scale_msa)), dim=1)
        attn_out = self.attention(attn_in, qk_norm, rope, seq, text_length)
        text_out, img_out = attn_out[:, :text_length], attn_out[:, text_length:]
        if sandwich:
            text_out, img_out = self.third_layernorm(text_out), self.third_layernorm(img_out)
        img = img + gate_msa.unsqueeze(1) * img_out
        text = text + t_gate_msa.unsqueeze(1) * text_out

        mlp_in = torch.cat((modulate(self.post_attention_layernorm(text), t_shift_mlp, t_scale_mlp),
                            modulate(self.post_attention_layernorm(img), shift_mlp, scale_mlp)), dim=1)
        mlp_out = self.mlp(mlp_in, gate)
        text_out, img_out = mlp_out[:, :text_length], mlp_out[:, text_length:]
        if sandwich:
            text_out, img_out = self.fourth_layernorm(text_out), self.fourth_layernorm(img_out)
        img = img + gate_mlp.unsqueeze(1) * img_out
        text = text + t_gate_mlp.unsqueeze(1) * text_out
        return torch.cat((text, img), dim=1)


class DiTTransformer(nn.Module):
    """SAT BaseTransformer after the mixins' reinit: no word_embeddings (patch_embed deletes them);
    position_embeddings only with Rotary3D (Basic3D deletes them), never used by the forward."""

    def __init__(self, a: DiTArch, tp: TPInfo, dtype: torch.dtype):
        super().__init__()
        self.arch = a
        if a.pos == "rotary3d":
            # SAT's nn.Embedding next to Rotary3D: a state-dict entry the forward never reads.
            self.position_embeddings = Embedding(a.max_seq, a.hidden, dtype)
            self.position_embeddings.specs = {"weight": TensorSpec(
                (a.max_seq, a.hidden), REPLICATED, if_absent="zeros (unused by the forward; CogVideo#586)")}
        self.layers = nn.ModuleList([DiTLayer(a, tp, dtype) for _ in range(a.layers)])
        if a.final_ln:
            self.final_layernorm = LayerNorm(a.hidden, eps=a.ln_eps, elementwise_affine=a.affine, dtype=dtype)

    def forward(self, hidden: torch.Tensor, text_length: int, emb: torch.Tensor, adaln: AdaLN,
                swiglu: Optional[SwiGLU], rope: Rope, seq: Optional[SeqShard] = None) -> torch.Tensor:
        """The layers with the mixins' per-layer parameters (SAT's layer_forward hook), then the
        final LayerNorm."""
        for i, layer in enumerate(self.layers):
            gate = None if swiglu is None else swiglu.w2[i]
            hidden = layer(hidden, text_length, adaln.modulations(i, emb), functools.partial(adaln.qk_norm, i),
                           rope, gate, seq)
        if self.arch.final_ln:
            hidden = self.final_layernorm(hidden)
        return hidden


# --- mixins (SAT's `mixins.*` state-dict entries) -------------------------------------------------

class Basic3DPositionEmbedding(nn.Module):
    """mixins.pos_embed for 2B: [1, text_length + T*H*W, h], text rows zero, video rows 3D sincos."""

    def __init__(self, a: DiTArch, dtype: torch.dtype):
        super().__init__()
        self.arch = a
        shape = (1, a.text_length + a.num_patches, a.hidden)
        self.pos_embedding = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        self.specs = {"pos_embedding": TensorSpec(shape, REPLICATED, if_absent="3D sincos (CogVideo#100)")}

    def defaults(self) -> dict[str, Callable[[], torch.Tensor]]:
        return {"pos_embedding": self.default_table}

    def default_table(self) -> torch.Tensor:
        a = self.arch
        table = torch.zeros(1, a.text_length + a.num_patches, a.hidden)
        table[0, a.text_length:] = sincos_3d(a.hidden, a.grid, a.interp)
        return table

    def position(self, frames: int, seq_length: int, text_length: int) -> Optional[torch.Tensor]:
        a = self.arch
        if text_length != a.text_length:
            raise ValueError(f"context has {text_length} tokens but Basic3DPositionEmbeddingMixin was configured "
                             f"with text_length={a.text_length}; pad the T5 embeddings to {a.text_length}")
        if frames == 1:
            return self.pos_embedding[:, : a.text_length + a.grid[1] * a.grid[2]]
        return self.pos_embedding[:, : a.text_length + seq_length]


class Rotary3DPositionEmbedding(nn.Module):
    """mixins.pos_embed for 5B / 1.5: 3D RoPE on the video tokens' q and k (and v with rot_v).

    v1.0 code: `freqs_sin`/`freqs_cos` [T*H*W, head_dim] are persistent buffers (loaded; computed
    if the file lacks them) and the first `seq_len` rows are used. 1.5 code: plain attributes in
    SAT, so computed here lazily for the input's (T, H, W), cached, never a meta buffer."""

    def __init__(self, a: DiTArch, dtype: torch.dtype):
        super().__init__()
        self.arch = a
        if a.learnable_pos:
            shape = (1, a.text_length + a.num_patches, a.hidden)
            self.pos_embedding = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        if a.v1:
            shape = (a.num_patches, a.head_dim)
            self.register_buffer("freqs_sin", torch.empty(shape, dtype=torch.float32))
            self.register_buffer("freqs_cos", torch.empty(shape, dtype=torch.float32))
            self.specs = {n: TensorSpec(shape, REPLICATED, if_absent="computed 3D RoPE table")
                          for n in ("freqs_sin", "freqs_cos")}
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def defaults(self) -> dict[str, Callable[[], torch.Tensor]]:
        if not self.arch.v1:
            return {}
        a = self.arch
        return {"freqs_sin": lambda: rope_freqs_3d(a.head_dim, a.grid, a.theta).reshape(a.num_patches, -1).sin(),
                "freqs_cos": lambda: rope_freqs_3d(a.head_dim, a.grid, a.theta).reshape(a.num_patches, -1).cos()}

    def position(self, frames: int, seq_length: int, text_length: int) -> Optional[torch.Tensor]:
        if not self.arch.learnable_pos:
            return None
        if text_length != self.arch.text_length:
            raise ValueError(f"context has {text_length} tokens but the learnable pos_embedding was trained with "
                             f"text_length={self.arch.text_length}; pad the T5 embeddings to {self.arch.text_length}")
        return self.pos_embedding[:, : self.arch.text_length + seq_length]

    def tables(self, thw: tuple[int, int, int], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) as [1, 1, T*H*W, head_dim] in `dtype` for the input's patch grid."""
        a = self.arch
        n = thw[0] * thw[1] * thw[2]
        if a.v1:
            return self.freqs_cos[:n][None, None].to(dtype), self.freqs_sin[:n][None, None].to(dtype)
        key = (thw, str(device))
        if key not in self._cache:
            if any(x > m for x, m in zip(thw, a.grid)):
                raise ValueError(f"input patch grid (T, H, W)={thw} exceeds the rotary table {a.grid} built from "
                                 f"num_frames/latent_height/latent_width; raise those in the config")
            angles = rope_freqs_3d(a.head_dim, thw, a.theta, device=device).reshape(n, -1)
            self._cache = {key: (angles.cos(), angles.sin())}
        cos, sin = self._cache[key]
        return cos[None, None].to(dtype), sin[None, None].to(dtype)


class ImagePatchEmbedding(nn.Module):
    """mixins.patch_embed: v1.0 Conv2d(in, h, p, p) per frame; 1.5 Linear(in*pt*ph*pw, h) on
    (c, o, p, q)-ordered patches; text_proj(context) goes first in the sequence."""

    def __init__(self, a: DiTArch, dtype: torch.dtype, tp: TPInfo):
        super().__init__()
        self.arch = a
        p = a.patch
        if a.v1:
            self.proj = nn.Conv2d(a.in_channels, a.hidden, kernel_size=p[1], stride=p[1], bias=a.patch_bias, dtype=dtype)
        else:
            self.proj = nn.Linear(a.in_channels * p[0] * p[1] * p[2], a.hidden, dtype=dtype)
        self.text_proj = conditioning_linear(a, tp, a.text_hidden, a.hidden, dtype)

    def forward(self, images: torch.Tensor, context: torch.Tensor, thw: tuple[int, int, int]) -> torch.Tensor:
        b, t, c = images.shape[:3]
        if self.arch.v1:
            emb = self.proj(images.reshape(b * t, *images.shape[2:]))  # [(b t), h, H/p, W/p]
            emb = emb.reshape(b, t, emb.shape[1], -1).transpose(2, 3).reshape(b, -1, emb.shape[1])
        else:
            (pt, ph, pw), (T, H, W) = self.arch.patch, thw
            x = images.permute(0, 1, 3, 4, 2).reshape(b, T, pt, H, ph, W, pw, c)
            x = x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, T * H * W, c * pt * ph * pw)
            emb = self.proj(x)
        return torch.cat((self.text_proj(context), emb), dim=1).contiguous()



class AdaLN(nn.Module):
    """mixins.adaln_layer: per layer SiLU+Linear(time_dim, 12h) and per-head q/k LayerNorms.

    The modulation linears are replicated, as in SAT; with `adaln_split` (sat_dist's opt-in layout)
    they are column-split across the TP group and the small [b, 12h] output is all-gathered."""

    def __init__(self, a: DiTArch, dtype: torch.dtype, tp: Optional[TPInfo] = None):
        super().__init__()
        self.arch, self.tp = a, tp or TPInfo()

        self.adaLN_modulations = nn.ModuleList(
            [nn.Sequential(nn.SiLU(), conditioning_linear(a, self.tp, a.time_dim, 12 * a.hidden, dtype))
             for _ in range(a.layers)])
        if a.qk_ln:
            self.query_layernorm_list = nn.ModuleList(
                [LayerNorm(a.head_dim, eps=1e-6, elementwise_affine=a.affine, dtype=dtype) for _ in range(a.layers)])
            self.key_layernorm_list = nn.ModuleList(
                [LayerNorm(a.head_dim, eps=1e-6, elementwise_affine=a.affine, dtype=dtype) for _ in range(a.layers)])

    def modulations(self, i: int, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Layer i's 12 [b, h] chunks: video shift/scale/gate for attention and MLP, then text's."""
        return self.adaLN_modulations[i](emb).chunk(12, dim=1)

    def qk_norm(self, i: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's per-head q/k LayerNorms (qk_ln), applied inside the attention."""
        if not self.arch.qk_ln:
            return q, k
        return self.query_layernorm_list[i](q), self.key_layernorm_list[i](k)


class FinalLayer(nn.Module):
    """mixins.final_layer: torch LayerNorm (eps 1e-6), adaLN shift/scale, Linear, unpatchify."""

    def __init__(self, a: DiTArch, dtype: torch.dtype, tp: TPInfo):
        super().__init__()
        self.arch = a
        self.norm_final = nn.LayerNorm(a.hidden, eps=1e-6, elementwise_affine=a.affine, dtype=dtype)
        self.linear = nn.Linear(a.hidden, a.patch[0] * a.patch[1] * a.patch[2] * a.out_channels, dtype=dtype)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), conditioning_linear(a, tp, a.time_dim, 2 * a.hidden, dtype))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, thw: tuple[int, int, int]) -> torch.Tensor:
        """FinalLayerMixin.final_forward + unpatchify: the video tokens [B, T*H*W, h] of patch grid
        `thw` -> [B, T, out_channels, H, W] latents."""
        a = self.arch
        shift, scale = self.adaLN_modulation(emb).chunk(2, dim=1)
        x = self.linear(modulate(self.norm_final(x), shift, scale))
        (T, H, W), (pt, ph, pw), b = thw, a.patch, x.shape[0]
        x = x.reshape(b, T, H, W, a.out_channels, pt, ph, pw).permute(0, 1, 5, 4, 2, 6, 3, 7)
        return x.reshape(b, T * pt, a.out_channels, H * ph, W * pw)


class SwiGLU(nn.Module):
    """mixins.swiglu (use_SwiGLU): per-layer column-parallel gate `w2.{i}` without bias, used by
    DiTMLP.forward."""

    def __init__(self, a: DiTArch, tp: TPInfo, dtype: torch.dtype):
        super().__init__()
        self.w2 = nn.ModuleList([ColumnParallelLinear(a.hidden, 4 * a.hidden, tp, False, dtype=dtype)
                                 for _ in range(a.layers)])
