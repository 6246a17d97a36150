"""CogVideoX's SAT DiT (`dit_video_concat.DiffusionTransformer`), tensor-parallel, on the meta device.

State-dict keys, shapes and persistent buffers are SAT's for every released variant (FORMATS.md §6):
the four SAT linears of each layer are TP-split by SAT's rules (QKV column stride 3, dense row,
h_to_4h column, 4h_to_h row); everything else (mixins, time/ofs embeddings, layer norms) is
replicated and computed redundantly on every TP rank, exactly as SAT would with mp > 1.

Which CogVideo code a config belongs to follows from `patch_size`, since neither code runs the
other's configs: an int is the v1.0 code (2B / 5B / 5B-I2V: Conv2d patch embedding, Rotary3D
`freqs_sin`/`freqs_cos` persistent buffers), a list `[t, h, w]` is the 1.5 code (Linear patch
embedding, rotary tables that are plain attributes, so not in the state dict; computed lazily here).

Some tensors are in SAT's state dict but not in the files that were released (SAT's
`force_inference` tolerates it: CogVideo#100, #586): the 2B sincos `pos_embedding`, the unused
`transformer.position_embeddings` of the rotary models, and the v1.0 rotary tables. Their specs are
TensorSpecs with `if_absent`: the reader drops them from the plan when the file lacks them and this module fills
them on `load_state_dict` with what SAT's constructor would have put there.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import LAYOUT_ADAPTERS, MODEL_CONFIGS, check_tp_divides
from ..errors import ConfigError
from ..placement import REPLICATED
from .layers import ColumnParallelLinear, Embedding, LayerNorm, RowParallelLinear, TensorSpec, TPInfo

CHECKPOINT_PREFIX = "model.diffusion_model."
MODEL_CLASS = "DiffusionTransformer"


# --- configuration ---------------------------------------------------------------------------

_REQUIRED = object()

# Mixin targets (matched on the class name, so `dit_video_concat.X` and `sat.dit_video_concat.X`
# both work) and the params each accepts, with SAT's defaults.
_POS_MIXINS: dict[str, dict[str, Any]] = {
    "Basic3DPositionEmbeddingMixin": {
        "text_length": 0, "height_interpolation": None, "width_interpolation": None, "time_interpolation": None},
    "Rotary3DPositionEmbeddingMixin": {
        "hidden_size_head": _REQUIRED, "text_length": _REQUIRED, "theta": 10000, "rot_v": False,
        "learnable_pos_embed": False,
        # accepted by the 1.5 code and unused there
        "height_interpolation": None, "width_interpolation": None, "time_interpolation": None},
}
_PATCH_MIXINS = {"ImagePatchEmbeddingMixin": {"text_hidden_size": _REQUIRED, "bias": True}}
_ADALN_MIXINS = {"AdaLNMixin": {"qk_ln": True}}
_FINAL_MIXINS: dict[str, dict[str, Any]] = {"FinalLayerMixin": {}}

# transformer_args keys: SAT's BaseModel args (ARGS_DEFAULT plus the required ones). Values of the
# FIXED ones change the weights or the forward in ways CogVideoX never uses: refused, not guessed.
_TARGS_DEFAULTS: dict[str, Any] = {
    "vocab_size": 1, "max_sequence_length": 64, "layernorm_order": "pre", "layernorm_epsilon": 1e-5,
    "use_final_layernorm": True, "use_bias": True, "use_qkv_bias": False, "inner_hidden_size": None,
    "hidden_size_per_attention_head": None,
    # irrelevant to inference weights and forward
    "skip_init": False, "model_parallel_size": 1, "checkpoint_activations": False, "checkpoint_num_layers": 1,
    "checkpoint_skip_layers": 0, "hidden_dropout": 0.0, "attention_dropout": 0.0, "drop_path": 0.0,
    "parallel_output": True, "num_layers": None, "hidden_size": None, "num_attention_heads": None, "seed": None,
}
_TARGS_FIXED: dict[str, Any] = {
    "is_decoder": False, "num_multi_query_heads": 0, "cross_num_multi_query_heads": 0,
    "cross_attn_hidden_size": None, "cross_hidden_size_per_attention_head": None,
    "row_parallel_linear_final_bias": True, "is_gated_mlp": False, "is_rotary_emb": False, "num_experts": 1,
}


@dataclass(frozen=True)
class DiTArch:
    """Everything the module and forward need, derived once from the SAT-layout config."""

    v1: bool  # CogVideoX 1.0 code (int patch_size) vs 1.5 code (list patch_size)
    patch: tuple[int, int, int]  # (t, h, w); v1.0 is (1, p, p)
    grid: tuple[int, int, int]  # (compressed latent frames, H/ph, W/pw) of the configured size; for 1.5 the
    # RoPE table's maximum, T not divided by the time patch
    hidden: int
    heads: int
    head_dim: int
    ffn: int
    layers: int
    time_dim: int
    ofs_dim: Optional[int]
    in_channels: int
    out_channels: int
    affine: bool
    ln_eps: float
    ln_order: str
    final_ln: bool
    use_bias: bool
    qkv_bias: bool
    max_seq: int
    pos: str  # "basic3d" | "rotary3d"
    text_length: int
    interp: tuple[float, float, float]  # (h, w, t) sincos interpolation
    theta: float
    rot_v: bool
    learnable_pos: bool
    text_hidden: int
    patch_bias: bool
    qk_ln: bool
    swiglu: bool

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def _mixin(modules: dict, key: str, known: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Resolve `modules.<key>` to (class name, params with SAT's defaults); refuse what SAT would."""
    node = modules.get(key)
    if not isinstance(node, dict) or "target" not in node:
        raise ConfigError(f"model.modules.{key} must be {{target: ..., params: ...}} "
                          f"(CogVideo's network_config.params.modules layout); got {node!r}")
    name = str(node["target"]).rsplit(".", 1)[-1]
    if name not in known:
        raise ConfigError(f"model.modules.{key}.target {node['target']!r} is not supported; "
                          f"supported: {sorted(known)}")
    params = dict(node.get("params") or {})
    unknown = sorted(set(params) - set(known[name]))
    if unknown:
        raise ConfigError(f"model.modules.{key}.params: unknown option(s) {unknown} for {name}; "
                          f"known: {sorted(known[name])}")
    out = {}
    for p, default in known[name].items():
        if p not in params and default is _REQUIRED:
            raise ConfigError(f"model.modules.{key}.params.{p} is required for {name}")
        out[p] = params.get(p, default)
    return name, out


