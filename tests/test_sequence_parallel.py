"""Ulysses sequence parallel (`load_engine(..., sp=N)`, `sat-dist sample --sp N`) against TP = 1, on
forked gloo ranks, CPU, fp32.

The mesh is dp x cfg x sp x tp (sat_dist/runtime.py `Mesh`): TP innermost (consecutive ranks), then
the SP ranks of a replica (tp apart), then CFG pairs of replicas, then work groups. At sp = 1 every
group is the one the dp x tp mesh had (checked here rank by rank), and SP peers hold the same TP shard,
so a load sees them as DP replicas (dp = world / tp).

The engine with SP keeps each rank's latent rows through the denoising loop and gathers them once: for
tiny pipelines of every release variant (2B sincos + DDIM, 5B RoPE + DPM, 5B-I2V learned positions +
image latents, 1.5 time patch, 1.5-I2V ofs; diffusers layout, 12 heads so that SP 2, 3 and 4 divide a
TP rank's heads) and a SAT-layout release (CogVideo's sampler), the latents after every step — this
rank's rows, joined across its SP group — and the final latents equal TP = 1's within 1e-5 of
max|ref| for every (tp, sp, cfg) in {1, 2} x {2, 3, 4} x {off, on} a world of at most 4 ranks allows.
The 5B-style DiT has 5 token rows, so every SP size splits it unevenly (SP 4: 2, 1, 1, 1 rows); the
others have 4 (SP 3: 2, 1, 1).

The text tokens are replicated on every SP rank and must appear once in K/V: the DiT's forward equals
TP = 1's, while the same forward with the text all-to-all'ed like the video (VideoSys #210, xDiT
#295: the text then sits in K/V sp times) is shown to be far off (2e-1 vs 5e-7). Worst seen (printed
with -s): 3.6e-6 relative over 3 steps, the order TP 2 or CFG parallel alone give on these pipelines
(3-3.5e-6: the guidance amplifies fp32 reassociation).
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import sat_dist
from cvx_fixtures import dit_inputs, random_weights, shape_table, tiny_params
from engine_fixtures import _randomize, dit_kwargs, random_image, write_pipeline, write_sat_release
from sat_dist.errors import ConfigError
from sat_dist.models import TPInfo
from sat_dist.models.cogvideox import CogVideoXDiT, DiTConfig, split_rows
from sat_dist.models.cogvideox import modules as dit_modules
from sat_dist.models.tp_ops import all_to_all
from sat_dist.runtime import Mesh
from sat_dist.testing.dist import run_ranks, values

PROMPT, SEED, STEPS, TOL = "a red panda eating bamboo", 42, 3, 1e-5
HEADS = 12  # SP 2, 3, 4 divide a TP rank's heads at TP 1; SP 2, 3 at TP 2
KINDS = ["2b", "5b", "5b_i2v", "15", "15_i2v"]
LATENT_H = {"5b": 10}  # latent rows; 5 token rows: every SP size splits them unevenly (the others: 8 -> 4)
# (tp, sp, cfg parallel): every layout with sp > 1 that fits in 4 ranks
LAYOUTS = [(1, 2, False), (1, 3, False), (2, 2, False), (1, 2, True), (1, 4, False)]
# 6 and 8 ranks, for the 5B-style pipeline: with LAYOUTS every (tp, sp, cfg) in {1, 2} x {2, 3} x {off, on}
WIDE = [(2, 3, False), (1, 3, True), (2, 2, True)]
WORST: dict = {}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


# --- the mesh -----------------------------------------------------------------------------------------

def test_mesh_at_sp_1_is_the_dp_x_tp_mesh():
    """Every group and coordinate the sp = 1 mesh had, for every world and TP of up to 16 ranks."""
    for world in range(1, 17):
        for tp in (t for t in range(1, world + 1) if world % t == 0):
            dp = world // tp
            for cfg in ((1, 2) if dp % 2 == 0 else (1,)):
                m = Mesh(world, tp, cfg=cfg)
                assert m.dp == dp and m.replicas == dp and m.work_groups == dp // cfg
                assert m.tp_groups() == [list(range(d * tp, (d + 1) * tp)) for d in range(dp)]
                assert m.dp_groups() == [list(range(t, world, tp)) for t in range(tp)]
                assert m.cfg_pairs() == [[2 * k * tp + t, (2 * k + 1) * tp + t] for k in range(dp // 2)
                                         for t in range(tp)]
                assert m.sp_groups() == [[r] for r in range(world)]
                for r in range(world):
                    assert (m.tp_rank(r), m.dp_rank(r), m.sp_rank(r), m.replica(r)) == (r % tp, r // tp, 0, r // tp)
            assert Mesh(world, tp) == Mesh(world, tp, 1, 1)


def test_mesh_rank_layout_dp_cfg_sp_tp():
    """rank = ((d * cfg + c) * sp + s) * tp + t, for 16 ranks at tp 2 x sp 2 x cfg 2 x dp 2."""
    m = Mesh(16, 2, sp=2, cfg=2)
    assert (m.dp, m.replicas, m.work_groups) == (8, 4, 2)
    for r in range(16):
        d, c, s, t = r // 8, (r // 4) % 2, (r // 2) % 2, r % 2
        assert (m.work_group(r), m.cfg_rank(r), m.sp_rank(r), m.tp_rank(r)) == (d, c, s, t)
        assert m.replica(r) == 2 * d + c and m.work_group_ranks(r) == list(range(8 * d, 8 * d + 8))
    assert m.tp_groups()[:3] == [[0, 1], [2, 3], [4, 5]]
    assert m.sp_groups()[:4] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert m.cfg_pairs()[:4] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert m.dp_groups() == [list(range(0, 16, 2)), list(range(1, 16, 2))]  # SP peers: weight replicas
    for groups in (m.tp_groups(), m.sp_groups(), m.cfg_pairs()):
        assert sorted(r for g in groups for r in g) == list(range(16))
    assert Mesh.for_job(8, 2, 2, cfg_parallel=True).cfg == 2
    assert Mesh.for_job(12, 2, 2, cfg_parallel=True).cfg == 1  # three replicas: sequential CFG, as at sp = 1


def test_mesh_refuses_a_world_without_whole_replicas():
    with pytest.raises(ConfigError, match=r"--sp 2: a replica of --tp 2 x --sp 2 = 4 ranks does not divide the "
                                          r"world size 6.*--sp in \[1, 3\]"):
        Mesh(6, 2, sp=2)
    with pytest.raises(ConfigError, match="not a multiple of 8"):
        Mesh(12, 2, sp=2, cfg=2)
    with pytest.raises(ConfigError, match="--tp 2 does not divide the world size 3"):
        Mesh(3, 2, sp=1)


def test_split_rows():
    assert split_rows(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]  # 480p's token rows on 4 ranks
    assert split_rows(5, 4) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    with pytest.raises(ValueError, match="only 3"):
        split_rows(3, 4)


# --- the DiT: text once in K/V -------------------------------------------------------------------

def _duplicated_text(q, k, v, text_length, shard):
    """The bug sequence.ulysses_attention avoids: the replicated text all-to-all'ed with the video, so
    K/V hold sp copies of it (VideoSys #210, xDiT #295)."""
    sp, counts = shard.sp, shard.counts
    n = sp.size
    b, heads, s, d = q.shape
    hg = heads // n
    lens = [text_length + c for c in counts]
    send = torch.stack((q, k, v)).reshape(3, b, n, hg, s, d).permute(2, 0, 1, 3, 4, 5).reshape(-1)
    unit = 3 * b * hg * d
    got = all_to_all(send, [unit * c for c in lens], [unit * s] * n, sp.group)
    parts = [p.view(3, b, hg, c, d) for p, c in zip(got.split([unit * c for c in lens]), lens)]
    full = torch.cat(parts, dim=3)  # every rank's [text | video]: the text n times
    out = F.scaled_dot_product_attention(full[0], full[1], full[2]).split(lens, dim=2)
    send = torch.cat([o.reshape(-1) for o in out])
    got = all_to_all(send, [b * hg * s * d] * n, [b * hg * c * d for c in lens], sp.group)
    return got.view(n, b, hg, s, d).permute(1, 0, 2, 3, 4).reshape(b, heads, s, d)


def _dit_forward(rank, kind, sp, duplicate=False):
    torch.manual_seed(0)
    if sp > 1:
        dist.init_process_group("gloo")
    params = tiny_params(kind, heads=6)
    model = CogVideoXDiT(DiTConfig(**params), TPInfo())
    full = random_weights(shape_table(params), seed=7)
    sd = model.state_dict()
    model.load_state_dict({k: full.get(k, sd[k]) for k in sd}, assign=True, strict=False)
    inp = dit_inputs(kind, 2, 8, 12, 5, seed=3)
    if sp > 1:
        model.set_sequence_parallel(sp, rank, dist.new_group(list(range(sp))))
        start, stop = model.latent_rows(8)[rank]
        inp = {**inp, "x": inp["x"][:, :, :, start:stop]}
        if "concat_images" in inp:
            inp["concat_images"] = inp["concat_images"][:, :, :, start:stop]
    if duplicate:
        dit_modules.ulysses_attention = _duplicated_text  # this forked rank only
    with torch.no_grad():
        return model(**inp)


@pytest.mark.parametrize("kind", ["5b", "5b_i2v"])
def test_text_appears_once_in_kv(kind):
    """SP 3 (token rows 2, 1, 1) equals TP = 1; with the text duplicated in K/V it would not."""
    (ref,) = values(run_ranks(1, _dit_forward, kind, 1))
    ours = torch.cat(values(run_ranks(3, _dit_forward, kind, 3)), dim=3)
    bad = torch.cat(values(run_ranks(3, _dit_forward, kind, 3, True)), dim=3)
    assert ours.shape == bad.shape == ref.shape
    err, dup = _rel(ours, ref), _rel(bad, ref)
    assert err <= TOL, err
    assert dup > 1000 * TOL, dup  # duplication changes the softmax far beyond rounding
    print(f"\n[sp dit] {kind}: SP 3 vs TP 1 {err:.1e}; with the text duplicated in K/V {dup:.1e}")


# --- the engine -------------------------------------------------------------------------------------

def _write(root: str, kind: str, seed: int) -> tuple[str, tuple[int, int, int]]:
    """The engine fixtures' tiny `kind` pipeline with a 12-head DiT (latent height LATENT_H or 8)."""
    from diffusers import CogVideoXTransformer3DModel

    write_pipeline(root, kind, seed=seed)
    h = LATENT_H.get(kind, 8)
    kw = {**dit_kwargs(kind), "num_attention_heads": HEADS, "attention_head_dim": 16, "sample_height": h}
    g = torch.Generator().manual_seed(seed + 100)
    _randomize(CogVideoXTransformer3DModel(**kw), g, 0.05).eval().save_pretrained(os.path.join(root, "transformer"))
    return root, (9, 4 * h, 48)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    out = {}
    for i, kind in enumerate(KINDS):
        root, size = _write(str(tmp_path_factory.mktemp(f"sp_{kind}")), kind, 30 + i)
        out[kind] = (root, size, random_image(seed=i) if kind.endswith("i2v") else None)
    return out


def _sample(rank, path, tp, sp, cfg, size=None, image=None):
    engine = sat_dist.load_engine(path, tp=tp, sp=sp, cfg_parallel=cfg)
    rt, steps = engine.rt, []
    kw = {} if size is None else dict(zip(("num_frames", "height", "width"), size))
    _, latents = engine.run(PROMPT, num_steps=STEPS, seed=SEED, image=image, decode=False,
                            on_step=lambda i, t, x: steps.append(x.clone()), **kw)
    sp_ranks = None if rt.sp_group is None else dist.get_process_group_ranks(rt.sp_group)
    return {"steps": steps, "latents": latents, "sp_group": sp_ranks, "sp_rank": rt.sp_rank, "leader": engine.leader,
            "group": engine.group, "pair": engine.pair_index, "report": engine.report.to_dict()}


def _check_layout(results: list[dict], ref: dict, tp: int, sp: int, cfg: bool, what: str) -> float:
    """Every rank's final latents, and each SP group's per-step rows joined, against TP = 1's."""
    world = tp * sp * (2 if cfg else 1)
    mesh = Mesh(world, tp, sp, 2 if cfg else 1)
    assert len(results) == world
    worst = 0.0
    for rank, r in enumerate(results):
        assert r["sp_rank"] == mesh.sp_rank(rank) and r["leader"] == (rank == 0)
        assert r["sp_group"] == next(g for g in mesh.sp_groups() if rank in g)
        assert (r["group"], r["pair"]) == (0, mesh.cfg_rank(rank))
        assert r["latents"].shape == ref["latents"].shape
        worst = max(worst, _rel(r["latents"], ref["latents"]))
    rep = results[0]["report"]
    assert (rep["tp"], rep["sp"], rep["dp"], rep["cfg_parallel"]) == (tp, sp, world // tp, cfg)
    height = ref["latents"].shape[3]
    for group in mesh.sp_groups():
        rows = [results[r]["steps"] for r in group]
        sizes = [steps[0].shape[3] for steps in rows]
        assert sum(sizes) == height and max(sizes) - min(sizes) <= 2  # whole token rows (patch 2) each
        for i, want in enumerate(ref["steps"]):
            worst = max(worst, _rel(torch.cat([steps[i] for steps in rows], dim=3), want))
    WORST[what] = max(WORST.get(what, 0.0), worst)
    assert worst <= TOL, (what, tp, sp, cfg, worst)
    return worst


@pytest.mark.parametrize("kind", KINDS)
def test_engine_sp_equals_tp1(pipelines, kind):
    root, size, image = pipelines[kind]
    (ref,) = values(run_ranks(1, _sample, root, 1, 1, False, size, image))
    assert len(ref["steps"]) == STEPS and ref["sp_group"] is None
    layouts = LAYOUTS + WIDE if kind == "5b" else LAYOUTS[:4]
    for tp, sp, cfg in layouts:
        results = values(run_ranks(tp * sp * (2 if cfg else 1), _sample, root, tp, sp, cfg, size, image))
        _check_layout(results, ref, tp, sp, cfg, kind)
        if kind == "5b" and sp in (3, 4):  # 5 token rows: uneven
            group = range(0, tp * sp, tp)  # the first SP group: TP rank 0's, tp apart
            assert [results[r]["steps"][0].shape[3] // 2 for r in group] == [b - a for a, b in split_rows(5, sp)]
    print(f"\n[sp engine] {kind}: worst |SP - TP 1| {WORST[kind]:.1e} (rel) over (tp, sp, cfg) {layouts}")


def test_sat_layout_release(tmp_path):
    """CogVideo's SAT sampler (two noise draws per step, guidance on x0) with SP: 6 heads, 4 token rows."""
    path, _ = write_sat_release(str(tmp_path / "sat5b"), "5b", seed=3)
    (ref,) = values(run_ranks(1, _sample, path, 1, 1, False))
    assert ref["report"]["layout"] == "sat" and len(ref["steps"]) == STEPS
    for tp, sp, cfg in [(1, 2, False), (1, 3, False), (1, 2, True)]:
        _check_layout(values(run_ranks(tp * sp * (2 if cfg else 1), _sample, path, tp, sp, cfg)), ref, tp, sp, cfg,
                      "sat")
    print(f"\n[sp engine] sat 5b: worst |SP - TP 1| {WORST['sat']:.1e} (rel)")


def test_sp_peers_load_as_dp_replicas(pipelines):
    """At tp 2 x sp 2 the SP peers hold the same TP shard: the load's dp is world / tp and each rank's
    (tp_rank, dp_rank) is the dp x tp mesh's; ranks with the same TP rank need the same bytes."""
    root, size, _ = pipelines["5b"]
    results = values(run_ranks(4, _sample, root, 2, 2, False, size))
    dit = results[0]["report"]["components"]["transformer"]["ranks"]
    assert [(r["tp_rank"], r["dp_rank"]) for r in dit] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert dit[0]["bytes_needed"] == dit[2]["bytes_needed"] and dit[1]["bytes_needed"] == dit[3]["bytes_needed"]


def _load(rank, root, tp, sp):
    sat_dist.load_engine(root, tp=tp, sp=sp)


def test_refusals_before_loading(pipelines):
    root = pipelines["5b"][0]
    (bad,) = run_ranks(1, _load, root, 1, 5)
    assert bad.error_type == "ConfigError"
    assert "--sp 5: transformer: SP=5 does not divide the 12 attention heads" in bad.error
    assert "[1, 2, 3, 4, 6, 12]" in bad.error
    results = run_ranks(3, _load, root, 1, 2)
    assert all(r.error_type == "ConfigError" and "does not divide the world size 3" in r.error for r in results)
    assert "--sp in [1, 3]" in results[0].error


def _cli(rank, argv):
    from sat_dist.cli import main

    return main(argv)


def test_cli_sp_flag(pipelines, capfd, tmp_path):
    """`sample --sp`: refused before loading where it cannot split the heads; at SP 2 one mp4 (rank 0's)."""
    import json

    import imageio.v3 as iio

    root, (f, h, w), _ = pipelines["5b"]
    argv = ["sample", "--model", root, "--prompt", PROMPT, "--sp", "5", "--dry-run"]
    assert values(run_ranks(1, _cli, argv)) == [1]
    assert "--sp 5: transformer: SP=5 does not divide" in capfd.readouterr().err
    out, report = str(tmp_path / "panda.mp4"), str(tmp_path / "run.json")
    argv = ["sample", "--model", root, "--prompt", PROMPT, "--sp", "2", "--steps", "2", "--out", out,
            "--report", report]
    assert values(run_ranks(2, _cli, argv)) == [0, 0]
    assert iio.imread(out).shape == (f, h, w, 3) and sorted(os.listdir(tmp_path)) == ["panda.mp4", "run.json"]
    rep = json.load(open(report))
    assert (rep["sp"], rep["tp"], rep["world_size"]) == (2, 1, 2) and [r["rank"] for r in rep["runs"]] == [0]


def _run_small(rank, root, sp):
    engine = sat_dist.load_engine(root, sp=sp)
    try:
        engine.run(PROMPT, num_steps=1, num_frames=9, height=16, width=48, decode=False)
    except ConfigError as exc:
        return str(exc)


def test_refuses_fewer_token_rows_than_sp_ranks(pipelines):
    """1.5 at 16 px high: a latent of 4 rows is 2 token rows, too few for SP 3 (refused before any step)."""
    msgs = values(run_ranks(3, _run_small, pipelines["15"][0], 3))
    assert all(m is not None and "--sp 3 splits the latent's 2 token rows" in m for m in msgs), msgs
