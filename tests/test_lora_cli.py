"""LoRA on the command line (`sat_dist.cli.main`, as `sat-dist` runs it, in this process):

* `sample --dry-run` lists each prompt's adapters (the command line's, a `--prompts` line's own, `none`);
* `sample` with a LoRA for another model exits 1 before loading anything, naming the file and the tensor;
* `sample --prompts` with per-line adapters writes every video, switching adapters between groups; the
  video of a prompt equals the one `sample --prompt` writes with the same adapters;
* `load --lora` reports bytes read == bytes needed (the base plus the adapters' rank parts);
* `inspect` of a PEFT LoRA says its format, rank, scale and layers.
"""
import json
import os
import subprocess

import numpy as np
import pytest
from safetensors.torch import save_file
import torch

from engine_fixtures import write_pipeline
from lora_fixtures import write_peft_lora

SIZE = ["--frames", "9", "--height", "32", "--width", "48", "--steps", "2"]


def _main(capsys, *args):
    from sat_dist.cli import main

    rc = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    base = tmp_path_factory.mktemp("lora_cli")
    root = write_pipeline(str(base / "pipe"), "5b", seed=5)
    a = write_peft_lora(root, str(base / "a"), rank=4, alpha=8, seed=1)
    b = write_peft_lora(root, str(base / "b"), rank=2, alpha=2, seed=2, targets=("to_q", "to_v"))
    bad = str(base / "bad.safetensors")
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 7),
               "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 2)}, bad)
    return {"root": root, "a": a, "b": b, "bad": bad, "base": base}


def test_dry_run_lists_each_prompts_adapters(pipe, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"a red panda\na cat --lora {pipe['b']}:0.5\na dog --lora none\n")
    out = _main(capsys, "sample", "--model", pipe["root"], "--prompts", str(prompts), "--out-dir",
                str(tmp_path / "v"), "--lora", f"{pipe['a']}:0.8", "--dry-run", *SIZE)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("output")]
    assert lines[0].endswith("'a red panda'  [LoRA a/pytorch_lora_weights.safetensors:0.8]")
    assert lines[1].endswith("'a cat'  [LoRA b/pytorch_lora_weights.safetensors:0.5]")
    assert lines[2].endswith("'a dog'")


def test_a_lora_for_another_model_stops_sample_before_loading(pipe, tmp_path, capsys):
    out = _main(capsys, "sample", "--model", pipe["root"], "--prompt", "x", "--out", str(tmp_path / "x.mp4"),
               "--lora", pipe["bad"], *SIZE)
    assert out.returncode == 1
    assert pipe["bad"] in out.stderr and "to_q.lora_A.weight" in out.stderr and "another model" in out.stderr
    assert "load table" not in out.stdout and not (tmp_path / "x.mp4").exists()


def _frames(path):
    import imageio.v3 as iio

    return np.asarray(iio.imread(path))


def test_prompts_with_their_own_adapters_equal_single_runs(pipe, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"a red panda\na cat --lora {pipe['b']}:0.5\na dog --lora none\n")
    out = _main(capsys, "sample", "--model", pipe["root"], "--prompts", str(prompts), "--out-dir", str(tmp_path / "v"),
               "--lora", f"{pipe['a']}:0.8", *SIZE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("LoRA switched to") == 2
    names = sorted(os.listdir(tmp_path / "v"))
    assert names == ["000_a_red_panda.mp4", "001_a_cat.mp4", "002_a_dog.mp4"]
    single = _main(capsys, "sample", "--model", pipe["root"], "--prompt", "a cat", "--out", str(tmp_path / "cat.mp4"),
                   "--lora", f"{pipe['b']}:0.5", *SIZE)
    assert single.returncode == 0, single.stderr
    assert np.array_equal(_frames(tmp_path / "cat.mp4"), _frames(tmp_path / "v" / "001_a_cat.mp4"))
    assert not np.array_equal(_frames(tmp_path / "v" / "000_a_red_panda.mp4"),
                              _frames(tmp_path / "v" / "002_a_dog.mp4"))


def test_load_reports_the_adapters_bytes(pipe, tmp_path, capsys):
    report = tmp_path / "r.json"
    out = _main(capsys, "load", os.path.join(pipe["root"], "transformer"), "--lora", f"{pipe['a']}:0.5", "--lora", pipe["b"],
               "--report", str(report))
    assert out.returncode == 0, out.stderr
    rank = json.loads(report.read_text())["ranks"][0]
    lora_bytes = os.path.getsize(pipe["a"]) + os.path.getsize(pipe["b"])
    assert rank["bytes_read"] == rank["bytes_needed"]
    plain = tmp_path / "p.json"
    assert _main(capsys, "load", os.path.join(pipe["root"], "transformer"), "--report", str(plain)).returncode == 0
    extra = rank["bytes_read"] - json.loads(plain.read_text())["ranks"][0]["bytes_read"]
    assert 0 < extra < lora_bytes  # the factors' data, not their headers


def test_inspect_a_peft_lora(pipe, capsys):
    out = _main(capsys, "inspect", pipe["a"])
    assert out.returncode == 0, out.stderr
    assert "format: LoRA (PEFT / diffusers), 8 adapted modules, rank [4]" in out.stdout
    assert "lora_alpha 8 / r 4 = 2 x strength" in out.stdout and "layers: 2 (0..1)" in out.stdout


def test_verify_checks_the_checkpoint_and_not_the_adapter(pipe, tmp_path, capsys):
    transformer = os.path.join(pipe["root"], "transformer")
    assert _main(capsys, "manifest", transformer).returncode == 0  # the adapter's folder has none
    out = _main(capsys, "load", transformer, "--verify", "--lora", pipe["a"])
    assert out.returncode == 0, out.stderr
