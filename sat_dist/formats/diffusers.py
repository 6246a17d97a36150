"""diffusers' CogVideoX transformer folders, loaded into SAT's DiT at any TP size.

A folder written by `CogVideoXTransformer3DModel.save_pretrained` (the `transformer/` of the
released CogVideoX-2b/-5b/-5b-I2V/1.5-5b/1.5-5b-I2V pipelines): `config.json` plus
`diffusion_pytorch_model.safetensors`, or shards listed by `diffusion_pytorch_model.safetensors.index.json`
(`--tag fp16` picks diffusers' `variant` files, `diffusion_pytorch_model.fp16.safetensors`). The
pipeline root (holding `transformer/config.json`) is accepted too.

The model config comes from `config.json` alone (`diffusers_map.sat_model_config`): no YAML. Each
stored tensor becomes a Piece under its SAT name whose fragments are the boxes of SAT's tensor it
holds (`diffusers_map.sources`), so a rank's plan reads only its own rows of `to_q`/`to_k`/`to_v`
and of the `norm1`/`norm2` adaLN linears; nothing is copied or re-fused in memory. The names in
the files are diffusers' own: the SAT prefix (`model.diffusion_model.`) of the request is not used.
Headers are validated by `safetensors_header`; of a sharded folder only the shards holding tensors
this rank needs are opened, chosen from the index's weight map alone.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Mapping, Optional

from ..errors import CheckpointError, ConfigError, MalformedCheckpointError
from ..index import CheckpointIndex, Piece
from ..placement import TensorSpec
from .base import IndexRequest, split_absent
from .diffusers_map import CLASS_NAME, Source, sat_model_config, sources, variant_name
from .safetensors_header import DTYPE_CODES, SafetensorsFile, read_header, read_weight_map

NAME = "diffusers"
CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model"
SUBFOLDER = "transformer"  # where a pipeline root keeps it (model_index.json's "transformer")


def _class_of(folder: str) -> Optional[str]:
    """config.json's `_class_name`, or None (no folder, no file, not JSON): never raises."""
    try:
        with open(os.path.join(folder, CONFIG)) as f:
            cfg = json.load(f)
        return cfg.get("_class_name") if isinstance(cfg, dict) else None
    except (OSError, ValueError):
        return None


def root_of(path: str) -> Optional[str]:
    """The transformer folder `path` names: itself, or a pipeline root's `transformer/`."""
    if not os.path.isdir(path):
        return None
    for folder in (path, os.path.join(path, SUBFOLDER)):
        if _class_of(folder) == CLASS_NAME:
            return folder
    return None


def recognise(path: str, tag: Optional[str] = None) -> bool:
    """A folder whose config.json names CogVideoXTransformer3DModel, or a pipeline root holding one."""
    return root_of(path) is not None


def _root(path: str) -> str:
    root = root_of(path)
    if root is None:
        raise CheckpointError(f"{path}: no {CONFIG} naming {CLASS_NAME} here or in {SUBFOLDER}/; "
                              f"pass the diffusers transformer folder")
    return root


def read_config(root: str) -> dict:
    path = os.path.join(root, CONFIG)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def model_config(path: str) -> dict:
    """The SAT-layout DiT model config, from the folder's config.json alone."""
    root = _root(path)
    return sat_model_config(read_config(root), os.path.join(root, CONFIG))


def weight_files(root: str, tag: Optional[str] = None) -> tuple[Optional[dict[str, str]], list[str], str]:
    """(tensor -> shard from the index, or None for one file; the files; the file or index named).
    As diffusers' from_pretrained: the index first, then the single file; `tag` is the variant."""
    variant = f".{tag}" if tag else ""
    index_json = os.path.join(root, f"{WEIGHTS}.safetensors.index{variant}.json")
    single = os.path.join(root, f"{WEIGHTS}{variant}.safetensors")
    if os.path.isfile(index_json):
        where = read_weight_map(index_json)
        return where, sorted(set(where.values())), index_json
    if os.path.isfile(single):
        return None, [single], single
    present = sorted(n for n in os.listdir(root) if n.startswith(WEIGHTS))
    hint = ("; pickled .bin weights are not read: re-save with save_pretrained(..., safe_serialization=True)"
            if any(n.endswith(".bin") for n in present) else "")
    raise CheckpointError(f"{root}: no {os.path.basename(index_json)} or {os.path.basename(single)} "
                          f"(variant {tag!r}; found {present or 'no weight files'}){hint}")


def _names(names: list[str]) -> str:
    return f"{names[:8]}{' ...' if len(names) > 8 else ''} ({len(names)})"


def _sources(specs: Mapping[str, TensorSpec]) -> dict[str, list[Source]]:
    out, alien = {}, []
    for name, spec in specs.items():
        srcs = sources(name, spec.global_shape)
        if srcs is None:
            alien.append(name)
        else:
            out[name] = srcs
    if alien:
        raise ConfigError(f"the model has tensors a diffusers {CLASS_NAME} never holds: {_names(alien)} "
                          f"(options no released CogVideoX uses, or not a CogVideoX DiT config)")
    return out


