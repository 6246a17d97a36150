"""What `sat-dist plan --engine` needs from the configs alone: the three components' model configs
(no checkpoint read) and the T5 encoder's activation estimate.

- DiT: the YAMLs, as `plan` reads them.
- T5: `conditioner_config`'s FrozenT5Embedder `model_dir/config.json` when that folder exists, else
  t5-v1_1-xxl's (google/t5-v1_1-xxl config.json: what every CogVideoX release ships), with the
  embedder's `max_length` (226).
- VAE: `first_stage_config`'s encoder shape when the YAML has it (sat_layout), else diffusers'
  AutoencoderKLCogVideoX defaults (CogVideoX's VAE), `model.scale_factor` as scaling factor.
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from .. import formats
from ..config import LoadConfig, build_model_config, resolve
from ..errors import SatDistError
from ..models import TPInfo, build_meta_model, collect_specs
from ..models.family import Latent
from .sat_layout import t5_source, vae_source

T5_XXL = {"model_class": "T5EncoderModel", "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
          "num_heads": 64, "vocab_size": 32128, "feed_forward_proj": "gated-gelu",
          "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6}


def engine_configs(config_files: Sequence[str], overrides: Sequence[str] = (),
                   dtype: Optional[str] = None) -> tuple[LoadConfig, Any, Any, int]:
    """(the DiT's LoadConfig, the T5 model config, the VAE model config, the T5 max_length)."""
    dit = resolve(None, list(config_files), list(overrides), dtype=dtype)
    merged = OmegaConf.to_container(OmegaConf.merge(*(OmegaConf.load(f) for f in config_files)), resolve=True)
    model = merged.get("model") or {}
    base = os.path.dirname(os.path.abspath(config_files[0]))
    t5, length = dict(T5_XXL), 226
    if model.get("conditioner_config"):
        t5_dir, length = t5_source(model, base)
        if os.path.isdir(t5_dir):
            t5 = formats.model_config(t5_dir) or t5
    vae = {"model_class": "AutoencoderKLCogVideoX", "scaling_factor": float(model.get("scale_factor", 1.15258426))}
    if model.get("first_stage_config"):
        vae = vae_source(model, base)[1]
    return dit, build_model_config(t5), build_model_config(vae), length


def t5_activation(cfg: Any, tp: int, itemsize: int, length: int) -> int:
    """One prompt through the TP encoder, layer by layer: the replicated [L, d] residual stream and
    norms, this rank's q/k/v/context [L, heads*d_kv/tp], its gated FFN [L, 2*d_ff/tp], and its scores
    plus the position bias [heads/tp, L, L] (eager attention)."""
    per_token = 4 * cfg.d_model + 4 * cfg.num_heads * cfg.d_kv // tp + 3 * cfg.d_ff // tp
    return (length * per_token + 2 * (cfg.num_heads // tp) * length * length) * itemsize


def sample_latent(dit: Any, latent: Optional[Latent]) -> Optional[Latent]:
    """The latent size to decode: `latent`, else the 1.0 DiT's configured one (1.5: unknown)."""
    a = dit.arch
    if latent is not None or not a.v1:
        return latent
    return a.grid[0], a.grid[1] * a.patch[1], a.grid[2] * a.patch[2]


_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "float32": 4, "float16": 2, "bfloat16": 2}


def rank_weights(cfg: LoadConfig) -> tuple[int, Optional[int]]:
    """(elements, bytes) of one component's weights on its largest TP rank, from the model config on the
    meta device (nothing allocated, no tensor read): what `sample --dry-run` shows. Bytes in `cfg.dtype`,
    else the stored dtype when the checkpoint's headers name one; None when neither says."""
    specs = collect_specs(build_meta_model(cfg.model, TPInfo(1, 0, None)))
    elements = max(sum(math.prod(s.placement(cfg.tp, r).local_shape(s.global_shape)) for s in specs.values())
                   for r in range(cfg.tp))
    if cfg.torch_dtype is not None:
        return elements, elements * cfg.torch_dtype.itemsize
    try:
        stored = formats.describe(cfg.checkpoint).get("dtypes") or []
    except SatDistError:
        stored = []
    sizes = {_ITEMSIZE.get(str(d)) for d in stored}
    return elements, (elements * sizes.pop() if len(sizes) == 1 and None not in sizes else None)