@dataclass
class DiTConfig:
    """`network_config.params` of a CogVideoX SAT YAML, names exactly as CogVideo's."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_frames: int
    time_compressed_rate: int
    latent_width: int
    latent_height: int
    patch_size: Any  # int (CogVideoX 1.0 code) or [t, h, w] (1.5 code)
    in_channels: int
    out_channels: int
    modules: dict
    model_class: str = MODEL_CLASS
    transformer_args: dict = field(default_factory=dict)
    elementwise_affine: bool = True
    time_embed_dim: Optional[int] = None
    ofs_embed_dim: Optional[int] = None
    adm_in_channels: Optional[int] = None  # only used with num_classes (unsupported)
    input_time: str = "adaln"
    parallel_output: bool = True  # SAT sets it; the DiT output is never vocab-parallel
    height_interpolation: float = 1.0
    width_interpolation: float = 1.0
    time_interpolation: float = 1.0
    use_SwiGLU: bool = False
    zero_init_y_embed: bool = False  # v1.0 init-only option
    dtype: Optional[str] = None  # set by SATVideoDiffusionEngine at build; load.dtype decides here
    # top-level keys of a SAT model_config.json, informative only (transformer_args is what counts)
    vocab_size: Optional[int] = None
    layernorm_order: Optional[str] = None
    model_parallel_size: Optional[int] = None
    max_sequence_length: Optional[int] = None
    tokenizer_type: Optional[str] = None

    UNSUPPORTED = {"use_RMSNorm": False, "num_classes": None}

    def validate(self) -> None:
        self.arch  # noqa: B018  derive (and so validate) once

    @functools.cached_property
    def arch(self) -> DiTArch:
        """Everything the module needs, derived and validated from the SAT-layout fields."""
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_frames", "time_compressed_rate",
                     "latent_width", "latent_height", "in_channels", "out_channels"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.model_class != MODEL_CLASS:
            raise ConfigError(f"DiTConfig is for model_class {MODEL_CLASS!r}, got {self.model_class!r}")
        if self.input_time != "adaln":
            raise ConfigError(f"model.input_time={self.input_time!r}: SAT's DiT only implements 'adaln'")
        h, a = self.hidden_size, self.num_attention_heads
        if h % a:
            raise ConfigError(f"hidden_size {h} is not divisible by num_attention_heads {a}")
        ps = self.patch_size
        if isinstance(ps, int) and not isinstance(ps, bool):
            v1, patch = True, (1, ps, ps)
        elif isinstance(ps, (list, tuple)) and len(ps) == 3 and all(isinstance(p, int) for p in ps):
            v1, patch = False, tuple(ps)
        else:
            raise ConfigError(f"model.patch_size must be an int (CogVideoX 1.0) or [t, h, w] (1.5), got {ps!r}")
        if min(patch) <= 0:
            raise ConfigError(f"model.patch_size entries must be positive, got {ps!r}")
        if not isinstance(self.modules, dict):
            raise ConfigError("model.modules must be a mapping with pos_embed_config, patch_embed_config, "
                              "adaln_layer_config and final_layer_config")
        extra = sorted(set(self.modules) - {"pos_embed_config", "patch_embed_config", "adaln_layer_config",
                                            "final_layer_config"})
        if "lora_config" in extra:
            raise ConfigError("model.modules.lora_config: LoRA checkpoints are not supported (they add "
                              "matrix_A/matrix_B tensors); merge the LoRA into the base DiT weights first")
        if extra:
            raise ConfigError(f"model.modules: unknown module config(s) {extra}")

        targs = dict(self.transformer_args or {})
        unknown = sorted(set(targs) - set(_TARGS_DEFAULTS) - set(_TARGS_FIXED))
        if unknown:
            raise ConfigError(f"model.transformer_args: unknown option(s) {unknown}; known: "
                              f"{sorted(set(_TARGS_DEFAULTS) | set(_TARGS_FIXED))}")
        for key, need in _TARGS_FIXED.items():
            if key in targs and targs[key] != need:
                raise ConfigError(f"model.transformer_args.{key}={targs[key]!r} is not supported by sat_dist's "
                                  f"CogVideoX DiT (only {need!r})")
        t = {**_TARGS_DEFAULTS, **{k: v for k, v in targs.items() if k in _TARGS_DEFAULTS}}
        if t["layernorm_order"] not in ("pre", "sandwich"):
            raise ConfigError(f"model.transformer_args.layernorm_order={t['layernorm_order']!r}: AdaLNMixin's "
                              f"layer_forward implements 'pre' and 'sandwich'")
        head_dim = h // a
        if t["hidden_size_per_attention_head"] not in (None, head_dim):
            raise ConfigError(f"transformer_args.hidden_size_per_attention_head="
                              f"{t['hidden_size_per_attention_head']} != hidden_size/heads={head_dim}: "
                              f"AdaLNMixin's per-head layernorms would not fit")
        ffn = int(t["inner_hidden_size"] or 4 * h)
        if self.use_SwiGLU and ffn != 4 * h:
            raise ConfigError(f"use_SwiGLU builds its gate with 4*hidden_size={4 * h} rows but the MLP is {ffn} wide")

        pos_name, pos = _mixin(self.modules, "pos_embed_config", _POS_MIXINS)
        _, patch_p = _mixin(self.modules, "patch_embed_config", _PATCH_MIXINS)
        _, adaln = _mixin(self.modules, "adaln_layer_config", _ADALN_MIXINS)
        _mixin(self.modules, "final_layer_config", _FINAL_MIXINS)
        if not v1 and "bias" in (self.modules["patch_embed_config"].get("params") or {}):
            raise ConfigError("modules.patch_embed_config.params.bias exists only in the CogVideoX 1.0 code "
                              "(int patch_size); the 1.5 ImagePatchEmbeddingMixin takes no 'bias'")
        if pos_name == "Basic3DPositionEmbeddingMixin":
            kind = "basic3d"
            if h % 16:
                raise ConfigError(f"Basic3DPositionEmbeddingMixin's 3D sincos table needs hidden_size % 16 == 0, "
                                  f"got {h}")
        else:
            kind = "rotary3d"
            hs = int(pos["hidden_size_head"])
            if hs != head_dim:
                raise ConfigError(f"Rotary3DPositionEmbeddingMixin hidden_size_head={hs} but the attention head "
                                  f"dim is {head_dim}")
            if hs // 4 + 2 * (hs // 8 * 3) != hs:
                raise ConfigError(f"Rotary3D splits the head dim into t/h/w parts hs//4 + 2*(hs//8*3); that is "
                                  f"not {hs} for hidden_size_head={hs} (use a multiple of 8)")
        interp_keys = ("height_interpolation", "width_interpolation", "time_interpolation")
        if v1:  # the 1.0 DiT never passes its own *_interpolation to the position mixin
            ignored = [k for k in interp_keys if float(getattr(self, k)) != 1.0]
            if ignored:
                raise ConfigError(f"model.{ignored[0]}={getattr(self, ignored[0])}: the CogVideoX 1.0 DiT ignores "
                                  f"it (SAT uses 1.0); set it under modules.pos_embed_config.params instead")
        interp = tuple(float(pos.get(k) if pos.get(k) is not None else getattr(self, k)) for k in interp_keys)
        compressed = (self.num_frames - 1) // self.time_compressed_rate + 1
        grid = (compressed, self.latent_height // patch[1], self.latent_width // patch[2])
        if min(grid) <= 0:
            raise ConfigError(f"latent {self.latent_height}x{self.latent_width} is smaller than patch {patch}")
        return DiTArch(
            v1=v1, patch=patch, grid=grid, hidden=h, heads=a, head_dim=head_dim, ffn=ffn, layers=self.num_layers,
            time_dim=int(self.time_embed_dim or h), ofs_dim=self.ofs_embed_dim, in_channels=self.in_channels,
            out_channels=self.out_channels, affine=bool(self.elementwise_affine),
            ln_eps=float(t["layernorm_epsilon"]), ln_order=t["layernorm_order"],
            final_ln=bool(t["use_final_layernorm"]), use_bias=bool(t["use_bias"]), qkv_bias=bool(t["use_qkv_bias"]),
            max_seq=int(t["max_sequence_length"]), pos=kind, text_length=int(pos["text_length"]), interp=interp,
            theta=float(pos.get("theta", 10000)), rot_v=bool(pos.get("rot_v", False)),
            learnable_pos=bool(pos.get("learnable_pos_embed", False)), text_hidden=int(patch_p["text_hidden_size"]),
            patch_bias=bool(patch_p["bias"]), qk_ln=bool(adaln["qk_ln"]), swiglu=bool(self.use_SwiGLU),
        )

    def check_tp(self, tp: int) -> None:
        """TP must divide the heads and the MLP width; say which sizes work before any byte is read."""
        check_tp_divides(tp, {"num_attention_heads": self.arch.heads, "MLP width": self.arch.ffn})


# --- CogVideo's YAML layout -------------------------------------------------------------------

def cogvideo_layout(merged: dict) -> Optional[dict]:
    """CogVideo's `model: {network_config: {target, params}, conditioner_config, first_stage_config,
    ...}` + `args: {load, fp16/bf16, ...}` -> sat_dist's {"model", "load"}.

    Only the DiT is loaded: every other engine part (T5 conditioner, VAE, denoiser, sampler, loss)
    and every other run argument is ignored, as SAT ignores unknown `args`. `args.load` becomes the
    checkpoint and `args.bf16`/`args.fp16` the dtype, unless given explicitly."""
    model = merged.get("model")
    if not isinstance(model, dict) or "network_config" not in model:
        return None
    net = model["network_config"]
    if not isinstance(net, dict) or "params" not in net:
        raise ConfigError("model.network_config must hold {target: dit_video_concat.DiffusionTransformer, params: ...}")
    target = str(net.get("target", ""))
    if target.rsplit(".", 1)[-1] != MODEL_CLASS:
        raise ConfigError(f"model.network_config.target {target!r} is not supported; sat_dist loads "
                          f"dit_video_concat.{MODEL_CLASS}")
    out_model = {"model_class": MODEL_CLASS, **dict(net["params"] or {})}
    load: dict = {}
    args = merged.get("args") or {}
    if isinstance(args, dict):
        if args.get("load"):
            load["checkpoint"] = str(args["load"])
        if args.get("bf16"):
            load["dtype"] = "bf16"
        elif args.get("fp16"):
            load["dtype"] = "fp16"
    load.update(merged.get("load") or {})
    return {"model": out_model, "load": load}


# --- positional tables (SAT's formulas) -------------------------------------------------------

def sincos_3d(dim: int, grid: tuple[int, int, int], interp: tuple[float, float, float]) -> torch.Tensor:
    """Basic3DPositionEmbeddingMixin's table [T*H*W, dim] (fp32): per token [temporal (dim/4) |
    spatial (3dim/4)], spatial = [1D(w coords) | 1D(h coords)] as SAT's meshgrid order gives."""
    t_size, gh, gw = grid
    h_i, w_i, t_i = interp

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(d // 2, dtype=np.float64)
        omega /= d / 2.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    d_sp, d_t = dim // 4 * 3, dim // 4
    grid_h = np.arange(gh, dtype=np.float32) / np.float32(h_i)
    grid_w = np.arange(gw, dtype=np.float32) / np.float32(w_i)
    mesh = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, gh, gw)
    spatial = np.concatenate([one_d(d_sp // 2, mesh[0]), one_d(d_sp // 2, mesh[1])], axis=1)  # [H*W, 3d/4]
    temporal = one_d(d_t, np.arange(t_size, dtype=np.float32) / np.float32(t_i))  # [T, d/4]
    table = np.concatenate([np.repeat(temporal[:, None, :], gh * gw, axis=1),
                            np.repeat(spatial[None, :, :], t_size, axis=0)], axis=-1)
    return torch.from_numpy(table).float().reshape(t_size * gh * gw, dim)


def rope_freqs_3d(head_dim: int, grid: tuple[int, int, int], theta: float, device=None) -> torch.Tensor:
    """Rotary3DPositionEmbeddingMixin's angles [T, H, W, head_dim] (fp32): [t | h | w] parts of
    head_dim//4, head_dim//8*3, head_dim//8*3, each frequency repeated for an interleaved pair."""
    parts = (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)
    angles = []
    for dim, n in zip(parts, grid):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim))
        pos = torch.arange(n, dtype=torch.float32, device=device)
        angles.append(torch.einsum("..., f -> ... f", pos, freqs).repeat_interleave(2, dim=-1))
    t, h, w = grid
    return torch.cat([angles[0][:, None, None, :].expand(t, h, w, -1),
                      angles[1][None, :, None, :].expand(t, h, w, -1),
                      angles[2][None, None, :, :].expand(t, h, w, -1)], dim=-1).contiguous()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """SAT's interleaved rotate_half: pairs (x0, x1) -> (-x1, x0)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def timestep_embedding(t: torch.Tensor, dim: int, dtype: torch.dtype, max_period: float = 10000.0) -> torch.Tensor:
    """sgm's timestep_embedding (repeat_only=False): [cos | sin] of t * exp(-ln(P) i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --- modules (attribute names = SAT's state-dict keys) ----------------------------------------

class DiTAttention(nn.Module):
    """SAT SelfAttention: fused [Q;K;V] column-parallel (stride 3), dense row-parallel."""

    def __init__(self, a: DiTArch, tp: TPInfo, dtype: torch.dtype):
        super().__init__()
        inner = a.heads * a.head_dim
        self.query_key_value = ColumnParallelLinear(a.hidden, 3 * inner, tp, a.use_bias or a.qkv_bias, (1, 1, 1), dtype)
        self.dense = RowParallelLinear(inner, a.hidden, tp, a.use_bias, dtype)


class DiTMLP(nn.Module):
    def __init__(self, a: DiTArch, tp: TPInfo, dtype: torch.dtype):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(a.hidden, a.ffn, tp, a.use_bias, dtype=dtype)
        self.dense_4h_to_h = RowParallelLinear(a.ffn, a.hidden, tp, a.use_bias, dtype)


class DiTLayer(nn.Module):
    def __init__(self, a: DiTArch, tp: TPInfo, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = LayerNorm(a.hidden, eps=a.ln_eps, elementwise_affine=a.affine, dtype=dtype)
        self.attention = DiTAttention(a, tp, dtype)
        self.post_attention_layernorm = LayerNorm(a.hidden, eps=a.ln_eps, elementwise_affine=a.affine, dtype=dtype)
        if a.ln_order == "sandwich":
            self.third_layernorm = LayerNorm(a.hidden, eps=a.ln_eps, elementwise_affine=a.affine, dtype=dtype)
            self.fourth_layernorm = LayerNorm(a.hidden, eps=a.ln_eps, elementwise_affine=a.affine, dtype=dtype)
        self.mlp = DiTMLP(a, tp, dtype)


class DiTTransformer(nn.Module):
    """SAT BaseTransformer after the mixins' reinit: no word_embeddings (patch_embed deletes them);
    position_embeddings only with Rotary3D (Basic3D deletes them), never used by the forward."""

    def __init__(self, a: DiTArch, tp: TPInfo, dtype: torch.dtype):
        super().__init__()
        if a.pos == "rotary3d":
            # SAT's nn.Embedding next to Rotary3D: a state-dict entry the forward never reads.
            self.position_embeddings = Embedding(a.max_seq, a.hidden, dtype)
            self.position_embeddings.specs = {"weight": TensorSpec(
                (a.max_seq, a.hidden), REPLICATED, if_absent="zeros (unused by the forward; CogVideo#586)")}
        self.layers = nn.ModuleList([DiTLayer(a, tp, dtype) for _ in range(a.layers)])
        if a.final_ln:
            self.final_layernorm = LayerNorm(a.hidden, eps=a.ln_eps, elementwise_affine=a.affine, dtype=dtype)


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

    def __init__(self, a: DiTArch, dtype: torch.dtype):
        super().__init__()
        self.arch = a
        p = a.patch
        if a.v1:
            self.proj = nn.Conv2d(a.in_channels, a.hidden, kernel_size=p[1], stride=p[1], bias=a.patch_bias, dtype=dtype)
        else:
            self.proj = nn.Linear(a.in_channels * p[0] * p[1] * p[2], a.hidden, dtype=dtype)
        self.text_proj = nn.Linear(a.text_hidden, a.hidden, dtype=dtype)

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
    """mixins.adaln_layer: per layer SiLU+Linear(time_dim, 12h) and per-head q/k LayerNorms."""

    def __init__(self, a: DiTArch, dtype: torch.dtype):
        super().__init__()
        self.adaLN_modulations = nn.ModuleList(
            [nn.Sequential(nn.SiLU(), nn.Linear(a.time_dim, 12 * a.hidden, dtype=dtype)) for _ in range(a.layers)])
        if a.qk_ln:
            self.query_layernorm_list = nn.ModuleList(
                [LayerNorm(a.head_dim, eps=1e-6, elementwise_affine=a.affine, dtype=dtype) for _ in range(a.layers)])
            self.key_layernorm_list = nn.ModuleList(
                [LayerNorm(a.head_dim, eps=1e-6, elementwise_affine=a.affine, dtype=dtype) for _ in range(a.layers)])


class FinalLayer(nn.Module):
    """mixins.final_layer: torch LayerNorm (eps 1e-6), adaLN shift/scale, Linear, unpatchify."""

    def __init__(self, a: DiTArch, dtype: torch.dtype):
        super().__init__()
        self.norm_final = nn.LayerNorm(a.hidden, eps=1e-6, elementwise_affine=a.affine, dtype=dtype)
        self.linear = nn.Linear(a.hidden, a.patch[0] * a.patch[1] * a.patch[2] * a.out_channels, dtype=dtype)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(a.time_dim, 2 * a.hidden, dtype=dtype))


class SwiGLU(nn.Module):
    """mixins.swiglu (use_SwiGLU): per-layer column-parallel gate `w2.{i}` without bias."""

    def __init__(self, a: DiTArch, tp: TPInfo, dtype: torch.dtype):
        super().__init__()
        self.w2 = nn.ModuleList([ColumnParallelLinear(a.hidden, 4 * a.hidden, tp, False, dtype=dtype)
                                 for _ in range(a.layers)])


def _time_mlp(dim_in: int, dim: int, dtype: torch.dtype) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim, dtype=dtype), nn.SiLU(), nn.Linear(dim, dim, dtype=dtype))


class CogVideoXDiT(nn.Module):
    """SAT `DiffusionTransformer`: `forward(x, timesteps, context, ofs=..., concat_images=...)`
    returns the predicted latents [B, T, out_channels, H, W], TP collectives inside."""

    checkpoint_prefix = CHECKPOINT_PREFIX

    def __init__(self, cfg: DiTConfig, tp: TPInfo, dtype: torch.dtype = torch.float32):
        super().__init__()
        a = cfg.arch
        self.arch, self.tp = a, tp
        # Registration order = SAT's: BaseModel's mixins and transformer, then time/ofs embeddings.
        self.mixins = nn.ModuleDict()
        self.transformer = DiTTransformer(a, tp, dtype)
        self.time_embed = _time_mlp(a.hidden, a.time_dim, dtype)
        if a.ofs_dim is not None:
            self.ofs_embed = _time_mlp(a.ofs_dim, a.ofs_dim, dtype)
        pos_cls = Basic3DPositionEmbedding if a.pos == "basic3d" else Rotary3DPositionEmbedding
        self.mixins["pos_embed"] = pos_cls(a, dtype)
        self.mixins["patch_embed"] = ImagePatchEmbedding(a, dtype)
        self.mixins["adaln_layer"] = AdaLN(a, dtype)
        self.mixins["final_layer"] = FinalLayer(a, dtype)
        if a.swiglu:
            self.mixins["swiglu"] = SwiGLU(a, tp, dtype)
        self.requires_grad_(False)
        self.register_load_state_dict_pre_hook(_fill_absent)

    @property
    def dtype(self) -> torch.dtype:
        return self.mixins["patch_embed"].text_proj.weight.dtype

    def absent_ok_defaults(self) -> dict[str, Callable[[], torch.Tensor]]:
        """name -> what SAT's constructor puts there, for tensors released files may lack."""
        out: dict[str, Callable[[], torch.Tensor]] = {
            f"mixins.pos_embed.{k}": fn for k, fn in self.mixins["pos_embed"].defaults().items()}
        if hasattr(self.transformer, "position_embeddings"):
            a = self.arch
            out["transformer.position_embeddings.weight"] = lambda: torch.zeros(a.max_seq, a.hidden)
        return out

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y=None,
                concat_images: Optional[torch.Tensor] = None, ofs: Optional[torch.Tensor] = None,
                **_unused) -> torch.Tensor:
        a, dtype = self.arch, self.dtype
        if y is not None:
            raise ValueError("y (class conditioning) is not used by CogVideoX (num_classes is None)")
        x = x.to(dtype)
        if concat_images is not None:  # I2V: the encoded first frame, concatenated on channels
            if concat_images.shape[0] != x.shape[0]:
                concat_images = concat_images.repeat(2, 1, 1, 1, 1)
            x = torch.cat([x, concat_images.to(dtype)], dim=2)
        b, t, c, h, w = x.shape
        if c != a.in_channels:
            raise ValueError(f"latents have {c} channels (after concat_images) but the DiT takes in_channels="
                             f"{a.in_channels}; I2V models need concat_images")
        pt, ph, pw = a.patch
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent (T, H, W)=({t}, {h}, {w}) is not divisible by patch_size {a.patch}")
        thw = (t // pt, h // ph, w // pw)
        if a.v1 and (thw[1:] != a.grid[1:] or thw[0] > a.grid[0]):
            raise ValueError(f"the CogVideoX 1.0 DiT runs only at its configured latent size "
                             f"{a.grid[1] * ph}x{a.grid[2] * pw} with at most {a.grid[0]} latent frames (got "
                             f"{t} frames of {h}x{w}): its unpatchify, RoPE and position tables are fixed to it")
        seq_length = thw[0] * thw[1] * thw[2]
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(b)
        emb = self.time_embed(timestep_embedding(timesteps, a.hidden, dtype))
        if a.ofs_dim is not None:
            if ofs is None:
                raise ValueError("this DiT has ofs_embed (CogVideoX1.5 I2V): pass ofs (e.g. torch.full((B,), 2.0))")
            ofs = torch.as_tensor(ofs, device=x.device)
            emb = emb + self.ofs_embed(timestep_embedding(ofs.expand(b) if ofs.dim() == 0 else ofs, a.ofs_dim, dtype))
        context = context.to(dtype)
        text_length = context.shape[1]

        hidden = self.mixins["patch_embed"](x, context, thw)
        pos = self.mixins["pos_embed"].position(t, seq_length, text_length)
        if pos is not None:
            hidden = hidden + pos
        rope = None
        if a.pos == "rotary3d":
            # v1.0 splits text/video at the configured text_length, 1.5 at the context's length.
            split = a.text_length if a.v1 else text_length
            if a.v1 and text_length != a.text_length:
                raise ValueError(f"context has {text_length} tokens but the CogVideoX 1.0 rotary mixin splits at "
                                 f"text_length={a.text_length}; pad the T5 embeddings to {a.text_length}")
            cos, sin = self.mixins["pos_embed"].tables(thw, x.device, dtype)
            rope = (split, cos, sin)
        for i in range(a.layers):
            hidden = self._layer(i, hidden, emb, text_length, rope)
        if a.final_ln:
            hidden = self.transformer.final_layernorm(hidden)
        return self._final(hidden, emb, text_length, thw)

    def _layer(self, i: int, hidden: torch.Tensor, emb: torch.Tensor, text_length: int, rope) -> torch.Tensor:
        """AdaLNMixin.layer_forward: separate text/video modulation around shared attention + MLP."""
        layer = self.transformer.layers[i]
        sandwich = self.arch.ln_order == "sandwich"
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         t_shift_msa, t_scale_msa, t_gate_msa, t_shift_mlp, t_scale_mlp, t_gate_mlp) = \
            self.mixins["adaln_layer"].adaLN_modulations[i](emb).chunk(12, dim=1)
        text, img = hidden[:, :text_length], hidden[:, text_length:]

        attn_in = torch.cat((modulate(layer.input_layernorm(text), t_shift_msa, t_scale_msa),
                             modulate(layer.input_layernorm(img), shift_msa, scale_msa)), dim=1)
        attn_out = self._attention(i, attn_in, rope)
        text_out, img_out = attn_out[:, :text_length], attn_out[:, text_length:]
        if sandwich:
            text_out, img_out = layer.third_layernorm(text_out), layer.third_layernorm(img_out)
        img = img + gate_msa.unsqueeze(1) * img_out
        text = text + t_gate_msa.unsqueeze(1) * text_out

        mlp_in = torch.cat((modulate(layer.post_attention_layernorm(text), t_shift_mlp, t_scale_mlp),
                            modulate(layer.post_attention_layernorm(img), shift_mlp, scale_mlp)), dim=1)
        mlp_out = self._mlp(i, mlp_in)
        text_out, img_out = mlp_out[:, :text_length], mlp_out[:, text_length:]
        if sandwich:
            text_out, img_out = layer.fourth_layernorm(text_out), layer.fourth_layernorm(img_out)
        img = img + gate_mlp.unsqueeze(1) * img_out
        text = text + t_gate_mlp.unsqueeze(1) * text_out
        return torch.cat((text, img), dim=1)

    def _attention(self, i: int, x: torch.Tensor, rope) -> torch.Tensor:
        """This rank's heads: q/k LayerNorm per head, then RoPE on video tokens, full attention;
        the row-parallel dense all-reduces the heads' partial outputs."""
        attn, a = self.transformer.layers[i].attention, self.arch
        b, s, _ = x.shape
        q, k, v = attn.query_key_value(x).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, s, -1, a.head_dim).permute(0, 2, 1, 3) for z in (q, k, v))
        if a.qk_ln:
            q = self.mixins["adaln_layer"].query_layernorm_list[i](q)
            k = self.mixins["adaln_layer"].key_layernorm_list[i](k)
        if rope is not None:
            split, cos, sin = rope

            def rot(z: torch.Tensor) -> torch.Tensor:
                video = z[:, :, split:]
                return torch.cat((z[:, :, :split], video * cos + rotate_half(video) * sin), dim=2)

            q, k = rot(q), rot(k)
            if a.rot_v:
                v = rot(v)
        ctx = F.scaled_dot_product_attention(q, k, v)
        return attn.dense(ctx.permute(0, 2, 1, 3).reshape(b, s, -1))

    def _mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        mlp = self.transformer.layers[i].mlp
        h = mlp.dense_h_to_4h(x)
        if self.arch.swiglu:
            h = F.silu(self.mixins["swiglu"].w2[i](x)) * h
        else:
            h = F.gelu(h, approximate="tanh")
        return mlp.dense_4h_to_h(h)

    def _final(self, hidden: torch.Tensor, emb: torch.Tensor, text_length: int, thw: tuple[int, int, int]):
        """FinalLayerMixin.final_forward + unpatchify -> [B, T, out_channels, H, W]."""
        a, fl = self.arch, self.mixins["final_layer"]
        x = hidden[:, text_length:]
        shift, scale = fl.adaLN_modulation(emb).chunk(2, dim=1)
        x = fl.linear(modulate(fl.norm_final(x), shift, scale))
        (T, H, W), (pt, ph, pw), b = thw, a.patch, x.shape[0]
        x = x.reshape(b, T, H, W, a.out_channels, pt, ph, pw).permute(0, 1, 5, 4, 2, 6, 3, 7)
        return x.reshape(b, T * pt, a.out_channels, H * ph, W * pw)


def _fill_absent(module: CogVideoXDiT, state_dict: dict, prefix: str, *_args) -> None:
    """load_state_dict pre-hook: put SAT's constructor values where the file had no tensor
    (the reader dropped it from the plan), in the dtype and on the device of the loaded weights."""
    ref = state_dict.get(prefix + "mixins.patch_embed.text_proj.weight")
    for name, make in module.absent_ok_defaults().items():
        if prefix + name not in state_dict:
            value = make()
            if ref is not None and not ref.is_meta:
                value = value.to(device=ref.device, dtype=ref.dtype)
            state_dict[prefix + name] = value


def build_cogvideox(cfg: DiTConfig, tp: TPInfo) -> CogVideoXDiT:
    """BUILDERS entry (called under the meta device by build_meta_model)."""
    return CogVideoXDiT(cfg, tp)


MODEL_CONFIGS[MODEL_CLASS] = DiTConfig
if cogvideo_layout not in LAYOUT_ADAPTERS:
    LAYOUT_ADAPTERS.append(cogvideo_layout)

__all__ = ["CogVideoXDiT", "DiTArch", "DiTConfig", "build_cogvideox", "cogvideo_layout",
           "rope_freqs_3d", "sincos_3d", "timestep_embedding"]
