"""A test-only hook that holds a rank at a named point of a load, so fault tests can stop, kill or
interrupt it exactly there (tests/test_faults.py, `make soak`). Unset, it costs one dict lookup.

Points, in load order: `rendezvous` (before joining the process group), `tag` (the agreement on
what `latest` names), `index` (before indexing the checkpoint), `plan` (the agreement after
planning), `read` (before the first tensor byte), `agree` (the final agreement).

- `SAT_DIST_TEST_PAUSE_DIR=DIR`: each rank writes `DIR/<point>.<rank>` (its pid) on reaching a point.
- `SAT_DIST_TEST_PAUSE_AT=POINT[@R,R...]`: those ranks (default: all) then sleep
  `SAT_DIST_TEST_PAUSE_S` seconds (default 60) at POINT.
"""
from __future__ import annotations

import os
import time


def pause_point(point: str, rank: int) -> None:
    folder = os.environ.get("SAT_DIST_TEST_PAUSE_DIR")
    if folder:
        with open(os.path.join(folder, f"{point}.{rank}"), "w") as f:
            f.write(str(os.getpid()))
    at = os.environ.get("SAT_DIST_TEST_PAUSE_AT", "")
    name, _, ranks = at.partition("@")
    if name == point and (not ranks or str(rank) in ranks.split(",")):
        time.sleep(float(os.environ.get("SAT_DIST_TEST_PAUSE_S", "60")))
