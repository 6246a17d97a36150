"""Bytes sent per rank by kind (sat_dist/commcount.py), counted at each collective of a sampling run,
equal engine/comm.py's prediction from the configs exactly (the VAE's tile gathers included), for tiny 12-head pipelines at TP, SP and
CFG layouts on forked gloo ranks (CPU, fp32). The 5B-style DiT has 5 token rows: SP 2 splits them 3, 2,
so the two SP ranks send different bytes, each predicted."""
import os

import pytest
import torch

import sat_dist
from engine_fixtures import _randomize, dit_kwargs, write_pipeline
from sat_dist import commcount
from sat_dist.engine.comm import Layout, choose, run_bytes, valid_layouts
from sat_dist.testing.dist import run_ranks, values

PROMPT, STEPS = "a red panda eating bamboo", 2
LAYOUTS = [(2, 1, False), (1, 2, False), (1, 1, True), (2, 2, False)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from diffusers import CogVideoXTransformer3DModel

    root = str(tmp_path_factory.mktemp("comm_5b"))
    write_pipeline(root, "5b", seed=7)
    kw = {**dit_kwargs("5b"), "num_attention_heads": 12, "attention_head_dim": 16, "sample_height": 10}
    _randomize(CogVideoXTransformer3DModel(**kw), torch.Generator().manual_seed(8), 0.05).eval().save_pretrained(
        os.path.join(root, "transformer"))
    return root


TILE = {"tile_sample_min_height": 24, "tile_sample_min_width": 40}  # 2 x 2 tiles of the 40 x 48 video


def _sample(rank, path, tp, sp, cfg):
    engine = sat_dist.load_engine(path, tp=tp, sp=sp, cfg_parallel=cfg, vae_tiling=TILE)
    _, latents = engine.run(PROMPT, num_steps=STEPS, seed=1, num_frames=9, height=40, width=48)
    a, t5 = engine.dit.arch, engine.parts.models["text_encoder"].model
    item = next(engine.text_encoder.parameters()).element_size()
    length = engine.parts.max_text_length or a.text_length
    want = run_bytes(a, t5, Layout(tp, sp, 2 if engine.pair_group is not None else 1), text=length,
                     latent=tuple(latents.shape[i] for i in (1, 3, 4)), channels=latents.shape[2],
                     dit_item=engine.dit.dtype.itemsize, t5_item=item, latent_item=latents.element_size(),
                     sp_rank=engine.rt.sp_rank, vae=engine.vae, tp_rank=engine.rt.tp_rank,
                     pair_index=engine.pair_index, vae_item=engine.vae.dtype.itemsize)
    engine.finish()
    return {"got": engine.comm[-1], "want": want, "ranks": engine.report.ranks}


@pytest.mark.parametrize("tp,sp,cfg", LAYOUTS)
def test_counted_bytes_equal_the_prediction(root, tp, sp, cfg):
    results = values(run_ranks(tp * sp * (2 if cfg else 1), _sample, root, tp, sp, cfg))
    for rank, r in enumerate(results):
        got, want = r["got"], r["want"]
        assert got["per_step"] == want["per_step"], (rank, got, want)
        assert got["steps_total"] == {k: v * STEPS for k, v in want["per_step"].items()}
        assert got["encode"] == want["encode"], (rank, got, want)
        assert got["decode"] == want["decode"], (rank, got, want)  # the SP latents gather and the tile gathers
        assert (got["decode"]["decode"] > 0) == (rank % (tp * sp * (2 if cfg else 1)) > 0)  # all but the leader
        for kind, n in got["per_step"].items():  # each layout's own collectives only
            assert (n > 0) == {"tp": tp > 1, "sp": sp > 1, "cfg": cfg, "decode": False}[kind], (kind, n)
        assert [g["comm_bytes"][-1] for g in r["ranks"]] == [x["got"] for x in results]  # finish gathers all
    if sp > 1:
        assert results[0]["got"]["per_step"]["sp"] != results[tp]["got"]["per_step"]["sp"]  # 3 vs 2 token rows


def test_conventions():
    assert commcount.all_reduce_bytes(100, 4) == 150 and commcount.all_reduce_bytes(100, 1) == 0
    assert commcount.all_gather_bytes(10, 4) == 30
    assert commcount.all_to_all_bytes([3, 2, 2], 1, 4) == 20
    assert commcount.gather_bytes(10, 2, True) == 0 and commcount.gather_bytes(10, 2, False) == 10


def test_auto_rule_and_valid_layouts():
    from types import SimpleNamespace

    a = SimpleNamespace(heads=12, ffn=48, hidden=24)
    got = {(l.tp, l.sp, l.cfg) for l in valid_layouts(a, 4, token_rows=5)}
    assert (2, 2, 1) in got and (4, 1, 1) in got and (1, 4, 1) in got and (1, 2, 2) in got and (4, 1, 2) not in got
    assert all((3 not in x[:2]) for x in got)  # 3 does not divide 4
    rows = [{"tp": 2, "sp": 1, "cfg": 1, "bytes_per_step": 10, "fits": True},
            {"tp": 1, "sp": 1, "cfg": 2, "bytes_per_step": 10, "fits": True},
            {"tp": 1, "sp": 1, "cfg": 1, "bytes_per_step": 0, "fits": False}]
    assert choose(rows)["cfg"] == 2 and choose(rows)["tp"] == 1  # tie on bytes: same ranks, smaller tp
    assert choose([dict(r, fits=False) for r in rows]) is None


def _auto(rank, argv):
    from sat_dist.cli import _auto_layout, build_parser, parse

    args = parse(build_parser(), argv)
    try:
        _auto_layout(args)
    except sat_dist.ConfigError as exc:
        return str(exc)
    return args.tp, args.sp, args.no_cfg_parallel


def test_sample_layout_auto_picks_by_the_rule_before_loading(root, tmp_path):
    """`sample --layout auto` on 4 ranks: with one prompt the whole world works on it (dp 1) and the
    layout sending the fewest bytes per step wins; with 4 prompts pure data parallelism (no bytes)
    wins; with too little memory it names every layout's need. Nothing is loaded (no process group)."""
    from sat_dist.capacity import engine_layouts
    from sat_dist.engine.comm import choose

    rows = engine_layouts([], 4, checkpoint=root)
    one = choose([{**r, "fits": True} for r in rows if r["dp"] == 1])
    base = ["sample", "--model", root, "--layout", "auto"]
    got = values(run_ranks(4, _auto, base + ["--prompt", "a cat"]))
    assert got == [(one["tp"], one["sp"], one["cfg"] == 1)] * 4
    assert one["bytes_per_step"] == min(r["bytes_per_step"] for r in rows if r["dp"] == 1)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\nd\n")
    assert values(run_ranks(4, _auto, base + ["--prompts", str(prompts)])) == [(1, 1, True)] * 4
    refused = values(run_ranks(2, _auto, base + ["--prompt", "a cat", "--gpu-memory", "1MiB"]))[0]
    assert "no layout of 2 GPUs fits --gpu-memory 1MiB" in refused and "TP1xSP1xCFG2" in refused
    clash = values(run_ranks(2, _auto, base + ["--prompt", "a cat", "--tp", "2"]))[0]
    assert "--layout auto chooses --tp" in clash


def test_layout_memory_divides_the_denoising_activations_by_sp_and_the_cfg_pair():
    from sat_dist.capacity import engine_layouts, layout_activations

    acts = {"encode": 10, "denoise": 1000, "decode": 300}
    assert layout_activations(acts, 1, 1) == acts
    assert layout_activations(acts, 4, 2) == {"encode": 10, "denoise": 125, "decode": 300}
    cfg = os.path.join(os.path.dirname(__file__), "..", "configs", "cogvideox_5b.yaml")
    rows = {r["layout"]: r for r in engine_layouts([cfg], 8)}
    one, two = rows["TP2xSP1xCFG1"], rows["TP2xSP2xCFG2"]
    assert two["activations"]["denoise"] * 4 >= one["activations"]["denoise"] > two["activations"]["denoise"]
    assert two["device_bytes"] <= one["device_bytes"] and two["weights"] == one["weights"]
