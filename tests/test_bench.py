"""`sat-dist bench` (issue 14) on a tiny SAT checkpoint: every method runs in forked ranks and keeps
exactly its TP slices; byte counts are exact (never timings): the limit and sat_dist read exactly
the planned bytes per rank (with `load.exchange=on`, the exchange shares the replicated ones), SAT-style reads every file
byte on every rank, and the summary's ratios are taken against the limit of the same run."""
import json
import os

import pytest

from sat_dist.bench import run_bench
from sat_dist.bench.methods import prepare
from sat_rules import CONFIGS, full_state_dict, write_sat_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bench"))
    write_sat_checkpoint(root, CONFIGS["plain"], full_state_dict(CONFIGS["plain"], seed=11), 1)
    return root


def test_bench_methods_read_exact_bytes(ckpt, tmp_path):
    res = run_bench(ckpt, world=2, tp=2, repeat=2, methods=["limit", "sat_dist", "sat_style", "mmap"],
                    log=lambda _: None)
    by = {m.method: m for m in res.methods}
    assert all(m.skipped is None and len(m.rounds) == 2 for m in by.values()), {m.method: m.skipped for m in by.values()}
    need = [prepare(r, ckpt, 2, [], [])[3].bytes_to_read for r in range(2)]
    file_bytes = os.path.getsize(res.files[0])
    assert res.file_bytes == file_bytes and res.cache.startswith("warm (after")
    for rnd in range(2):
        limit, ours, sat = (by[m].rounds[rnd] for m in ("limit", "sat_dist", "sat_style"))
        assert [s["bytes_read"] for s in limit] == need
        # exchange auto on one CPU host: off (the page cache shares the reads); each rank reads its plan
        assert [(s["bytes_read"], s["bytes_received"]) for s in ours] == [(n, 0) for n in need]
        assert [s["bytes_read"] for s in sat] == [file_bytes, file_bytes]
        assert all(s["bytes_kept"] == ours[r]["bytes_kept"] for r, s in enumerate(sat))
    out = tmp_path / "bench.json"
    out.write_text(json.dumps(res.to_dict()))
    summary = {m["method"]: m["summary"] for m in json.loads(out.read_text())["methods"]}
    assert summary["limit"]["x_limit"] == 1.0
    assert summary["sat_style"]["job_bytes_read"] == 2 * file_bytes
    assert "sat_dist" in res.table() and "x limit" in res.table()


def test_bench_passes_overrides_to_sat_dist(ckpt):
    """`load.exchange=on`: replicated tensors read once in the job, the rest of each rank's bytes arrive."""
    res = run_bench(ckpt, world=2, tp=2, methods=["sat_dist"], overrides=["load.exchange=on"], log=lambda _: None)
    need = [prepare(r, ckpt, 2, [], [])[3].bytes_to_read for r in range(2)]
    ours = res.methods[0].rounds[0]
    assert [s["bytes_read"] + s["bytes_received"] for s in ours] == need
    assert sum(s["bytes_read"] for s in ours) < sum(need) and all(s["bytes_received"] > 0 for s in ours)


def test_bench_says_which_gpu_methods_cannot_run_here(ckpt, monkeypatch):
    """The GPU methods are decided in the parent from NVML's GPU count (no CUDA before the fork):
    `h2d` needs a GPU; sat_dist on CUDA needs one GPU per rank unless told `load.device=cpu`. Here
    (no GPU) a run that asks for h2d skips it and still runs the others."""
    import torch

    from sat_dist.bench import _available

    res = run_bench(ckpt, world=2, tp=2, methods=["h2d", "limit"], log=lambda _: None)
    if torch.cuda.device_count() == 0:
        assert res.methods[0].skipped is not None and res.methods[0].rounds == []
    assert res.methods[1].skipped is None and len(res.methods[1].rounds) == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert _available("h2d", False, 1, []) is not None
    assert _available("sat_dist", False, 4, []) is None  # CPU ranks: any world
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _available("h2d", False, 4, []) is None
    assert _available("sat_dist", False, 2, []) is None
    assert _available("sat_dist", False, 4, []) is not None
    assert _available("sat_dist", False, 4, ["load.device=cpu"]) is None
