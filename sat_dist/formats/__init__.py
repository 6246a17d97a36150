"""Checkpoint readers. Each turns a path into a CheckpointIndex without reading tensor data."""
from __future__ import annotations

import os
from typing import Callable, Mapping, Optional

from ..errors import CheckpointError
from . import deepspeed as _deepspeed
from . import sat as _sat
from .index import CheckpointIndex, Piece
from .torchfile import StoredTensor

# A reader: (root, specs, tp, tp_rank, tag, prefix, **options) -> (index, preferred files), or None
# when the folder is not its format. Tried in order.
Reader = Callable[..., Optional[tuple]]


def _read_sat(root, specs, tp, tp_rank, tag=None, prefix="", **_options):
    return _sat.read_index(root, specs, tp, tp_rank, tag, prefix) if _sat.is_sat_checkpoint(root) else None


# DeepSpeed first: a ZeRO-1/2 folder also holds mp_rank_XX_model_states.pt (the SAT reader's
# format); it recognises ZeRO folders by their *_optim_states.pt / zero_pp_rank_* files.
READERS: list[Reader] = [_deepspeed.read, _read_sat]


def open_index(root: str, specs: Mapping, tp: int, tp_rank: int, tag: Optional[str] = None, prefix: str = "",
               **options):
    """Index only the files this rank needs, with whichever reader recognises `root`.
    `options` (e.g. weights="fp32") go to every reader; readers ignore those they do not know."""
    if not os.path.exists(root):
        raise CheckpointError(f"checkpoint path {root} does not exist")
    for reader in READERS:
        found = reader(root, specs, tp, tp_rank, tag, prefix, **options)
        if found is not None:
            return found
    raise CheckpointError(
        f"{root}: no 'latest' file and no known checkpoint layout (SAT mp_rank_XX_model_states.pt or "
        f"DeepSpeed ZeRO files); pass the folder that holds 'latest'"
    )


__all__ = ["CheckpointIndex", "Piece", "READERS", "StoredTensor", "open_index"]
