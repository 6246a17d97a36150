"""`sat-dist sample`: every argument is checked against the model before any component is loaded (at
real size a load takes minutes), `--dry-run` prints the resolved run and loads nothing, and no mp4 is
claimed that was not written whole. Refusals run in-process with the loader, the engine's load and the
process group's setup replaced by test failures, so each one provably happens before any load."""
from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest
import torch.distributed as dist

from engine_fixtures import random_image, write_pipeline
from sat_dist.cli import main
from sat_dist.engine import check, video
from sat_dist.engine.engine import Engine
from sat_dist.engine.layout import components_for
from sat_dist.errors import ConfigError
from sat_dist.testing.dist import run_ranks, values


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """The tiny 1.0 T2V (configured 9 x 32 x 48) and 1.5 I2V (RoPE table: 6 latent frames, 32 x 48 px)."""
    out = {kind: write_pipeline(str(tmp_path_factory.mktemp(f"args_{kind}")), kind, seed=i)
           for i, kind in enumerate(["5b", "15_i2v"])}
    out["png"] = str(tmp_path_factory.mktemp("args_png") / "first.png")
    random_image(seed=5).save(out["png"])
    return out


@pytest.fixture
def no_load(monkeypatch):
    """Any load, or a process group forming, fails the test."""
    import sat_dist.collectives
    import sat_dist.engine.engine
    import sat_dist.loader

    def loaded(*a, **k):
        pytest.fail("a component was loaded (or a process group set up) before the arguments were checked")

    monkeypatch.setattr(sat_dist.engine.engine, "load_engine", loaded)
    monkeypatch.setattr(sat_dist.loader, "load_components", loaded)
    monkeypatch.setattr(sat_dist.collectives, "setup", loaded)
    yield
    assert not dist.is_initialized()


def _sample(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["sample", *argv])
    got = capsys.readouterr()
    return rc, got.out, got.err


