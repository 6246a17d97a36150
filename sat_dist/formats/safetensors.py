"""safetensors checkpoints: one `.safetensors` file, or shards listed by a `*.safetensors.index.json`.

The reader interface of `formats.base`. A file holds FULL (unsplit) tensors under SAT's names (what
`sat-dist convert --to safetensors` writes), so every tensor is one piece replicated over the whole
logical tensor; the planner intersects it with this rank's TP placement and preads only the rows
the rank needs. Headers are validated before use (`safetensors_header`); of a sharded checkpoint
only the shards holding tensors of the model are opened, chosen from the index's `weight_map` alone.
The model description is the header's `__metadata__["model_config"]` (JSON text; for shards, the
first shard's), else a `model_config.json` beside the file.

Format: huggingface/safetensors README ("Format"); sharding: the `*.safetensors.index.json` that
`huggingface_hub.split_torch_state_dict_into_shards` / transformers' `save_pretrained` write.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from ..errors import CheckpointError, ConfigError, MalformedCheckpointError
from ..index import CheckpointIndex, Piece
from ..placement import Replicate, TensorSpec
from .base import IndexRequest, check_names, check_shape, folder_model_config, split_absent
from .safetensors_header import DTYPE_CODES, SafetensorsFile, read_header, read_weight_map

NAME = "safetensors"
SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG_KEY = "model_config"  # __metadata__ key holding the model config as JSON text


@dataclass(frozen=True)
class Source:
    """What a path names: one file (`file`) or an index of shards (`index_json`)."""

    path: str
    file: Optional[str] = None
    index_json: Optional[str] = None

    @property
    def folder(self) -> str:
        return os.path.dirname(os.path.abspath(self.file or self.index_json))


def _index_names(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(INDEX_SUFFIX))


def recognise(path: str, tag: Optional[str] = None) -> bool:
    """A `.safetensors` file, a `*.safetensors.index.json`, or a folder holding `model.safetensors`
    or a `*.safetensors.index.json` (several: `locate` says which to pass)."""
    try:
        if os.path.isdir(path):
            return os.path.isfile(os.path.join(path, SINGLE)) or bool(_index_names(path))
        return os.path.isfile(path) and path.endswith((SUFFIX, INDEX_SUFFIX))
    except OSError:
        return False


def locate(path: str) -> Source:
    """The file or index `path` names; a folder's `model.safetensors` wins over an index (as in
    transformers), and a folder with several indexes must be told which."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, SINGLE)):
            return Source(path, file=os.path.join(path, SINGLE))
        names = _index_names(path)
        if len(names) == 1:
            return Source(path, index_json=os.path.join(path, names[0]))
        if names:
            raise CheckpointError(f"{path} holds {len(names)} safetensors indexes {names}: pass the one to load")
        raise CheckpointError(f"{path} holds neither {SINGLE} nor a *{INDEX_SUFFIX}: not a safetensors checkpoint")
    if not os.path.isfile(path):
        raise CheckpointError(f"safetensors checkpoint {path} does not exist")
    if path.endswith(INDEX_SUFFIX):
        return Source(path, index_json=path)
    if path.endswith(SUFFIX):
        return Source(path, file=path)
    raise CheckpointError(f"{path} is neither a *{SUFFIX} file nor a *{INDEX_SUFFIX}")


def refuse_tag(path: str, tag: Optional[str]) -> None:
    if tag is not None:
        raise ConfigError(f"--tag {tag!r} picks an iteration folder of a SAT or DeepSpeed checkpoint, but {path} is "
                          f"a safetensors checkpoint, which has none; drop --tag")


def shard_map(src: Source) -> tuple[dict[str, str], list[str]]:
    """(tensor name -> file, files in order) from the index alone, or the one file's header."""
    if src.file:
        return {}, [src.file]
    where = read_weight_map(src.index_json)
    return where, sorted(set(where.values()))


