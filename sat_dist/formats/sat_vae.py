"""CogVideo's SAT VAE file (`vae/3d-vae.pt` of the SAT releases) read under diffusers' names.

The file is a torch zip holding `{"state_dict": {...}}` with CogVideo's names (THUDM/CogVideo
sat/vae_modules/autoencoder.py `init_from_ckpt`; `loss.*` entries are the training loss's and are
ignored, as `first_stage_config.params.ignore_keys: ['loss']` says). The model is diffusers'
`AutoencoderKLCogVideoX` (models/cogvideox_vae), so each stored name is mapped to diffusers' by the
rules of huggingface/diffusers scripts/convert_cogvideox_to_diffusers.py (`convert_vae`:
VAE_KEYS_RENAME_DICT applied in order, then `decoder.up.N` -> `decoder.up_blocks.{last - N}`, since
SAT numbers the decoder's up blocks from the lowest resolution); no tensor is copied or changed, so
each rank's plan reads the stored bytes directly. Indexed without reading tensor data (`torchfile`).
"""
from __future__ import annotations

import os
from typing import Optional

from ..errors import CheckpointError
from ..index import CheckpointIndex, Piece
from ..placement import Replicate
from . import torchfile
from .base import IndexRequest, check_names, check_shape

NAME = "sat_vae"
SUFFIXES = (".pt", ".ckpt")
RENAME = (  # diffusers' VAE_KEYS_RENAME_DICT, in its order
    ("block.", "resnets."), ("down.", "down_blocks."), ("downsample", "downsamplers.0"),
    ("upsample", "upsamplers.0"), ("nin_shortcut", "conv_shortcut"),
    ("encoder.mid.block_1", "encoder.mid_block.resnets.0"), ("encoder.mid.block_2", "encoder.mid_block.resnets.1"),
    ("decoder.mid.block_1", "decoder.mid_block.resnets.0"), ("decoder.mid.block_2", "decoder.mid_block.resnets.1"),
)
IGNORED = ("loss",)


def recognise(path: str, tag: Optional[str] = None) -> bool:
    """A single torch file (`*.pt`, `*.ckpt`): SAT's VAE (index() checks that it holds one)."""
    return os.path.isfile(path) and path.endswith(SUFFIXES)


def diffusers_name(sat_name: str, up_blocks: int) -> Optional[str]:
    """A CogVideo VAE tensor name -> diffusers' AutoencoderKLCogVideoX name (None: not the model's)."""
    if sat_name.startswith(IGNORED):
        return None
    name = sat_name
    for old, new in RENAME:
        name = name.replace(old, new)
    if "up." in name:  # decoder.up.N.* -> decoder.up_blocks.{up_blocks - 1 - N}.*
        parts = name.split(".")
        parts[1], parts[2] = "up_blocks", str(up_blocks - 1 - int(parts[2]))
        name = ".".join(parts)
    return name


def _state_dict(path: str) -> dict:
    obj = torchfile.load_structure(path)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not any(str(k).startswith("decoder.") for k in sd):
        raise CheckpointError(f"{path}: not a CogVideo SAT VAE file (expected {{'state_dict': {{'encoder.*', "
                              f"'decoder.*'}}}}, as sat/vae_modules/autoencoder.py saves it)")
    return sd


def names(sd: dict) -> dict[str, str]:
    """diffusers name -> stored name, for every model tensor of the file."""
    up = len({k.split(".")[2] for k in sd if k.startswith("decoder.up.")})
    out = {}
    for key in sd:
        new = diffusers_name(key, up)
        if new is not None:
            out[new] = key
    return out


def index(req: IndexRequest) -> tuple[CheckpointIndex, list[str]]:
    """Every VAE tensor, whole (the VAE is replicated), under diffusers' names."""
    sd = _state_dict(req.path)
    where = names(sd)
    check_names(req.path, [n for n in req.specs if n not in where], [n for n in where if n not in req.specs])
    size = os.path.getsize(req.path)
    idx = CheckpointIndex(root=req.path, format=NAME, meta={"tag": None, "mp_size": 1, "absent": {}, "files": 1,
                                                            "files_total": 1})
    for name, spec in req.specs.items():
        stored = torchfile.locate(req.path, sd[where[name]], where[name], size)
        check_shape(req.path, where[name], stored.shape, spec, 0, 1)
        idx.add(Piece(name, stored, tuple(Replicate().fragments(spec.global_shape))))
    return idx, [req.path]


def describe(path: str, tag: Optional[str] = None) -> dict:
    sd = _state_dict(path)
    where = names(sd)
    data = sum(t.numel() * t.element_size() for t in sd.values() if hasattr(t, "numel"))
    summary = [f"format: CogVideo SAT VAE, {len(where)} model tensors under diffusers' AutoencoderKLCogVideoX names "
               f"({len(sd) - len(where)} ignored: {', '.join(IGNORED)}.*)", f"tensor data {data:,} bytes"]
    return {"format": NAME, "root": path, "tag": None, "summary": summary, "tensors": len(where),
            "files": [{"file": os.path.basename(path), "bytes": os.path.getsize(path), "holds": f"{len(sd)} tensors"}]}


def model_config(path: str) -> None:
    """The file carries none: the VAE's config comes from the YAML's first_stage_config."""
    return None
