"""Each byte read from storage once per job (issue 14): the exchange and the reader threads give
every rank the same tensors (same digests) as independent reads, and the bytes each rank reads
from storage and receives from its peers are counted exactly:

* TP2 x DP2 from an mp=1 file: the whole job reads each stored byte once (sum of bytes_read ==
  the file's tensor bytes); what a rank does not read it receives (read + received == needed);
* from mp=2 files, each file's copy of a replicated tensor is read once (the agreement still
  compares the files' copies);
* a peer dying during the exchange fails the group within the timeout;
* the SHA-256 digest is null unless asked for.
"""
import os

import pytest
import torch

import sat_dist
from sat_dist import exchange
from sat_dist.materialize import Stripe as M_Stripe
from sat_dist.pagecache import evict
from sat_dist.plan import ReadPlan, Target, assign_exchange
from sat_dist.report import state_dict_digest
from sat_dist.testing.dist import run_ranks, timed_group_load, values
from sat_rules import CONFIGS, full_state_dict, sat_split, write_sat_checkpoint

PLAIN = CONFIGS["plain"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    full = full_state_dict(PLAIN, seed=3)
    roots = {}
    for n in (1, 2):
        roots[n] = str(tmp_path_factory.mktemp(f"xchg_n{n}"))
        write_sat_checkpoint(roots[n], PLAIN, full, n)
    return full, roots


def _load(rank, path, tp, mode="on", readers=4, digest=True):
    model, rep = sat_dist.load_model(path, tp=tp, return_report=True, digest=digest, exchange=mode,
                                     overrides=[f"load.readers={readers}"])
    return {k: v.clone() for k, v in model.state_dict().items()}, rep.ranks[rank]


def _stored_tensor_bytes(root):
    """Tensor bytes held by the checkpoint's files (each mp file's copy of a replicated tensor counts)."""
    total = 0
    for f in sorted(os.listdir(os.path.join(root, "1000"))):
        sd = torch.load(os.path.join(root, "1000", f), weights_only=True)["module"]
        total += sum(t.numel() * t.element_size() for t in sd.values())
    return total


@pytest.mark.parametrize("n,tp,world", [(1, 2, 4), (2, 2, 4), (1, 1, 2), (2, 1, 2), (1, 4, 4), (2, 4, 4)])
def test_exchange_gives_every_rank_its_sat_split(ckpts, n, tp, world):
    full, roots = ckpts
    on = values(run_ranks(world, _load, roots[n], tp))
    off = values(run_ranks(world, _load, roots[n], tp, "off", 1))
    for rank, ((state, rep), (_, rep_off)) in enumerate(zip(on, off)):
        want = {k: sat_split(k, v, tp, rank % tp, PLAIN) for k, v in full.items()}
        assert all(torch.equal(state[k], want[k]) for k in want), (n, tp, world, rank)
        assert rep.digest == rep_off.digest == state_dict_digest(want)
        assert rep_off.bytes_read == rep_off.bytes_needed and rep_off.bytes_received == 0
        assert rep.bytes_read + rep.bytes_received == rep.bytes_needed  # fp32 stored and loaded
    if n in (1, tp):  # every stored byte is needed: each is read once
        assert sum(r.bytes_read for _, r in on) == _stored_tensor_bytes(roots[n])
    else:  # replicated copies only partly needed: one DP replica's reads, no more
        assert sum(r.bytes_read for _, r in on) == sum(r.bytes_read for _, r in off if r.dp_rank == 0)


def test_tp2_dp2_job_reads_each_stored_byte_once(ckpts):
    _, roots = ckpts
    reps = [r for _, r in values(run_ranks(4, _load, roots[1], 2))]
    stored = _stored_tensor_bytes(roots[1])
    assert sum(r.bytes_read for r in reps) == stored
    needed_by_one_replica = sum(r.bytes_needed for r in reps if r.dp_rank == 0)
    assert sum(r.bytes_received for r in reps) == sum(r.bytes_needed for r in reps) - stored
    assert needed_by_one_replica >= stored  # the replicated tensors count once per TP rank there
    assert max(r.bytes_read for r in reps) <= 0.5 * stored  # the reading is shared


def _load_on_kernels(rank, path, kernels):
    """`auto` on forked ranks that pretend to run on the kernels `kernels[rank]` (hosts)."""
    import sat_dist.runtime
    sat_dist.runtime.kernel_id = lambda: kernels[rank]
    return _load(rank, path, 2, "auto")


@pytest.mark.parametrize("kernels", [("a", "a", "a", "a"), ("a", "a", "b", "b")])
def test_auto_exchanges_only_across_kernels_on_cpu(ckpts, kernels):
    """TP2 x DP2: on one kernel the page cache already makes each stored byte one storage read, so
    `auto` reads locally (no broadcasts); across two "hosts" (the DP replicas on different kernels)
    it exchanges, and the job reads each stored byte once."""
    full, roots = ckpts
    reps = [r for _, r in values(run_ranks(4, _load_on_kernels, roots[1], kernels))]
    stored = _stored_tensor_bytes(roots[1])
    if len(set(kernels)) == 1:
        assert all(r.bytes_received == 0 and r.bytes_read == r.bytes_needed for r in reps)
    else:
        assert sum(r.bytes_read for r in reps) == stored and all(r.bytes_received > 0 for r in reps)


def test_wanted_modes_kernels_and_devices():
    from sat_dist.exchange import Offer, wanted

    def offers(modes, kernels="aa", devices=("cpu", "cpu")):
        return [Offer(m, k, d, {} if m != "off" else None) for m, k, d in zip(modes, kernels, devices)]
    assert not wanted(offers(["auto", "auto"]))  # one CPU host: the page cache shares the reads
    assert wanted(offers(["auto", "auto"], "ab"))  # two hosts
    assert wanted(offers(["auto", "auto"], devices=("cuda", "cuda")))
    assert wanted(offers(["on", "auto"])) and wanted(offers(["on", "on"]))
    assert not wanted(offers(["off", "on"], "ab")) and not wanted(offers(["auto", "off"], "ab"))
    assert not wanted(offers(["on"], "a"))  # a world of one


def test_exchange_from_a_safetensors_file_tp2_dp2(ckpts, tmp_path):
    """The exchange is format-blind: from a .safetensors file (written by safetensors' save_file) the
    TP2 x DP2 job reads each stored tensor byte once and every rank ends with the digest of `off`."""
    import json
    from safetensors.torch import save_file

    full, _ = ckpts
    path = str(tmp_path / "model.safetensors")
    save_file(full, path, metadata={"format": "pt", "model_config": json.dumps(
        {"model_class": "BaseModel", **PLAIN, "model_parallel_size": 1})})
    on = [r for _, r in values(run_ranks(4, _load, path, 2, "on"))]
    off = [r for _, r in values(run_ranks(4, _load, path, 2, "off"))]
    assert [r.digest for r in on] == [r.digest for r in off]
    assert sum(r.bytes_read for r in on) == sum(t.numel() * t.element_size() for t in full.values())
    assert all(r.bytes_read + r.bytes_received == r.bytes_needed and r.bytes_received > 0 for r in on)


def test_digest_null_unless_asked(ckpts, tmp_path):
    _, roots = ckpts
    (_, rep), = values(run_ranks(1, _load, roots[1], 1, "auto", 4, None))
    assert rep.digest is None and rep.bytes_received == 0


def _die_in_exchange(rank, path):
    if rank == 1:
        def die(*a, **k):
            os._exit(3)
        exchange.C.broadcast_async = die
    return timed_group_load(path, 2, 8, exchange="on")


def test_peer_death_during_exchange_fails_the_group_within_timeout(ckpts):
    _, roots = ckpts
    results = run_ranks(2, _die_in_exchange, roots[1], timeout=60)
    assert results[1].error_type == "Died"
    msg, seconds = results[0].value
    assert "could not reach its peers" in msg and "'exchange'" in msg, msg
    assert seconds < 8 + 10


def _plan(sizes):
    return ReadPlan({n: Target(n, (s,), torch.uint8, torch.uint8) for n, s in sizes.items()})


def test_assignment_classes_and_balance():
    """Same signature everywhere: read once per job; same within the DP group: once per DP group;
    else read by each rank. Largest first to the least loaded owner, the world's tensors counted."""
    plan = _plan({"rep": 100, "a": 10, "b": 10, "c": 10, "d": 10, "mine": 5})
    # world 4 = tp 2 x dp 2: ranks 0, 2 are TP rank 0; 1, 3 are TP rank 1
    tables = [{"rep": "R", "a": "A0", "b": "B0", "c": "C0", "d": "D0", "mine": f"m{r}"} for r in range(4)]
    for r in (1, 3):
        tables[r].update(a="A1", b="B1", c="C1", d="D1")
    shares = [assign_exchange(plan, tables, r, 2) for r in range(4)]
    assert all(n == "rep" for s in shares for n, _ in s.world) and {o for s in shares for _, o in s.world} == {0}
    # rank 0 already reads "rep": its DP partner 2 takes the DP group's tensors (2 of 4 would not balance)
    assert [o for _, o in shares[0].dp] == [2, 2, 2, 2] and [o for _, o in shares[3].dp] == [1, 3, 1, 3]
    assert all("mine" in s.read for s in shares)
    assert shares[0].read == {"rep", "mine"} and shares[2].read == {"a", "b", "c", "d", "mine"}
    assert shares[0].received(0) == ["a", "b", "c", "d"] and shares[2].received(2) == ["rep"]
    assert shares[1].read == {"a", "c", "mine"} and shares[3].read == {"b", "d", "mine"}
    off = assign_exchange(plan, tables, 0, 2, enabled=False)
    assert off.read == set(plan.targets) and not off.dp and not off.world


def test_fingerprint_sees_a_changed_word_and_swapped_blocks():
    from sat_dist.report import FP_BLOCK, fingerprints

    t = torch.randn(3 * FP_BLOCK * 2 + 5)  # fp32: 3 blocks of 64 KiB, a word tail and a byte tail
    base = fingerprints({"w": t}, {"all": ["w"]})["all"]
    for i in (0, FP_BLOCK * 2 + 7, t.numel() - 1):
        u = t.clone()
        u.view(torch.int32)[i] ^= 1 << 3
        assert fingerprints({"w": u}, {"all": ["w"]})["all"] != base, i
    u = t.clone()
    blk = 2 * FP_BLOCK  # fp32 elements per block
    u[:blk], u[blk:2 * blk] = t[blk:2 * blk].clone(), t[:blk].clone()
    assert fingerprints({"w": u}, {"all": ["w"]})["all"] != base
    assert fingerprints({"w": t.clone()}, {"all": ["w"]})["all"] == base
    assert fingerprints({"w": t}, {"all": ["w"]}, {"all": {"w": "sig"}})["all"] != base


def test_small_tensors_are_fingerprinted_together_with_the_same_values(monkeypatch):
    """Hundreds of norms and biases are summed in one batch (numpy's reduceat on the host, index_add_
    on a device): the fingerprints are exactly those of the per-tensor definition, for every size
    around the one-block edge, odd tails, empty tensors and several dtypes; a changed word in a
    batched tensor still shows."""
    import sat_dist.report as R

    g = torch.Generator().manual_seed(3)
    sizes = [0, 1, 3, 8, 4095, R.FP_BLOCK * 8 - 8, R.FP_BLOCK * 8, R.FP_BLOCK * 8 + 8, 3 * R.FP_BLOCK * 8 + 5]
    sd = {f"u8_{n}": torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8) for n in sizes}
    sd.update({f"bf16_{i}": torch.randn(i, generator=g).to(torch.bfloat16) for i in (1, 4, 6, 3072)})
    sd.update({f"norm{i}": torch.randn(2048, generator=g) for i in range(300)})
    sd["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    subsets = {"all": list(sd), "some": [n for n in sd if n.startswith("norm1")]}
    batched = R.fingerprints(sd, subsets)
    assert sum(map(R._one_block, sd.values())) > 300
    with monkeypatch.context() as m:
        m.setattr(R, "_one_block", lambda t: False)
        assert R.fingerprints(sd, subsets) == batched
    small = [t for t in sd.values() if R._one_block(t)]
    per_tensor = torch.stack([R._tensor_fingerprint(t) for t in small])
    assert torch.equal(R._small_fingerprints(small, host=True), per_tensor)
    assert torch.equal(R._small_fingerprints(small, host=False), per_tensor)  # the device path, run here
    changed = dict(sd, norm7=sd["norm7"].clone())
    changed["norm7"].view(torch.int32)[1000] ^= 1
    assert R.fingerprints(changed, subsets)["all"] != batched["all"]
    assert R.fingerprints(changed, subsets)["some"] == batched["some"]


def test_progress_bar_path_loads(ckpts):
    _, roots = ckpts
    (state, rep), = values(run_ranks(1, _progress, roots[1]))
    assert rep.bytes_read == rep.bytes_needed


def _progress(rank, path):
    model, rep = sat_dist.load_model(path, return_report=True, progress=True)
    return {}, rep.ranks[rank]


def _load_bf16(rank, path, mode, bucket):
    exchange.BUCKET_BYTES = bucket  # 0: every tensor broadcast in place, in its own dtype
    model, rep = sat_dist.load_model(path, tp=2, dtype="bf16", return_report=True, digest=True, exchange=mode)
    return rep.ranks[rank]


@pytest.mark.parametrize("bucket", [0, 1 << 30])
def test_exchange_of_cast_tensors_in_place_and_packed(ckpts, bucket):
    _, roots = ckpts
    on = values(run_ranks(4, _load_bf16, roots[1], "on", bucket))
    off = values(run_ranks(4, _load_bf16, roots[1], "off", bucket))
    assert [r.digest for r in on] == [r.digest for r in off]
    assert all(r.bytes_received > 0 for r in on)
    # received bytes are the cast (bf16) tensors: half the stored fp32 bytes they stand for
    assert sum(2 * r.bytes_received + r.bytes_read for r in on) == sum(r.bytes_needed for r in on)


def test_stripe_needs_the_whole_tp_group_on_one_kernel():
    from sat_dist.exchange import Offer, stripe
    from sat_dist.launch import LaunchInfo
    from sat_dist.materialize import Stripe
    from sat_dist.runtime import Mesh, Runtime

    def rt(rank, tp):
        return Runtime(LaunchInfo("torchrun", rank, rank, 4, 4, 0, None, None), Mesh(4, tp), torch.device("cpu"))

    def offers(kernels, files="ffff", mode="off"):
        return [Offer(mode, k, "cpu", None if mode == "off" else {}, f) for k, f in zip(kernels, files)]
    assert stripe(rt(3, 2), offers("aabb")) == Stripe(1, 2)  # its TP group (2, 3) shares kernel b
    assert stripe(rt(3, 4), offers("aabb")) is None  # TP=4 spans two kernels: each asks for its own rows
    assert stripe(rt(2, 4), offers("aaaa")) == Stripe(2, 4)
    assert stripe(rt(2, 1), offers("aaaa")) is None  # no TP peers
    # mp=2 files at TP=4: ranks 0, 1 read file x, ranks 2, 3 file y: turns among those on the same files
    assert [stripe(rt(r, 4), offers("aaaa", "xxyy")) for r in range(4)] == [Stripe(0, 2), Stripe(1, 2)] * 2
    assert stripe(rt(1, 4), offers("aaaa", "xzyy")) is None  # no peer reads its files
    # the exchange on: a DP replica on another kernel may read a TP slice, so no turns there
    assert stripe(rt(3, 2), offers("aabb", mode="on")) is None
    assert stripe(rt(3, 2), offers("bbbb", mode="on")) == Stripe(1, 2)


def _evict(root):
    for dirpath, _, names in os.walk(root):
        for n in names:
            evict(os.path.join(dirpath, n))


def _cold_load(rank, path):
    """Load with the cache dropped just before this rank's first tensor byte (indexing a small file
    reads most of it into the cache), recording the turn of each row-split prefetch."""
    from sat_dist import loader
    from sat_dist import materialize as M
    seen = []
    real = M._prefetch_rows
    M._prefetch_rows = lambda fd, rs, start, stripe: (seen.append(stripe), real(fd, rs, start, stripe))[1]
    loader.pause_point = lambda point, _rank: _evict(path) if point == "read" else None
    state, _ = _load(rank, path, 4, "auto")
    return state, seen


def test_cold_tp4_load_takes_turns_and_places_the_sat_split(tmp_path):
    """A cold TP=4 load on one kernel: each row-split prefetch is the rank's turn among its 4 peers
    (a rank whose rows a peer's turn already brought in asks nothing), and every rank still ends
    with exactly SAT's split."""
    cfg = dict(num_layers=1, hidden_size=512, num_attention_heads=8, vocab_size=1024, max_sequence_length=32)
    full, root = full_state_dict(cfg, seed=5), str(tmp_path / "cold")
    write_sat_checkpoint(root, cfg, full, 1)
    results = values(run_ranks(4, _cold_load, root))
    assert any(seen for _, seen in results)
    for rank, (state, seen) in enumerate(results):
        assert all(s == M_Stripe(rank, 4) for s in seen), (rank, seen)
        want = {k: sat_split(k, v, 4, rank, cfg) for k, v in full.items()}
        assert all(torch.equal(state[k], want[k]) for k in want), rank
