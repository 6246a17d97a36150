"""What every output format's writer shares: the output tensors (`Want`), the job, and the file
mechanics (shard packing, which rank writes what, fsync).

A writer is one module in `writers/` exposing:

- `NAME: str` — the `--to` value;
- `check(job)` — refuse, with a ConfigError, a job the format cannot hold, before any byte is read;
- `write(job, root, fetch) -> list[Written]` — this rank's part of the output, under `root` (the
  temporary folder `convert` renames at the end);
- `finish(job, root) -> list[Written]` — rank 0, after every rank's `write`: the small files that
  make the folder complete (`latest`, an index, a config).

Writers never read a checkpoint: `fetch(wants)` (convert.py: `make_plan` + `materialize` for just
those tensors) returns them, and a writer drops them once written, so a rank holds at most one
output tensor (SAT, DCP) or one output shard file (safetensors) at a time. Every choice here is a
pure function of the job, so every rank and every world size computes the same files.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

import torch

from ..errors import ConfigError
from ..placement import Fragment, Placement, Replicate, TensorSpec

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Boxes:
    """A placement given by its fragments: the boxes of a model tensor an output tensor of `shape`
    holds, and where (diffusers' `to_q` rows, `norm1.linear`'s two chunk pairs)."""

    shape: Shape
    frags: tuple[Fragment, ...]

    def local_shape(self, _full: Shape) -> Shape:
        return self.shape

    def fragments(self, _full: Shape) -> list[Fragment]:
        return list(self.frags)


@dataclass(frozen=True)
class Want:
    """One output tensor: `name` in the output, cut by `place` from model tensor `source` (full
    shape `global_shape`), written as `dtype`. It has TensorSpec's two planning members
    (`global_shape`, `placement`), so `make_plan` plans it like any model tensor."""

    name: str
    source: str
    global_shape: Shape
    place: Union[Placement, Boxes]
    dtype: torch.dtype

    def placement(self, _tp: int = 1, _tp_rank: int = 0) -> Union[Placement, Boxes]:
        return self.place

    @property
    def shape(self) -> Shape:
        return tuple(self.place.local_shape(self.global_shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


Fetch = Callable[[Sequence[Want]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Job:
    """One conversion as every writer sees it (the same on every rank but `rank`)."""

    specs: Mapping[str, TensorSpec]  # full (TP=1) specs of the model tensors the source holds, sorted by name
    dtypes: Mapping[str, torch.dtype]  # the dtype each is written in
    prefix: str  # key prefix of SAT-layout outputs (CogVideoX: `model.diffusion_model.`)
    model_config: dict  # SAT-layout model config, without model_parallel_size
    tp: int = 1  # model-parallel size of a SAT output
    shard_size: int = 5 * 10**9  # largest safetensors shard, bytes
    iteration: str = "1"  # SAT's iteration folder
    rank: int = 0
    world: int = 1

    def whole(self, name: str) -> Want:
        """Model tensor `name`, whole, under its SAT-layout key."""
        return Want(self.prefix + name, name, self.specs[name].global_shape, Replicate(), self.dtypes[name])

    def wholes(self) -> list[Want]:
        return [self.whole(n) for n in self.specs]


@dataclass(frozen=True)
class Written:
    file: str  # relative to the output folder
    bytes: int


def owners(sizes: Sequence[int], world: int) -> list[int]:
    """Which rank writes each item: largest first, each to the least-loaded rank (ties: the lower
    rank, the earlier item). Deterministic, so every rank agrees without talking."""
    load = [0] * world
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += sizes[i]
    return out


def pack(wants: Sequence[Want], limit: int) -> list[list[Want]]:
    """Consecutive groups of at most `limit` bytes, in order (a larger tensor is a group alone):
    huggingface_hub's split_torch_state_dict_into_shards rule."""
    groups: list[list[Want]] = [[]]
    size = 0
    for w in wants:
        if groups[-1] and size + w.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(w)
        size += w.nbytes
    return groups if groups[0] else []


def fsync_path(path: str) -> None:
    """Flush a written file (or a folder's entries) to storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def done(root: str, rel: str) -> Written:
    """`rel` is complete: fsync it and say how big it is."""
    path = os.path.join(root, rel)
    fsync_path(path)
    return Written(rel, os.path.getsize(path))


def write_text(root: str, rel: str, text: str) -> Written:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return done(root, rel)


def write_json(root: str, rel: str, obj: dict) -> Written:
    """Deterministic JSON: sorted keys, two-space indent, a final newline."""
    return write_text(root, rel, json.dumps(obj, indent=2, sort_keys=True) + "\n")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: Union[str, int]) -> int:
    """`5GB` -> 5 * 10**9, `500MiB` -> 500 * 2**20, `1024` -> 1024 (huggingface_hub's units)."""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise ConfigError(f"--shard-size {text!r}: write a size like 5GB, 500MB or 2GiB")
        size = int(float(m[1]) * _UNITS[(m[2] or "").lower()])
    if size < 1:
        raise ConfigError(f"--shard-size must be positive, got {text!r}")
    return size


def publish(tmp: str, dst: str, force: bool, files: bool = False) -> None:
    """fsync every folder of `tmp` (and, with `files`, every file in it), then rename it to `dst`. With
    `force`, an existing `dst` is moved aside first and removed only after the rename (put back if the
    rename fails). convert's outputs and the LoRA exports appear complete or not at all."""
    for folder, _, names in os.walk(tmp):
        for n in names if files else ():
            fsync_path(os.path.join(folder, n))
        fsync_path(folder)
    old = None
    if os.path.lexists(dst):
        if not force:
            raise ConfigError(f"{dst} appeared while converting: pass --force to replace it")
        old = f"{tmp}.old"
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if old:
            os.rename(old, dst)
        raise
    fsync_path(os.path.dirname(os.path.abspath(dst)))
    if old:
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
