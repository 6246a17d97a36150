"""GPU-ready by construction (issue 19), shown on CPU where gloo stands in for both planes:

* routing: every agreement object travels on the control group (gloo, its own object), only
  tensors on the device groups, and the exchange's broadcasts carry bytes (uint8: NCCL has no
  uint16/uint32) — in a plain load, an exchange load and an engine load with a sample;
* a rank failing inside its read with the exchange on fails every rank with THAT rank's error
  (without the read agreement, the same run ends in timeouts that never name it);
* a work group idle longer than --timeout while another renders finishes cleanly (the runtime
  timeout takes over after the load);
* one job, one configuration: different --tp / --dtype / checkpoint across ranks are refused at the
  first agreement naming the option; --report on rank 0 only still gives every rank's digest;
* device mapping: more local ranks than GPUs refused, one GPU per rank honoured, two ranks on one
  GPU refused on every rank before any device group exists;
* a second load in one process reuses the first's groups (none leak) and the first model still works.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

import sat_dist
from sat_dist.errors import ConfigError
from sat_dist.runtime import pick_device, setup_problems
from sat_dist.testing.dist import run_ranks, values
from sat_rules import CONFIGS, full_state_dict, write_sat_checkpoint

PLAIN = CONFIGS["plain"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gpu_ready"))
    write_sat_checkpoint(root, PLAIN, full_state_dict(PLAIN, seed=5), 1)
    return root


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from engine_fixtures import write_pipeline

    return write_pipeline(str(tmp_path_factory.mktemp("gpu_ready_cvx")), "5b", seed=1)


# --- routing ------------------------------------------------------------------------------------

def _routed(rank, what, path):
    """Run `what` with every c10d collective recorded: (op, plane, dtypes, inside an object gather)."""
    import torch.distributed as dist

    import sat_dist.collectives as C
    from sat_dist import loader

    calls, depth = [], [0]
    real_gather = C.all_gather_objects

    def gather(obj, group):
        depth[0] += 1
        try:
            return real_gather(obj, group)
        finally:
            depth[0] -= 1
    C.all_gather_objects = gather
    C.__dict__["all_gather_objects"] = gather

    def wrap(name):
        real = getattr(dist, name)

        def op(*a, **k):
            group = k.get("group")
            tensors = [x for x in a if isinstance(x, torch.Tensor)]
            tensors += [t for x in a if isinstance(x, list) for t in x if isinstance(t, torch.Tensor)]
            calls.append((name, group, sorted({str(t.dtype) for t in tensors}), depth[0] > 0))
            return real(*a, **k)
        setattr(dist, name, op)
    for name in ("all_gather", "broadcast", "all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor"):
        wrap(name)
    if what == "engine":
        engine = sat_dist.load_engine(path, tp=2, timeout_s=30)
        engine.run("a red panda", num_steps=2, seed=1)
        engine.finish()
        rt = engine.rt
    else:
        sat_dist.load_model(path, tp=2, timeout_s=30, exchange="on" if what == "exchange" else "off")
        rt = loader._RUNTIMES[-1]
    device_groups = {id(g) for g in (rt.tp_group, rt.dp_group, rt.cfg_group) if g is not None}
    ctrl = id(rt.ctrl_group)
    out = [(name, "ctrl" if id(g) == ctrl else ("device" if g is None or id(g) in device_groups else "other"),
            dtypes, in_gather) for name, g, dtypes, in_gather in calls]
    return out, ctrl not in device_groups and rt.ctrl_group is not dist.distributed_c10d._get_default_group()


@pytest.mark.parametrize("what", ["load", "exchange", "engine"])
def test_objects_travel_on_the_control_group_and_only_tensors_on_the_device_groups(ckpt, pipeline, what):
    path = pipeline if what == "engine" else ckpt
    for calls, separate in values(run_ranks(4, _routed, what, path, timeout=240)):
        assert separate  # the control group is its own object, neither the default nor a device group
        gathers = [c for c in calls if c[3]]
        others = [c for c in calls if not c[3]]
        assert gathers and all(plane == "ctrl" and dtypes == ["torch.uint8"] for _, plane, dtypes, _ in gathers)
        assert all(plane == "device" for _, plane, _, _ in others), others
        broadcasts = [c for c in others if c[0] == "broadcast"]
        if what == "exchange":  # TP2 x DP2 from one file: shared tensors go over the DP groups, as bytes
            assert broadcasts and all(dtypes == ["torch.uint8"] for _, _, dtypes, _ in broadcasts)
        if what == "engine":  # TP forwards and the CFG pair's gather are device-plane tensor traffic
            assert {c[0] for c in others} >= {"all_reduce", "all_gather"}


# --- a failed read is agreed before the exchange ------------------------------------------------

def _load_failing(rank, path, skip_read_agreement):
    from sat_dist import loader

    if skip_read_agreement:  # the code before issue 19: straight from the read to the broadcasts
        real = loader.agree_phase

        def unagreed(rt, phase, err, *a, **k):
            if phase != "read":
                return real(rt, phase, err, *a, **k)
            if err is not None:
                raise err
            return None
        loader.agree_phase = unagreed
    t = time.monotonic()
    try:
        sat_dist.load_model(path, tp=2, timeout_s=4, exchange="on")
    except sat_dist.SatDistError as exc:
        return type(exc).__name__, str(exc), time.monotonic() - t
    return "loaded", "", time.monotonic() - t


def test_a_rank_failing_in_its_read_fails_every_rank_with_its_error(ckpt):
    env = {r: {"SAT_DIST_TEST_FAIL_AT": "read@1", "SAT_DIST_TEST_FAIL": "oom"} for r in range(4)}
    got = values(run_ranks(4, _load_failing, ckpt, False, env=env, timeout=60))
    texts = {text for _, text, _ in got}
    assert len(texts) == 1  # every rank raises the same error
    (text,) = texts
    assert all(kind == "GroupLoadError" for kind, _, _ in got)
    assert "during 'read'" in text and "rank 1: RuntimeError" in text and "allocate" in text
    assert all(seconds < 4 for _, _, seconds in got)  # agreed at once, no timeout waited out
    # Without the read agreement the failing rank leaves its peers in the broadcasts: the run ends in
    # timeouts on the other ranks, and no survivor names the real error.
    old = values(run_ranks(4, _load_failing, ckpt, True, env=env, timeout=60))
    assert len({text for _, text, _ in old}) > 1
    assert not all("allocate" in text for r, (_, text, _) in enumerate(old) if r != 1)


# --- sampling is not bounded by the load's timeout ------------------------------------------------

def _cli_slow_decode(rank, argv, seconds):
    """The CLI, with rank 0's VAE decode `seconds` slower (a long render, as at real size)."""
    from sat_dist.cli import main
    from sat_dist.engine import video

    if rank == 0:
        real = video.decode
        video.decode = lambda *a, **k: (time.sleep(seconds), real(*a, **k))[1]
    return main(argv)


