"""diffusers output for the CogVideoX DiT: a folder `CogVideoXTransformer3DModel.from_pretrained`
loads (huggingface/diffusers models/transformers/cogvideox_transformer_3d.py): `config.json` plus
`diffusion_pytorch_model.safetensors`, or shards and `diffusion_pytorch_model.safetensors.index.json`.

Names and row blocks are `formats/diffusers_map.sources()` read forwards: every diffusers tensor is a
`Want` whose fragments are the boxes of the SAT tensor it holds (`to_q`/`to_k`/`to_v` = the rows of
`query_key_value`, `norm1.linear`/`norm2.linear` = two chunk pairs of `adaLN_modulations`), so the
planner reads exactly those rows from any source, split or not, and nothing is re-cut in memory.
Tensors diffusers does not store (v1.0 RoPE tables, the unused `position_embeddings`, 2B's sincos
table, a non-persistent buffer there) are not written. `config.json` is
`diffusers_map.diffusers_config` of the model config; files as diffusers' `save_pretrained`
writes them (metadata `{"format": "pt"}`), through writers/safetensors.py.
"""
from __future__ import annotations

from ..errors import ConfigError
from ..formats.diffusers import CONFIG, WEIGHTS
from ..formats.diffusers_map import CLASS_NAME, diffusers_config, sources
from .base import Boxes, Fetch, Job, Want, Written, write_json
from .safetensors import write_index, write_shards

NAME = "diffusers"
SINCOS = "patch_embed.pos_embedding"  # learned (5B-I2V): a stored tensor; sincos (2B): a non-persistent buffer


def wants(job: Job) -> list[Want]:
    """Every diffusers tensor, sorted by name; ConfigError for a model diffusers cannot hold."""
    learned = diffusers_config(job.model_config)["use_learned_positional_embeddings"]
    out, alien = [], []
    for name, spec in job.specs.items():
        srcs = sources(name, spec.global_shape)
        if srcs is None:
            alien.append(name)
            continue
        out += [Want(s.name, name, spec.global_shape, Boxes(s.shape, s.fragments), job.dtypes[name])
                for s in srcs if s.name != SINCOS or learned]
    if alien:
        raise ConfigError(f"the model has tensors a diffusers {CLASS_NAME} never holds: {alien[:8]} ({len(alien)})")
    return sorted(out, key=lambda w: w.name)


def check(job: Job) -> None:
    wants(job)


def write(job: Job, root: str, fetch: Fetch) -> list[Written]:
    return write_shards(root, WEIGHTS, wants(job), job.shard_size, {"format": "pt"}, fetch, job.rank, job.world)


def finish(job: Job, root: str) -> list[Written]:
    return write_index(root, WEIGHTS, wants(job), job.shard_size) + [
        write_json(root, CONFIG, diffusers_config(job.model_config))]
