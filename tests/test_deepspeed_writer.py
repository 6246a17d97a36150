"""sat_dist/testing/zero3_writer.py (used by bench/zero3_bench.py for a 504M-parameter ZeRO-3 checkpoint
that real DeepSpeed cannot train on this machine) against real DeepSpeed ZeRO-3 fixtures:
rewriting a fixture from its own weights gives the same file names, the same pickle structure and
globals, the same param_shapes and partitions (outside DeepSpeed's uninitialised padding), the same
zero_to_fp32 output (checked in tests/ds_writer_check.py, which imports deepspeed and so runs in a
subprocess), and the same sat_dist loads."""
import json
import os
import subprocess
import sys

import pytest

from sat_dist.testing.dist import run_ranks, values
from ds_testlib import HERE, case, load_rank, warm_up

warm_up()


@pytest.mark.parametrize("kind,name", [("dp2", "z3_bf16"), ("dp4", "z3_fp32"), ("dp4", "sat_z3_fp32"),
                                       ("dp2", "z3_rotary_bf16")])
def test_writer_reproduces_deepspeed_zero3_layout(tmp_path_factory, tmp_path, kind, name):
    c = case(tmp_path_factory, kind, name)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "ds_writer_check.py"), c.dir, str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["problems"] == [], "\n".join(result["problems"])
    written = str(tmp_path / "ckpt")
    for tp in (2, 4):
        real = values(run_ranks(tp, load_rank, c.ckpt, tp, c.overrides()))
        mine = values(run_ranks(tp, load_rank, written, tp, c.overrides()))
        for (a, ra, _), (b, rb, _) in zip(real, mine):
            assert ra.digest == rb.digest and ra.bytes_read == rb.bytes_read
