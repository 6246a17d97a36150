"""DeepSpeed ZeRO-1/2/3 checkpoints, read without DeepSpeed and without `zero_to_fp32`.

Layout (FORMATS.md sections 1-2, checked against files written by DeepSpeed 0.19.8):

- `<root>/latest` names the tag folder, e.g. `global_step1000` (SAT: the iteration number).
- ZeRO-1/2: `mp_rank_XX_model_states.pt['module']` holds the complete weights in the training dtype;
  `[bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt` holds dp rank D's slice of the fp32 master
  weights: per param group, the trainable params (in `param_shapes` order, which already reflects
  `round_robin_gradients`) are concatenated, padded to a multiple of 2*dp and cut into dp equal
  slices; rank D saves its slice with its tail padding stripped (BF16_Optimizer keeps it).
- ZeRO-3: `zero_pp_rank_D_mp_rank_XX_model_states.pt` hold size-0 placeholders, buffers and the
  frozen params' partitions; the trainable weights exist only in the optim files' `fp32_flat_groups`,
  every param partitioned on its own: q = ceil(numel/dp), rank D holds flat elements [D*q, (D+1)*q).

A ZeRO flat partition holding elements [a, b) of a flattened param becomes, through
`flat_range_boxes`, a few Pieces whose StoredTensor is the box (contiguous) at the file offset of
the box's first element. The planner and materializer then treat them like any other checkpoint:
each rank reads only the byte ranges overlapping its TP shard; the Adam moments (exp_avg,
exp_avg_sq: 2/3 of an optim file) are never touched. Only `data.pkl` of each file is unpickled,
with weights_only=True (DeepSpeed's own classes come from `ds_pickle` stubs), and deepspeed is
never imported.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

from ..errors import CheckpointError, ConfigError
from ..models.layers import TensorSpec
from ..placement import Box, Fragment, flat_range_boxes
from . import ds_pickle  # noqa: F401  (registers the DeepSpeed stubs as allowed pickle globals)
from . import sat as _sat
from .index import CheckpointIndex, Piece
from .torchfile import StoredTensor, iter_tensors, load_structure, locate

OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
Z3_MODEL_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
MP_MODEL_FILE = _sat.MP_FILE
UNSUPPORTED_FILES = (
    (re.compile(r"^layer_\d+-model_\d+-model_states\.pt$"), "pipeline-parallel (PipelineModule layer files)"),
    (re.compile(r"^(layer_\d+_)?expert_\d+_mp_rank_\d+_model_states\.pt$"), "MoE expert-parallel"),
    (re.compile(r"^expp_rank_\d+_mp_rank_\d+_optim_states\.pt$"), "MoE expert-parallel"),
)
WEIGHTS = ("auto", "module", "fp32")
ZERO_STAGE_NAMES = {1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}


# --- discovery -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeepSpeedCheckpoint:
    """The files of one DeepSpeed tag folder, by model-parallel rank and data-parallel rank."""

    root: str
    tag: str
    tag_dir: str
    bf16: bool  # optim files carry the `bf16_` prefix: the run trained in bf16
    zero3: bool  # per-dp-rank model_states files: weights are partitioned
    optim_files: tuple[tuple[str, ...], ...]  # [mp][dp]
    model_files: tuple[tuple[str, ...], ...]  # [mp][dp] under ZeRO-3, [mp][0] (mp_rank_XX) otherwise

    @property
    def mp_size(self) -> int:
        return len(self.optim_files)

    @property
    def dp_size(self) -> int:
        return len(self.optim_files[0])


def _resolve_tag(root: str, tag: Optional[str]) -> Optional[tuple[str, str]]:
    if tag is not None:
        return tag, os.path.normpath(os.path.join(root, tag))
    latest = os.path.join(root, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            name = f.read().strip()
        return (name, os.path.normpath(os.path.join(root, name))) if name else None
    return ".", os.path.normpath(root)  # pointed straight at a tag folder


def discover(root: str, tag: Optional[str] = None) -> Optional[DeepSpeedCheckpoint]:
    """The DeepSpeed ZeRO layout of `root` (or its `latest` tag), or None when `root` holds no ZeRO
    files (a SAT or ZeRO-0 folder: the SAT reader's job). Missing or inconsistent files are errors."""
    if not os.path.isdir(root):
        return None
    resolved = _resolve_tag(root, tag)
    if resolved is None or not os.path.isdir(resolved[1]):
        return None
    tag, tag_dir = resolved
    names = sorted(os.listdir(tag_dir))
    optim: dict[int, dict[int, str]] = {}
    z3: dict[int, dict[int, str]] = {}
    mp_files: dict[int, str] = {}
    prefixes: set[str] = set()
    for name in names:
        path = os.path.join(tag_dir, name)
        if m := OPTIM_FILE.match(name):
            prefixes.add(m.group(1) or "")
            optim.setdefault(int(m.group(3)), {})[int(m.group(2))] = path
        elif m := Z3_MODEL_FILE.match(name):
            z3.setdefault(int(m.group(2)), {})[int(m.group(1))] = path
        elif m := MP_MODEL_FILE.match(name):
            mp_files[int(m.group(1))] = path
    if not optim and not z3:
        return None
    for pattern, what in UNSUPPORTED_FILES:
        found = [n for n in names if pattern.match(n)]
        if found:
            raise CheckpointError(
                f"{tag_dir} is a {what} DeepSpeed checkpoint ({found[0]} ...); sat_dist reads dense ZeRO-1/2/3 "
                f"checkpoints only: convert it with DeepSpeed's ds_to_universal.py or zero_to_fp32.py first"
            )
    if len(prefixes) > 1:
        raise CheckpointError(
            f"{tag_dir} mixes bf16_zero_pp_rank_* and zero_pp_rank_* optimizer files: two runs were saved into "
            f"the same tag folder; keep only the files of one run"
        )
    if z3 and mp_files:
        raise CheckpointError(
            f"{tag_dir} holds both ZeRO-3 (zero_pp_rank_*_model_states.pt) and ZeRO-1/2 (mp_rank_XX_model_states.pt) "
            f"files: two runs were saved into the same tag folder; keep only the files of one run"
        )
    if not optim:
        raise CheckpointError(
            f"{tag_dir} holds ZeRO-3 model states but no *_optim_states.pt: under ZeRO-3 the weights exist only in "
            f"the optimizer partitions (SAT's no-optimizer save and save_checkpoint(exclude optimizer) drop them); "
            f"copy the *_optim_states.pt files of this tag from the training run"
        )
    prefix = prefixes.pop()
    mp_size = max(optim) + 1
    dp_size = max(max(d) + 1 for d in optim.values())
    missing = [f"{prefix}zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt"
               for m in range(mp_size) for d in range(dp_size) if d not in optim.get(m, {})]
    if z3:
        missing += [f"zero_pp_rank_{d}_mp_rank_{m:02d}_model_states.pt"
                    for m in range(mp_size) for d in range(dp_size) if d not in z3.get(m, {})]
    else:
        missing += [f"mp_rank_{m:02d}_model_states.pt" for m in range(mp_size) if m not in mp_files]
    if missing:
        raise CheckpointError(
            f"{tag_dir} is missing partition file(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} "
            f"(found optimizer partitions for dp ranks "
            f"{sorted(set(d for v in optim.values() for d in v))} of {dp_size}): a rank did not finish saving or "
            f"the folder was copied incompletely; copy the missing file(s) from the training run"
        )
    optim_files = tuple(tuple(optim[m][d] for d in range(dp_size)) for m in range(mp_size))
    if z3:
        model_files = tuple(tuple(z3[m][d] for d in range(dp_size)) for m in range(mp_size))
    else:
        model_files = tuple((mp_files[m],) for m in range(mp_size))
    return DeepSpeedCheckpoint(root, tag, tag_dir, prefix == "bf16_", bool(z3), optim_files, model_files)


# --- reading the pickles (data.pkl only) ---------------------------------------------------------

def _load(path: str, what: str) -> dict:
    """`load_structure` with the file's role in the message (truncated / unknown global / ...)."""
    try:
        obj = load_structure(path)
    except CheckpointError as exc:
        hint = "" if "allow-list" in str(exc) else "; if the file is truncated or corrupt, copy it again from the training run"
        raise CheckpointError(f"{what}: {exc}{hint}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path} holds a {type(obj).__name__}, not a DeepSpeed checkpoint dict; "
                              f"pass the folder of a DeepSpeed save (the one holding 'latest')")
    return obj


def _optim_state(path: str, dp_rank: int) -> dict:
    obj = _load(path, f"optimizer partition file of dp rank {dp_rank}")
    osd = obj.get("optimizer_state_dict")
    if not isinstance(osd, dict):
        raise CheckpointError(f"{path} has no 'optimizer_state_dict' (keys {sorted(obj)[:10]}): not a ZeRO "
                              f"optimizer file; remove stray *_optim_states.pt files from the tag folder")
    return osd


def _stage_of(osd: Mapping, path: str) -> int:
    """1, 2 or 3; BF16_Optimizer files (no `zero_stage`) count as 1: same flat layout, padding kept."""
    stage = osd.get("zero_stage")
    if stage is None:
        if "single_partition_of_fp32_groups" in osd:
            return 1
        raise CheckpointError(f"{path}: no 'zero_stage' and no fp32 partitions: not a ZeRO optimizer file; "
                              f"load the module weights instead (--weights module)")
    stage = int(stage)
    if stage not in (1, 2, 3):
        raise CheckpointError(f"{path}: zero_stage={stage} has no fp32 partitions to read; load the module "
                              f"weights instead (--weights module)")
    return stage


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


def _compose(box: Box, saved: Sequence[Fragment]) -> tuple[Fragment, ...]:
    """Fragments (logical box, offset inside `box`) of the part of a saved local tensor that
    `box` (in that local tensor's coordinates) covers; `saved` maps the saved local tensor to
    the logical one (its TP placement when the run used Megatron-style model parallelism)."""
    out = []
    for f in saved:
        inter = box.intersect(f.local_box())
        if inter is None:
            continue
        logical = tuple(l + i - o for l, i, o in zip(f.logical.offsets, inter.offsets, f.local_offsets))
        out.append(Fragment(Box(logical, inter.sizes), tuple(i - o for i, o in zip(inter.offsets, box.offsets))))
    return tuple(out)


def flat_pieces(name: str, local_shape: Sequence[int], start: int, stop: int, file: str, byte_offset: int,
                dtype: torch.dtype, saved: Sequence[Fragment]) -> list[Piece]:
    """Pieces for flat elements [start, stop) of a param of `local_shape`, stored contiguously in
    `file` from `byte_offset` (the offset of element `start`)."""
    out = []
    for flat, box in flat_range_boxes(tuple(local_shape), start, stop):
        st = StoredTensor(file, byte_offset + dtype.itemsize * (flat - start), dtype, box.sizes,
                          _contiguous_stride(box.sizes))
        frags = _compose(box, saved)
        if frags:
            out.append(Piece(name, st, frags))
    return out


@dataclass
class _Segment:
    """Part of one flat partition tensor: `length` elements from `byte_offset`."""

    file: str
    byte_offset: int
    dtype: torch.dtype
    length: int


class _FlatFile:
    """One dp rank's list of flat fp32 tensors (one per group), addressable as one concatenation."""

    def __init__(self, path: str, tensors: Sequence[Any], what: str):
        size = os.path.getsize(path)
        self.path = path
        self.stored = [locate(path, t, f"{what}[{i}]", size) for i, t in enumerate(tensors)]
        for i, st in enumerate(self.stored):
            if len(st.shape) != 1:
                raise CheckpointError(f"{path}: {what}[{i}] has shape {list(st.shape)}, expected a flat 1-D partition")
        self.lengths = [st.shape[0] for st in self.stored]
        self.starts = [0]
        for n in self.lengths:
            self.starts.append(self.starts[-1] + n)

    def group_segment(self, g: int, start: int, stop: int) -> _Segment:
        """Elements [start, stop) of group `g`'s tensor."""
        st = self.stored[g]
        return _Segment(self.path, st.byte_offset + st.itemsize * start, st.dtype, stop - start)

    def segments(self, start: int, stop: int) -> Iterator[tuple[int, _Segment]]:
        """(element offset, segment) covering [start, stop) of the concatenation."""
        for g, st in enumerate(self.stored):
            lo, hi = max(start, self.starts[g]), min(stop, self.starts[g + 1])
            if lo < hi:
                yield lo, _Segment(self.path, st.byte_offset + st.itemsize * (lo - self.starts[g]), st.dtype, hi - lo)


# --- index building ------------------------------------------------------------------------------

@dataclass
class _Builder:
    """Collects pieces for the model's tensors from one or more mp ranks' files."""

    specs: Mapping[str, TensorSpec]
    prefix: str
    mp_size: int
    index: CheckpointIndex
    shared: Mapping[str, str]  # tied weights, alias -> owner (DeepSpeed's shared_params)

    def model_name(self, stored: str) -> Optional[str]:
        """The model's name for a DeepSpeed name (DeepSpeed wraps nothing: they are state_dict keys)."""
        if not stored.startswith(self.prefix):
            return None
        return stored[len(self.prefix):]

    def expected_shape(self, name: str, mp_rank: int) -> tuple[int, ...]:
        spec = self.specs[name]
        return tuple(spec.layout.placement(self.mp_size, mp_rank).local_shape(spec.global_shape))

    def saved_fragments(self, name: str, mp_rank: int) -> list[Fragment]:
        spec = self.specs[name]
        return spec.layout.placement(self.mp_size, mp_rank).fragments(spec.global_shape)

    def check_shape(self, path: str, stored_name: str, name: str, shape: Sequence[int], mp_rank: int) -> None:
        want = self.expected_shape(name, mp_rank)
        if tuple(shape) != want:
            raise CheckpointError(
                f"{path}: tensor {stored_name!r} has shape {list(shape)} in the checkpoint but the model config gives "
                f"{list(want)} for model-parallel rank {mp_rank} of {self.mp_size} (full "
                f"{list(self.specs[name].global_shape)}); check --config / model_config.json"
            )

    def unexpected(self, path: str, names: Sequence[str]) -> None:
        extra = [n for n in names if self.model_name(n) is not None and self.model_name(n) not in self.specs]
        if extra:
            raise CheckpointError(
                f"{path}: the checkpoint and the model config disagree: tensors {extra[:8]}"
                f"{' ...' if len(extra) > 8 else ''} ({len(extra)}) are not in the model; check --config / "
                f"model_config.json"
            )

    def add_full(self, path: str, module: Mapping, stored_name: str, name: str, mp_rank: int, size: int) -> None:
        """A tensor stored whole (a buffer, a ZeRO-1/2 frozen param) in `module`."""
        stored = locate(path, module[stored_name], stored_name, size)
        self.check_shape(path, stored_name, name, stored.shape, mp_rank)
        self.index.add(Piece(name, stored, tuple(self.saved_fragments(name, mp_rank))))

    def add_flat(self, name: str, mp_rank: int, start: int, stop: int, seg: _Segment) -> None:
        shape = self.expected_shape(name, mp_rank)
        for piece in flat_pieces(name, shape, start, stop, seg.file, seg.byte_offset, seg.dtype,
                                 self.saved_fragments(name, mp_rank)):
            self.index.add(piece)


def _wanted(builder: _Builder, name: str, first_mp: bool) -> bool:
    """Replicated tensors are read from the first needed mp rank's files only."""
    return name in builder.specs and (first_mp or not builder.specs[name].layout.replicated)


def _check_dp(path: str, key: str, value: Any, dp: int, tag_dir: str) -> None:
    counts = value if isinstance(value, (list, tuple)) else [value]
    try:
        counts = [int(c) for c in counts]
    except (TypeError, ValueError):
        counts = []
    if not counts:
        raise CheckpointError(f"{path}: {key}={value!r} is not a data-parallel size; the file is not a complete "
                              f"DeepSpeed save: copy this tag's files again from the training run")
    if max(counts) != dp:
        raise CheckpointError(
            f"{path} says {key}={max(counts)} (the data-parallel size it was saved with) but {tag_dir} holds {dp} "
            f"optimizer partition file(s) per model-parallel rank: partition files are missing or left over from "
            f"another run; restore exactly the files of one save"
        )
    if min(counts) != dp:
        raise CheckpointError(
            f"{path}: param groups have different partition counts {counts} (MoE expert groups); "
            f"sat_dist reads dense ZeRO checkpoints only: convert it with DeepSpeed's ds_to_universal.py"
        )


def _index_zero12(ckpt: DeepSpeedCheckpoint, b: _Builder, mp: int, first: bool) -> int:
    """Index mp rank `mp`'s fp32 master partitions; returns the ZeRO stage (1 or 2).

    Each param group is flattened (with per-param alignment padding), padded to a multiple of
    2 x dp and cut into dp slices of P elements; P and the valid elements of each slice follow
    from param_shapes alone. The files' own slice lengths differ by DeepSpeed version (padding
    stripped per rank, stripped on the last rank only, or kept by BF16_Optimizer), so each file
    only has to hold at least its valid elements."""
    model_path = ckpt.model_files[mp][0]
    model = _load(model_path, f"model states file of mp rank {mp}")
    param_shapes = model.get("param_shapes")
    if not isinstance(param_shapes, list):
        raise CheckpointError(f"{model_path} has no 'param_shapes' list: not a ZeRO-1/2 checkpoint; pass the "
                              f"folder of a DeepSpeed save (the one holding 'latest')")
    module = model.get("module") or {}
    dp = ckpt.dp_size
    _check_dp(model_path, "dp_world_size", model.get("dp_world_size", dp), dp, ckpt.tag_dir)
    files, align_pads, stages = [], None, set()
    for d, path in enumerate(ckpt.optim_files[mp]):
        osd = _optim_state(path, d)
        stage = _stage_of(osd, path)
        if stage == 3:
            raise CheckpointError(f"{path} is a ZeRO-3 optimizer file but {ckpt.tag_dir} has ZeRO-1/2 model states: "
                                  f"two runs were saved into the same tag folder; keep only the files of one run")
        stages.add(stage)
        _check_dp(path, "partition_count", osd.get("partition_count"), dp, ckpt.tag_dir)
        parts = osd.get("single_partition_of_fp32_groups")
        if not isinstance(parts, list) or len(parts) != len(param_shapes):
            raise CheckpointError(
                f"{path}: {len(parts) if isinstance(parts, list) else 'no'} fp32 partition groups but {model_path} "
                f"lists {len(param_shapes)} param groups: the files come from different saves; restore exactly "
                f"the files of one save"
            )
        files.append(_FlatFile(path, parts, "single_partition_of_fp32_groups"))
        if d == 0:
            align_pads = osd.get("param_alignment_paddings")
    for g, shapes in enumerate(param_shapes):
        gpads = [int(p) for p in align_pads[g]] if align_pads is not None else [0] * len(shapes)
        if len(gpads) != len(shapes):
            raise CheckpointError(f"{ckpt.optim_files[mp][0]}: param_alignment_paddings[{g}] has {len(gpads)} "
                                  f"entries for {len(shapes)} params: the files come from different saves")
        total = sum(math.prod(s) for s in shapes.values()) + sum(gpads)
        P = -(-total // (2 * dp)) * 2  # DeepSpeed pads each flat group to a multiple of 2 x dp
        valid = [min(P, max(0, total - d * P)) for d in range(dp)]
        short = [(f.path, f.lengths[g], valid[d]) for d, f in enumerate(files) if not valid[d] <= f.lengths[g] <= P]
        if short:
            path, have, want = short[0]
            raise CheckpointError(
                f"{path}: param group {g} partition holds {have} fp32 elements but param_shapes in {model_path} "
                f"({len(shapes)} params, {total} elements over dp={dp}) put {want} (of at most {P}) on this rank: "
                f"the file is truncated or from another save; restore exactly the files of one save"
            )
        offset = 0
        for j, (stored_name, shape) in enumerate(shapes.items()):
            n = math.prod(shape)
            name = b.model_name(stored_name)
            if name is not None and name in b.specs:
                b.check_shape(model_path, stored_name, name, tuple(shape), mp)
            if _wanted(b, name, first) and n:
                for d in range(offset // P, (offset + n - 1) // P + 1):
                    lo, hi = max(offset, d * P), min(offset + n, d * P + P)
                    seg = files[d].group_segment(g, lo - d * P, hi - d * P)
                    b.add_flat(name, mp, lo - offset, hi - offset, seg)
            offset += n + gpads[j]
    in_flat = {n for s in param_shapes for n in s}
    # Frozen params (not in the optimizer) and buffers: whole tensors in `module` (16-bit in 16-bit
    # runs). Tied aliases are skipped: they take the owner's (fp32) pieces in _alias_shared.
    size = os.path.getsize(model_path)
    for stored_name in module:
        name = b.model_name(stored_name)
        if stored_name not in in_flat and stored_name not in b.shared and _wanted(b, name, first):
            b.add_full(model_path, module, stored_name, name, mp, size)
    b.unexpected(model_path, list(module))
    _alias_shared(b)
    if len(stages) != 1:
        raise CheckpointError(f"{ckpt.tag_dir}: the optimizer files of mp rank {mp} mix ZeRO stages {sorted(stages)}: "
                              f"two runs were saved into the same tag folder; keep only the files of one run")
    return stages.pop()


def _index_zero3(ckpt: DeepSpeedCheckpoint, b: _Builder, mp: int, first: bool) -> int:
    dp = ckpt.dp_size
    model_path = ckpt.model_files[mp][0]
    model0 = _load(model_path, f"model states file of dp rank 0, mp rank {mp}")
    param_shapes = model0.get("param_shapes")
    if not isinstance(param_shapes, list):
        raise CheckpointError(f"{model_path} has no 'param_shapes' list: not a ZeRO-3 checkpoint")
    _check_dp(model_path, "dp_world_size", model0.get("dp_world_size", dp), dp, ckpt.tag_dir)
    files = []
    for d, path in enumerate(ckpt.optim_files[mp]):
        osd = _optim_state(path, d)
        if _stage_of(osd, path) != 3:
            raise CheckpointError(f"{path} is a ZeRO-1/2 optimizer file but {ckpt.tag_dir} has ZeRO-3 model states")
        _check_dp(path, "partition_count", osd.get("partition_count"), dp, ckpt.tag_dir)
        groups = osd.get("fp32_flat_groups")
        if not isinstance(groups, list):
            raise CheckpointError(f"{path} has no 'fp32_flat_groups': not a ZeRO-3 optimizer file")
        files.append(_FlatFile(path, groups, "fp32_flat_groups"))
    if any(f.lengths != files[0].lengths for f in files):
        raise CheckpointError(
            f"{ckpt.tag_dir}: the optimizer files' fp32_flat_groups sizes differ "
            f"({[f.lengths for f in files]}): the files come from different saves"
        )
    flat = [(n, s) for group in param_shapes for n, s in group.items()]
    need = sum(-(-math.prod(s) // dp) for _, s in flat)
    if need != files[0].starts[-1]:
        raise CheckpointError(
            f"{ckpt.optim_files[mp][0]}: fp32_flat_groups hold {files[0].starts[-1]} elements per rank but "
            f"param_shapes in {model_path} need {need} (sum of ceil(numel/{dp})): the files come from different "
            f"saves or a different data-parallel size"
        )
    offset = 0
    for stored_name, shape in flat:
        n = math.prod(shape)
        q = -(-n // dp)
        name = b.model_name(stored_name)
        if name is not None and name in b.specs:
            b.check_shape(model_path, stored_name, name, tuple(shape), mp)
        if _wanted(b, name, first):
            for d in range(dp):
                lo, hi = d * q, min(n, (d + 1) * q)
                if lo < hi:  # the tail rank(s) may hold only (uninitialised) padding: never read it
                    for at, seg in files[d].segments(offset, offset + hi - lo):
                        start = lo + at - offset
                        b.add_flat(name, mp, start, start + seg.length, seg)
        offset += q
    b.unexpected(model_path, [n for n, _ in flat])
    frozen = model0.get("frozen_param_shapes") or {}
    b.unexpected(model_path, list(frozen))
    for stored_name, shape in frozen.items():
        name = b.model_name(stored_name)
        if name is not None and name in b.specs:
            b.check_shape(model_path, stored_name, name, tuple(shape), mp)
    wanted_frozen = {n: s for n, s in frozen.items() if _wanted(b, b.model_name(n), first)}
    if wanted_frozen:  # frozen params: every dp rank's model_states file holds its padded 16-bit slice
        for d, path in enumerate(ckpt.model_files[mp]):
            model = model0 if d == 0 else _load(path, f"model states file of dp rank {d}, mp rank {mp}")
            frags = model.get("frozen_param_fragments") or {}
            size = os.path.getsize(path)
            for stored_name, shape in wanted_frozen.items():
                n = math.prod(shape)
                q = -(-n // dp)
                lo, hi = d * q, min(n, (d + 1) * q)
                if lo >= hi:
                    continue
                if stored_name not in frags:
                    raise CheckpointError(f"{path} has no frozen_param_fragments entry for {stored_name!r}; the "
                                          f"file comes from another save: copy this tag's files again")
                st = locate(path, frags[stored_name], stored_name, size)
                if math.prod(st.shape) < hi - lo:
                    raise CheckpointError(f"{path}: frozen fragment {stored_name!r} has {math.prod(st.shape)} "
                                          f"elements, dp rank {d} must hold {hi - lo} of {n}")
                b.add_flat(b.model_name(stored_name), mp, lo, hi, _Segment(path, st.byte_offset, st.dtype, hi - lo))
    # Buffers are real tensors in `module`; parameters there are size-0 placeholders.
    module = model0.get("module") or {}
    size = os.path.getsize(model_path)
    partitioned = {n for n, _ in flat} | set(frozen)
    for stored_name in model0.get("buffer_names") or []:
        name = b.model_name(stored_name)
        if stored_name in module and stored_name not in partitioned and _wanted(b, name, first):
            b.add_full(model_path, module, stored_name, name, mp, size)
    b.unexpected(model_path, list(model0.get("buffer_names") or []))
    _alias_shared(b)
    return 3


def _alias_shared(b: _Builder) -> None:
    """Tied weights are saved once, under the owner's name: the alias reads the owner's pieces."""
    for alias, owner in b.shared.items():
        a, o = b.model_name(alias), b.model_name(owner)
        if a in b.specs and a not in b.index.pieces and o in b.index.pieces:
            for piece in b.index.pieces[o]:
                b.index.add(Piece(a, piece.stored, piece.fragments))


def _check_complete(b: _Builder, ckpt: DeepSpeedCheckpoint, stage: int) -> None:
    missing = [n for n in b.specs if n not in b.index.pieces]
    absent = _sat._absent_ok(b.specs, missing)  # tensors the model fills itself, as for SAT files
    b.index.meta.setdefault("absent", {}).update(absent)
    missing = [n for n in missing if n not in absent]
    if missing:
        hint = ("under ZeRO-3 only params in param_shapes (trainable), frozen_param_shapes (frozen, unless saved "
                "with exclude_frozen_parameters) and buffers are saved: these cannot be recovered from this checkpoint"
                if stage == 3 else "check --config / model_config.json")
        raise CheckpointError(
            f"{ckpt.tag_dir}: the checkpoint has no data for tensors {[b.prefix + n for n in missing[:8]]}"
            f"{' ...' if len(missing) > 8 else ''} ({len(missing)}); {hint}"
        )


def source_for(ckpt: DeepSpeedCheckpoint, weights: str) -> str:
    """'module' or 'fp32': where the weights come from for this checkpoint and --weights choice."""
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights must be one of {list(WEIGHTS)}, got {weights!r}")
    if ckpt.zero3:
        if weights == "module":
            raise ConfigError(
                f"{ckpt.tag_dir} is a ZeRO-3 checkpoint: its model states hold only size-0 placeholders and the "
                f"weights exist only as fp32 optimizer partitions; use --weights fp32 (or auto)"
            )
        return "fp32"
    return "fp32" if weights == "fp32" else "module"


def read(root: str, specs: Mapping[str, TensorSpec], tp: int, tp_rank: int, tag: Optional[str] = None,
         prefix: str = "", weights: str = "auto", **_options: Any) -> Optional[tuple[CheckpointIndex, list[str]]]:
    """The DeepSpeed reader for `formats.READERS`: None if `root` holds no ZeRO files."""
    ckpt = discover(root, tag)
    if ckpt is None:
        if weights == "fp32":
            raise ConfigError(
                f"--weights fp32 reads DeepSpeed ZeRO optimizer partitions, but {root} (tag {tag or 'from latest'}) "
                f"holds no *_optim_states.pt; drop --weights to load the saved module weights"
            )
        return None
    from ..plan import files_needed

    meta = {"tag": ckpt.tag, "mp_size": ckpt.mp_size, "dp_size": ckpt.dp_size, "zero3": ckpt.zero3,
            "bf16": ckpt.bf16}
    if source_for(ckpt, weights) == "module":
        # ZeRO-1/2 `module` is an ordinary SAT/DeepSpeed model-states file: the SAT reader's job.
        index, files = _sat.read_index(root, specs, tp, tp_rank, tag, prefix)
        index.format = "deepspeed-zero12-module"
        index.meta.update(meta, source="module")
        return index, files
    index = CheckpointIndex(root=root, format="deepspeed", meta={**meta, "source": "fp32"})
    # DeepSpeed records shared_params (tied weights) only in global rank 0's model states file.
    model00 = _load(ckpt.model_files[0][0], "model states file of mp rank 0")
    shared = model00.get("shared_params") if isinstance(model00.get("shared_params"), Mapping) else {}
    b = _Builder(specs, prefix, ckpt.mp_size, index, dict(shared))
    ranks = files_needed(specs, ckpt.mp_size, tp, tp_rank)
    stage = 0
    for i, mp in enumerate(ranks):
        stage = (_index_zero3 if ckpt.zero3 else _index_zero12)(ckpt, b, mp, first=i == 0)
    index.format, index.meta["stage"] = f"deepspeed-zero{stage}", stage
    run_dtype = _run_dtype(ckpt, model00)
    if run_dtype != torch.float32:  # a 16-bit run: serve its dtype unless --dtype says otherwise
        index.meta["default_dtype"] = run_dtype
    _check_complete(b, ckpt, stage)
    files = sorted({p.file for pieces in index.pieces.values() for p in pieces})
    for f in files:
        index.file_sizes[f] = os.path.getsize(f)
    return index, files


def _run_dtype(ckpt: DeepSpeedCheckpoint, model0: Mapping) -> torch.dtype:
    """The dtype the run trained in: bf16 optimizer files, else ds_config's fp16.enabled, else fp32."""
    if ckpt.bf16:
        return torch.bfloat16
    cfg = model0.get("ds_config") if isinstance(model0.get("ds_config"), dict) else {}
    return torch.float16 if (cfg.get("fp16") or {}).get("enabled") else torch.float32


# --- inspect -------------------------------------------------------------------------------------

def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested structure (sizes only: nothing is read)."""
    return sum(t.numel() * t.element_size() for t in iter_tensors(obj))


def _dtypes(tensors: Any) -> list[str]:
    return sorted({str(t.dtype).removeprefix("torch.") for t in tensors if isinstance(t, torch.Tensor)})


def inspect_checkpoint(path: str, tag: Optional[str] = None) -> dict:
    """What a DeepSpeed (or SAT) checkpoint folder holds, from the pickles' metadata only."""
    ckpt = discover(path, tag)
    if ckpt is None:
        sat = _sat.discover(path, tag)
        files = []
        for i, f in enumerate(sat.files):
            obj = _load(f, f"model states file of mp rank {i}")
            module = obj.get("module") or {}
            files.append({"file": os.path.relpath(f, path), "bytes": os.path.getsize(f), "mp_rank": i,
                          "holds": f"module: {len(module)} tensors, {_tensor_bytes(module)} bytes "
                                   f"({', '.join(_dtypes(module.values()))}), mp rank {i}'s TP shard",
                          "other_keys": sorted(k for k in obj if k != "module")})
        return {"format": "sat" if "param_shapes" not in obj else "deepspeed (ZeRO-0 or no optimizer saved)",
                "root": path, "tag": sat.tag, "mp_size": sat.mp_size, "files": files}
    model0 = _load(ckpt.model_files[0][0], "model states file")
    osd0 = _optim_state(ckpt.optim_files[0][0], 0)
    stage = _stage_of(osd0, ckpt.optim_files[0][0])
    param_shapes = model0.get("param_shapes") or []
    frozen = model0.get("frozen_param_shapes") or {}
    module = model0.get("module") or {}
    trainable = [(n, tuple(s)) for g in param_shapes for n, s in g.items()]
    run_dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[_run_dtype(ckpt, model0)]
    info: dict[str, Any] = {
        "format": "deepspeed",
        "root": path, "tag": ckpt.tag, "tag_dir": ckpt.tag_dir,
        "stage": stage, "optimizer": "BF16_Optimizer" if "zero_stage" not in osd0 else "DeepSpeedZeroOptimizer"
        + ("_Stage3" if stage == 3 else ""),
        "dp_size": ckpt.dp_size, "mp_size": ckpt.mp_size,
        "saved_dp_world_size": model0.get("dp_world_size"), "saved_mp_world_size": model0.get("mp_world_size"),
        "run_dtype": run_dtype, "ds_version": model0.get("ds_version"),
        "param_groups": len(param_shapes),
        "trainable_params": len(trainable), "trainable_numel": sum(_numel(s) for _, s in trainable),
        "frozen_params": len(frozen), "frozen_numel": sum(_numel(s) for s in frozen.values()),
        "buffers": list(model0.get("buffer_names") or []),
        "shared_params": dict(model0.get("shared_params") or {}),
        "client_state_keys": sorted(set(model0) - {
            "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
            "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
            "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
            "checkpoint_parallel_dimensions", "ds_config", "ds_version", "universal_checkpoint_info"}),
        "default_source": "fp32 partitions" if ckpt.zero3 else "module (--weights fp32: fp32 partitions)",
        "files": [],
    }
    for m in range(ckpt.mp_size):
        for d, f in enumerate(ckpt.model_files[m]):
            obj = model0 if (m, d) == (0, 0) else _load(f, "model states file")
            mod = obj.get("module") or {}
            real = {k: t for k, t in mod.items() if isinstance(t, torch.Tensor) and t.numel()}
            dtypes = ", ".join(_dtypes(real.values())) or "-"
            holds = (f"module: {len(real)} real tensors ({_tensor_bytes(real)} bytes, {dtypes})"
                     f"{'; ' + str(len(mod) - len(real)) + ' size-0 placeholders' if len(mod) > len(real) else ''}")
            ff = obj.get("frozen_param_fragments") or {}
            if ff:
                holds += f"; frozen_param_fragments: {len(ff)} ({_tensor_bytes(ff)} bytes)"
            info["files"].append({"file": os.path.relpath(f, path), "bytes": os.path.getsize(f), "mp_rank": m,
                                  "dp_rank": d if ckpt.zero3 else None, "holds": holds})
        for d, f in enumerate(ckpt.optim_files[m]):
            osd = osd0 if (m, d) == (0, 0) else _optim_state(f, d)
            key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
            parts = osd.get(key) or []
            inner = osd.get("optimizer_state_dict") if stage == 3 else osd.get("base_optimizer_state")
            info["files"].append({
                "file": os.path.relpath(f, path), "bytes": os.path.getsize(f), "mp_rank": m, "dp_rank": d,
                "holds": f"{key}: {len(parts)} group(s), {sum(t.numel() for t in parts)} fp32 elements "
                         f"({_tensor_bytes(parts)} bytes, the only bytes sat_dist reads); optimizer moments: "
                         f"{_tensor_bytes(inner)} bytes (never read)",
                "partition_count": osd.get("partition_count"),
            })
    return info


def format_inspect(info: Mapping) -> str:
    """Human-readable `sat-dist inspect` output."""
    lines = [f"{info['root']}  (tag {info['tag']})"]
    if info["format"] != "deepspeed":
        lines.append(f"format: {info['format']}, mp size {info['mp_size']}")
    else:
        lines += [
            f"format: DeepSpeed {ZERO_STAGE_NAMES[info['stage']]} ({info['optimizer']}), "
            f"ds_version {info['ds_version']}",
            f"dp size {info['dp_size']} (files), mp size {info['mp_size']}; run dtype {info['run_dtype']}",
            f"params: {info['trainable_params']} trainable ({info['trainable_numel']:,} elements) in "
            f"{info['param_groups']} group(s), {info['frozen_params']} frozen ({info['frozen_numel']:,} elements), "
            f"{len(info['buffers'])} buffer(s)"
            f"{', shared: ' + str(info['shared_params']) if info['shared_params'] else ''}",
            f"weights come from: {info['default_source']}",
        ]
        if info["client_state_keys"]:
            lines.append(f"client state: {', '.join(info['client_state_keys'])}")
    lines.append("files:")
    for f in info["files"]:
        lines.append(f"  {f['file']}  [{f['bytes']:,} B]  {f['holds']}")
    return "\n".join(lines)
