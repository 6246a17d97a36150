"""`sat-dist sample` end to end on forked gloo ranks: tiny diffusers pipeline folders
(tests/engine_fixtures.py) -> the whole engine loaded -> mp4s written by the work groups' leaders at
the release's fps -> the files decode back (imageio-ffmpeg) to the right frame count and size; the
JSON run report holds every component's per-rank bytes, each run's seconds per step and every rank's
peak memory."""
import json
import os

import imageio.v3 as iio
import pytest

from engine_fixtures import SIZES, random_image, write_pipeline
from sat_dist.cli import main
from sat_dist.testing.dist import run_ranks, values


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {kind: write_pipeline(str(tmp_path_factory.mktemp(f"cli_{kind}")), kind, seed=i)
            for i, kind in enumerate(["5b", "15_i2v"])}


def _cli(rank, argv):
    return main(argv)


def _decoded(path):
    frames = iio.imread(path)
    meta = iio.immeta(path)
    return frames, meta


def test_sample_writes_an_mp4_and_a_run_report(folders, tmp_path):
    out, report = str(tmp_path / "panda.mp4"), str(tmp_path / "run.json")
    argv = ["sample", "--model", folders["5b"], "--prompt", "a red panda eating bamboo", "--steps", "3",
            "--seed", "7", "--out", out, "--report", report]
    assert values(run_ranks(1, _cli, argv)) == [0]
    frames, meta = _decoded(out)
    f, h, w = SIZES["5b"]
    assert frames.shape == (f, h, w, 3)
    assert round(meta["fps"]) == 8  # CogVideoX 1.0
    rep = json.load(open(report))
    assert set(rep["components"]) == {"transformer", "text_encoder", "vae"}
    (run,) = rep["runs"]
    assert run["out"] == out and len(run["seconds_per_step"]) == 3 and run["seconds_decode"] > 0
    assert rep["ranks"][0]["peak_device_bytes"] > 0


def test_prompts_file_on_two_groups_and_cfg_parallel(folders, tmp_path):
    """World 2 at TP 1: with CFG parallel one pair makes every video; without it the two replicas
    take every other prompt. Either way each prompt's mp4 is written once, by its group's leader."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red panda eating bamboo\n\na cat playing piano\nwaves on a beach\n")
    f, h, w = SIZES["5b"]
    for extra, name in (([], "pair"), (["--no-cfg-parallel"], "groups")):
        out_dir = str(tmp_path / name)
        argv = ["sample", "--model", folders["5b"], "--prompts", str(prompts), "--steps", "2", "--tp", "1",
                "--out-dir", out_dir, "--report", str(tmp_path / f"{name}.json"), *extra]
        assert values(run_ranks(2, _cli, argv)) == [0, 0]
        names = sorted(os.listdir(out_dir))
        assert names == ["000_a_red_panda_eating_bamboo.mp4", "001_a_cat_playing_piano.mp4", "002_waves_on_a_beach.mp4"]
        for n in names:
            assert _decoded(os.path.join(out_dir, n))[0].shape == (f, h, w, 3)
        rep = json.load(open(tmp_path / f"{name}.json"))
        writers = sorted(r["rank"] for r in rep["runs"])
        assert rep["cfg_parallel"] == (name == "pair")
        assert writers == ([0, 0, 0] if name == "pair" else [0, 0, 1])


def test_image_to_video_from_a_png(folders, tmp_path):
    """1.5-I2V: --image first.png; 16 fps (CogVideoX 1.5)."""
    png, out = str(tmp_path / "first.png"), str(tmp_path / "i2v.mp4")
    random_image(seed=5).save(png)
    argv = ["sample", "--model", folders["15_i2v"], "--prompt", "a cat", "--image", png, "--steps", "2",
            "--frames", "9", "--height", "32", "--width", "48", "--out", out, "--tp", "2"]
    assert values(run_ranks(2, _cli, argv)) == [0, 0]
    frames, meta = _decoded(out)
    assert frames.shape == (9, 32, 48, 3) and round(meta["fps"]) == 16


def test_missing_image_is_one_clear_error(folders, tmp_path, capsys):
    argv = ["sample", "--model", folders["15_i2v"], "--prompt", "a cat", "--steps", "1", "--out", str(tmp_path / "x.mp4")]
    (rc,) = values(run_ranks(1, _cli, argv))
    assert rc == 1
