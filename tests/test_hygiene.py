"""Hygiene: 25 load -> shutdown cycles (SAT_DIST_HYGIENE_CYCLES; 50 before the CI budget) in one process (on each of 2 forked ranks, a fresh process
group each time) leak no file descriptor, thread or process group, and RSS stays flat; a failed
load leaves nothing behind either. Also the consistent view: a `latest` rewritten while ranks
start cannot give them different iterations."""
from __future__ import annotations

import gc
import os
import time

import torch.distributed as dist

import sat_dist
from sat_dist.testing.dist import free_port, run_ranks, values
from sat_rules import CONFIGS, full_state_dict, write_sat_checkpoint

CFG = CONFIGS["plain"]
CYCLES = int(os.environ.get("SAT_DIST_HYGIENE_CYCLES", "25"))  # 20 cycles after the 5 warm-up ones


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cycles(rank, path, ports, bad):
    samples = []
    for i, port in enumerate(ports):
        os.environ["MASTER_PORT"] = str(port)  # a job's fresh rendezvous per load
        try:
            model = sat_dist.load_model(bad if i % 10 == 9 else path, tp=2, timeout_s=30)
            del model
        except sat_dist.SatDistError:
            assert i % 10 == 9
        sat_dist.shutdown()
        gc.collect()
        assert not dist.is_initialized()
        time.sleep(0.05)  # let native threads of the destroyed group finish exiting
        samples.append((_fds(), _threads(), _rss_mib()))
    return samples


def test_load_shutdown_cycles_leak_nothing(tmp_path):
    good = str(tmp_path / "good")
    write_sat_checkpoint(good, CFG, full_state_dict(CFG), 2)
    bad = str(tmp_path / "bad")
    write_sat_checkpoint(bad, CFG, full_state_dict(CFG), 2)
    os.remove(os.path.join(bad, "1000", "mp_rank_01_model_states.pt"))  # every 10th load fails
    ports = [free_port() for _ in range(CYCLES)]
    for rank, samples in enumerate(values(run_ranks(2, _cycles, good, ports, bad, timeout=600))):
        warm, last = samples[4], samples[-1]
        assert last[0] == warm[0], f"rank {rank}: file descriptors {warm[0]} after 5 cycles, {last[0]} after {CYCLES}"
        assert last[1] == warm[1], f"rank {rank}: threads {warm[1]} after 5 cycles, {last[1]} after {CYCLES}"
        grown = last[2] - min(s[2] for s in samples[4:])
        assert grown < 16, (f"rank {rank}: RSS grew {grown:.1f} MiB over {CYCLES - 5} cycles: "
                            f"{[round(s[2]) for s in samples]}")
        print(f"rank {rank}: fds {warm[0]} -> {last[0]}, threads {warm[1]} -> {last[1]}, "
              f"RSS {warm[2]:.0f} -> {last[2]:.0f} MiB")


def _load_tag(rank, path):
    _, rep = sat_dist.load_model(path, tp=1, timeout_s=30, return_report=True, digest=True)
    return rep.ranks[rank].digest


def _latest_changes_after_rank_0_read_it(rank, path):
    """A save finishes while the job starts: `latest` moves to 2000 right after rank 0 read it, before
    rank 1 starts. Every rank still indexes what rank 0 read."""
    import sat_dist.formats as F

    if rank == 0:
        real = F.latest_tag

        def then_saved(p):
            tag = real(p)
            open(os.path.join(p, "latest"), "w").write("2000")
            return tag
        F.latest_tag = then_saved
    else:
        time.sleep(0.5)
    return _load_tag(rank, path)


def _load_at(rank, path, tag):
    _, rep = sat_dist.load_model(path, tp=1, tag=tag, timeout_s=30, return_report=True, digest=True)
    return rep.ranks[rank].digest


def test_latest_is_read_once_and_agreed(tmp_path):
    root = str(tmp_path / "ckpt")
    write_sat_checkpoint(root, CFG, full_state_dict(CFG, seed=1), 1, iteration="1000")
    write_sat_checkpoint(root, CFG, full_state_dict(CFG, seed=2), 1, iteration="2000")
    at = {t: values(run_ranks(1, _load_at, root, t))[0] for t in ("1000", "2000")}
    assert at["1000"] != at["2000"]
    open(os.path.join(root, "latest"), "w").write("1000")
    assert values(run_ranks(2, _latest_changes_after_rank_0_read_it, root)) == [at["1000"]] * 2
    assert open(os.path.join(root, "latest")).read() == "2000"
