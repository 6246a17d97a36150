"""Data-only stand-ins for the DeepSpeed classes that ZeRO optimizer files pickle.

DeepSpeed saves `*_optim_states.pt` with a few of its own objects inside (checked with
`torch.serialization.get_unsafe_globals_in_checkpoint` on files written by DeepSpeed 0.19.8):

- ZeRO-1/2: `deepspeed.runtime.zero.config.ZeroStageEnum`, `deepspeed.runtime.fp16.loss_scaler.LossScaler`,
  `deepspeed.utils.tensor_fragment.fragment_address` (in `param_slice_mappings`)
- ZeRO-3: `ZeroStageEnum`, `LossScaler`
- BF16_Optimizer (bf16 + ZeRO-1 + fp32 grad accumulation): `fragment_address` only
- fp16 runs with dynamic loss scaling pickle `DynamicLossScaler` instead of `LossScaler`
  (fp16 cannot be trained on this CPU, so that one is taken from DeepSpeed's source, not a file).

`torch.load(weights_only=True)` refuses them, and DeepSpeed itself loads with weights_only=False,
which would execute arbitrary code from an untrusted file. Instead these stubs carry the exact
`__module__`/`__qualname__` DeepSpeed pickles, so torch's restricted unpickler accepts them as
plain attribute bags: nothing from deepspeed is imported and no pickled code runs. `torchfile`
lists `DEEPSPEED_STUBS` in its allow-list.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


def _named(cls: type, module: str) -> type:
    cls.__module__ = module
    cls.__qualname__ = cls.__name__
    return cls


class ZeroStageEnum(int, enum.Enum):
    """`deepspeed.runtime.zero.config.ZeroStageEnum` (the `zero_stage` entry of optim files)."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3
    max_stage = 3  # an alias of `weights`, as in DeepSpeed


class LossScaler:
    """`deepspeed.runtime.fp16.loss_scaler.LossScaler`: static loss scale (`cur_scale`, `dynamic`)."""


class DynamicLossScaler:
    """`deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler`: fp16 dynamic loss scale state."""


@dataclass
class fragment_address:  # noqa: N801 - DeepSpeed's spelling is what the pickle names
    """`deepspeed.utils.tensor_fragment.fragment_address`: a param's slice of a flat partition."""

    numel: int = 0
    start: int = 0


_named(ZeroStageEnum, "deepspeed.runtime.zero.config")
_named(LossScaler, "deepspeed.runtime.fp16.loss_scaler")
_named(DynamicLossScaler, "deepspeed.runtime.fp16.loss_scaler")
_named(fragment_address, "deepspeed.utils.tensor_fragment")

DEEPSPEED_STUBS: tuple[type, ...] = (ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address)


def stub_names() -> list[str]:
    """The fully qualified names the stubs stand for (what a pickle must spell to use them)."""
    return [f"{c.__module__}.{c.__qualname__}" for c in DEEPSPEED_STUBS]