def index(req: IndexRequest) -> tuple[CheckpointIndex, list[str]]:
    """This rank's pieces: the full stored tensors of the model, from the shards holding them."""
    if req.weights == "fp32":
        raise ConfigError(f"--weights fp32 selects DeepSpeed ZeRO fp32 master partitions, but {req.path} is a "
                          f"safetensors checkpoint holding only the weights; drop --weights")
    refuse_tag(req.path, req.tag)
    src = locate(req.path)
    where, files = shard_map(src)
    headers: dict[str, SafetensorsFile] = {}
    if src.file:
        headers[src.file] = read_header(src.file)
        where = dict.fromkeys(headers[src.file].tensors, src.file)
    p, named_in = req.prefix, src.index_json or src.file
    stored = {k[len(p):] for k in where if k.startswith(p)}
    absent, missing = split_absent(req.specs, [n for n in req.specs if n not in stored])
    check_names(named_in, missing, [k for k in where if k.startswith(p) and k[len(p):] not in req.specs])
    holding = {where[p + n] for n in req.specs if n not in absent}
    needed = [f for f in files if f in holding]
    idx = CheckpointIndex(root=req.path, format=NAME, meta={"tag": None, "mp_size": 1, "absent": absent,
                                                            "files": len(needed), "files_total": len(files)})
    for name, spec in req.specs.items():
        if name not in absent:
            idx.add(full_piece(name, p + name, spec, where, headers, src.index_json))
    return idx, needed


def full_piece(name: str, key: str, spec: TensorSpec, where: dict[str, str], headers: dict[str, SafetensorsFile],
               index_json: Optional[str]) -> Piece:
    """Stored tensor `key` (in file `where[key]`; its header read once into `headers`) as one full
    piece of the model's tensor `name`, its shape checked against `spec`."""
    path = where[key]
    if path not in headers:
        headers[path] = read_header(path)
    st = headers[path].tensors.get(key)
    if st is None:
        raise MalformedCheckpointError(
            f"{index_json}: weight_map puts tensor {key!r} in {path}, whose header has no such tensor; "
            f"the index and the shards come from different saves: copy them again together"
        )
    check_shape(path, key, st.shape, spec, 0, 1)
    return Piece(name, st, tuple(Replicate().fragments(spec.global_shape)))


def _config_from_metadata(path: str, meta: dict[str, str]) -> Optional[dict]:
    text = meta.get(CONFIG_KEY)
    if text is None:
        return None
    try:
        cfg = json.loads(text)
    except ValueError as exc:
        raise MalformedCheckpointError(f"{path}: __metadata__[{CONFIG_KEY!r}] is not valid JSON ({exc}); "
                                       f"re-save the file, or pass --config") from exc
    if not isinstance(cfg, dict):
        raise MalformedCheckpointError(f"{path}: __metadata__[{CONFIG_KEY!r}] is a JSON {type(cfg).__name__}, not "
                                       f"an object of SAT model arguments; re-save the file, or pass --config")
    return cfg


def model_config(path: str) -> Optional[dict]:
    """The model config the checkpoint carries: header metadata (sharded: the first shard's), else
    `model_config.json` beside the file or index, else None."""
    src = locate(path)
    _, files = shard_map(src)
    if files:
        cfg = _config_from_metadata(files[0], read_header(files[0]).metadata)
        if cfg is not None:
            return cfg
    return folder_model_config(src.folder)


def describe(path: str, tag: Optional[str] = None) -> dict:
    """Tensors, dtypes, bytes and metadata keys of every file, from the headers only."""
    refuse_tag(path, tag)
    src = locate(path)
    where, files = shard_map(src)
    headers = [read_header(f) for f in files]
    rows, dtypes, keys, tensors, data = [], set(), set(), 0, 0
    for h in headers:
        ds = sorted({DTYPE_CODES[t.dtype] for t in h.tensors.values()})
        dtypes.update(ds)
        keys.update(h.metadata)
        tensors += len(h.tensors)
        data += h.data_bytes()
        rows.append({"file": os.path.relpath(h.path, src.folder), "bytes": h.size, "tensors": len(h.tensors),
                     "dtypes": ds, "metadata_keys": sorted(h.metadata),
                     "holds": f"{len(h.tensors)} tensors, {h.data_bytes():,} data bytes ({', '.join(ds) or 'none'})"})
    layout = f"{len(files)} shards listed by {os.path.basename(src.index_json)}" if src.index_json else "1 file"
    summary = [f"format: safetensors, {tensors} tensors in {layout}, full (unsplit) tensors",
               f"dtypes: {', '.join(sorted(dtypes)) or 'none'}; tensor data {data:,} bytes",
               f"metadata keys: {', '.join(sorted(keys)) or 'none'}"]
    if where and len(where) != tensors:
        summary.append(f"note: the index names {len(where)} tensors, the shards' headers hold {tensors}")
    return {"format": NAME, "root": path, "tag": None, "summary": summary, "files": rows, "tensors": tensors,
            "dtypes": sorted(dtypes), "data_bytes": data, "metadata_keys": sorted(keys),
            "index": os.path.basename(src.index_json) if src.index_json else None}
