"""Where an engine's parts are in the SAT release layout: CogVideo's own YAMLs (THUDM/CogVideo
sat/configs/cogvideox_*.yaml + inference.yaml, as sat/sample_video.py reads them).

- `args.load` -> the DiT checkpoint folder (SAT mp_rank files; the cogvideox family's YAML adapter);
- `model.conditioner_config` -> the `FrozenT5Embedder`'s `model_dir` (an HF T5 folder, t5-v1_1-xxl:
  the T5 weights, read by the hf_t5 reader, and its tokenizer) and `max_length`;
- `model.first_stage_config` -> `ckpt_path` (vae/3d-vae.pt: the sat_vae reader maps CogVideo's names
  to diffusers') and the encoder/decoder shape (`ch`, `ch_mult`, `z_channels`, `num_res_blocks`) ->
  diffusers' AutoencoderKLCogVideoX config; `model.scale_factor` -> its scaling_factor;
- `model.sampler_config` -> the sampler (engine/sat_sampler.py); `args.sampling_*` -> defaults.

Relative paths are taken from the working directory, as CogVideo does (it runs from sat/), else from
the first YAML's folder.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from omegaconf import OmegaConf

from ..config import resolve
from ..errors import ConfigError
from .layout import Components, model_load

SAMPLERS = ("VPSDEDPMPP2MSampler",)
GUIDERS = ("DynamicCFG", "VanillaCFG")


def _cls(node: Any) -> str:
    return str((node or {}).get("target", "")).rsplit(".", 1)[-1]


def _path(p: str, base: str) -> str:
    return p if os.path.isabs(p) or os.path.exists(p) else os.path.join(base, p)


def t5_source(model: dict, base: str) -> tuple[str, int]:
    embedders = (((model.get("conditioner_config") or {}).get("params") or {}).get("emb_models")) or []
    t5 = [e for e in embedders if _cls(e) == "FrozenT5Embedder"]
    if len(t5) != 1:
        raise ConfigError("model.conditioner_config: expected one sgm.modules.encoders.modules.FrozenT5Embedder "
                          f"in emb_models, found {[_cls(e) for e in embedders]}")
    params = t5[0].get("params") or {}
    return _path(str(params.get("model_dir", "t5-v1_1-xxl")), base), int(params.get("max_length", 77))


def vae_source(model: dict, base: str) -> tuple[str, dict]:
    first = (model.get("first_stage_config") or {}).get("params") or {}
    if "ckpt_path" not in first:
        raise ConfigError("model.first_stage_config.params.ckpt_path (the VAE file, vae/3d-vae.pt) is missing")
    enc = (first.get("encoder_config") or {}).get("params") or {}
    ch, mult = int(enc.get("ch", 128)), list(enc.get("ch_mult", [1, 2, 2, 4]))
    cfg = {"model_class": "AutoencoderKLCogVideoX", "in_channels": int(enc.get("in_channels", 3)),
           "out_channels": int(enc.get("out_ch", 3)), "block_out_channels": [ch * m for m in mult],
           "down_block_types": ["CogVideoXDownBlock3D"] * len(mult), "up_block_types": ["CogVideoXUpBlock3D"] * len(mult),
           "latent_channels": int(enc.get("z_channels", 16)), "layers_per_block": int(enc.get("num_res_blocks", 3)),
           "scaling_factor": float(model.get("scale_factor", 1.0))}
    return _path(str(first["ckpt_path"]), base), cfg


def _sampler(model: dict) -> dict:
    sc = model.get("sampler_config") or {}
    if _cls(sc) not in SAMPLERS:
        raise ConfigError(f"model.sampler_config.target {sc.get('target')!r}: the engine runs {list(SAMPLERS)}")
    p = sc.get("params") or {}
    disc = (p.get("discretization_config") or {})
    if _cls(disc) != "ZeroSNRDDPMDiscretization":
        raise ConfigError(f"sampler discretization {disc.get('target')!r}: only ZeroSNRDDPMDiscretization")
    guider = p.get("guider_config") or {}
    if _cls(guider) not in GUIDERS:
        raise ConfigError(f"sampler guider {guider.get('target')!r}: only {list(GUIDERS)}")
    g = guider.get("params") or {}
    dp = disc.get("params") or {}
    for key in ("keep_start", "post_shift"):
        if dp.get(key):
            raise ConfigError(f"ZeroSNRDDPMDiscretization {key}=True is not implemented (no release sets it)")
    return {"_class_name": "SAT:" + _cls(sc), "num_steps": int(p.get("num_steps", 50)),
            "shift_scale": float(dp.get("shift_scale", 1.0)), "linear_start": float(dp.get("linear_start", 0.00085)),
            "linear_end": float(dp.get("linear_end", 0.012)), "num_timesteps": int(dp.get("num_timesteps", 1000)),
            "guider": _cls(guider), "scale": float(g.get("scale", 6.0)), "exp": float(g.get("exp", 5)),
            "guider_steps": int(g.get("num_steps", p.get("num_steps", 50)))}


def sat_components(files: Sequence[str], common: dict[str, Any]) -> Components:
    """The parts a CogVideo SAT YAML set names (see module docstring)."""
    for f in files:
        if not os.path.isfile(f):
            raise ConfigError(f"config file {f} does not exist")
    merged = OmegaConf.to_container(OmegaConf.merge(*(OmegaConf.load(f) for f in files)), resolve=True)
    model, args = merged.get("model") or {}, merged.get("args") or {}
    if "network_config" not in model:
        raise ConfigError(f"{list(files)}: no model.network_config: not CogVideo's SAT layout (pass a diffusers "
                          f"pipeline folder with --model instead)")
    base = os.path.dirname(os.path.abspath(files[0]))
    dit = resolve(None, list(files), (), **common)
    if not dit.checkpoint:
        raise ConfigError("the YAMLs give no args.load (the DiT's SAT checkpoint folder)")
    common = {**common, "dtype": dit.dtype}  # args.bf16 / fp16 (or --dtype) for every component
    t5_dir, max_length = t5_source(model, base)
    vae_file, vae_cfg = vae_source(model, base)
    models = {"transformer": dit, "text_encoder": model_load(t5_dir, None, common),
              "vae": model_load(vae_file, vae_cfg, common)}
    i2v = dit.model.in_channels == 2 * vae_cfg["latent_channels"]
    fps = int(args.get("sampling_fps", 8 if dit.model.arch.v1 else 16))
    extra = {}
    if args.get("sampling_num_frames"):  # latent frames (13 / 22): pixel frames of the real ones
        t = int(args["sampling_num_frames"]) - (0 if dit.model.arch.v1 else 1)
        extra["num_frames"] = (t - 1) * 4 + 1
    if args.get("sampling_image_size") and not i2v:
        extra["size"] = tuple(int(v) for v in args["sampling_image_size"])
    return Components(root=os.path.abspath(files[0]), layout="sat", models=models, tokenizer=t5_dir,
                      scheduler=_sampler(model), i2v=i2v, fps=fps, max_text_length=max_length, extra=extra)
