"""The CogVideoX DiT's config: `network_config.params` of a CogVideo SAT YAML, validated once into
a `DiTArch` that the modules read.

The names and defaults are SAT's (THUDM/CogVideo sat/dit_video_concat.py `DiffusionTransformer`
and its mixins; THUDM/SwissArmyTransformer sat/arguments.py for `transformer_args`). Options that
would change the weights or the forward in ways no released CogVideoX uses are refused by name,
not guessed.

Which CogVideo code a config belongs to follows from `patch_size`, since neither code runs the
other's configs: an int is the v1.0 code (2B / 5B / 5B-I2V), a list `[t, h, w]` the 1.5 code.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional

from ...errors import ConfigError
from ..family import check_tp_divides

MODEL_CLASS = "DiffusionTransformer"

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
    adaln_split: bool = False  # sat_dist's opt-in: AdaLN modulation linears column-split across TP

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
    # sat_dist's own option (not SAT's): split the AdaLN modulation linears across the TP group
    # (column split + all-gather of the [b, 12*hidden] modulation) instead of replicating them.
    adaln_split: bool = False

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
        if "lora_config" in extra:  # a LoraMixin fine-tune (CogVideo sat/configs/cogvideox_5b_lora.yaml)
            extra.remove("lora_config")
            _check_lora_config(self.modules["lora_config"])
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
            parts = (hs // 4, hs // 8 * 3, hs // 8 * 3)
            if sum(parts) != hs or any(p % 2 for p in parts):  # each part rotates whole (x0, x1) pairs
                raise ConfigError(f"Rotary3D splits the head dim into t/h/w parts hs//4, hs//8*3, hs//8*3 of "
                                  f"rotated pairs; for hidden_size_head={hs} they are {list(parts)}, which do not "
                                  f"make {hs} in even parts (use a multiple of 16: the releases' 64)")
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
            adaln_split=bool(self.adaln_split),
        )

    def check_tp(self, tp: int) -> None:
        """TP must divide the heads and the MLP width; say which sizes work before any byte is read."""
        check_tp_divides(tp, {"num_attention_heads": self.arch.heads, "MLP width": self.arch.ffn})

    def check_sp(self, tp: int, sp: int) -> None:
        """Sequence parallel (Ulysses) splits each TP rank's heads: SP must divide heads / TP; say which
        sizes work before any byte is read."""
        self.check_tp(tp)
        local = self.arch.heads // tp
        ok = [n for n in range(1, local + 1) if local % n == 0]
        if sp < 1 or local % sp:
            raise ConfigError(f"SP={sp} does not divide the {local} attention heads of a TP rank "
                              f"(num_attention_heads={self.arch.heads} / TP={tp}); SP sizes that work at TP={tp}: "
                              f"{ok}")


LORA_MIXINS = ("sat.model.finetune.lora2.LoraMixin",)
_LORA_PARAMS = {"r", "lora_alpha", "lora_dropout", "layer_range", "qlora", "cross_attention", "layer_num"}


def _check_lora_config(node) -> None:
    """model.modules.lora_config: SAT's LoraMixin, its params as sat/model/finetune/lora2.py takes them (the
    loader merges the checkpoint's matrix_A/B with scale lora_alpha / r)."""
    if not isinstance(node, dict) or node.get("target") not in LORA_MIXINS:
        raise ConfigError(f"model.modules.lora_config: target must be one of {list(LORA_MIXINS)}, got "
                          f"{node.get('target') if isinstance(node, dict) else node!r}")
    params = dict(node.get("params") or {})
    unknown = sorted(set(params) - _LORA_PARAMS)
    if unknown:
        raise ConfigError(f"model.modules.lora_config.params: unknown option(s) {unknown}; LoraMixin takes "
                          f"{sorted(_LORA_PARAMS)}")
    if params.get("qlora"):
        raise ConfigError("model.modules.lora_config.params.qlora: 4-bit base weights are not supported")
    for key in ("r", "lora_alpha"):
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ConfigError(f"model.modules.lora_config.params.{key} must be a positive number, got {value!r}")
