"""`sample`'s LoRA adapters: per-line adapters in `--prompts`, checked against the DiT before anything loads,
and the order in which the engine switches between them.

A `--prompts` line may end with its own adapters, written as on the command line:

    a red panda eating bamboo --lora style.safetensors:0.8 --lora dimx.safetensors
    a cat playing piano --lora none

A line without `--lora` takes the command line's; `--lora none` means the base alone. The prompts are run
in groups of equal adapters, in the order each set first appears, and `Engine.set_loras` switches between
groups (collective: every work group changes together), re-reading only the touched base rows.
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional, Sequence

from ..config import parse_lora_arg
from ..errors import ConfigError
from ..lora import files as lora_files
from ..models import TPInfo, build_meta_model, collect_specs
from .layout import Components

Loras = tuple[tuple[str, float], ...]
_FLAG = re.compile(r"\s--lora\s+(\S+)")


def short(loras: Loras) -> str:
    """`folder/file:strength, ...` for messages (released LoRAs share the file name pytorch_lora_weights)."""
    return ", ".join(f"{os.path.join(os.path.basename(os.path.dirname(p)), os.path.basename(p))}:{s:g}"
                     for p, s in loras) or "none"


def split_prompt(line: str) -> tuple[str, Optional[Loras]]:
    """(the prompt, its adapters or None when the line names none)."""
    found = _FLAG.findall(" " + line)
    if not found:
        return line, None
    prompt = _FLAG.sub("", " " + line).strip()
    if not prompt:
        raise ConfigError(f"--prompts line {line!r} has adapters but no prompt")
    if found == ["none"]:
        return prompt, ()
    if "none" in found:
        raise ConfigError(f"--prompts line {line!r}: '--lora none' cannot go with other adapters")
    return prompt, tuple(parse_lora_arg(x) for x in found)


def per_prompt(lines: Sequence[str], default: Sequence) -> tuple[list[str], list[Loras]]:
    """The prompts and each one's adapters (the command line's `default` where a line names none)."""
    base = tuple(parse_lora_arg(x) for x in default)
    prompts, loras = [], []
    for line in lines:
        prompt, mine = split_prompt(line)
        prompts.append(prompt)
        loras.append(base if mine is None else mine)
    return prompts, loras


def batches(loras: Sequence[Loras]) -> list[tuple[Loras, list[int]]]:
    """Prompt indices grouped by equal adapters, in the order each set first appears."""
    out: dict[Loras, list[int]] = {}
    for i, ls in enumerate(loras):
        out.setdefault(ls, []).append(i)
    return list(out.items())


def check_adapters(parts: Components, loras: Sequence[Loras], alpha: Optional[float]) -> list[Any]:
    """Open every distinct adapter against the DiT's tensors (headers only, at TP 1: the shapes are TP-free)
    so a LoRA for another model fails the command before any component loads."""
    wanted = sorted({p for ls in loras for p, _ in ls})
    if not wanted:
        return []
    cfg = parts.models["transformer"]
    model = build_meta_model(cfg.model, TPInfo(1, 0, None))
    specs, prefix = collect_specs(model), getattr(model, "checkpoint_prefix", "")
    return [lora_files.open_adapter(p, specs, prefix, alpha if alpha is not None else cfg.lora_alpha)
            for p in wanted]
