"""Multi-process load tests: forked gloo ranks through the public load_model API.

Saved N in {1, 2, 4} x loaded M in {1, 2, 4}: every rank's tensors equal the test's own SAT
split of the full tensors; bytes_read is exactly bytes_needed (<= 1.05x is the contract); the TP
forward equals the TP=1 forward; every rank ends in eval mode with no grads.
"""
import json

import pytest
import torch

import sat_dist
from sat_dist.testing.dist import run_ranks, values
from sat_dist.report import state_dict_digest
from sat_rules import CONFIGS, full_state_dict, sat_split, write_sat_checkpoint

PLAIN = CONFIGS["plain"]


@pytest.fixture(scope="module")
def plain_ckpts(tmp_path_factory):
    full = full_state_dict(PLAIN, seed=11)
    roots = {}
    for n in (1, 2, 4):
        roots[n] = str(tmp_path_factory.mktemp(f"plain_n{n}"))
        write_sat_checkpoint(roots[n], PLAIN, full, n)
    return full, roots


def _load_and_dump(rank, path, tp, report=None):
    model, rep = sat_dist.load_model(path, tp=tp, report=report, return_report=True, digest=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {
        "training": [n for n, m in model.named_modules() if m.training],
        "grads": [n for n, p in model.named_parameters() if p.requires_grad],
    }
    return state, rep.ranks[rank], flags


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_load_saved_n_at_tp_m(plain_ckpts, n, m):
    full, roots = plain_ckpts
    for rank, (state, rep, flags) in enumerate(values(run_ranks(m, _load_and_dump, roots[n], m))):
        assert set(state) == set(full)
        for name, t in state.items():
            assert torch.equal(t, sat_split(name, full[name], m, rank, PLAIN)), (n, m, rank, name)
        assert flags == {"training": [], "grads": []}
        assert rep.rank == rank and rep.tp_rank == rank
        assert rep.bytes_needed == sum(t.numel() * t.element_size() for t in state.values())
        assert rep.bytes_read <= 1.05 * rep.bytes_needed
        assert rep.digest == state_dict_digest(state)


def test_tp2_dp2_report_and_replica_digests(plain_ckpts, tmp_path):
    _, roots = plain_ckpts
    report = tmp_path / "load.json"
    out = values(run_ranks(4, _load_and_dump, roots[1], 2, str(report)))
    data = json.loads(report.read_text())
    assert data["status"] == "ok" and (data["world_size"], data["tp"], data["dp"]) == (4, 2, 2)
    assert data["checkpoint"] == roots[1] and data["seconds"] > 0
    keys = {"rank", "local_rank", "host", "tp_rank", "dp_rank", "device", "bytes_read", "bytes_needed",
            "peak_rss_bytes", "seconds", "num_tensors", "digest", "bytes_received"}
    assert all(set(r) == keys for r in data["ranks"])
    assert [(r["tp_rank"], r["dp_rank"]) for r in data["ranks"]] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    digests = [r["digest"] for r in data["ranks"]]
    assert digests[0] == digests[2] and digests[1] == digests[3] and digests[0] != digests[1]
    assert digests == [rep.digest for _, rep, _ in out]
    assert all(r["device"] == "cpu" and r["peak_rss_bytes"] > 0 for r in data["ranks"])


def _forward(rank, path, tp, dtype=None):
    model = sat_dist.load_model(path, tp=tp, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    vocab = 100 if "rotary" in path else 1024
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    pos = torch.arange(12).unsqueeze(0).expand(2, -1)
    causal = torch.ones(1, 1, 12, 12).tril()
    padded = causal.clone()
    padded[..., :, 10:] = 0  # neither full nor causal: SAT's masked formula path
    with torch.no_grad():
        return [model(ids, pos, causal), model(ids, pos, padded), model(ids, pos, None)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tp_forward_equals_tp1_forward(name, tmp_path):
    cfg = CONFIGS[name]
    root = str(tmp_path / name.replace("small_vocab_rotary", "rotary"))
    write_sat_checkpoint(root, cfg, full_state_dict(cfg, seed=5), 2)
    (ref,) = values(run_ranks(1, _forward, root, 1))
    for m in (2, 4):
        for rank, outs in enumerate(values(run_ranks(m, _forward, root, m))):
            for got, want in zip(outs, ref):
                assert got.shape == want.shape == (2, 12, cfg["vocab_size"])
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"{name} tp={m} rank={rank}")


def test_dtype_flag_casts_on_load(plain_ckpts):
    full, roots = plain_ckpts
    for rank, (state, rep, _) in enumerate(values(run_ranks(2, _load_dtype, roots[2]))):
        name = "transformer.layers.1.mlp.dense_h_to_4h.weight"
        assert state[name].dtype == torch.bfloat16
        assert torch.equal(state[name], sat_split(name, full[name], 2, rank, PLAIN).bfloat16())
        assert rep.bytes_read == rep.bytes_needed  # needed counts stored (fp32) bytes


def _load_dtype(rank, path):
    model, rep = sat_dist.load_model(path, tp=2, dtype="bf16", return_report=True)
    return dict(model.state_dict()), rep.ranks[rank], None


def _gather_objects(rank, sizes, budget=None):
    """Gather an object of sizes[rank] bytes from every rank; count the all-gathers and their sizes."""
    import torch.distributed as dist

    import sat_dist.collectives as C
    from sat_dist.launch import detect_launch

    if budget is not None:  # as a world of FRAMES_BUDGET / budget x 3 ranks would: a smaller frame
        C.FRAMES_BUDGET = budget
    rt = C.setup(detect_launch(timeout_s=30), 1, None, 30)
    calls, real = [], dist.all_gather
    dist.all_gather = lambda *a, **k: (calls.append(a[1].numel()), real(*a, **k))[1]
    try:
        got = C.all_gather_objects({"rank": rank, "blob": bytes([rank]) * sizes[rank]}, rt.ctrl_group)
    finally:
        dist.all_gather = real
        C.teardown(rt)
    return got, calls, C.object_frame(3)


@pytest.mark.parametrize("sizes,budget", [((0, 10, 100), None), ((0, 1 << 16, 5), None),
                                          ((300_000, 7, 1 << 17), None), ((0, 10, 9000), 3 * 4096)])
def test_object_gather_is_one_all_gather_unless_an_object_outgrows_the_frame(sizes, budget):
    """Agreement objects travel in one all-gather of a fixed frame (64 KiB; smaller in worlds so
    large that world x frame would pass the budget); a larger object on ANY rank makes every rank do
    one more (for the tail), and every rank gets every object exactly."""
    import pickle

    from sat_dist.collectives import MIN_FRAME, OBJECT_FRAME, object_frame

    assert object_frame(1) == object_frame(256) == OBJECT_FRAME
    assert object_frame(1024) == 16 << 10 and object_frame(1 << 20) == MIN_FRAME
    out = values(run_ranks(3, _gather_objects, sizes, budget))
    want = [{"rank": r, "blob": bytes([r]) * n} for r, n in enumerate(sizes)]
    longest = max(len(pickle.dumps(w, protocol=pickle.HIGHEST_PROTOCOL)) for w in want)
    for got, calls, frame in out:
        assert frame == (OBJECT_FRAME if budget is None else 4096)
        assert got == want
        assert calls[0] == 8 + frame
        assert calls[1:] == ([longest - frame] if longest > frame else [])
