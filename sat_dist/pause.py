"""A test-only hook that holds a rank at a named point of a load, so fault tests can stop, kill or
interrupt it exactly there (tests/test_faults.py, `make soak`). Unset, it costs one dict lookup.

Points, in load order: `rendezvous` (before joining the process group), `tag` (the agreement on
what `latest` names), `index` (before indexing the checkpoint), `plan` (the agreement after
planning), `read` (before the first tensor byte), `exchange` (before the read agreement that
precedes the exchange's broadcasts; reached only with the exchange on), `agree` (the final
agreement); and in the engine `decode` (a group leader, before its VAE decode).

- `SAT_DIST_TEST_PAUSE_DIR=DIR`: each rank writes `DIR/<point>.<rank>` (its pid) on reaching a point.
- `SAT_DIST_TEST_PAUSE_AT=POINT[@R,R...]`: those ranks (default: all) then sleep
  `SAT_DIST_TEST_PAUSE_S` seconds (default 60) at POINT.
- `SAT_DIST_TEST_FAIL_AT=POINT[@R,R...]` (`fail_point`, at `read`): those ranks fail there, inside the
  phase's error handling; `SAT_DIST_TEST_FAIL=oom` allocates far more than the rank's device holds
  (a real OutOfMemoryError on CUDA, the allocator's RuntimeError on CPU), anything else raises OSError
  (a short read).
"""
from __future__ import annotations

import os
import time


def _named(var: str, point: str, rank: int) -> bool:
    name, _, ranks = os.environ.get(var, "").partition("@")
    return name == point and (not ranks or str(rank) in ranks.split(","))


def fail_point(point: str, rank: int, device=None) -> None:
    """Fail here when SAT_DIST_TEST_FAIL_AT names this point and rank (see the module docstring)."""
    if not _named("SAT_DIST_TEST_FAIL_AT", point, rank):
        return
    if os.environ.get("SAT_DIST_TEST_FAIL") == "oom":
        import torch

        torch.empty(1 << 58, dtype=torch.uint8, device=device or "cpu")  # 256 PiB: no device holds it
    raise OSError(f"injected failure at '{point}' on rank {rank} (SAT_DIST_TEST_FAIL_AT)")


def pause_point(point: str, rank: int) -> None:
    folder = os.environ.get("SAT_DIST_TEST_PAUSE_DIR")
    if folder:
        with open(os.path.join(folder, f"{point}.{rank}"), "w") as f:
            f.write(str(os.getpid()))
    if _named("SAT_DIST_TEST_PAUSE_AT", point, rank):
        time.sleep(float(os.environ.get("SAT_DIST_TEST_PAUSE_S", "60")))
