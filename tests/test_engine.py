"""The CogVideoX engine (`sat_dist.load_engine` + `Engine.sample`) against diffusers' own
CogVideoXPipeline / CogVideoXImageToVideoPipeline, for tiny pipeline folders of all five release
variants (2B: sincos + DDIM; 5B: RoPE + DPM; 5B-I2V: + learned positions, image latents; 1.5: time
patch + frame padding; 1.5-I2V: + ofs), written by diffusers' and transformers' save_pretrained from
random weights (tests/engine_fixtures.py), CPU, fp32, same prompt, seed and steps, classifier-free
guidance 6 with the dynamic schedule where the releases use it (DPM).

Compared: the latents after every denoising step (the pipeline's `callback_on_step_end`) and the
decoded frames (`output_type="np"`, VAE tiling on with the same tiles on both sides), at TP 1 and 2 on
forked gloo ranks. Tolerances (fp32): latents |ours - ref| <= 1e-5 * max|ref| at every step; frames
(in [0, 1]) |ours - ref| <= 1e-4. Worst seen (printed with -s): latents 2.8e-6 relative, frames
1.4e-5 (the error grows over the steps: 2-6e-7 after the first). Set aside, as tests/test_cogvideox_forward.py explains: the reference's `norm_out.norm.eps`
is SAT's 1e-6 (diffusers' config says 1e-5), since the engine runs SAT's DiT.

CFG parallel (world = 2 x tp: the two DP replicas run the unconditional and conditional passes at
once) gives the latents of sequential CFG within the same tolerance (worst seen 2.5e-6).
"""
import pytest
import torch

import sat_dist
from engine_fixtures import SIZES, random_image, run_pipeline, write_pipeline
from sat_dist.errors import ConfigError, GroupLoadError
from sat_dist.testing.dist import run_ranks, values

KINDS = ["2b", "5b", "5b_i2v", "15", "15_i2v"]
PROMPT, SEED, STEPS = "a red panda eating bamboo", 42, 5
TILE = {"tile_sample_min_height": 24, "tile_sample_min_width": 40}  # tiles whose blend keeps the size exact
LAT_TOL, FRAME_TOL = 1e-5, 1e-4
WORST: dict = {}


def _sample(rank, root, tp, kind, image, cfg_parallel=True):
    engine = sat_dist.load_engine(root, tp=tp, vae_tiling=TILE, cfg_parallel=cfg_parallel)
    lat = []
    f, h, w = SIZES[kind]
    frames = engine.sample(PROMPT, num_steps=STEPS, seed=SEED, num_frames=f, height=h, width=w, image=image,
                           on_step=lambda i, t, x: lat.append(x.clone()))
    report = engine.finish()
    return lat, frames, report.to_dict()


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """kind -> (folder, image or None, reference latents per step, reference frames)."""
    out = {}
    for i, kind in enumerate(KINDS):
        root = write_pipeline(str(tmp_path_factory.mktemp(f"pipe_{kind}")), kind, seed=10 + i)
        image = random_image(seed=i) if kind.endswith("i2v") else None
        lat, frames = run_pipeline(root, kind, PROMPT, STEPS, SEED, dynamic=kind != "2b", image=image, tiling=TILE)
        out[kind] = (root, image, lat, frames)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


@pytest.mark.parametrize("kind", KINDS)
def test_matches_diffusers_pipeline_at_tp_1_and_2(pipelines, kind):
    root, image, ref_lat, ref_frames = pipelines[kind]
    assert len(ref_lat) == STEPS
    for tp in (1, 2):
        results = values(run_ranks(tp, _sample, root, tp, kind, image))
        for rank, (lat, frames, _) in enumerate(results):
            assert len(lat) == STEPS
            for step, (ours, ref) in enumerate(zip(lat, ref_lat)):
                assert ours.shape == ref.shape and ours.dtype == torch.float32
                err = _rel(ours, ref)
                WORST[kind, "latents"] = max(WORST.get((kind, "latents"), 0.0), err)
                assert err <= LAT_TOL, (kind, tp, rank, step, err)
            if rank:
                assert frames is None  # rank 0 gets the frames
                continue
            assert frames.shape == ref_frames.shape == (SIZES[kind][0], *SIZES[kind][1:], 3)
            err = float(abs(frames - ref_frames).max())
            WORST[kind, "frames"] = max(WORST.get((kind, "frames"), 0.0), err)
            assert err <= FRAME_TOL, (kind, tp, err)
    print(f"\n[engine vs pipeline] {kind}: worst latents {WORST[kind, 'latents']:.1e} (rel), frames "
          f"{WORST[kind, 'frames']:.1e} (abs) over TP 1, 2")


