"""Checkpoint writers for `sat-dist convert`: one module per output format, with the interface of
`writers.base` (NAME, check, write, finish). `WRITERS` is the table `--to` chooses from."""
from __future__ import annotations

from types import ModuleType

from ..errors import ConfigError
from . import dcp, diffusers, safetensors, sat

WRITERS: dict[str, ModuleType] = {m.NAME: m for m in (sat, safetensors, diffusers, dcp)}


def writer_for(name: str) -> ModuleType:
    if name not in WRITERS:
        raise ConfigError(f"--to {name!r} is not an output format; choose one of {sorted(WRITERS)}")
    return WRITERS[name]


__all__ = ["WRITERS", "writer_for"]
