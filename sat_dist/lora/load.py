"""LoRA in the load path: adapters opened and checked before any byte of the base is read, their rank parts
planned beside the base's in one ReadPlan, merged (or attached) between the read and `load_state_dict`.

`prepare` (per component, inside the loader's planning, so a LoRA for another model fails every rank at the
plan agreement) returns a `LoraSetup`; the loader asks it for the names the base is read under
(`reader_specs`: a LoraMixin fine-tune keeps the base in `….original.*`), lets it `extend` the base plan, and
calls `apply` on the materialized tensors. The setup stays on the model (`STATE_ATTR`) for `switch`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ..errors import LoraError
from ..formats import sat as sat_format
from ..index import CheckpointIndex, Piece
from ..placement import Replicate, TensorSpec
from ..plan import ReadPlan, make_plan
from . import files, merge
from .plan import LoraPlan, in_checkpoint_names, plan_loras

STATE_ATTR = "_sat_dist_lora"
SAT_LORA_TARGETS = ("sat.model.finetune.lora2.LoraMixin",)


def lora_config(model_cfg: Any) -> Optional[dict]:
    """The CogVideo YAML's `lora_config` params ({} when it has no params), None without one."""
    node = (getattr(model_cfg, "modules", None) or {}).get("lora_config")
    if node is None:
        return None
    return dict(node.get("params") or {})


