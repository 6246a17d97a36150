"""`sat-dist plan PATH` (issue 22): any checkpoint or release folder a reader recognises is planned from
its own config and headers (no tensor data read), with its stored dtype; `--engine` takes a diffusers
pipeline folder. The per-rank bytes equal what a load of that path holds on its largest rank."""
from __future__ import annotations

import json

import pytest

import sat_dist
from engine_fixtures import write_pipeline
from sat_dist.cli import main
from sat_dist.testing.dist import run_ranks, values


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return write_pipeline(str(tmp_path_factory.mktemp("plan_path")), "5b", seed=2)


def _state_bytes(rank, path, tp):
    model = sat_dist.load_model(path, tp=tp, timeout_s=30)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _plan(capsys, *argv):
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("component", ["transformer", "text_encoder"])
def test_plan_of_a_folder_equals_what_its_load_holds_per_rank(pipeline, capsys, component):
    path = f"{pipeline}/{component}"
    got = _plan(capsys, path, "--tp", "1", "2")
    assert got["dtype"] == "fp32"  # the stored dtype, from the headers
    for row in got["rows"]:
        held = values(run_ranks(row["tp"], _state_bytes, path, row["tp"], timeout=120))
        assert row["valid"] and row["param_bytes"] == max(held)


def test_plan_engine_of_a_pipeline_folder_and_refusals(pipeline, capsys, tmp_path):
    got = _plan(capsys, pipeline, "--engine", "--tp", "1", "2")
    rows = {r["tp"]: r for r in got["rows"]}
    assert rows[1]["valid"] and rows[2]["valid"]
    assert rows[2]["weights"]["transformer"] < rows[1]["weights"]["transformer"]
    assert rows[2]["weights"]["vae"] == rows[1]["weights"]["vae"]  # the VAE is on every rank whole
    bf16 = _plan(capsys, f"{pipeline}/transformer", "--tp", "1", "--dtype", "bf16")
    assert bf16["rows"][0]["param_bytes"] * 2 == got["components"]["transformer"]["rows"][0]["param_bytes"]
    assert main(["plan", pipeline]) == 1  # a pipeline folder without --engine: say what to pass
    assert "pass --engine" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "typo")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["plan"]) == 1
    assert "needs a checkpoint or release folder" in capsys.readouterr().err

