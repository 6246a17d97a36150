"""What a failed job prints and writes: the path that does not exist is named; under torchrun rank 0
prints the agreed error in full and every other rank one line pointing to it; every rank exits
non-zero; `--report` holds status "error", the phase, the failing ranks and their causes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from sat_dist.cli import main as cli_main
from sat_dist.testing.dist import free_port
from sat_rules import CONFIGS, full_state_dict, write_sat_checkpoint

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def test_nonexistent_path_is_named(capsys, tmp_path):
    report = tmp_path / "r.json"
    assert cli_main(["load", "/no/such/dir", "--report", str(report)]) == 1
    err = capsys.readouterr().err
    assert "checkpoint path /no/such/dir does not exist" in err and "model config" not in err, err
    rep = json.loads(report.read_text())
    assert rep["status"] == "error" and rep["error_type"] == "CheckpointError"
    assert rep["failures"] == [{"rank": 0, "cause": "CheckpointError: " + rep["error"]}]


def test_torchrun_prints_the_group_error_once_and_reports_it(tmp_path):
    root = str(tmp_path / "ckpt")
    write_sat_checkpoint(root, CONFIGS["plain"], full_state_dict(CONFIGS["plain"]), 2)
    os.remove(os.path.join(root, "1000", "mp_rank_01_model_states.pt"))
    report = tmp_path / "report.json"
    out = subprocess.run([TORCHRUN, "--nnodes=1", "--nproc_per_node=3", "--rdzv_backend=c10d",
                          f"--rdzv_endpoint=127.0.0.1:{free_port()}", "-m", "sat_dist", "load", root, "--tp", "1",
                          "--report", str(report)], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("[rank ")]
    by_rank = {int(ln[6:ln.index("]")]): ln for ln in lines}
    assert sorted(by_rank) == [0, 1, 2] and len(lines) == 3, out.stderr[-3000:]
    head = "sat_dist load failed on rank(s) [0, 1, 2] of 3 during 'plan':"
    assert by_rank[0] == f"[rank 0] {head}"
    for r in (1, 2):
        assert by_rank[r] == f"[rank {r}] {head} (the same error on every rank; rank 0 prints it in full)"
    # the cause, naming the missing file, appears once per failing rank: in rank 0's full text only
    assert out.stderr.count("missing ['mp_rank_01_model_states.pt']") == 3, out.stderr[-3000:]
    assert not re.search(r'File "[^"]*/sat_dist/', out.stderr), out.stderr[-3000:]  # no rank's traceback
    rep = json.loads(report.read_text())
    assert (rep["status"], rep["phase"], rep["world_size"], rep["agreed"]) == ("error", "plan", 3, True)
    assert [f["rank"] for f in rep["failures"]] == [0, 1, 2]
    assert all("mp_rank_01_model_states.pt" in f["cause"] for f in rep["failures"])