def _refusals(p: dict, tmp: str) -> list[tuple[str, list[str], list[str]]]:
    """(case, argv after `sample`, what the message must say)."""
    t2v, i2v, png = ["--model", p["5b"], "--prompt", "a cat"], ["--model", p["15_i2v"], "--prompt", "a cat"], p["png"]
    size15 = ["--image", png, "--height", "32", "--width", "48"]
    nofolder = os.path.join(tmp, "not_a_pipeline")
    os.makedirs(os.path.join(nofolder, "transformer"), exist_ok=True)
    prompts = os.path.join(tmp, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("a cat\n")
    return [
        ("t2v given an image", [*t2v, "--image", png], ["--image given", "text-to-video model"]),
        ("i2v without an image", i2v, ["image-to-video model: pass --image"]),
        ("missing image file", [*i2v, "--image", os.path.join(tmp, "nope.png")], ["--image", "nope.png: no such file"]),
        ("not an image", [*i2v, "--image", prompts], ["not an image"]),
        ("1.0 at another size", [*t2v, "--height", "64"],
         ["--height 64 --width 48 (the model's default)", "configured size 32x48", "--height 32 --width 48"]),
        ("1.5 off the patch grid", [*i2v, *size15[:2], "--frames", "9", "--height", "32", "--width", "44"],
         ["--width 44: must be a multiple of 8", "VAE's 4x spatial compression x the DiT's patch 2", "use 40 or 48"]),
        ("1.5 past its RoPE table", [*i2v, *size15[:2], "--frames", "9", "--height", "48", "--width", "48"],
         ["--height 48: this model runs at most 32"]),
        ("frames off the VAE's grid", [*i2v, *size15, "--frames", "10"],
         ["--frames 10: F - 1 must be a multiple of 8", "use 9 or 17"]),
        ("frames that would decode to 16", [*i2v, *size15, "--frames", "13"], ["--frames 13", "use 9 or 17"]),
        ("1.5 default frames past the table", [*i2v, *size15],
         ["--frames 81 (the model's default): this model runs at most 17 frames"]),
        ("1.0 past its configured frames", [*t2v, "--frames", "17"], ["--frames 17: this model runs at most 9"]),
        ("no steps", [*t2v, "--steps", "0"], ["--steps 0: must be >= 1"]),
        ("more steps than timesteps", [*t2v, "--steps", "1001"], ["--steps 1001", "num_train_timesteps=1000"]),
        ("TP that splits no head", [*t2v, "--tp", "3"],
         ["--tp 3: transformer", "TP sizes that work for this model: [1, 2, 4]"]),
        ("unwritable --out", [*t2v, "--out", "/proc/x.mp4"], ["--out /proc/x.mp4: cannot write in /proc"]),
        ("--out is a folder", [*t2v, "--out", tmp], [f"--out {tmp}: is a folder"]),
        ("unwritable --out-dir", ["--model", p["5b"], "--prompts", prompts, "--out-dir", "/proc/videos"],
         ["--out-dir /proc/videos: cannot create the folder"]),
        ("unreadable --prompts", ["--model", p["5b"], "--prompts", os.path.join(tmp, "none.txt")],
         ["--prompts", "none.txt: cannot read it"]),
        ("--model typo", ["--model", "/typo", "--prompt", "a cat"],
         ["no CogVideoX pipeline folder at /typo: no such file or folder"]),
        ("--model without model_index.json", ["--model", nofolder, "--prompt", "a cat"],
         [f"no CogVideoX pipeline folder at {nofolder}: model_index.json missing"]),
    ]


def test_every_refusal_comes_before_any_load(pipes, tmp_path, capsys, no_load):
    for case, argv, needles in _refusals(pipes, str(tmp_path)):
        rc, out, err = _sample(capsys, *argv, *([] if "--out" in argv or "--prompts" in argv else
                                                ["--out", str(tmp_path / "x.mp4")]))
        assert rc == 1, (case, out, err)
        for needle in needles:
            assert needle in err, (case, needle, err)
        assert "wrote" not in out, case
    assert not (tmp_path / "x.mp4").exists()


def test_the_python_api_refuses_the_same_way(pipes):
    """`Engine.run` checks first: an Engine with no model loaded at all refuses before touching one."""
    engine = Engine.__new__(Engine)  # no models, no process group: a refusal must not need them
    engine.parts = components_for(pipes["15_i2v"], {})
    image = random_image()
    with pytest.raises(ConfigError, match=r"num_frames=10: F - 1 must be a multiple of 8.*use 9 or 17"):
        engine.run("a cat", num_frames=10, height=32, width=48, image=image)
    with pytest.raises(ConfigError, match="image-to-video model: pass image="):
        engine.run("a cat", num_frames=9, height=32, width=48)
    with pytest.raises(ConfigError, match=r"width=44: must be a multiple of 8"):
        engine.run("a cat", num_frames=9, height=32, width=44, image=image)
    with pytest.raises(ConfigError, match=r"num_steps=0: must be >= 1"):
        engine.run("a cat", num_steps=0, num_frames=9, height=32, width=48, image=image)


def test_dry_run_prints_the_resolved_run_and_loads_nothing(pipes, tmp_path, capsys, no_load):
    out = tmp_path / "later" / "panda.mp4"
    rc, text, err = _sample(capsys, "--model", pipes["5b"], "--prompt", "a red panda", "--steps", "3", "--out",
                            str(out), "--dry-run")
    assert rc == 0, err
    for needle in ("nothing loaded", f"transformer  {pipes['5b']}/transformer", "text_encoder", "vae ",
                   "9 frames x 32 x 48", "tp 1", "dtype as stored", "CogVideoXDPMScheduler, 3 steps, guidance 6",
                   "dynamic CFG on", "MiB/rank", f"{out} <- 'a red panda'"):
        assert needle in text, (needle, text)
    assert not out.parent.exists()  # checked writable, not created: a dry run leaves nothing
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red panda\n\na cat playing piano\n")
    rc, text, err = _sample(capsys, "--model", pipes["15_i2v"], "--prompts", str(prompts), "--image", pipes["png"],
                            "--frames", "17", "--height", "16", "--width", "32", "--tp", "2", "--dtype", "bf16",
                            "--out-dir", str(tmp_path / "videos"), "--dry-run")
    assert rc == 0, err
    for needle in ("CogVideoX 1.5 image-to-video, 16 fps", "17 frames x 16 x 32 (DiT latents 6 x 4 x 8)",
                   "tp 2, sp 1, dtype bf16", "per rank", f"first frame {pipes['png']}",
                   f"{tmp_path / 'videos' / '000_a_red_panda.mp4'}", "001_a_cat_playing_piano.mp4"):
        assert needle in text, (needle, text)


FRAMES = np.random.default_rng(0).random((9, 32, 48, 3))


def test_write_mp4_is_whole_or_absent(tmp_path, monkeypatch):
    """A write lands by rename; a failed one is a ConfigError naming the path, leaves no temporary
    file and does not touch what was at the path before."""
    path = str(tmp_path / "a.mp4")
    assert video.write_mp4(FRAMES, path, 8) == path and os.listdir(tmp_path) == ["a.mp4"]
    before = open(path, "rb").read()
    with pytest.raises(ConfigError, match="could not write /proc/x.mp4"):
        video.write_mp4(FRAMES, "/proc/x.mp4", 8)

    def incomplete(p):
        raise ConfigError("ffmpeg left an incomplete mp4")

    monkeypatch.setattr(video, "_check_mp4", incomplete)
    with pytest.raises(ConfigError, match=f"could not write {path}: ffmpeg left an incomplete mp4"):
        video.write_mp4(FRAMES, path, 8)
    assert os.listdir(tmp_path) == ["a.mp4"] and open(path, "rb").read() == before


def test_check_mp4_refuses_a_truncated_file(tmp_path):
    path = str(tmp_path / "a.mp4")
    video.write_mp4(FRAMES, path, 8)
    data = open(path, "rb").read()
    cut = str(tmp_path / "cut.mp4")
    with open(cut, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="incomplete mp4"):
        video._check_mp4(cut)
    video._check_mp4(path)


def _sample_writing_to_proc(rank, argv):
    """The CLI with the up-front folder checks bypassed, so the failure comes from the mp4 write
    after sampling; returns (exit code, stdout, stderr)."""
    check.check_writable = lambda *a, **k: None
    real = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
    try:
        rc = main(argv)
        return rc, sys.stdout.getvalue(), sys.stderr.getvalue()
    finally:
        sys.stdout, sys.stderr = real


def test_a_failed_mp4_write_exits_non_zero_without_a_wrote_line(pipes):
    argv = ["sample", "--model", pipes["5b"], "--prompt", "a cat", "--steps", "1", "--out", "/proc/x.mp4"]
    ((rc, printed, err),) = values(run_ranks(1, _sample_writing_to_proc, argv))
    assert rc == 1 and "wrote" not in printed, printed
    assert "could not write /proc/x.mp4: ffmpeg wrote no file" in err, err
    assert not os.path.exists("/proc/x.mp4")
