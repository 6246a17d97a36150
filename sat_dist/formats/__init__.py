"""Checkpoint readers: each turns a path into a CheckpointIndex without reading tensor data.

Every reader is one module with the interface of `formats.base` (NAME, recognise, index,
describe). `READERS` is the order they are tried in; nothing here knows any format. Adding a
format is one module plus one line in that list.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

from ..errors import CheckpointError
from ..index import CheckpointIndex
from . import dcp, deepspeed, diffusers, hf_t5, safetensors, sat, sat_vae
from .base import IndexRequest, folder_model_config

# DeepSpeed first: a ZeRO-1/2 folder also holds mp_rank_XX_model_states.pt (the SAT reader's
# format); it recognises ZeRO folders by their *_optim_states.pt / zero_pp_rank_* files.
# diffusers and hf_t5 before safetensors: their folders also hold model.safetensors / a *.safetensors.index.json.
READERS: tuple[ModuleType, ...] = (deepspeed, diffusers, hf_t5, safetensors, dcp, sat_vae, sat)


def reader_for(path: str, tag: Optional[str] = None) -> ModuleType:
    """The first reader that recognises `path`; a named error when none does."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path} does not exist")
    for reader in READERS:
        if reader.recognise(path, tag):
            return reader
    raise CheckpointError(
        f"{path}: no 'latest' file and no known checkpoint layout ({', '.join(r.NAME for r in READERS)}: "
        f"e.g. SAT mp_rank_XX_model_states.pt or DeepSpeed ZeRO files); pass the folder that holds 'latest'"
    )


def latest_tag(path: str) -> Optional[str]:
    """The tag `<path>/latest` names, for the readers that resolve it (`USES_LATEST`: SAT, DeepSpeed);
    None when there is no `latest` or the reader does not use it. The loader reads it once, on rank 0, and
    every rank indexes that tag. A tag is one folder name: anything else is refused."""
    latest = os.path.join(path, "latest")
    if not os.path.isfile(latest) or not getattr(reader_for(path, None), "USES_LATEST", False):
        return None
    try:
        with open(latest, "rb") as f:
            raw = f.read(4097)
        tag = raw.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {latest}: {exc}; it must hold an iteration number or 'release'") from exc
    if not tag:
        raise CheckpointError(f"{latest} is empty; it must hold an iteration number or 'release' "
                              f"(pass --tag to pick one)")
    if len(raw) > 4096 or "/" in tag or "\\" in tag or tag in (".", "..") or any(c in tag for c in "\0\n\r"):
        raise CheckpointError(f"{latest} holds {tag[:80]!r}, which is not one folder name inside {path}; it must hold "
                              f"an iteration number or 'release' (pass --tag to pick one)")
    return tag


# What a reader's own checks miss in a damaged or crafted file surfaces as one of these (a pickled
# value of the wrong type, a missing key, a number out of range): still a named CheckpointError.
MALFORMED = (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError)


def open_index(req: IndexRequest) -> tuple[CheckpointIndex, list[str]]:
    """Index only the files this rank needs: (index, files in the order to prefer them)."""
    reader = reader_for(req.path, req.tag)
    try:
        return reader.index(req)
    except MALFORMED as exc:
        raise CheckpointError(f"{req.path}: the {reader.NAME} checkpoint holds a value sat_dist cannot use "
                              f"({type(exc).__name__}: {exc}); the files are damaged or were crafted: copy them "
                              f"again") from exc


def describe(path: str, tag: Optional[str] = None) -> dict:
    """`sat-dist inspect`: what the checkpoint holds, from headers/metadata only."""
    return reader_for(path, tag).describe(path, tag)


def model_config(path: str) -> Optional[dict]:
    """The model config `path` carries (SAT's model_config.json, a safetensors header's metadata),
    from its reader; None when it carries none.

    A folder no reader recognises still has its `model_config.json` read: the load then fails on
    the checkpoint's layout, agreed by the whole group, rather than on a model config it could not find."""
    if not os.path.exists(path):
        return None
    for reader in READERS:
        if reader.recognise(path, None):
            return reader.model_config(path)
    return folder_model_config(path) if os.path.isdir(path) else None


def render(info: dict) -> str:
    """Any reader's description as text: header, the reader's summary lines, then each file."""
    head = f"{info['root']}  (tag {info['tag']})" if "tag" in info else info["root"]
    lines = [head, *info.get("summary", []), "files:"]
    lines += [f"  {f['file']}  [{f['bytes']:,} B]  {f['holds']}" for f in info["files"]]
    return "\n".join(lines)


__all__ = ["READERS", "IndexRequest", "describe", "latest_tag", "model_config", "open_index", "reader_for", "render"]
