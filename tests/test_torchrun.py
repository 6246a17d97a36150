"""End-to-end through the real torchrun launcher and the installed console scripts."""
import json
import os
import subprocess
import sys

import pytest

from sat_dist.testing.dist import free_port, run_ranks, values
from sat_rules import CONFIGS, full_state_dict, write_sat_checkpoint

BIN = os.path.dirname(sys.executable)
TORCHRUN = os.path.join(BIN, "torchrun")


def torchrun(nproc, *args, env=None, timeout=180):
    cmd = [TORCHRUN, "--nnodes=1", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{free_port()}", "-m", "sat_dist", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tr") / "ckpt")
    write_sat_checkpoint(root, CONFIGS["plain"], full_state_dict(CONFIGS["plain"], seed=2), 2)
    return root


def _digest(rank, path, tp):
    import sat_dist

    _, rep = sat_dist.load_model(path, tp=tp, return_report=True, digest=True)
    return rep.ranks[rank].digest


def test_torchrun_load_tp2_dp2_matches_forked_load(ckpt, tmp_path):
    report = tmp_path / "load.json"
    out = torchrun(4, "load", ckpt, "--tp", "2", "--report", str(report))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "eval mode agreed on 4/4 ranks" in out.stdout
    data = json.loads(report.read_text())
    assert (data["status"], data["world_size"], data["tp"], data["dp"]) == ("ok", 4, 2, 2)
    forked = values(run_ranks(2, _digest, ckpt, 2))
    assert [r["digest"] for r in data["ranks"]] == forked * 2
    assert all(r["bytes_read"] <= 1.05 * r["bytes_needed"] for r in data["ranks"])


def test_torchrun_failure_exits_nonzero_on_every_rank_with_same_error(ckpt):
    out = torchrun(2, "load", ckpt, "--tp", "2", "model.num_attention_heads=3", "model.hidden_size=66")
    assert out.returncode != 0
    lines = [l for l in out.stderr.splitlines() if l.startswith("[rank ")]
    head = "sat_dist load failed on rank(s) [0, 1] of 2 during 'plan':"
    assert sorted(lines) == [f"[rank 0] {head}", f"[rank 1] {head} (the same error on every rank; rank 0 prints "
                                                 f"it in full)"], out.stderr[-3000:]
    # rank 0 prints the agreed message, which names both ranks' cause; rank 1 one line
    assert out.stderr.count("TP=2 does not divide num_attention_heads=3") == 2


def test_demo_under_torchrun(tmp_path):
    """`make demo`: the load table, then the tiny pipeline sampled on the same 4 ranks (TP 2 x CFG
    parallel 2) into an mp4 that decodes to the frames it says."""
    import imageio.v3 as iio

    video = tmp_path / "out" / "demo.mp4"
    out = torchrun(4, "demo", "--tp", "2", "--out", str(video), env={"SAT_DIST_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "eval mode agreed on 4/4 ranks" in out.stdout
    assert os.path.isfile(tmp_path / "demo-ckpt-v1" / "1" / "mp_rank_00_model_states.pt")
    assert json.load(open(tmp_path / "demo-ckpt-v1" / "model_config.json"))["model_class"] == "BaseModel"
    assert f"on 4 ranks (TP 2 x CFG parallel 2), 4 steps: wrote {video}: 9 frames 32x48" in out.stdout
    assert iio.imread(video).shape == (9, 32, 48, 3)
    assert os.path.isfile(tmp_path / "demo-pipeline-v1" / "model_index.json")


def test_console_script_single_process(ckpt):
    out = subprocess.run([os.path.join(BIN, "sat-dist"), "load", ckpt], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "eval mode agreed on 1/1 ranks" in out.stdout