@pytest.mark.parametrize("kind", ["5b", "15_i2v"])
def test_cfg_parallel_equals_sequential_cfg(pipelines, kind):
    root, image, _, _ = pipelines[kind]
    for tp in (1, 2):
        (seq_lat, seq_frames, seq_rep), *_ = values(run_ranks(tp, _sample, root, tp, kind, image))
        assert seq_rep["cfg_parallel"] is False and seq_rep["dp"] == 1
        results = values(run_ranks(2 * tp, _sample, root, tp, kind, image))
        rep = results[0][2]
        assert rep["cfg_parallel"] is True and rep["dp"] == 2 and rep["tp"] == tp
        for rank, (lat, frames, _) in enumerate(results):
            for ours, ref in zip(lat, seq_lat):
                err = _rel(ours, ref)
                WORST["cfg_parallel"] = max(WORST.get("cfg_parallel", 0.0), err)
                assert err <= LAT_TOL, (kind, tp, rank, err)
            assert (frames is None) == (rank != 0)
        assert float(abs(results[0][1] - seq_frames).max()) <= FRAME_TOL
    print(f"\n[cfg parallel] {kind}: worst |parallel - sequential| latents {WORST['cfg_parallel']:.1e} (rel)")


def test_one_report_for_every_component(pipelines):
    """One load: three components, each rank's bytes per component; the DiT and T5 read only their
    TP shard, the VAE is whole on every rank; the run's seconds per step and each rank's peak memory."""
    root, image, _, _ = pipelines["5b"]
    reports = [r[2] for r in values(run_ranks(2, _sample, root, 2, "5b", None))]
    rep = reports[0]
    assert set(rep["components"]) == {"transformer", "text_encoder", "vae"}
    for name, comp in rep["components"].items():
        assert [r["rank"] for r in comp["ranks"]] == [0, 1]
        for r in comp["ranks"]:
            assert 0 < r["bytes_read"] <= 1.05 * r["bytes_needed"], (name, r)
    dit = rep["components"]["transformer"]["ranks"]
    vae = rep["components"]["vae"]["ranks"]
    assert vae[0]["bytes_needed"] == vae[1]["bytes_needed"]  # replicated
    (rep1,) = [r[2] for r in values(run_ranks(1, _sample, root, 1, "5b", None))]
    full = rep1["components"]["transformer"]["ranks"][0]["bytes_needed"]
    assert all(r["bytes_needed"] < 0.75 * full for r in dit)  # TP shard, not the whole DiT
    (run,) = rep["runs"]
    assert run["rank"] == 0 and len(run["seconds_per_step"]) == STEPS and run["mean_seconds_per_step"] > 0
    assert [r["rank"] for r in rep["ranks"]] == [0, 1] and all(r["peak_device_bytes"] > 0 for r in rep["ranks"])


def _i2v_without_image(rank, root):
    engine = sat_dist.load_engine(root, tp=1)
    try:
        engine.sample(PROMPT, num_steps=1)
    except ConfigError as exc:
        return str(exc)


def test_i2v_needs_an_image(pipelines):
    (msg,) = values(run_ranks(1, _i2v_without_image, pipelines["5b_i2v"][0]))
    assert "image-to-video" in msg


def _load(rank, root):
    sat_dist.load_engine(root, tp=2)


def test_a_broken_component_fails_every_rank_alike(pipelines, tmp_path):
    """A VAE file that disagrees with its config fails the one plan agreement on every rank, naming the
    component, before any byte of any component is read."""
    import shutil

    root = str(tmp_path / "pipe")
    shutil.copytree(pipelines["5b"][0], root)
    import json
    cfg_path = f"{root}/vae/config.json"
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["latent_channels"] = 8
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    results = run_ranks(2, _load, root)
    assert all(r.error_type == "GroupLoadError" for r in results), results
    assert len({r.error for r in results}) == 1 and "vae:" in results[0].error
    assert GroupLoadError.__name__ == results[0].error_type
