"""torch.distributed.checkpoint (DCP) output: a folder `torch.distributed.checkpoint.load` reads
into a plain state dict of full tensors (keys: SAT names with the model's prefix), plus SAT's
`model_config.json` beside `.metadata` (formats/dcp.py reads it back, so no --config is needed).

Written by `torch.distributed.checkpoint.save` from every rank of the job (pytorch/pytorch
torch/distributed/checkpoint/state_dict_saver.py, filesystem.py): each rank saves PLAIN FULL
TENSORS, not DTensor shards, and each tensor is saved by exactly one rank (`owners`, balanced by
bytes), so the checkpoint holds every tensor once, as one chunk, whatever the world size; one file
`__<rank>_<n>.distcp` per tensor (see `write`) and `.metadata` from rank 0. `--tp` does not apply.

Streaming: the state dict handed to `save` holds meta-device placeholders (planning needs only
shapes and dtypes); the planner's `resolve_data`, which `FileSystemWriter` calls item by item as
it writes, fetches the real tensor then. Deterministic: `storage_meta` (a random save id and the
temporary folder's path) is left out of `.metadata`.
"""
from __future__ import annotations

import os

import torch

from .base import Fetch, Job, Written, done, owners, write_json

NAME = "dcp"
METADATA = ".metadata"


def _classes():
    from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter

    class LazyPlanner(DefaultSavePlanner):
        """Resolves each write item by fetching its tensor when the storage writer reaches it."""

        def __init__(self, fetch_one):
            super().__init__()
            self.fetch_one = fetch_one

        def resolve_data(self, write_item):
            return self.fetch_one(write_item.index.fqn)

    class Writer(FileSystemWriter):
        def storage_meta(self):
            return None

    return LazyPlanner, Writer


def check(job: Job) -> None:
    """Any model: full tensors under SAT's names."""


def write(job: Job, root: str, fetch: Fetch) -> list[Written]:
    """Collective: every rank calls `save` with the tensors it owns."""
    import torch.distributed.checkpoint as dcp

    wants = job.wholes()
    mine = {w.name: w for w, r in zip(wants, owners([w.nbytes for w in wants], job.world)) if r == job.rank}
    holders = {n: torch.empty(w.shape, dtype=w.dtype, device="meta") for n, w in mine.items()}
    planner_cls, writer_cls = _classes()
    planner = planner_cls(lambda fqn: fetch([mine[fqn]])[fqn])
    # One file per tensor: torch 2.13's FileSystemWriter keeps every tensor of a file referenced until
    # the file is closed (filesystem.py `_write_files_from_queue`, its `tensor_dict`), so one file per
    # rank would hold the rank's whole share in memory.
    writer = writer_cls(root, single_file_per_rank=False, thread_count=1, sync_files=True)
    dcp.save(holders, storage_writer=writer, planner=planner)
    return [done(root, f) for f in sorted(os.listdir(root)) if f.startswith(f"__{job.rank}_")]


def finish(job: Job, root: str) -> list[Written]:
    return [done(root, METADATA), write_json(root, "model_config.json", {**job.model_config, "model_parallel_size": 1})]
