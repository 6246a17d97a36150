"""What the ZeRO-1/2 and ZeRO-3 index builders share: opening one model-parallel rank's files,
and turning DeepSpeed's stored names into the model's Pieces.

Both stages save, per mp rank, a model-states dict whose `param_shapes` lists the trainable
params in flat order, and per dp rank an optimizer file with that rank's fp32 partitions
(`single_partition_of_fp32_groups` in microsoft/DeepSpeed deepspeed/runtime/zero/stage_1_and_2.py
and bf16_optimizer.py, `fp32_flat_groups` in deepspeed/runtime/zero/stage3.py). Only where the
params sit inside those partitions differs: that is left to `zero12` and `zero3`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from ...errors import CheckpointError
from ...index import CheckpointIndex, Piece
from ...placement import Fragment, TensorSpec
from ..base import check_names, check_shape, split_absent
from ..torchfile import locate
from .discovery import DeepSpeedCheckpoint
from .partitions import FlatFile, Segment, flat_pieces
from .states import check_dp, load, optim_state, stage_of


def _stage_name(zero3: bool) -> str:
    return "ZeRO-3" if zero3 else "ZeRO-1/2"


@dataclass
class RankFiles:
    """One mp rank's model-states dict (dp rank 0's under ZeRO-3) and every dp rank's fp32
    partitions, checked against each other's record of the data-parallel size."""

    model_path: str
    model: dict
    param_shapes: list  # per param group (ZeRO-3: per sub-group): stored name -> shape
    files: list[FlatFile]  # [dp]
    optim0: dict  # dp rank 0's optimizer state (ZeRO-1/2 reads its param_alignment_paddings)
    stages: set[int]


def open_rank(ckpt: DeepSpeedCheckpoint, mp: int) -> RankFiles:
    """Open mp rank `mp`'s model states and all its dp ranks' optimizer partitions (pickles only)."""
    z3, dp = ckpt.zero3, ckpt.dp_size
    model_path = ckpt.model_files[mp][0]
    model = load(model_path, f"model states file of {'dp rank 0, ' if z3 else ''}mp rank {mp}")
    param_shapes = model.get("param_shapes")
    if not isinstance(param_shapes, list):
        raise CheckpointError(f"{model_path} has no 'param_shapes' list: not a {_stage_name(z3)} checkpoint; pass "
                              f"the folder of a DeepSpeed save (the one holding 'latest')")
    check_dp(model_path, "dp_world_size", model.get("dp_world_size", dp), dp, ckpt.tag_dir)
    key = "fp32_flat_groups" if z3 else "single_partition_of_fp32_groups"
    files, stages, optim0 = [], set(), {}
    for d, path in enumerate(ckpt.optim_files[mp]):
        osd = optim_state(path, d)
        stage = stage_of(osd, path)
        if (stage == 3) != z3:
            raise CheckpointError(
                f"{path} is a {_stage_name(stage == 3)} optimizer file but {ckpt.tag_dir} has {_stage_name(z3)} "
                f"model states: two runs were saved into the same tag folder; keep only the files of one run")
        stages.add(stage)
        check_dp(path, "partition_count", osd.get("partition_count"), dp, ckpt.tag_dir)
        groups = osd.get(key)
        if not isinstance(groups, list):
            raise CheckpointError(f"{path} has no {key!r}: not a {_stage_name(z3)} optimizer file")
        files.append(FlatFile(path, groups, key))
        if d == 0:
            optim0 = osd
    return RankFiles(model_path, model, param_shapes, files, optim0, stages)


@dataclass
class Builder:
    """Collects pieces for the model's tensors from one or more mp ranks' files."""

    specs: Mapping[str, TensorSpec]
    prefix: str
    mp_size: int
    index: CheckpointIndex
    shared: Mapping[str, str]  # tied weights, alias -> owner (DeepSpeed's shared_params)

    def model_name(self, stored: str) -> Optional[str]:
        """The model's name for a DeepSpeed name (DeepSpeed wraps nothing: they are state_dict keys)."""
        return stored[len(self.prefix):] if stored.startswith(self.prefix) else None

    def wanted(self, name: Optional[str], first_mp: bool) -> bool:
        """Replicated tensors are read from the first needed mp rank's files only."""
        return name in self.specs and (first_mp or not self.specs[name].layout.replicated)

    def _placement(self, name: str, mp_rank: int):
        return self.specs[name].layout.placement(self.mp_size, mp_rank)

    def _saved_fragments(self, name: str, mp_rank: int) -> list[Fragment]:
        return self._placement(name, mp_rank).fragments(self.specs[name].global_shape)

    def check_shape(self, path: str, stored_name: str, shape: Sequence[int], mp_rank: int) -> None:
        """A stored tensor the model has must have its mp rank's shape (others are checked by name)."""
        name = self.model_name(stored_name)
        if name is not None and name in self.specs:
            check_shape(path, stored_name, tuple(shape), self.specs[name], mp_rank, self.mp_size)

    def check_unexpected(self, path: str, stored_names: Sequence[str]) -> None:
        """Stored names under the prefix that the model does not have are an error."""
        check_names(path, [], [n for n in stored_names
                               if self.model_name(n) is not None and self.model_name(n) not in self.specs])

    def add_full(self, path: str, module: Mapping, stored_name: str, mp_rank: int, size: int) -> None:
        """A tensor stored whole (a buffer, a ZeRO-1/2 frozen param) in `module`."""
        stored = locate(path, module[stored_name], stored_name, size)
        self.check_shape(path, stored_name, stored.shape, mp_rank)
        name = self.model_name(stored_name)
        self.index.add(Piece(name, stored, tuple(self._saved_fragments(name, mp_rank))))

    def add_flat(self, name: str, mp_rank: int, start: int, stop: int, seg: Segment) -> None:
        """Flat elements [start, stop) of `name`'s mp-rank-local tensor, stored in `seg`."""
        shape = self._placement(name, mp_rank).local_shape(self.specs[name].global_shape)
        for piece in flat_pieces(name, shape, start, stop, seg.file, seg.byte_offset, seg.dtype,
                                 self._saved_fragments(name, mp_rank)):
            self.index.add(piece)

    def alias_shared(self) -> None:
        """Tied weights are saved once, under the owner's name: the alias reads the owner's pieces."""
        for alias, owner in self.shared.items():
            a, o = self.model_name(alias), self.model_name(owner)
            if a in self.specs and a not in self.index.pieces and o in self.index.pieces:
                for piece in self.index.pieces[o]:
                    self.index.add(Piece(a, piece.stored, piece.fragments))

    def check_complete(self, tag_dir: str, stage: int) -> None:
        """Every model tensor has pieces, or is one the model fills itself (recorded as absent)."""
        absent, missing = split_absent(self.specs, [n for n in self.specs if n not in self.index.pieces])
        self.index.meta.setdefault("absent", {}).update(absent)
        if missing:
            hint = ("under ZeRO-3 only params in param_shapes (trainable), frozen_param_shapes (frozen, unless saved "
                    "with exclude_frozen_parameters) and buffers are saved: these cannot be recovered from this "
                    "checkpoint" if stage == 3 else "check --config / model_config.json")
            raise CheckpointError(
                f"{tag_dir}: the checkpoint has no data for tensors {[self.prefix + n for n in missing[:8]]}"
                f"{' ...' if len(missing) > 8 else ''} ({len(missing)}); {hint}"
            )

