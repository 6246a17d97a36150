"""The one reader interface, and the checks every reader shares.

A format is one module in `formats/` exposing:

- `NAME: str` — what `inspect` and the report call it;
- `recognise(path, tag) -> bool` — cheap (a directory listing), never raises for a foreign folder;
- `index(request: IndexRequest) -> (CheckpointIndex, preferred files)` — locate, never read, the
  tensors the request's rank needs; errors name the file and the tensor;
- `describe(path, tag) -> dict` — for `sat-dist inspect`: at least `format`, `root`, `summary`
  (lines of text) and `files` (`file`, `bytes`, `holds`), from headers/metadata only;
- optionally `USES_LATEST = True` when `<path>/latest` names the folder to index (the loader then
  reads it once, on rank 0, and passes the agreed tag);
- `model_config(path) -> dict | None` — the model config the checkpoint carries, if any
  (`folder_model_config` for formats that keep SAT's `model_config.json` beside their files).

`formats/__init__` lists those modules in the order they are tried. Pure: no process group.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

from ..errors import CheckpointError
from ..placement import TensorSpec

Shape = tuple[int, ...]


@dataclass(frozen=True)
class IndexRequest:
    """What one rank asks a reader for: its TP shard of `specs` (model names; the file's names are
    `prefix + name`), from `path` at `tag` (None: what `latest` says)."""

    path: str
    specs: Mapping[str, TensorSpec]
    tp: int
    tp_rank: int
    tag: Optional[str] = None
    prefix: str = ""
    weights: str = "auto"  # DeepSpeed ZeRO-1/2: auto|module = module weights, fp32 = fp32 master partitions


def _some(names: Sequence[str]) -> str:
    return f"{list(names[:8])}{' ...' if len(names) > 8 else ''} ({len(names)})"


def split_absent(specs: Mapping[str, TensorSpec], missing: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Split missing tensors into those the model fills itself (SAT's own load tolerates them
    missing, e.g. CogVideoX's sincos table: name -> what it uses instead) and the truly missing."""
    missing = list(missing)
    absent = {n: specs[n].if_absent for n in missing if specs[n].if_absent}
    return absent, [n for n in missing if n not in absent]


def check_names(path: str, missing: Sequence[str], unexpected: Sequence[str]) -> None:
    """One error for a checkpoint whose tensor names do not match the model's."""
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_some(unexpected)}")
        raise CheckpointError(f"{path}: the checkpoint and the model config disagree: {', '.join(parts)}; "
                              f"check --config / model_config.json")


def check_shape(path: str, key: str, shape: Sequence[int], spec: TensorSpec, mp_rank: int, mp_size: int) -> None:
    """A stored shard must have the shape the model's layout gives its model-parallel rank."""
    try:
        want = tuple(spec.layout.placement(mp_size, mp_rank).local_shape(spec.global_shape))
    except ValueError as exc:
        raise CheckpointError(f"{path}: tensor {key!r} cannot have been saved at mp={mp_size}: {exc}") from exc
    if tuple(shape) != want:
        raise CheckpointError(
            f"{path}: tensor {key!r} has shape {list(shape)} in the checkpoint but the model config gives "
            f"{list(want)} for model-parallel rank {mp_rank} of {mp_size} (full {list(spec.global_shape)}); "
            f"check --config / model_config.json"
        )


def read_json_object(path: str, what: str) -> dict:
    """The JSON object in file `path` (`what` names it in errors); CheckpointError otherwise."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a JSON {type(obj).__name__}, not an object ({what})")
    return obj


def folder_model_config(path: str) -> Optional[dict]:
    """The `model_config.json` SAT writes in the checkpoint folder `path`, parsed (None: there is none)."""
    json_path = os.path.join(path, "model_config.json")
    if not os.path.isfile(json_path):
        return None
    try:
        with open(json_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {json_path}: {exc}; fix or delete it, or pass the model with "
                              f"--config") from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{json_path} holds a JSON {type(cfg).__name__}, not an object of SAT model arguments")
    return cfg
