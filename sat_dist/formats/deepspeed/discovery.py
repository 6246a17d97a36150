"""Which files a DeepSpeed tag folder holds, by model-parallel rank and data-parallel rank.

DeepSpeed names them in microsoft/DeepSpeed deepspeed/runtime/engine.py (`_get_ckpt_name`,
`_get_rank_zero_ckpt_name`): `<root>/latest` holds the tag (`global_step1000`; SAT: the
iteration number); ZeRO-1/2 saves `mp_rank_XX_model_states.pt` (the complete weights) and
`[bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt`; ZeRO-3 saves one
`zero_pp_rank_D_mp_rank_XX_model_states.pt` per dp rank instead. Pipeline and MoE files are
named so that they are refused rather than misread. Only names are looked at here: nothing is
opened but `latest`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

from ...errors import CheckpointError
from ..sat import MP_FILE as MP_MODEL_FILE

OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
Z3_MODEL_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
UNSUPPORTED_FILES = (
    (re.compile(r"^layer_\d+-model_\d+-model_states\.pt$"), "pipeline-parallel (PipelineModule layer files)"),
    (re.compile(r"^(layer_\d+_)?expert_\d+_mp_rank_\d+_model_states\.pt$"), "MoE expert-parallel"),
    (re.compile(r"^expp_rank_\d+_mp_rank_\d+_optim_states\.pt$"), "MoE expert-parallel"),
)


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
    """(tag, tag folder): the explicit tag, else what `latest` names, else `root` itself (pointed
    straight at a tag folder); None for an empty `latest`."""
    if tag is not None:
        return tag, os.path.normpath(os.path.join(root, tag))
    latest = os.path.join(root, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            name = f.read().strip()
        return (name, os.path.normpath(os.path.join(root, name))) if name else None
    return ".", os.path.normpath(root)


def _listing(root: str, tag: Optional[str]) -> Optional[tuple[str, str, list[str]]]:
    """(tag, tag folder, its sorted file names), or None when there is no such folder."""
    if not os.path.isdir(root):
        return None
    resolved = _resolve_tag(root, tag)
    if resolved is None or not os.path.isdir(resolved[1]):
        return None
    return resolved[0], resolved[1], sorted(os.listdir(resolved[1]))


def _is_zero_file(name: str) -> bool:
    return bool(OPTIM_FILE.match(name) or Z3_MODEL_FILE.match(name))


def recognise(root: str, tag: Optional[str] = None) -> bool:
    """The tag folder holds ZeRO files (*_optim_states.pt or zero_pp_rank_*_model_states.pt). A SAT
    or ZeRO-0 folder (only mp_rank_XX_model_states.pt) is the SAT reader's; never raises for either."""
    try:
        found = _listing(root, tag)
    except OSError:
        return False
    return found is not None and any(_is_zero_file(n) for n in found[2])


def discover(root: str, tag: Optional[str] = None) -> DeepSpeedCheckpoint:
    """The DeepSpeed ZeRO layout of `root` (or its `latest` tag). No ZeRO files, missing or
    inconsistent files are errors naming the folder and what to do."""
    found = _listing(root, tag)
    if found is None or not any(_is_zero_file(n) for n in found[2]):
        raise CheckpointError(f"{root} (tag {tag or 'from latest'}) holds no DeepSpeed ZeRO files "
                              f"(*_optim_states.pt, zero_pp_rank_*_model_states.pt)")
    tag, tag_dir, names = found
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
    _refuse_mixed(tag_dir, names, prefixes, bool(z3), bool(mp_files), bool(optim))
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


def _refuse_mixed(tag_dir: str, names: list[str], prefixes: set[str], z3: bool, mp_files: bool,
                  optim: bool) -> None:
    """Layouts sat_dist does not read, and folders holding the files of two runs."""
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
