"""safetensors output: full tensors under SAT's names, the model config as JSON in each file's
`__metadata__["model_config"]` (what formats/safetensors.py reads back), shards of at most
`--shard-size` bytes with huggingface's index.

Layout as huggingface/transformers `save_pretrained` writes it (huggingface_hub
`split_torch_state_dict_into_shards`): one shard is `model.safetensors` with no index; more are
`model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` =
`{"metadata": {"total_size": N}, "weight_map": {tensor: file}}`. Files are written with the
`safetensors` package (`save_file`, which writes from the tensors' memory, no copy); a shard is the
unit of memory: fetched, written, fsynced, freed. The shards are cut in sorted name order and dealt
to the ranks by `owners`, so the files do not depend on the world size.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from safetensors.torch import save_file

from .base import Fetch, Job, Want, Written, done, owners, pack, write_json

NAME = "safetensors"
BASE = "model"


def shard_names(base: str, n: int) -> list[str]:
    if n == 1:
        return [f"{base}.safetensors"]
    return [f"{base}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_shards(root: str, base: str, wants: Sequence[Want], limit: int, metadata: dict[str, str], fetch: Fetch,
                 rank: int, world: int) -> list[Written]:
    """This rank's shards of `wants` (cut at `limit` bytes) as `root/<base>...safetensors`."""
    shards = pack(wants, limit)
    names = shard_names(base, len(shards))
    out = []
    for shard, rel, owner in zip(shards, names, owners([sum(w.nbytes for w in s) for s in shards], world)):
        if owner != rank:
            continue
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        tensors = fetch(shard)
        save_file({w.name: tensors[w.name] for w in shard}, os.path.join(root, rel), metadata=metadata)
        del tensors
        out.append(done(root, rel))
    return out


def write_index(root: str, base: str, wants: Sequence[Want], limit: int) -> list[Written]:
    """`<base>.safetensors.index.json` when there is more than one shard."""
    shards = pack(wants, limit)
    if len(shards) < 2:
        return []
    where = {w.name: rel for shard, rel in zip(shards, shard_names(base, len(shards))) for w in shard}
    total = sum(w.nbytes for w in wants)
    return [write_json(root, f"{base}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": where})]


def metadata(job: Job) -> dict[str, str]:
    """One key: the safetensors package writes `__metadata__` in its hash map's order, which varies
    between processes, so a second key (huggingface's `"format": "pt"`) would make the bytes vary."""
    return {"model_config": json.dumps({**job.model_config, "model_parallel_size": 1}, sort_keys=True)}


def check(job: Job) -> None:
    """Any model: full tensors under SAT's names."""


def write(job: Job, root: str, fetch: Fetch) -> list[Written]:
    return write_shards(root, BASE, job.wholes(), job.shard_size, metadata(job), fetch, job.rank, job.world)


def finish(job: Job, root: str) -> list[Written]:
    return write_index(root, BASE, job.wholes(), job.shard_size)
