"""SAT checkpoints: `<root>/latest` -> `<root>/<iter|release>/mp_rank_XX_model_states.pt`,
weights under `['module']`. File XX of N holds rank XX's TP shard by SAT's split rules, so what a
file holds is known from the model's layouts before it is opened; only the files a rank needs
are opened at all (their `data.pkl` only), and their tensors are located, never loaded.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from ..errors import CheckpointError
from ..models.layers import TensorSpec
from .index import CheckpointIndex, Piece
from .torchfile import load_structure, locate

MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


@dataclass(frozen=True)
class SatCheckpoint:
    root: str
    tag: str
    iter_dir: str
    files: tuple[str, ...]  # position = model-parallel rank

    @property
    def mp_size(self) -> int:
        return len(self.files)


def is_sat_checkpoint(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "latest")) or any(
        MP_FILE.match(n) for n in (os.listdir(root) if os.path.isdir(root) else [])
    )


def discover(root: str, tag: Optional[str] = None) -> SatCheckpoint:
    """Resolve `latest` (or an explicit tag) to the iteration folder and its mp_rank files."""
    if not os.path.isdir(root):
        raise CheckpointError(f"checkpoint folder {root} does not exist")
    if tag is None:
        latest = os.path.join(root, "latest")
        if os.path.isfile(latest):
            with open(latest) as f:
                tag = f.read().strip()
            if not tag:
                raise CheckpointError(f"{latest} is empty; it must hold an iteration number or 'release'")
        elif any(MP_FILE.match(n) for n in os.listdir(root)):
            tag = "."  # pointed straight at an iteration folder
        else:
            raise CheckpointError(
                f"{root} has no 'latest' file and no mp_rank_XX_model_states.pt: not a SAT checkpoint "
                f"folder (pass the folder that holds 'latest', or --tag ITERATION)"
            )
    iter_dir = os.path.normpath(os.path.join(root, tag))
    if not os.path.isdir(iter_dir):
        raise CheckpointError(f"{root}/latest names {tag!r} but {iter_dir} does not exist")
    ranks = {}
    for name in os.listdir(iter_dir):
        m = MP_FILE.match(name)
        if m:
            ranks[int(m.group(1))] = os.path.join(iter_dir, name)
    if not ranks:
        raise CheckpointError(f"{iter_dir} holds no mp_rank_XX_model_states.pt file")
    n = max(ranks) + 1
    missing = [f"mp_rank_{r:02d}_model_states.pt" for r in range(n) if r not in ranks]
    if missing:
        raise CheckpointError(
            f"{iter_dir} is missing {missing} (found {len(ranks)} of {n} model-parallel files); "
            f"copy the missing file(s) from the training run"
        )
    ckpt = SatCheckpoint(root, tag, iter_dir, tuple(ranks[r] for r in range(n)))
    _check_model_config(ckpt)
    return ckpt


def _check_model_config(ckpt: SatCheckpoint) -> None:
    path = os.path.join(ckpt.root, "model_config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = json.load(f).get("model_parallel_size")
    if saved is not None and int(saved) != ckpt.mp_size:
        raise CheckpointError(
            f"{path} says model_parallel_size={saved} but {ckpt.iter_dir} holds {ckpt.mp_size} "
            f"mp_rank files; the folder is incomplete or mixes two runs"
        )


def _absent_ok(specs: Mapping[str, TensorSpec], missing: Sequence[str]) -> dict[str, str]:
    """Missing tensors the model can fill itself (SAT's own load tolerates them missing, e.g.
    CogVideoX's sincos table) -> what the model uses instead."""
    return {n: specs[n].if_absent for n in missing if specs[n].if_absent}


def index_files(ckpt: SatCheckpoint, specs: Mapping[str, TensorSpec], mp_ranks: Sequence[int],
                prefix: str = "") -> CheckpointIndex:
    """Index the given mp files: every tensor located, checked against the model's layouts.

    `prefix` is prepended to the model's names to find them in the file (CogVideoX files hold
    `model.diffusion_model.*`). Missing, unexpected and mis-shaped tensors are errors naming the
    file and the tensor.
    """
    index = CheckpointIndex(root=ckpt.root, format="sat", meta={"tag": ckpt.tag, "mp_size": ckpt.mp_size})
    n = ckpt.mp_size
    for r in mp_ranks:
        path = ckpt.files[r]
        size = os.path.getsize(path)
        index.file_sizes[path] = size
        obj = load_structure(path)
        if not isinstance(obj, dict) or "module" not in obj or not isinstance(obj["module"], dict):
            raise CheckpointError(f"{path} has no 'module' state dict (keys: {list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__})")
        module = obj["module"]
        stored_names = {k[len(prefix):] for k in module if k.startswith(prefix)}
        missing = [name for name in specs if name not in stored_names]
        absent = _absent_ok(specs, missing)
        index.meta.setdefault("absent", {}).update(absent)
        missing = [name for name in missing if name not in absent]
        # With a prefix the model is one subtree of the file (CogVideoX: `model.diffusion_model.`);
        # other engine parts a whole-engine training save may hold (T5, VAE) are not its business.
        unexpected = [k for k in module if k.startswith(prefix) and k[len(prefix):] not in specs]
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: the checkpoint and the model config disagree: missing tensors {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected tensors {unexpected[:8]}"
                f"{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)}); check --config / model_config.json"
            )
        for name, spec in specs.items():
            if name in absent:
                continue
            key = prefix + name
            placement = spec.layout.placement(n, r)
            try:
                expected = placement.local_shape(spec.global_shape)
            except ValueError as exc:
                raise CheckpointError(f"{path}: tensor {key!r} cannot have been saved at mp={n}: {exc}") from exc
            stored = locate(path, module[key], key, size)
            if stored.shape != tuple(expected):
                raise CheckpointError(
                    f"{path}: tensor {key!r} has shape {list(stored.shape)} but the model config gives "
                    f"{list(expected)} for mp rank {r} of {n} (full {list(spec.global_shape)}); "
                    f"check --config / model_config.json"
                )
            index.add(Piece(name, stored, tuple(placement.fragments(spec.global_shape))))
    return index


def read_index(root: str, specs: Mapping[str, TensorSpec], tp: int, tp_rank: int, tag: Optional[str] = None,
               prefix: str = "") -> tuple[CheckpointIndex, list[str]]:
    """Discover `root`, index only the mp files this TP rank needs; returns (index, those files)."""
    from ..plan import files_needed  # lazy: plan imports this package's index module

    ckpt = discover(root, tag)
    ranks = files_needed(specs, ckpt.mp_size, tp, tp_rank)
    return index_files(ckpt, specs, ranks, prefix), [ckpt.files[r] for r in ranks]
