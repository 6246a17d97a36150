"""The diffusers CogVideoX transformer in SAT's layout: names, placements and config, pure data.

diffusers' `CogVideoXTransformer3DModel` stores SAT's DiT (THUDM/CogVideo sat/dit_video_concat.py)
under other names, with SAT's fused tensors cut apart. Each stored diffusers tensor is described
here as the boxes of a SAT logical tensor it holds (`Source`), never copied: the planner then
intersects a rank's SAT shard with those boxes and reads only the rows it needs. The facts are
those of huggingface/diffusers scripts/convert_cogvideox_to_diffusers.py and THUDM/CogVideo
tools/convert_weight_sat2hf.py (SAT -> diffusers; read here backwards), checked against diffusers
0.42 `models/transformers/cogvideox_transformer_3d.py` and `models/embeddings.py`:

- `attention.query_key_value` [3h, .] = [to_q; to_k; to_v] (`torch.chunk(qkv, 3, 0)`): three
  Sources, rows [0,h), [h,2h), [2h,3h).
- `adaLN_modulations.N.1` [12h, .] (chunks: video shift/scale/gate msa, mlp, then text's):
  `norm1.linear` = chunks [0:3] + [6:9], `norm2.linear` = chunks [3:6] + [9:12]: two Sources of
  two Fragments each.
- everything else is a rename of the whole tensor. Neither patch embedding needs a permutation:
  v1.0's Conv2d weight [h, c, p, p] is the same module in both codes, and 1.5's Linear input
  features are ordered (c, pt, ph, pw) by both SAT (`rearrange(... -> b (t h w) (c o p q))`) and
  diffusers' CogVideoXPatchEmbed (`permute(0, 1, 3, 5, 7, 2, 4, 6).flatten(4, 7)`); the same holds
  for `proj_out`'s outputs and both unpatchifies.
- not stored by diffusers: the v1.0 RoPE tables `freqs_sin/cos` and the unused
  `transformer.position_embeddings` (the script removes them), and 2B's sincos `pos_embedding`
  (a non-persistent buffer in diffusers); the DiT computes all of them itself (`if_absent`).

The config goes both ways: `sat_model_config` (config.json -> SAT layout, for loading) and its
inverse `diffusers_config` (SAT layout -> config.json, for `sat-dist convert --to diffusers`, whose
writer reads `sources()` forwards).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import ConfigError
from ..placement import Box, Fragment

Shape = tuple[int, ...]
CLASS_NAME = "CogVideoXTransformer3DModel"


@dataclass(frozen=True)
class Source:
    """One stored diffusers tensor: its name, its shape, and the boxes of the SAT tensor it holds
    (each at `local_offsets` inside the stored tensor)."""

    name: str
    shape: Shape
    fragments: tuple[Fragment, ...]


_GLOBAL = {  # SAT prefix -> diffusers prefix (whole tensors)
    "mixins.patch_embed.proj.": "patch_embed.proj.",
    "mixins.patch_embed.text_proj.": "patch_embed.text_proj.",
    "mixins.pos_embed.pos_embedding": "patch_embed.pos_embedding",  # 5B-I2V learned; 2B: not stored
    "time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
    "ofs_embed.0.": "ofs_embedding.linear_1.", "ofs_embed.2.": "ofs_embedding.linear_2.",
    "transformer.final_layernorm.": "norm_final.",
    "mixins.final_layer.norm_final.": "norm_out.norm.",
    "mixins.final_layer.linear.": "proj_out.",
    "mixins.final_layer.adaLN_modulation.1.": "norm_out.linear.",
}
_LAYER = {  # inside transformer.layers.N. -> transformer_blocks.N.
    "input_layernorm.": "norm1.norm.", "post_attention_layernorm.": "norm2.norm.",
    "attention.dense.": "attn1.to_out.0.", "mlp.dense_h_to_4h.": "ff.net.0.proj.", "mlp.dense_4h_to_h.": "ff.net.2.",
}
NOT_STORED = ("mixins.pos_embed.freqs_sin", "mixins.pos_embed.freqs_cos", "transformer.position_embeddings.weight")
_QKV = re.compile(r"^transformer\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)$")
_ADALN = re.compile(r"^mixins\.adaln_layer\.adaLN_modulations\.(\d+)\.1\.(weight|bias)$")
_QKNORM = re.compile(r"^mixins\.adaln_layer\.(query|key)_layernorm_list\.(\d+)\.(weight|bias)$")
_BLOCK = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")


def _rows(shape: Shape, parts: int, name: str) -> int:
    if not shape or shape[0] % parts:
        raise ConfigError(f"SAT tensor {name!r} of shape {list(shape)} cannot hold {parts} equal row blocks")
    return shape[0] // parts


def _frag(sat_row: int, local_row: int, rows: int, shape: Shape) -> Fragment:
    rest = tuple(shape[1:])
    return Fragment(Box((sat_row,) + (0,) * len(rest), (rows,) + rest), (local_row,) + (0,) * len(rest))


def sources(sat_name: str, shape: Shape) -> Optional[list[Source]]:
    """The diffusers tensors holding SAT tensor `sat_name` (full shape `shape`): [] when diffusers
    never stores it (`NOT_STORED`), None when it has no diffusers counterpart at all (SwiGLU gates,
    sandwich norms: options no released CogVideoX uses)."""
    shape = tuple(shape)
    whole = [Fragment(Box.full(shape), (0,) * len(shape))]
    if sat_name in NOT_STORED:
        return []
    m = _QKV.match(sat_name)
    if m:
        h = _rows(shape, 3, sat_name)
        return [Source(f"transformer_blocks.{m[1]}.attn1.to_{n}.{m[2]}", (h,) + shape[1:], (_frag(i * h, 0, h, shape),))
                for i, n in enumerate("qkv")]
    m = _ADALN.match(sat_name)
    if m:
        c = _rows(shape, 12, sat_name)
        return [Source(f"transformer_blocks.{m[1]}.{norm}.linear.{m[2]}", (6 * c,) + shape[1:],
                       (_frag(a * c, 0, 3 * c, shape), _frag(b * c, 3 * c, 3 * c, shape)))
                for norm, a, b in (("norm1", 0, 6), ("norm2", 3, 9))]
    m = _QKNORM.match(sat_name)
    if m:
        return [Source(f"transformer_blocks.{m[2]}.attn1.norm_{m[1][0]}.{m[3]}", shape, tuple(whole))]
    for sat, dif in _GLOBAL.items():
        if sat_name.startswith(sat):
            return [Source(dif + sat_name[len(sat):], shape, tuple(whole))]
    m = _BLOCK.match(sat_name)
    if m:
        for sat, dif in _LAYER.items():
            if m[2].startswith(sat):
                return [Source(f"transformer_blocks.{m[1]}.{dif}{m[2][len(sat):]}", shape, tuple(whole))]
    return None


# --- config.json -> SAT-layout model config ---------------------------------------------------------

# CogVideoXTransformer3DModel.__init__'s defaults (diffusers 0.42): config.json files written by
# older releases omit the keys added later (patch_size_t, ofs_embed_dim, patch_bias, ...).
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 30, "attention_head_dim": 64, "in_channels": 16, "out_channels": 16,
    "flip_sin_to_cos": True, "freq_shift": 0, "time_embed_dim": 512, "ofs_embed_dim": None,
    "text_embed_dim": 4096, "num_layers": 30, "dropout": 0.0, "attention_bias": True, "sample_width": 90,
    "sample_height": 60, "sample_frames": 49, "patch_size": 2, "patch_size_t": None,
    "temporal_compression_ratio": 4, "max_text_seq_length": 226, "activation_fn": "gelu-approximate",
    "timestep_activation_fn": "silu", "norm_elementwise_affine": True, "norm_eps": 1e-5,
    "spatial_interpolation_scale": 1.875, "temporal_interpolation_scale": 1.0,
    "use_rotary_positional_embeddings": False, "use_learned_positional_embeddings": False, "patch_bias": True,
}
# Values SAT's DiT has no other form of: a config.json with anything else is refused, not guessed.
_FIXED = {
    "flip_sin_to_cos": (True, "SAT's timestep embedding is [cos | sin]"),
    "freq_shift": (0, "SAT's timestep frequencies are exp(-ln(10000) i / half)"),
    "activation_fn": ("gelu-approximate", "SAT's MLP uses tanh-approximate GELU"),
    "timestep_activation_fn": ("silu", "SAT's time_embed is Linear, SiLU, Linear"),
    "attention_bias": (True, "SAT's query_key_value has a bias whenever attention.dense has one"),
    "norm_elementwise_affine": (True, "diffusers' q/k norms stay affine while SAT's would not"),
}
# SAT's BaseModel arguments as CogVideo's configs set them (configs/cogvideox_*.yaml).
_TRANSFORMER_ARGS = {"checkpoint_activations": False, "vocab_size": 1, "max_sequence_length": 64,
                     "layernorm_order": "pre", "skip_init": False, "model_parallel_size": 1, "is_decoder": False}


def sat_model_config(config: dict, where: str = "config.json") -> dict:
    """A diffusers `CogVideoXTransformer3DModel` config.json -> the SAT-layout DiT model config
    (`model_class: DiffusionTransformer` + CogVideo's network_config params), as the YAMLs in
    configs/ hold it. Unknown keys and values SAT's DiT cannot express are ConfigErrors."""
    if config.get("_class_name") != CLASS_NAME:
        raise ConfigError(f"{where}: _class_name is {config.get('_class_name')!r}; sat_dist loads {CLASS_NAME} only")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
    if unknown:
        raise ConfigError(f"{where}: unknown {CLASS_NAME} option(s) {unknown} (newer diffusers?); known: "
                          f"{sorted(DIFFUSERS_DEFAULTS)}")
    c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key, (need, why) in _FIXED.items():
        if c[key] != need:
            raise ConfigError(f"{where}: {key}={c[key]!r} is not supported ({why}; only {need!r})")
    if c["out_channels"] is None:
        raise ConfigError(f"{where}: out_channels is null; CogVideoXTransformer3DModel needs it set")
    rotary, learned = bool(c["use_rotary_positional_embeddings"]), bool(c["use_learned_positional_embeddings"])
    if learned and not rotary:
        raise ConfigError(f"{where}: use_learned_positional_embeddings without rotary embeddings exists in no "
                          f"CogVideoX (diffusers refuses it too)")
    v15, head = c["patch_size_t"] is not None, int(c["attention_head_dim"])
    if rotary:
        pos = {"target": "dit_video_concat.Rotary3DPositionEmbeddingMixin",
               "params": {"hidden_size_head": head, "text_length": c["max_text_seq_length"],
                          **({"learnable_pos_embed": True} if learned else {})}}
    else:
        pos = {"target": "dit_video_concat.Basic3DPositionEmbeddingMixin",
               "params": {"text_length": c["max_text_seq_length"],
                          "height_interpolation": c["spatial_interpolation_scale"],
                          "width_interpolation": c["spatial_interpolation_scale"],
                          "time_interpolation": c["temporal_interpolation_scale"]}}
    patch = {"text_hidden_size": c["text_embed_dim"]}
    if not v15:  # 1.5's Linear patch embedding always has a bias; patch_bias is v1.0's Conv2d only
        patch["bias"] = bool(c["patch_bias"])
    out = {
        "model_class": "DiffusionTransformer",
        "num_layers": c["num_layers"], "hidden_size": c["num_attention_heads"] * head,
        "num_attention_heads": c["num_attention_heads"], "time_embed_dim": c["time_embed_dim"],
        "elementwise_affine": True, "num_frames": c["sample_frames"],
        "time_compressed_rate": c["temporal_compression_ratio"],
        "latent_width": c["sample_width"], "latent_height": c["sample_height"],
        "patch_size": [c["patch_size_t"], c["patch_size"], c["patch_size"]] if v15 else c["patch_size"],
        "in_channels": c["in_channels"], "out_channels": c["out_channels"],
        "transformer_args": {**_TRANSFORMER_ARGS, "layernorm_epsilon": c["norm_eps"]},
        "modules": {"pos_embed_config": pos,
                    "patch_embed_config": {"target": "dit_video_concat.ImagePatchEmbeddingMixin", "params": patch},
                    "adaln_layer_config": {"target": "dit_video_concat.AdaLNMixin", "params": {"qk_ln": True}},
                    "final_layer_config": {"target": "dit_video_concat.FinalLayerMixin"}},
    }
    if c["ofs_embed_dim"]:
        out["ofs_embed_dim"] = c["ofs_embed_dim"]
    return out


def variant_name(config: dict) -> str:
    """Which release a config.json looks like (for `inspect`): 2B-, 5B-, 5B-I2V-, 1.5- or 1.5-I2V-style."""
    c = {**DIFFUSERS_DEFAULTS, **config}
    if c["patch_size_t"] is not None:
        return "CogVideoX 1.5 " + ("I2V (ofs)" if c["ofs_embed_dim"] else "T2V")
    if not c["use_rotary_positional_embeddings"]:
        return "CogVideoX 1.0, sincos positions (2B-style)"
    return "CogVideoX 1.0, 3D RoPE" + (" + learned positions (5B-I2V-style)" if c["use_learned_positional_embeddings"]
                                       else " (5B-style)")


# --- SAT-layout model config -> config.json (the inverse of sat_model_config) -----------------------

DIFFUSERS_VERSION = "0.42.1"  # written as `_diffusers_version`: the release whose __init__ DIFFUSERS_DEFAULTS mirrors


def _module_params(sat: dict, key: str, where: str) -> tuple[str, dict]:
    node = (sat.get("modules") or {}).get(key)
    if not isinstance(node, dict) or "target" not in node:
        raise ConfigError(f"{where}: modules.{key} must be {{target: ..., params: ...}} (CogVideo's layout)")
    return str(node["target"]).rsplit(".", 1)[-1], dict(node.get("params") or {})


def diffusers_config(sat: dict, where: str = "the model config") -> dict:
    """The SAT-layout DiT model config (what `sat_model_config` returns; configs/*.yaml's
    network_config params) -> a `CogVideoXTransformer3DModel` config.json, the arguments
    huggingface/diffusers scripts/convert_cogvideox_to_diffusers.py gives the class for the same
    release. Pure. SAT options diffusers' class has no form of are ConfigErrors naming them."""
    if sat.get("model_class") != "DiffusionTransformer":
        raise ConfigError(f"{where}: diffusers output holds the CogVideoX DiT (model_class DiffusionTransformer), "
                          f"not {sat.get('model_class')!r}")
    h, heads = int(sat["hidden_size"]), int(sat["num_attention_heads"])
    targs = {"layernorm_order": "pre", "layernorm_epsilon": 1e-5, "use_bias": True, "use_final_layernorm": True,
             **(sat.get("transformer_args") or {})}
    pos_name, pos = _module_params(sat, "pos_embed_config", where)
    _, patch = _module_params(sat, "patch_embed_config", where)
    _, adaln = _module_params(sat, "adaln_layer_config", where)
    rotary = pos_name == "Rotary3DPositionEmbeddingMixin"
    ps = sat["patch_size"]
    v15 = isinstance(ps, (list, tuple))
    interp = {k: pos.get(k) if pos.get(k) is not None else sat.get(k, 1.0)
              for k in ("height_interpolation", "width_interpolation", "time_interpolation")}
    refuse = {
        "transformer_args.layernorm_order": (targs["layernorm_order"] != "pre", "diffusers' blocks are pre-norm"),
        "transformer_args.use_bias": (not targs["use_bias"], "diffusers' linears all have biases"),
        "transformer_args.use_final_layernorm": (not targs["use_final_layernorm"], "diffusers always has norm_final"),
        "transformer_args.inner_hidden_size": (targs.get("inner_hidden_size") not in (None, 4 * h),
                                               "diffusers' MLP is 4 x hidden wide"),
        "elementwise_affine": (not sat.get("elementwise_affine", True), "diffusers' norms are affine"),
        "use_SwiGLU": (bool(sat.get("use_SwiGLU")), "diffusers' MLP is tanh-GELU"),
        "adaln_layer_config.params.qk_ln": (not adaln.get("qk_ln", True), "diffusers always normalises q and k"),
        "pos_embed_config.params.theta": (rotary and pos.get("theta", 10000) != 10000, "diffusers' RoPE theta is 10000"),
        "pos_embed_config.params.rot_v": (rotary and bool(pos.get("rot_v")), "diffusers rotates only q and k"),
        "pos_embed_config.params.learnable_pos_embed": (v15 and bool(pos.get("learnable_pos_embed")),
                                                        "no CogVideoX 1.5 has learned positions"),
        "pos_embed_config.params.width_interpolation": (
            not rotary and interp["height_interpolation"] != interp["width_interpolation"],
            "diffusers has one spatial_interpolation_scale"),
        "patch_size": (v15 and ps[1] != ps[2], "diffusers' patches are square"),
    }
    bad = [f"{k} ({why})" for k, (hit, why) in refuse.items() if hit]
    if bad:
        raise ConfigError(f"{where}: {CLASS_NAME} cannot express {', '.join(bad)}")
    out = {**DIFFUSERS_DEFAULTS,
           "num_attention_heads": heads, "attention_head_dim": h // heads, "in_channels": sat["in_channels"],
           "out_channels": sat["out_channels"], "time_embed_dim": sat.get("time_embed_dim") or h,
           "ofs_embed_dim": sat.get("ofs_embed_dim"), "text_embed_dim": patch["text_hidden_size"],
           "num_layers": sat["num_layers"], "sample_width": sat["latent_width"], "sample_height": sat["latent_height"],
           "sample_frames": sat["num_frames"], "patch_size": ps[1] if v15 else ps, "patch_size_t": ps[0] if v15 else None,
           "temporal_compression_ratio": sat["time_compressed_rate"], "max_text_seq_length": pos.get("text_length", 0),
           "norm_eps": targs["layernorm_epsilon"], "use_rotary_positional_embeddings": rotary,
           "use_learned_positional_embeddings": rotary and bool(pos.get("learnable_pos_embed")),
           "patch_bias": (not v15) and bool(patch.get("bias", True))}
    if not rotary:
        out["spatial_interpolation_scale"] = interp["height_interpolation"]
        out["temporal_interpolation_scale"] = interp["time_interpolation"]
    return {"_class_name": CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION, **out}
