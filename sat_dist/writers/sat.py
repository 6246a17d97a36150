"""SAT output at model-parallel size M (`--tp`), loadable by SAT itself: `latest` (the iteration),
`model_config.json` (model_parallel_size=M) and `<iteration>/mp_rank_XX_model_states.pt` =
`torch.save({'module': shard})`, each shard cut by the model's layouts (SAT's split:
THUDM/SwissArmyTransformer sat/mpu/layers.py `partition`, the rules of sat_dist/writer.py
`shard_state_dict`); the layout THUDM/SwissArmyTransformer sat/training/model_io.py
`save_checkpoint` writes and `load_checkpoint` reads.

An mp file is written one tensor at a time, byte for byte what `torch.save` writes (a test checks
it): torch's own pickler and zip writer (`torch.serialization._save`, pytorch/pytorch
torch/serialization.py) run over placeholder tensors of the right shapes (allocated, never touched:
no resident memory), and each `data/<key>` record is filled, as the writer reaches it, with the
tensor `fetch` returns, which is dropped right after. File r of M is written by rank `owners(...)[r]`.
"""
from __future__ import annotations

import os
import pickle
from typing import Sequence

import torch

from .base import Fetch, Job, Want, Written, done, owners, write_json, write_text

NAME = "sat"


def mp_file(job: Job, r: int) -> str:
    return os.path.join(job.iteration, f"mp_rank_{r:02d}_model_states.pt")


def file_wants(job: Job, r: int) -> list[Want]:
    """Model-parallel rank r's shard of every tensor, under its SAT-layout key."""
    return [Want(job.prefix + n, n, s.global_shape, s.layout.placement(job.tp, r), job.dtypes[n])
            for n, s in job.specs.items()]


class _Fill:
    """Stands in for torch's PyTorchFileWriter inside `torch.serialization._save`: every record
    passes through, but a `data/<key>` record of a placeholder storage is written from the real
    tensor, fetched just then."""

    def __init__(self, zip_file, owner: dict[int, Want], fetch: Fetch):
        self.zip_file, self.owner, self.fetch = zip_file, owner, fetch

    def write_record(self, name: str, data, size: int) -> None:
        want = self.owner.get(data._cdata) if isinstance(data, torch.UntypedStorage) else None
        if want is None:
            self.zip_file.write_record(name, data, size)
            return
        storage = self.fetch([want])[want.name].contiguous().untyped_storage()
        if storage.nbytes() != size:
            raise AssertionError(f"{want.name}: {storage.nbytes()} bytes fetched for a {size}-byte record")
        self.zip_file.write_record(name, storage, size)


def save_streaming(path: str, wants: Sequence[Want], fetch: Fetch) -> None:
    """`torch.save({'module': {w.name: tensor}}, path)` holding one tensor in memory at a time."""
    holders = {w.name: torch.empty(w.shape, dtype=w.dtype) for w in wants}
    owner = {holders[w.name].untyped_storage()._cdata: w for w in wants}
    with torch.serialization._open_zipfile_writer(path) as zip_file:
        torch.serialization._save({"module": holders}, _Fill(zip_file, owner, fetch), pickle,
                                  torch.serialization.DEFAULT_PROTOCOL, False)


def check(job: Job) -> None:
    """The TP check (heads, MLP width, vocabulary) is the model family's (convert.py)."""


def write(job: Job, root: str, fetch: Fetch) -> list[Written]:
    files = [file_wants(job, r) for r in range(job.tp)]
    out = []
    for r, owner in enumerate(owners([sum(w.nbytes for w in f) for f in files], job.world)):
        if owner == job.rank:
            rel = mp_file(job, r)
            os.makedirs(os.path.join(root, job.iteration), exist_ok=True)
            save_streaming(os.path.join(root, rel), files[r], fetch)
            out.append(done(root, rel))
    return out


def finish(job: Job, root: str) -> list[Written]:
    return [write_json(root, "model_config.json", {**job.model_config, "model_parallel_size": job.tp}),
            write_text(root, "latest", job.iteration)]