@dataclass
class LoraSetup:
    """One component's adapters for one rank: the plan, how the base is named in the files, the dtypes."""

    plan: LoraPlan
    merge: bool
    tp: int
    rank: int
    stored: dict[str, str]  # model name -> name the base is read under (in-checkpoint SAT LoRA)
    external: list[tuple[dict[str, TensorSpec], CheckpointIndex]] = field(default_factory=list)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # touched base -> the run's dtype
    specs: dict[str, TensorSpec] = field(default_factory=dict)  # the model's (for switching)
    prefix: str = ""
    alpha: Optional[float] = None
    base_index: Optional[CheckpointIndex] = None  # kept for switching: re-read the touched rows only
    prefer: Sequence[str] = ()
    op_bytes: int = 64 << 20
    runtime: Any = None  # the group that loaded the model (set by the loader; switch agrees on it)
    timeout_s: float = 300.0

    @property
    def active(self) -> bool:
        return bool(self.plan.merges)

    def reader_specs(self, specs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """What the base reader indexes: the model's tensors under their stored names, plus the LoRA
        tensors that live in the base checkpoint itself."""
        out = {self.stored.get(n, n): s for n, s in specs.items()}
        for adapter, mine in zip(self.plan.adapters, self.plan.specs):
            if adapter.in_checkpoint:
                out.update(mine)
        return out

    def extend(self, plan: ReadPlan, index: CheckpointIndex, prefer: Sequence[str], op_bytes: int) -> ReadPlan:
        """Add the external adapters' reads to `plan`; set the dtypes the merge needs: merging, the touched base
        tensors and the factors stay as stored (each goes to fp32 exactly, one tensor at a time, in
        merge.apply: the peak is one fp32 copy, not all of them); unmerged factors take the run's dtype."""
        self.base_index, self.prefer, self.op_bytes = index, tuple(prefer), op_bytes
        touched = {self.stored.get(n, n): n for n in self.plan.touched}
        for stored, name in touched.items():
            self.dtypes[name] = plan.targets[stored].dtype
        plan = join(plan, *self.external_plans())
        if self.merge:
            for name in set(touched) | self.plan.lora_names():
                plan.targets[name] = dataclasses.replace(plan.targets[name], dtype=plan.targets[name].stored_dtype)
        else:
            unmerged_dtypes(plan, self.plan, self.dtypes)
        return plan

    def external_plans(self) -> list[ReadPlan]:
        """The reads of the adapters in their own files (their layouts are the base's at its TP size)."""
        return [make_plan(specs, self.tp, self.rank, idx, None, (), self.op_bytes) for specs, idx in self.external]

    def base_only(self, plan: ReadPlan) -> ReadPlan:
        """`plan` without the reads of adapters in their own files (`--verify` checks the checkpoint's
        reads against its manifest; an adapter file is not in it)."""
        own = {n for specs, _ in self.external for n in specs}
        if not own:
            return plan
        return ReadPlan({n: t for n, t in plan.targets.items() if n not in own},
                        [op for op in plan.ops if op.name not in own])

    def apply(self, tensors: dict, model: nn.Module) -> None:
        merge.apply(self.plan, tensors, self.dtypes, model, self.merge)
        setattr(model, STATE_ATTR, self)


def join(plan: ReadPlan, *more: ReadPlan) -> ReadPlan:
    """`plan` with the targets and ops of `more` (ops back in file order)."""
    for sub in more:
        plan.targets.update(sub.targets)
        plan.ops.extend(sub.ops)
    plan.ops.sort(key=lambda op: (op.file, op.first_byte))
    return plan


def unmerged_dtypes(plan: ReadPlan, lp: LoraPlan, dtypes: Mapping[str, torch.dtype]) -> None:
    """Unmerged factors are read into the run's dtype of the layer they adapt."""
    for m in lp.merges:
        for n in (m.a, m.b):
            plan.targets[n] = dataclasses.replace(plan.targets[n], dtype=dtypes[m.base])


def _peft_index(adapter: files.AdapterFile, keys: Mapping[str, str], specs: Mapping[str, TensorSpec]
                ) -> CheckpointIndex:
    idx = CheckpointIndex(root=adapter.path, format="lora")
    for name, key in keys.items():  # located by the header files.peft_adapter read
        idx.add(Piece(name, adapter.stored[key], tuple(Replicate().fragments(specs[name].global_shape))))
    return idx


def _sat_index(adapter: files.AdapterFile, keys: Mapping[str, str], specs: Mapping[str, TensorSpec],
               tp: int, rank: int, prefix: str) -> CheckpointIndex:
    by_key = {keys[n]: s for n, s in specs.items()}
    idx, _ = sat_format.read_index(adapter.path, by_key, tp, rank, adapter.tag, prefix, partial=True)
    out = CheckpointIndex(root=adapter.path, format="lora")
    back = {k: n for n, k in keys.items()}
    for key, pieces in idx.pieces.items():
        for p in pieces:
            out.add(Piece(back[key], p.stored, p.fragments))
    return out


def prepare(model_cfg: Any, checkpoint: Optional[str], tag: Optional[str], loras: Sequence[tuple[str, float]],
            merge_: bool, alpha: Optional[float], specs: Mapping[str, TensorSpec], prefix: str, tp: int,
            rank: int) -> LoraSetup:
    """Open and check every adapter (headers only) and plan this rank's part (an empty plan without any:
    the setup still remembers where the base lies, for `switch`)."""
    yaml_lora = lora_config(model_cfg)
    if alpha is None and yaml_lora is not None:  # the YAML's LoraMixin: its lora_alpha, or LoraMixin's default 1
        alpha = yaml_lora.get("lora_alpha", 1.0)
    adapters, strengths, stored = [], [], {}
    a = files.finetune_adapter(checkpoint, specs, prefix, tag, alpha, (yaml_lora or {}).get("r")) if checkpoint else None
    if a is not None:
        adapters.append(a)
        strengths.append(1.0)
        stored = {k: v for k, v in in_checkpoint_names(a).items() if k in specs}
    elif yaml_lora is not None:
        raise LoraError(f"the config has lora_config (a LoraMixin fine-tune) but {checkpoint} holds no LoRA tensors "
                        f"(<linear>.matrix_A.N under {prefix!r}); load the fine-tune's checkpoint, or drop lora_config")
    for path, strength in loras:
        adapters.append(files.open_adapter(path, specs, prefix, alpha))
        strengths.append(strength)
    files.check_sequence(adapters)
    lp = plan_loras(adapters, strengths, specs, tp, rank, stored)
    setup = LoraSetup(lp, merge_, tp, rank, stored, specs=dict(specs), prefix=prefix, alpha=alpha)
    setup.external = external_indices(lp, tp, rank, prefix)
    return setup


def external_indices(lp: LoraPlan, tp: int, rank: int, prefix: str) -> list[tuple[dict, CheckpointIndex]]:
    """(specs, index) of every adapter that has its own file (headers / data.pkl only)."""
    out = []
    for adapter, mine, keys in zip(lp.adapters, lp.specs, lp.keys):
        if adapter.in_checkpoint:
            continue
        idx = (_peft_index(adapter, keys, mine) if adapter.format == "peft"
               else _sat_index(adapter, keys, mine, tp, rank, prefix))
        out.append((mine, idx))
    return out


def state(model: nn.Module) -> Optional[LoraSetup]:
    return getattr(model, STATE_ATTR, None)