def _check_names(named_in: str, root: str, where: Mapping[str, str], plan: dict[str, list[Source]],
                 specs: Mapping[str, TensorSpec]) -> dict[str, str]:
    """Absent tensors the model fills itself; missing or unexpected diffusers tensors are one error."""
    none_stored = [n for n, srcs in plan.items() if not any(s.name in where for s in srcs)]
    absent, missing = split_absent(specs, none_stored)
    lacking = [s.name for n, srcs in plan.items() if n not in absent for s in srcs if s.name not in where]
    lacking += [f"{n} (diffusers never stores it)" for n in missing if not plan[n]]
    expected = {s.name for srcs in plan.values() for s in srcs}
    unexpected = sorted(k for k in where if k not in expected)
    if lacking or unexpected:
        parts = ([f"missing tensors {_names(lacking)}"] if lacking else []) + (
            [f"unexpected tensors {_names(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{named_in}: the weights and the model config disagree: {', '.join(parts)}; "
                              f"the config comes from {os.path.join(root, CONFIG)} (and any --config / overrides)")
    return absent


def _needed(src: Source, mine) -> bool:
    return any(a.logical.intersect(b.logical) for a in src.fragments for b in mine)


def index(req: IndexRequest) -> tuple[CheckpointIndex, list[str]]:
    """This rank's pieces: every stored tensor holding rows of its shard, under SAT's names."""
    if req.weights == "fp32":
        raise ConfigError(f"--weights fp32 selects DeepSpeed ZeRO fp32 master partitions, but {req.path} is a "
                          f"diffusers folder holding only the weights; drop --weights")
    root = _root(req.path)
    where, files, named_in = weight_files(root, req.tag)
    headers: dict[str, SafetensorsFile] = {}
    if where is None:
        headers[files[0]] = read_header(files[0])
        where = dict.fromkeys(headers[files[0]].tensors, files[0])
    plan = _sources(req.specs)
    absent = _check_names(named_in, root, where, plan, req.specs)
    todo = []
    for name, srcs in plan.items():
        if name in absent:
            continue
        spec = req.specs[name]
        mine = spec.placement(req.tp, req.tp_rank).fragments(spec.global_shape)
        todo += [(name, s) for s in srcs if _needed(s, mine)]
    needed = sorted({where[s.name] for _, s in todo})
    idx = CheckpointIndex(root=root, format=NAME, meta={"tag": req.tag, "mp_size": 1, "absent": absent,
                                                        "files": len(needed), "files_total": len(files)})
    for name, src in todo:
        path = where[src.name]
        if path not in headers:
            headers[path] = read_header(path)
        stored = headers[path].tensors.get(src.name)
        if stored is None:
            raise MalformedCheckpointError(f"{named_in}: weight_map puts tensor {src.name!r} in {path}, whose header "
                                           f"has no such tensor; copy the index and its shards again together")
        if tuple(stored.shape) != src.shape:
            raise CheckpointError(f"{path}: tensor {src.name!r} has shape {list(stored.shape)} but the model config "
                                  f"({os.path.join(root, CONFIG)}) gives {list(src.shape)} (SAT's {name!r} "
                                  f"{list(req.specs[name].global_shape)})")
        idx.add(Piece(name, stored, src.fragments))
    # diffusers keeps 5B-I2V's learned pos_embedding as a float64 buffer, so an fp32 save holds one F64
    # tensor (its forward casts it). Without --dtype, load everything in the weights' dtype, as it does.
    counts = Counter(p.stored.dtype for pieces in idx.pieces.values() for p in pieces)
    if len(counts) > 1:
        idx.meta["default_dtype"] = counts.most_common(1)[0][0]
    return idx, needed


def describe(path: str, tag: Optional[str] = None) -> dict:
    """Class, variant, the SAT model config it loads as, and each file's tensors, from headers only."""
    root = _root(path)
    cfg = read_config(root)
    where, files, named_in = weight_files(root, tag)
    rows, dtypes, tensors, data = [], set(), 0, 0
    for h in (read_header(f) for f in files):
        ds = sorted({DTYPE_CODES[t.dtype] for t in h.tensors.values()})
        dtypes.update(ds)
        tensors += len(h.tensors)
        data += h.data_bytes()
        rows.append({"file": os.path.relpath(h.path, root), "bytes": h.size, "tensors": len(h.tensors), "dtypes": ds,
                     "holds": f"{len(h.tensors)} tensors, {h.data_bytes():,} data bytes ({', '.join(ds) or 'none'})"})
    try:
        sat_cfg, note = sat_model_config(cfg, os.path.join(root, CONFIG)), None
    except ConfigError as exc:
        sat_cfg, note = None, f"not loadable: {exc}"
    summary = [f"format: diffusers {CLASS_NAME} ({variant_name(cfg)}), {tensors} tensors in "
               f"{len(files)} file(s) via {os.path.basename(named_in)}",
               f"dtypes: {', '.join(sorted(dtypes)) or 'none'}; tensor data {data:,} bytes"]
    if sat_cfg:
        summary.append(f"loads as SAT DiffusionTransformer: {sat_cfg['num_layers']} layers, hidden "
                       f"{sat_cfg['hidden_size']}, {sat_cfg['num_attention_heads']} heads, patch "
                       f"{sat_cfg['patch_size']}, in/out channels {sat_cfg['in_channels']}/{sat_cfg['out_channels']}")
    return {"format": NAME, "root": root, "tag": tag, "summary": summary + ([note] if note else []), "files": rows,
            "tensors": tensors, "dtypes": sorted(dtypes), "data_bytes": data, "class": cfg.get("_class_name"),
            "diffusers_version": cfg.get("_diffusers_version"), "model_config": sat_cfg}
