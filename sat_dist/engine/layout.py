"""Where an engine's parts are: the diffusers release layout of a CogVideoX pipeline folder.

A folder written by `CogVideoXPipeline.save_pretrained` / `CogVideoXImageToVideoPipeline` (the
released THUDM/CogVideoX-2b, -5b, -5b-I2V, CogVideoX1.5-5B, -5B-I2V repositories): `model_index.json`,
`transformer/` (diffusers reader: SAT's DiT at any TP), `text_encoder/` (HF T5 reader: T5 at any
TP), `vae/` (`config.json` + `diffusion_pytorch_model.safetensors`: the safetensors reader, names
= diffusers'), `tokenizer/` and `scheduler/scheduler_config.json`. Each model becomes one LoadConfig;
the loader loads them together (`loader.load_components`). Layout per huggingface/diffusers
src/diffusers/pipelines/cogvideo/pipeline_cogvideox.py (`register_modules`) and
src/diffusers/pipelines/pipeline_utils.py (`save_pretrained`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import LoadConfig, build_model_config, parse_dtype, resolve
from ..errors import CheckpointError, ConfigError
from ..formats.base import read_json_object
from ..formats.diffusers import weight_files

I2V_PIPELINE = "CogVideoXImageToVideoPipeline"
PIPELINES = ("CogVideoXPipeline", I2V_PIPELINE)
SCHEDULERS = ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")
FOLDERS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass
class Components:
    """One engine's parts: a LoadConfig per model (DiT, T5, VAE, in load order) and the rest."""

    root: str
    layout: str  # "diffusers" | "sat"
    models: dict[str, LoadConfig]  # "transformer", "text_encoder", "vae"
    tokenizer: str  # folder for transformers' AutoTokenizer
    scheduler: dict  # scheduler_config.json (its _class_name says which)
    i2v: bool
    fps: int
    max_text_length: Optional[int] = None  # None: the DiT's text_length
    extra: dict = field(default_factory=dict)  # SAT layout: args.sampling_num_frames / sampling_image_size


def is_diffusers_pipeline(path: str) -> bool:
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "model_index.json")) or all(
        os.path.isdir(os.path.join(path, d)) for d in FOLDERS))


def _not_a_pipeline(path: str, why: str) -> CheckpointError:
    return CheckpointError(f"no CogVideoX pipeline folder at {path}: {why} (a diffusers CogVideoX pipeline folder, "
                           f"as CogVideoXPipeline.save_pretrained writes it, holds model_index.json and "
                           f"{', '.join(d + '/' for d in FOLDERS)}; CogVideo's SAT YAMLs go to --config)")


def check_pipeline_folder(path: str) -> None:
    """`--model PATH` must be a pipeline folder: say what was expected there, not what the YAML path
    (the fallback for other paths) would say about it."""
    if not os.path.exists(path):
        raise _not_a_pipeline(path, "no such file or folder")
    if not os.path.isdir(path):
        raise _not_a_pipeline(path, "it is a file")
    if not is_diffusers_pipeline(path):
        raise _not_a_pipeline(path, "model_index.json missing")


def vae_model_config(folder: str) -> dict:
    """`vae/config.json` as the cogvideox_vae family's model config (`_class_name` -> model_class)."""
    cfg = read_json_object(os.path.join(folder, "config.json"), "the VAE config")
    cls = cfg.get("_class_name")
    if cls != "AutoencoderKLCogVideoX":
        raise ConfigError(f"{folder}/config.json: _class_name is {cls!r}; the engine decodes with "
                          f"AutoencoderKLCogVideoX only")
    return {"model_class": cls, **{k: v for k, v in cfg.items() if not k.startswith("_")}}


def scheduler_config(path: str) -> dict:
    cfg = read_json_object(path, "the scheduler config")
    if cfg.get("_class_name") not in SCHEDULERS:
        raise ConfigError(f"{path}: _class_name {cfg.get('_class_name')!r} is not one of CogVideoX's schedulers "
                          f"{list(SCHEDULERS)}")
    return cfg


def model_load(checkpoint: str, model: Optional[dict], common: dict[str, Any]) -> LoadConfig:
    """A LoadConfig for one component: the model config its reader finds in `checkpoint` (model=None),
    or the given one."""
    if model is None:
        return resolve(checkpoint, (), (), **common)
    cfg = LoadConfig(model=build_model_config(model), checkpoint=checkpoint,
                     **{k: v for k, v in common.items() if v is not None})
    parse_dtype(cfg.dtype)
    return cfg


def diffusers_components(root: str, common: dict[str, Any]) -> Components:
    """The five parts of a diffusers CogVideoX pipeline folder. `common`: tp, dtype, device,
    timeout_s, staging_mib for every model."""
    missing = [d for d in FOLDERS if not os.path.isdir(os.path.join(root, d))]
    if missing:
        raise _not_a_pipeline(root, f"missing subfolder(s) {missing}")
    index_path = os.path.join(root, "model_index.json")
    index = read_json_object(index_path, "the pipeline index") if os.path.isfile(index_path) else {}
    if index and index.get("_class_name") not in PIPELINES:
        raise ConfigError(f"{index_path}: _class_name {index.get('_class_name')!r} is not one of {list(PIPELINES)}")
    vae_dir = os.path.join(root, "vae")
    _, _, vae_file = weight_files(vae_dir)
    models = {
        "transformer": model_load(os.path.join(root, "transformer"), None, common),
        "text_encoder": model_load(os.path.join(root, "text_encoder"), None, common),
        "vae": model_load(vae_file, vae_model_config(vae_dir), common),
    }
    dit, vae = models["transformer"].model, models["vae"].model
    i2v = dit.in_channels == 2 * vae.latent_channels
    if index and (index["_class_name"] == I2V_PIPELINE) != i2v:
        raise ConfigError(f"{index_path} names {index['_class_name']} but the DiT takes {dit.in_channels} channels "
                          f"for {vae.latent_channels}-channel latents")
    fps = 8 if dit.arch.v1 else 16  # CogVideoX 1.0 videos are 8 fps, 1.5's 16 (CogVideo inference/cli_demo.py)
    return Components(root=root, layout="diffusers", models=models, tokenizer=os.path.join(root, "tokenizer"),
                      scheduler=scheduler_config(os.path.join(root, "scheduler", "scheduler_config.json")),
                      i2v=i2v, fps=fps)


def components_for(path_or_config, common: dict[str, Any]) -> Components:
    """The release layout `path_or_config` names: a diffusers pipeline folder, or CogVideo's SAT
    YAML file(s) (`sat_layout`)."""
    if isinstance(path_or_config, str) and (os.path.isdir(path_or_config) or not (
            os.path.exists(path_or_config) or path_or_config.endswith(YAML_SUFFIXES))):
        check_pipeline_folder(path_or_config)  # a folder, or a missing path that names no YAML
        return diffusers_components(path_or_config, common)
    from .sat_layout import sat_components

    files = [path_or_config] if isinstance(path_or_config, str) else list(path_or_config)
    return sat_components(files, common)
