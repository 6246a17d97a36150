"""SAT checkpoints: `<root>/latest` -> `<root>/<iter|release>/mp_rank_XX_model_states.pt`,
weights under `['module']`. File XX of N holds rank XX's TP shard by SAT's split rules, so what a
file holds is known from the model's layouts before it is opened; only the files a rank needs
are opened at all (their `data.pkl` only), and their tensors are located, never loaded.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from ..errors import CheckpointError, ConfigError
from ..index import CheckpointIndex, Piece
from ..placement import TensorSpec, files_needed
from .base import IndexRequest, check_names, check_shape, folder_model_config, split_absent
from .torchfile import iter_tensors, load_structure, locate, tensor_bytes

NAME = "sat"
USES_LATEST = True  # `<root>/latest` names the iteration folder: the loader agrees it once
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


def recognise(root: str, tag: Optional[str] = None) -> bool:
    """A folder with `latest`, or an iteration folder holding mp_rank_XX_model_states.pt."""
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
        raise CheckpointError(f"{root}: the tag {tag!r} (from {root}/latest or --tag) names {iter_dir}, which does not "
                              f"exist; fix 'latest' or pass --tag with an existing iteration folder")
    ranks = {}
    for name in os.listdir(iter_dir):
        m = MP_FILE.match(name)
        if m:
            ranks[int(m.group(1))] = os.path.join(iter_dir, name)
    saved = _saved_mp_size(root)
    if not ranks:
        raise CheckpointError(f"{iter_dir} holds no mp_rank_XX_model_states.pt file"
                              + (f" (model_config.json says model_parallel_size={saved})" if saved else ""))
    n = max(max(ranks) + 1, saved or 0)
    missing = [f"mp_rank_{r:02d}_model_states.pt" for r in range(n) if r not in ranks]
    if missing:
        said = f"; {root}/model_config.json says model_parallel_size={saved}" if saved else ""
        raise CheckpointError(
            f"{iter_dir} is missing {missing} (found {len(ranks)} of {n} model-parallel files{said}); "
            f"copy the missing file(s) from the training run"
        )
    ckpt = SatCheckpoint(root, tag, iter_dir, tuple(ranks[r] for r in range(n)))
    _check_model_config(ckpt)
    return ckpt


# SAT writes `model_config.json` beside `latest`.
model_config = folder_model_config


def _saved_mp_size(root: str) -> Optional[int]:
    """`model_parallel_size` from the folder's model_config.json (None when it does not say)."""
    saved = (model_config(root) or {}).get("model_parallel_size")
    if saved is None:
        return None
    if type(saved) is not int or saved < 1:
        raise CheckpointError(f"{root}/model_config.json: model_parallel_size={saved!r} is not a positive integer")
    return saved


def _check_model_config(ckpt: SatCheckpoint) -> None:
    saved = _saved_mp_size(ckpt.root)
    if saved is not None and saved != ckpt.mp_size:
        raise CheckpointError(
            f"{ckpt.root}/model_config.json says model_parallel_size={saved} but {ckpt.iter_dir} holds "
            f"{ckpt.mp_size} mp_rank files; the folder is incomplete or mixes two runs"
        )


def index_files(ckpt: SatCheckpoint, specs: Mapping[str, TensorSpec], mp_ranks: Sequence[int],
                prefix: str = "", partial: bool = False) -> CheckpointIndex:
    """Index the given mp files: every tensor located, checked against the model's layouts.

    `prefix` is prepended to the model's names to find them in the file (CogVideoX files hold
    `model.diffusion_model.*`). Missing, unexpected and mis-shaped tensors are errors naming the
    file and the tensor. `partial`: `specs` are some of the file's tensors (a LoRA's factors read from a
    whole fine-tune checkpoint), the others are not unexpected.
    """
    index = CheckpointIndex(root=ckpt.root, format="sat", meta={"tag": ckpt.tag, "mp_size": ckpt.mp_size})
    n = ckpt.mp_size
    for r in mp_ranks:
        path = ckpt.files[r]
        size = os.path.getsize(path)
        obj = load_structure(path)
        if not isinstance(obj, dict) or "module" not in obj or not isinstance(obj["module"], dict):
            raise CheckpointError(f"{path} has no 'module' state dict (keys: {list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__})")
        module = obj["module"]
        stored_names = {k[len(prefix):] for k in module if k.startswith(prefix)}
        absent, missing = split_absent(specs, [name for name in specs if name not in stored_names])
        index.meta.setdefault("absent", {}).update(absent)
        # With a prefix the model is one subtree of the file (CogVideoX: `model.diffusion_model.`);
        # other engine parts a whole-engine training save may hold (T5, VAE) are not its business.
        check_names(path, missing, [] if partial else
                    [k for k in module if k.startswith(prefix) and k[len(prefix):] not in specs])
        for name, spec in specs.items():
            if name in absent:
                continue
            key = prefix + name
            stored = locate(path, module[key], key, size)
            check_shape(path, key, stored.shape, spec, r, n)
            index.add(Piece(name, stored, tuple(spec.layout.placement(n, r).fragments(spec.global_shape))))
    return index


def read_index(root: str, specs: Mapping[str, TensorSpec], tp: int, tp_rank: int, tag: Optional[str] = None,
               prefix: str = "", partial: bool = False) -> tuple[CheckpointIndex, list[str]]:
    """Discover `root`, index only the mp files this TP rank needs; returns (index, those files)."""
    ckpt = discover(root, tag)
    ranks = files_needed(specs, ckpt.mp_size, tp, tp_rank)
    return index_files(ckpt, specs, ranks, prefix, partial), [ckpt.files[r] for r in ranks]


def index(req: IndexRequest) -> tuple[CheckpointIndex, list[str]]:
    """The reader interface's entry: this rank's files of a SAT (or ZeRO-0 DeepSpeed) checkpoint."""
    if req.weights == "fp32":
        raise ConfigError(
            f"--weights fp32 reads DeepSpeed ZeRO optimizer partitions, but {req.path} (tag "
            f"{req.tag or 'from latest'}) holds no *_optim_states.pt; drop --weights to load the saved module weights"
        )
    return read_index(req.path, req.specs, req.tp, req.tp_rank, req.tag, req.prefix)


def describe(path: str, tag: Optional[str] = None) -> dict:
    """What each mp file holds, from its `data.pkl` only (`sat-dist inspect`)."""
    ckpt = discover(path, tag)
    files, deepspeed = [], False
    for i, f in enumerate(ckpt.files):
        obj = load_structure(f)
        module = (obj.get("module") or {}) if isinstance(obj, dict) else {}
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in iter_tensors(module)})
        deepspeed = deepspeed or (isinstance(obj, dict) and "param_shapes" in obj)
        files.append({"file": os.path.relpath(f, path), "bytes": os.path.getsize(f), "mp_rank": i,
                      "holds": f"module: {len(module)} tensors, {tensor_bytes(module)} bytes "
                               f"({', '.join(dtypes)}), mp rank {i}'s TP shard",
                      "other_keys": sorted(k for k in obj if k != "module") if isinstance(obj, dict) else []})
    fmt = "deepspeed (ZeRO-0 or no optimizer saved)" if deepspeed else "sat"
    return {"format": fmt, "root": path, "tag": ckpt.tag, "mp_size": ckpt.mp_size,
            "summary": [f"format: {fmt}, mp size {ckpt.mp_size}"], "files": files}