def test_a_group_idle_longer_than_the_load_timeout_while_another_renders_finishes(pipeline, tmp_path):
    """World 4, TP 1, CFG pairs: group 0 (ranks 0, 1) renders prompts 0 and 2, group 1 prompt 1 and
    then waits in `finish`; rank 0's decode takes 6 s longer, so its pair partner waits at its next
    CFG gather and group 1 in `finish`, both longer than --timeout 4 (which still bounds the load)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red panda\na cat\nwaves\n")
    report = str(tmp_path / "run.json")
    argv = ["sample", "--model", pipeline, "--prompts", str(prompts), "--steps", "1", "--tp", "1", "--timeout", "4",
            "--out-dir", str(tmp_path / "videos"), "--report", report]
    assert values(run_ranks(4, _cli_slow_decode, argv, 6.0, timeout=240)) == [0, 0, 0, 0]
    assert len(os.listdir(tmp_path / "videos")) == 3
    assert sorted(r["rank"] for r in json.load(open(report))["runs"]) == [0, 0, 2]


# --- one job, one configuration -------------------------------------------------------------------

def _load_as(rank, path, per_rank):
    opts = {"tp": 2, "timeout_s": 20, **per_rank.get(rank, {})}
    path = opts.pop("path", path)
    try:
        _, rep = sat_dist.load_model(path, return_report=True, **opts)
    except sat_dist.GroupLoadError as exc:
        return exc.phase, str(exc)
    return "ok", [r.digest for r in rep.ranks]


@pytest.mark.parametrize("per_rank,phase,named", [
    ({2: {"tp": 1}, 3: {"tp": 1}}, "setup", "--tp 1 where rank 0 has --tp 2"),
    ({1: {"dtype": "bf16"}}, "tag", "--dtype 'bf16' (rank 0: 'as stored')"),
    ({3: {"path": "OTHER"}}, "tag", "checkpoint"),
])
def test_ranks_started_differently_are_refused_at_the_first_agreement(ckpt, tmp_path, per_rank, phase, named):
    if any("path" in v for v in per_rank.values()):
        other = str(tmp_path / "other")
        write_sat_checkpoint(other, PLAIN, full_state_dict(PLAIN, seed=6), 1)
        per_rank = {r: {"path": other} for r in per_rank}
    got = values(run_ranks(4, _load_as, ckpt, per_rank, timeout=60))
    assert len({text for _, text in got}) == 1  # the same error on every rank
    (got_phase, text), bad = got[0], sorted(per_rank)
    assert got_phase == phase and named in text
    assert f"rank(s) {bad}" in text


def test_a_report_asked_on_rank_0_only_still_has_every_ranks_digest(ckpt, tmp_path):
    report = str(tmp_path / "load.json")
    got = values(run_ranks(4, _load_as, ckpt, {0: {"report": report}}, timeout=60))
    assert all(phase == "ok" for phase, _ in got)
    digests = [r["digest"] for r in json.load(open(report))["ranks"]]
    assert all(isinstance(d, str) and len(d) == 64 for d in digests)
    assert digests[0] == digests[2] and digests[1] == digests[3]  # DP replicas of each TP shard


# --- device mapping ---------------------------------------------------------------------------------

def test_device_mapping_refuses_more_local_ranks_than_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert pick_device(3, 4, gpus=8) == torch.device("cuda", 3)
    assert pick_device(3, 4, gpus=4) == torch.device("cuda", 3)
    assert pick_device(3, 4, gpus=1) == torch.device("cuda", 0)  # per-task binding: each rank sees its GPU
    assert pick_device(3, 4, "cuda", gpus=1) == torch.device("cuda", 0)
    assert pick_device(0, 2, gpus=0) == torch.device("cpu")
    assert pick_device(1, 2, "cpu", gpus=8) == torch.device("cpu")
    assert pick_device(1, 2, "cuda:5", gpus=8) == torch.device("cuda", 5)
    with pytest.raises(ConfigError) as exc:
        pick_device(0, 4, gpus=2)
    assert "4 ranks on this node but only 2 GPUs visible (CUDA_VISIBLE_DEVICES='0,1')" in str(exc.value)
    assert "--nproc_per_node=2" in str(exc.value)
    with pytest.raises(ConfigError):
        pick_device(0, 2, "cuda:2", gpus=2)
    with pytest.raises(ConfigError):
        pick_device(0, 1, "cuda", gpus=0)


def _ident(rank, uuid, kernel="k0", type_="cuda"):
    return {"rank": rank, "tp": 1, "cfg_parallel": False, "error": None,
            "device": {"type": type_, "device": f"{type_}:0", "uuid": uuid, "kernel": kernel, "host": f"h{kernel}",
                       "visible": None}}


def test_setup_problems_name_shared_gpus_mixed_devices_and_other_meshes():
    ok = [_ident(0, "GPU-a"), _ident(1, "GPU-b"), _ident(2, "GPU-a", "k1"), _ident(3, "GPU-b", "k1")]
    assert setup_problems(ok) == {}  # the same UUIDs on two hosts are two GPUs
    shared = [_ident(0, "GPU-a"), _ident(1, "GPU-a"), _ident(2, "GPU-b")]
    got = setup_problems(shared)
    assert sorted(got) == [0, 1] and "rank(s) [1] use too" in got[0] and "GPU-a" in got[0]
    mixed = [_ident(0, "GPU-a"), _ident(1, None, type_="cpu")]
    assert sorted(setup_problems(mixed)) == [1]
    other_tp = [_ident(0, "GPU-a"), {**_ident(1, "GPU-b"), "tp": 2}]
    assert "--tp 2 where rank 0 has --tp 1" in setup_problems(other_tp)[1]


def _shared_gpu(rank, path):
    import sat_dist.collectives as C

    made = []
    C.device_identity = lambda dev, kernel, host: {"type": "cuda", "device": "cuda:0", "uuid": "GPU-same",
                                                   "kernel": "k", "host": "h", "visible": None}
    real = C._device_groups
    C._device_groups = lambda *a: (made.append(1), real(*a))
    try:
        sat_dist.load_model(path, tp=1, timeout_s=20)
    except sat_dist.GroupLoadError as exc:
        return exc.phase, str(exc), made
    return "ok", "", made


def test_two_ranks_on_one_gpu_are_refused_before_any_device_group(ckpt):
    got = values(run_ranks(2, _shared_gpu, ckpt, timeout=60))
    assert len({text for _, text, _ in got}) == 1
    phase, text, made = got[0]
    assert phase == "setup" and "GPU-same" in text and "rank(s) [0, 1]" in text
    assert all(not m for _, _, m in got)  # refused before the TP/DP groups (NCCL) were created


# --- a second load in one process --------------------------------------------------------------------

def _two_loads(rank, path):
    import torch.distributed as dist

    from sat_dist import loader

    first = sat_dist.load_model(path, tp=2, timeout_s=20)
    groups = len(dist.distributed_c10d._world.pg_map)
    second = sat_dist.load_model(path, tp=2, timeout_s=20)
    after = len(dist.distributed_c10d._world.pg_map)
    ids = torch.tensor([[1, 2, 3, 4]])
    pos = torch.arange(4)[None]
    mask = torch.ones(1, 1, 4, 4).tril()
    with torch.no_grad():
        same = torch.equal(first(ids, pos, mask), second(ids, pos, mask))
    shared = loader._RUNTIMES[0].tp_group is loader._RUNTIMES[1].tp_group
    sat_dist.shutdown()
    return groups, after, same, shared, dist.is_initialized()


def test_a_second_load_reuses_the_groups_and_shutdown_destroys_them(ckpt):
    for groups, after, same, shared, alive in values(run_ranks(2, _two_loads, ckpt, timeout=60)):
        assert after == groups and shared  # no new communicators for the same mesh
        assert same  # the first model still runs its TP forward
        assert not alive


# --- make bench-gpu fails when sat_dist's load failed ---------------------------------------------

@pytest.mark.parametrize("failed", [False, True])
def test_bench_exits_nonzero_when_a_method_failed_on_a_rank(monkeypatch, tmp_path, failed):
    import argparse

    from sat_dist import bench

    def fake(*a, **k):
        res = bench.BenchResult("ckpt", [], 0, 2, 1)
        res.methods = [bench.MethodResult("limit", skipped="needs a file"),
                       bench.MethodResult("sat_dist", skipped="failed on rank 1: OutOfMemoryError: ..." if failed
                                          else "needs CUDA", failed=failed)]
        return res
    monkeypatch.setattr(bench, "run_bench", fake)
    args = argparse.Namespace(methods=None, checkpoint="ckpt", world=2, tp=1, cold=False, repeat=1, config=[],
                              overrides=[], json=str(tmp_path / "b.json"))
    assert bench.cmd_bench(args) == (1 if failed else 0)
    assert json.load(open(tmp_path / "b.json"))["methods"][1]["failed"] is failed


# --- make gpu-check ------------------------------------------------------------------------------

def test_gpu_check_runs_its_rows_on_cpu_and_refuses_without_a_gpu():
    """The script itself stays runnable: one row in --cpu mode, and without --cpu on a machine with
    no GPU one FAIL row and exit code 2 (the full --cpu table: `make gpu-check GPU_CHECK_ARGS=--cpu`)."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "gpu_check.py")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cpu = subprocess.run([sys.executable, script, "--cpu", "--only", "env"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert cpu.returncode == 0, cpu.stdout + cpu.stderr
    assert any(line.startswith("env") and "| PASS |" in line for line in cpu.stdout.splitlines())
    gpu = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60, env=env)
    assert gpu.returncode == 2 and "no GPU visible" in gpu.stdout + gpu.stderr
