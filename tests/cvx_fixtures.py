"""Test-side CogVideoX facts, written from FORMATS.md §6 and CogVideo's sources, sharing no code
with sat_dist: the key/shape rules of SAT's DiT, SAT's TP split of its four linears, the shipped
folder layout, CogVideo-layout YAML writing and the SAT -> diffusers key conversion."""
from __future__ import annotations

import hashlib
import math
import os
from typing import Optional

import torch
import yaml

PREFIX = "model.diffusion_model."
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def shape_table(p: dict) -> dict[str, tuple[int, ...]]:
    """Full (mp=1) state-dict shapes of SAT's DiffusionTransformer built from network_config params
    `p` (CogVideo's YAML), by the rules in FORMATS.md §6."""
    h, L, a = p["hidden_size"], p["num_layers"], p["num_attention_heads"]
    hd, f = h // a, 4 * h
    tdim = p.get("time_embed_dim") or h
    ps = p["patch_size"]
    v1 = isinstance(ps, int)
    pt, ph, pw = (1, ps, ps) if v1 else tuple(ps)
    frames = (p["num_frames"] - 1) // p["time_compressed_rate"] + 1
    n_patch = frames * (p["latent_height"] // ph) * (p["latent_width"] // pw)
    mods = p["modules"]
    pos = mods["pos_embed_config"]
    pos_kind = pos["target"].rsplit(".", 1)[-1]
    pos_p = pos.get("params") or {}
    text = pos_p.get("text_length", 0)
    order = (p.get("transformer_args") or {}).get("layernorm_order", "pre")
    s: dict[str, tuple[int, ...]] = {}
    if pos_kind == "Basic3DPositionEmbeddingMixin":
        s["mixins.pos_embed.pos_embedding"] = (1, text + n_patch, h)
    else:
        if pos_p.get("learnable_pos_embed"):
            s["mixins.pos_embed.pos_embedding"] = (1, text + n_patch, h)
        if v1:
            s["mixins.pos_embed.freqs_sin"] = (n_patch, hd)
            s["mixins.pos_embed.freqs_cos"] = (n_patch, hd)
    c = p["in_channels"]
    s["mixins.patch_embed.proj.weight"] = (h, c, ph, pw) if v1 else (h, c * pt * ph * pw)
    s["mixins.patch_embed.proj.bias"] = (h,)
    th = mods["patch_embed_config"]["params"]["text_hidden_size"]
    s["mixins.patch_embed.text_proj.weight"] = (h, th)
    s["mixins.patch_embed.text_proj.bias"] = (h,)
    for i in range(L):
        s[f"mixins.adaln_layer.adaLN_modulations.{i}.1.weight"] = (12 * h, tdim)
        s[f"mixins.adaln_layer.adaLN_modulations.{i}.1.bias"] = (12 * h,)
    for i in range(L):
        for n in ("query", "key"):
            s[f"mixins.adaln_layer.{n}_layernorm_list.{i}.weight"] = (hd,)
            s[f"mixins.adaln_layer.{n}_layernorm_list.{i}.bias"] = (hd,)
    s["mixins.final_layer.norm_final.weight"] = (h,)
    s["mixins.final_layer.norm_final.bias"] = (h,)
    s["mixins.final_layer.linear.weight"] = (pt * ph * pw * p["out_channels"], h)
    s["mixins.final_layer.linear.bias"] = (pt * ph * pw * p["out_channels"],)
    s["mixins.final_layer.adaLN_modulation.1.weight"] = (2 * h, tdim)
    s["mixins.final_layer.adaLN_modulation.1.bias"] = (2 * h,)
    if p.get("use_SwiGLU"):
        for i in range(L):
            s[f"mixins.swiglu.w2.{i}.weight"] = (f, h)
    if pos_kind != "Basic3DPositionEmbeddingMixin":
        s["transformer.position_embeddings.weight"] = (64, h)
    for i in range(L):
        q = f"transformer.layers.{i}."
        norms = ["input_layernorm", "post_attention_layernorm"] + (
            ["third_layernorm", "fourth_layernorm"] if order == "sandwich" else [])
        for n in norms:
            s[q + n + ".weight"] = (h,)
            s[q + n + ".bias"] = (h,)
        s[q + "attention.query_key_value.weight"] = (3 * h, h)
        s[q + "attention.query_key_value.bias"] = (3 * h,)
        s[q + "attention.dense.weight"] = (h, h)
        s[q + "attention.dense.bias"] = (h,)
        s[q + "mlp.dense_h_to_4h.weight"] = (f, h)
        s[q + "mlp.dense_h_to_4h.bias"] = (f,)
        s[q + "mlp.dense_4h_to_h.weight"] = (h, f)
        s[q + "mlp.dense_4h_to_h.bias"] = (h,)
    s["transformer.final_layernorm.weight"] = (h,)
    s["transformer.final_layernorm.bias"] = (h,)
    s["time_embed.0.weight"] = (tdim, h)
    s["time_embed.0.bias"] = (tdim,)
    s["time_embed.2.weight"] = (tdim, tdim)
    s["time_embed.2.bias"] = (tdim,)
    if p.get("ofs_embed_dim"):
        o = p["ofs_embed_dim"]
        for j in (0, 2):
            s[f"ofs_embed.{j}.weight"] = (o, o)
            s[f"ofs_embed.{j}.bias"] = (o,)
    return s


def split_rule(name: str) -> Optional[tuple[int, int]]:
    """(dim, stride) of SAT's TP split for `name`, None when replicated."""
    if name.endswith("attention.query_key_value.weight") or name.endswith("attention.query_key_value.bias"):
        return 0, 3
    if name.endswith("attention.dense.weight") or name.endswith("mlp.dense_4h_to_h.weight"):
        return 1, 1
    if ".mlp.dense_h_to_4h." in name or name.startswith("mixins.swiglu.w2."):
        return 0, 1
    return None


def sat_split(name: str, full: torch.Tensor, n: int, r: int) -> torch.Tensor:
    """Rank r of n's shard, as sat/mpu's ColumnParallelLinear.partition / RowParallelLinear do."""
    rule = split_rule(name)
    if rule is None or n == 1:
        return full.clone()
    dim, stride = rule
    blocks = full.chunk(stride, dim=dim)  # [Q; K; V] for stride 3
    return torch.cat([b.chunk(n, dim=dim)[r] for b in blocks], dim=dim).clone()


def local_shape(name: str, shape: tuple[int, ...], n: int) -> tuple[int, ...]:
    rule = split_rule(name)
    if rule is None:
        return tuple(shape)
    out = list(shape)
    out[rule[0]] //= n
    return tuple(out)


def random_weights(shapes: dict, seed: int, dtype=torch.float32, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """Deterministic full weights; norms near (1, 0) so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        t = torch.randn(shapes[name], generator=g) * scale
        if "layernorm" in name or "norm_final" in name:
            t = 1 + 0.1 * t if name.endswith("weight") else 0.1 * t
        out[name] = t.to(dtype)
    return out


def write_shipped(root: str, full: dict, mp: int = 1, iteration: str = "1000", extra_module: dict | None = None) -> str:
    """`root/latest` -> `root/<iteration>/mp_rank_XX_model_states.pt` = {'module': {PREFIX + k: shard}},
    the layout of the released `transformer/` folders. Returns root."""
    it = os.path.join(root, iteration)
    os.makedirs(it, exist_ok=True)
    for r in range(mp):
        module = {PREFIX + k: sat_split(k, v, mp, r) for k, v in full.items()}
        module.update(extra_module or {})
        torch.save({"module": module}, os.path.join(it, f"mp_rank_{r:02d}_model_states.pt"))
    with open(os.path.join(root, "latest"), "w") as fh:
        fh.write(iteration)
    return root


def load_params(name: str) -> dict:
    """network_config.params of a shipped configs/<name>.yaml."""
    with open(os.path.join(CONFIGS, name + ".yaml")) as fh:
        return yaml.safe_load(fh)["model"]["network_config"]["params"]


def tiny_params(kind: str, heads: int = 6, head_dim: int = 16, layers: int = 2) -> dict:
    """Same structure as the released variants, tiny sizes: '2b' (sincos, v1.0), '5b' (RoPE v1.0),
    '5b_i2v' (+learnable pos, 2x channels), '15' (1.5 code), '15_i2v' (+ofs)."""
    v15 = kind.startswith("15")
    i2v = kind.endswith("i2v")
    if kind == "2b":
        pos = {"target": "dit_video_concat.Basic3DPositionEmbeddingMixin",
               "params": {"text_length": 5, "height_interpolation": 1.875, "width_interpolation": 1.875}}
    else:
        pos = {"target": "dit_video_concat.Rotary3DPositionEmbeddingMixin",
               "params": {"hidden_size_head": head_dim, "text_length": 5,
                          **({"learnable_pos_embed": True} if kind == "5b_i2v" else {})}}
    p = {
        "time_embed_dim": 32, "elementwise_affine": True, "num_frames": 13 if v15 else 9, "time_compressed_rate": 4,
        "latent_width": 12, "latent_height": 8, "num_layers": layers, "patch_size": [2, 2, 2] if v15 else 2,
        "in_channels": 8 if i2v else 4, "out_channels": 4, "hidden_size": heads * head_dim, "adm_in_channels": 256,
        "num_attention_heads": heads,
        "transformer_args": {"checkpoint_activations": True, "vocab_size": 1, "max_sequence_length": 64,
                             "layernorm_order": "pre", "skip_init": False, "model_parallel_size": 1,
                             "is_decoder": False},
        "modules": {"pos_embed_config": pos,
                    "patch_embed_config": {"target": "dit_video_concat.ImagePatchEmbeddingMixin",
                                           "params": {"text_hidden_size": 24}},
                    "adaln_layer_config": {"target": "dit_video_concat.AdaLNMixin", "params": {"qk_ln": True}},
                    "final_layer_config": {"target": "dit_video_concat.FinalLayerMixin"}},
    }
    if kind == "15_i2v":
        p["ofs_embed_dim"] = 32
    return p


def write_cogvideo_yaml(path: str, params: dict, args: Optional[dict] = None) -> str:
    """A YAML in CogVideo's full layout: the DiT under model.network_config plus the engine
    sections sat_dist must ignore (conditioner, VAE, denoiser, sampler, loss), and `args:`."""
    doc = {"model": {
        "scale_factor": 0.7, "disable_first_stage_autocast": True, "log_keys": ["txt"],
        "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
                            "params": {"num_idx": 1000, "quantize_c_noise": False}},
        "network_config": {"target": "dit_video_concat.DiffusionTransformer", "params": params},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
            {"is_trainable": False, "input_key": "txt", "ucg_rate": 0.1,
             "target": "sgm.modules.encoders.modules.FrozenT5Embedder",
             "params": {"model_dir": "t5-v1_1-xxl", "max_length": 226}}]}},
        "first_stage_config": {"target": "vae_modules.autoencoder.VideoAutoencoderInferenceWrapper",
                               "params": {"cp_size": 1, "ckpt_path": "vae/3d-vae.pt", "ignore_keys": ["loss"]}},
        "loss_fn_config": {"target": "sgm.modules.diffusionmodules.loss.VideoDiffusionLoss"},
        "sampler_config": {"target": "sgm.modules.diffusionmodules.sampling.VPSDEDPMPP2MSampler",
                           "params": {"num_steps": 50}},
    }}
    if args is not None:
        doc["args"] = args
    with open(path, "w") as fh:
        yaml.safe_dump(doc, fh, sort_keys=False)
    return path


def tensor_sha(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (independent of sat_dist's digest)."""
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def nbytes(shape: tuple[int, ...], itemsize: int) -> int:
    return math.prod(shape) * itemsize


# --- SAT -> diffusers (CogVideoXTransformer3DModel) ------------------------------------------

_RENAME = {
    "mixins.patch_embed.": "patch_embed.", "time_embed.0.": "time_embedding.linear_1.",
    "time_embed.2.": "time_embedding.linear_2.", "ofs_embed.0.": "ofs_embedding.linear_1.",
    "ofs_embed.2.": "ofs_embedding.linear_2.", "transformer.final_layernorm.": "norm_final.",
    "mixins.final_layer.norm_final.": "norm_out.norm.", "mixins.final_layer.linear.": "proj_out.",
    "mixins.final_layer.adaLN_modulation.1.": "norm_out.linear.",
}
_LAYER = {"input_layernorm.": "norm1.norm.", "post_attention_layernorm.": "norm2.norm.",
          "attention.dense.": "attn1.to_out.0.", "mlp.dense_h_to_4h.": "ff.net.0.proj.",
          "mlp.dense_4h_to_h.": "ff.net.2."}


def to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAT DiT keys -> diffusers keys: QKV chunked 3-way into to_q/to_k/to_v; the 12 adaLN chunks
    (shift, scale, gate for msa, mlp, then the same for text) regrouped into norm1 (msa: video,
    text) and norm2 (mlp: video, text); RoPE tables and the unused position_embeddings dropped
    (diffusers takes RoPE as a forward argument); the 5B-I2V learnable pos_embedding kept."""
    out = {}
    for k, v in sd.items():
        if "freqs_" in k or k == "transformer.position_embeddings.weight":
            continue
        if k == "mixins.pos_embed.pos_embedding":
            out["patch_embed.pos_embedding"] = v
            continue
        hit = next((a for a in _RENAME if k.startswith(a)), None)
        if hit:
            out[_RENAME[hit] + k[len(hit):]] = v
            continue
        parts = k.split(".")
        if k.startswith("transformer.layers."):
            blk, rest = f"transformer_blocks.{parts[2]}.", ".".join(parts[3:])
            if rest.startswith("attention.query_key_value."):
                for n, chunk in zip("qkv", v.chunk(3, 0)):
                    out[f"{blk}attn1.to_{n}.{parts[-1]}"] = chunk
            else:
                hit = next(a for a in _LAYER if rest.startswith(a))
                out[blk + _LAYER[hit] + rest[len(hit):]] = v
            continue
        if k.startswith("mixins.adaln_layer."):
            blk = f"transformer_blocks.{parts[3]}."
            if parts[2] == "adaLN_modulations":
                c = v.chunk(12, 0)
                out[f"{blk}norm1.linear.{parts[-1]}"] = torch.cat(c[0:3] + c[6:9])
                out[f"{blk}norm2.linear.{parts[-1]}"] = torch.cat(c[3:6] + c[9:12])
            else:
                out[f"{blk}attn1.{'norm_q' if parts[2].startswith('query') else 'norm_k'}.{parts[-1]}"] = v
            continue
        raise KeyError(f"no diffusers name for {k}")
    return out


def write_tiny_shipped(base, kind: str, seed: int, args: dict, adjust=None) -> tuple[dict, dict, str]:
    """A tiny `kind` DiT with random weights in the released folder layout under `base`, and a
    CogVideo-layout YAML whose args.load is it. `adjust(kind, params, full)` may edit the weights
    first. Returns (params, full weights, YAML path)."""
    params = tiny_params(kind)
    full = random_weights(shape_table(params), seed=seed)
    if adjust is not None:
        adjust(kind, params, full)
    root = write_shipped(os.path.join(str(base), "transformer"), full)
    return params, full, write_cogvideo_yaml(os.path.join(str(base), "model.yaml"), params, {"load": root, **args})


def dit_inputs(kind: str, t: int, h: int, w: int, text: int, seed: int) -> dict:
    """Random DiT forward inputs for a tiny `kind` model (SAT's argument names): latents [2, t, 4, h, w],
    two timesteps, a [2, text, 24] context; I2V adds `concat_images`, 1.5-I2V also `ofs`."""
    g = torch.Generator().manual_seed(seed)
    inp = {"x": torch.randn(2, t, 4, h, w, generator=g), "timesteps": torch.tensor([3.0, 811.0]),
           "context": torch.randn(2, text, 24, generator=g)}
    if kind.endswith("i2v"):
        inp["concat_images"] = torch.randn(2, t, 4, h, w, generator=g)
    if kind == "15_i2v":
        inp["ofs"] = torch.tensor([2.0, 2.0])
    return inp
