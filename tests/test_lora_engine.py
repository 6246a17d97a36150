"""The CogVideoX engine with LoRA adapters (`sat_dist.load_engine(..., lora=, lora_merge=)`,
`Engine.set_loras`) against diffusers + PEFT themselves, on the tiny '5b' pipeline of
tests/engine_fixtures.py (inner dim 4 x 16 = 64, 2 layers), CPU fp32, forked gloo ranks, 3 steps.

LoRA files (tests/lora_fixtures.py, written by PEFT + CogVideoXPipeline.save_lora_weights):
A: rank 4, alpha 8, all four attention targets, metadata (diffusers' scale alpha / r = 2);
B: rank 2, alpha 2, to_q + to_v only, metadata; N: rank 2, alpha 6, to_q + to_v, no metadata (diffusers
reads it as alpha = r: scale 1, so a loader guessing alpha 6 or 1 fails); B16: B's tensors in bf16.

1. Oracle: diffusers' `run_pipeline_with_loras` (load_lora_weights + fuse_lora / set_adapters) vs the
   engine at TP 1 and 2, merged and unmerged, for A at 0.5, A 0.7 + B -0.4 (summed), N at 0.8: latents
   after every step |ours - ref| <= 1e-5 * max|ref|, frames (in [0, 1]) |ours - ref| <= 1e-4, as
   tests/test_engine.py. Each LoRA moves the oracle's frames by > 1e-3 from the base's (so the
   tolerances can tell). Worst seen (printed with -s): latents 1.5e-6 relative, frames 5.7e-6.
   Also with sequence parallel: SP 2 merged and TP 2 x SP 2 unmerged give the oracle's frames.
2. Switching, TP 2: a merged engine loaded with A, then set_loras B -> none -> A -> B16; an unmerged one
   A -> B -> none -> A. After each switch every rank's DiT state_dict digest (report.state_dict_digest)
   equals a fresh `load_model(root/transformer, tp=2, lora=..., lora_merge=...)`'s, and a sample equals
   a fresh engine's with the same adapters (latents and frames bitwise or within 1e-6; seen: bitwise).
   The bytes, computed here from the shapes: touched = the SAT tensors (fused query_key_value, dense)
   the old or the new adapters adapt; bytes_base = sum over touched of this rank's shard (QKV [3h, h] ->
   3h/tp rows, dense [h, h] -> h/tp columns) x the checkpoint's itemsize; bytes_factors = the new
   adapters' rank parts (column-parallel q/k/v: B's out/tp rows + all of A; row-parallel to_out.0: A's
   in/tp columns + all of B) x the LoRA file's itemsize; bytes_read = their sum. Unmerged: touched
   empty, bytes_base 0. Also: a bf16 run switching A -> B -> A equals a fresh bf16 load bit for bit (same
   byte counts: the stored fp32 base rows); with CFG-parallel replicas (world 4 = 2 x TP 2) a switch
   gives every rank its TP rank's fresh-load digest and the sample of a fresh TP-2 engine within the
   oracle's tolerances.
3. A LoRA that does not fit (from a 3-layer pipeline, from one with hidden size 32, a hand-written file
   naming attn2.to_q which the DiT lacks) fails load_model and load_engine at TP 2 on every rank with
   the same GroupLoadError, phase "plan", naming the file and the tensor, with no call of the reader
   (materialize) and no os.preadv; set_loras with it fails every rank alike (phase "lora-plan") and leaves
   the model as it was.
"""
from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import sat_dist
from engine_fixtures import SIZES, dit_kwargs, run_pipeline, write_pipeline
from lora_fixtures import read_header_metadata, run_pipeline_with_loras, write_peft_lora
from sat_dist.report import state_dict_digest
from sat_dist.testing.dist import run_ranks, values

KIND, PROMPT, SEED, STEPS = "5b", "a red panda eating bamboo", 42, 3
TILE = {"tile_sample_min_height": 24, "tile_sample_min_width": 40}  # as tests/test_engine.py
LAT_TOL, FRAME_TOL, SWITCH_TOL = 1e-5, 1e-4, 1e-6
HIDDEN, LAYERS = 64, 2
WORST: dict = {}
KEY = re.compile(r"^transformer\.transformer_blocks\.(\d+)\.attn1\.(to_q|to_k|to_v|to_out\.0)\.lora_([AB])\.weight$")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(pipeline root, {name: LoRA path})."""
    root = write_pipeline(str(tmp_path_factory.mktemp("pipe")), KIND, seed=11)
    out = {
        "A": write_peft_lora(root, str(tmp_path_factory.mktemp("A")), rank=4, alpha=8, seed=0),
        "B": write_peft_lora(root, str(tmp_path_factory.mktemp("B")), rank=2, alpha=2, targets=("to_q", "to_v"),
                             seed=1),
        "N": write_peft_lora(root, str(tmp_path_factory.mktemp("N")), rank=2, alpha=6, targets=("to_q", "to_v"),
                             seed=2, metadata=False),
    }
    b16 = str(tmp_path_factory.mktemp("B16") / "b16.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(out["B"]).items()}, b16,
              metadata=read_header_metadata(out["B"]))
    out["B16"] = b16
    return root, out


def _loras(out: dict, spec) -> list:
    return [(out[n], s) for n, s in spec]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


def _run(engine):
    lat: list = []
    f, h, w = SIZES[KIND]
    frames = engine.sample(PROMPT, num_steps=STEPS, seed=SEED, num_frames=f, height=h, width=w,
                           on_step=lambda i, t, x: lat.append(x.clone()))
    return lat, frames


def _sample(rank, root, tp, loras, merge):
    engine = sat_dist.load_engine(root, tp=tp, vae_tiling=TILE, lora=loras, lora_merge=merge)
    return (*_run(engine), state_dict_digest(engine.dit.state_dict()))


# --- 1. the oracle --------------------------------------------------------------------------------------------

CASES = {"A@0.5": [("A", 0.5)], "A@0.7+B@-0.4": [("A", 0.7), ("B", -0.4)], "N@0.8": [("N", 0.8)]}


@pytest.fixture(scope="module")
def base_frames(files):
    root, _ = files
    return run_pipeline(root, KIND, PROMPT, STEPS, SEED, tiling=TILE)[1]


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers_with_loras_at_tp_1_and_2_merged_and_unmerged(files, base_frames, case):
    root, out = files
    loras = _loras(out, CASES[case])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Already found a `peft_config` attribute" (2nd adapter)
        ref_lat, ref_frames = run_pipeline_with_loras(root, KIND, loras, PROMPT, STEPS, SEED, tiling=TILE)
    assert len(ref_lat) == STEPS
    assert float(abs(ref_frames - base_frames).max()) > 1e-3  # the LoRA does something the tolerances see
    for tp in (1, 2):
        for merge in (True, False):
            results = values(run_ranks(tp, _sample, root, tp, loras, merge))
            for rank, (lat, frames, _) in enumerate(results):
                assert len(lat) == STEPS
                for step, (ours, ref) in enumerate(zip(lat, ref_lat)):
                    assert ours.shape == ref.shape and ours.dtype == torch.float32
                    err = _rel(ours, ref)
                    WORST["latents"] = max(WORST.get("latents", 0.0), err)
                    assert err <= LAT_TOL, (case, tp, merge, rank, step, err)
                if rank:
                    assert frames is None
                    continue
                assert frames.shape == ref_frames.shape
                err = float(abs(frames - ref_frames).max())
                WORST["frames"] = max(WORST.get("frames", 0.0), err)
                assert err <= FRAME_TOL, (case, tp, merge, err)
    print(f"\n[engine+lora vs diffusers] {case}: worst so far latents {WORST['latents']:.1e} (rel), "
          f"frames {WORST['frames']:.1e} (abs)")


def _sample_sp(rank, root, tp, sp, loras, merge):
    engine = sat_dist.load_engine(root, tp=tp, sp=sp, vae_tiling=TILE, lora=loras, lora_merge=merge)
    return _run(engine)[1]


def test_with_sequence_parallel(files):
    """The adapters under Ulysses SP (the tokens split, the weights and the low-rank path not): frames of
    SP 2 (merged) and TP 2 x SP 2 (unmerged) equal diffusers' with the LoRA fused."""
    root, out = files
    loras = _loras(out, CASES["A@0.5"])
    _, ref_frames = run_pipeline_with_loras(root, KIND, loras, PROMPT, STEPS, SEED, tiling=TILE)
    for tp, sp, merge in ((1, 2, True), (2, 2, False)):
        frames = values(run_ranks(tp * sp, _sample_sp, root, tp, sp, loras, merge))[0]
        err = float(abs(frames - ref_frames).max())
        assert err <= FRAME_TOL, (tp, sp, merge, err)


# --- 2. switching ---------------------------------------------------------------------------------------------

def _switch_sequence(rank, root, tp, first, seq, merge):
    engine = sat_dist.load_engine(root, tp=tp, vae_tiling=TILE, lora=first, lora_merge=merge)
    out = []
    for loras in seq:
        stats = engine.set_loras(loras)
        out.append((stats, state_dict_digest(engine.dit.state_dict()), *_run(engine)))
    return out


def _fresh_digest(rank, root, tp, loras, merge):
    model, _ = sat_dist.load_model(os.path.join(root, "transformer"), tp=tp, lora=loras, lora_merge=merge,
                                   return_report=True)
    return state_dict_digest(model.state_dict())


def _modules(path: str) -> dict:
    """(layer, target) -> (A shape, B shape, itemsize) of a PEFT LoRA file."""
    sd = load_file(path)
    out: dict = {}
    for k, t in sd.items():
        m = KEY.match(k)
        assert m, k
        out.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
    return {key: (tuple(ab["A"].shape), tuple(ab["B"].shape), ab["A"].element_size()) for key, ab in out.items()}


def _sat_name(layer: int, target: str) -> str:
    part = "dense" if target == "to_out.0" else "query_key_value"
    return f"transformer.layers.{layer}.attention.{part}.weight"


def _base_itemsize(root: str) -> int:
    sd = load_file(os.path.join(root, "transformer", "diffusion_pytorch_model.safetensors"))
    return sd["transformer_blocks.0.attn1.to_q.weight"].element_size()


def _expected(old_paths, new_paths, tp: int, base_item: int, merge: bool) -> tuple[list, int, int]:
    """(touched, bytes_base, bytes_factors) of one rank, from the shapes alone."""
    h = HIDDEN
    touched = sorted({_sat_name(l, t) for p in list(old_paths) + list(new_paths) for (l, t) in _modules(p)})
    shard = {"query_key_value": 3 * h // tp * h, "dense": h * (h // tp)}  # elements of this rank's shard
    base = sum(shard[n.split(".")[-2]] for n in touched) * base_item
    factors = 0
    for p in new_paths:
        for (_, target), ((r, fan_in), (fan_out, r2), item) in _modules(p).items():
            assert r == r2
            if target == "to_out.0":  # row-parallel: this rank's columns of A, all of B
                factors += (r * (fan_in // tp) + fan_out * r) * item
            else:  # column-parallel (a block of the fused QKV): this rank's rows of B, all of A
                factors += (fan_out // tp * r + r * fan_in) * item
    if not merge:
        return [], 0, factors
    return touched, base, factors


SEQUENCES = {True: [["A"], ["B"], [], ["A"], ["B16"]], False: [["A"], ["B"], [], ["A"]]}


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_set_loras_equals_a_fresh_load_and_reads_only_the_touched_rows(files, merge):
    root, out = files
    tp = 2
    names = SEQUENCES[merge]
    strength = {"A": 0.7, "B": -0.9, "B16": -0.9}
    sets = [[(out[n], strength[n]) for n in ns] for ns in names]
    results = values(run_ranks(tp, _switch_sequence, root, tp, sets[0], sets[1:], merge))
    base_item = _base_itemsize(root)
    fresh: dict = {}
    for step, (prev, cur) in enumerate(zip(sets, sets[1:])):
        key = tuple(cur)
        if key not in fresh:
            digests = values(run_ranks(tp, _fresh_digest, root, tp, cur, merge))
            fresh[key] = digests, values(run_ranks(tp, _sample, root, tp, cur, merge))
        digests, samples = fresh[key]
        touched, base, factors = _expected([p for p, _ in prev], [p for p, _ in cur], tp, base_item, merge)
        for rank in range(tp):
            stats, digest, lat, frames = results[rank][step]
            what = (merge, step, names[step + 1], rank)
            assert digest == digests[rank] == samples[rank][2], what
            assert stats.touched == touched, (what, stats.touched)
            assert stats.bytes_read == stats.bytes_base + stats.bytes_factors, (what, stats)
            assert (stats.bytes_base, stats.bytes_factors) == (base, factors), (what, stats, base, factors)
            ref_lat, ref_frames, _ = samples[rank]
            for ours, ref in zip(lat, ref_lat, strict=True):
                err = (ours - ref).abs().max().item()
                WORST["switch"] = max(WORST.get("switch", 0.0), err)
                assert err <= SWITCH_TOL, (what, err)
            assert (frames is None) == (ref_frames is None) == (rank != 0)
            if frames is not None:
                err = float(abs(frames - ref_frames).max())
                WORST["switch"] = max(WORST.get("switch", 0.0), err)
                assert err <= SWITCH_TOL, (what, err)
    if merge:  # the digests differ between adapter sets (the comparison above can tell them apart)
        assert len({fresh[tuple(s)][0][0] for s in sets[1:]}) == len({tuple(s) for s in sets[1:]})
    print(f"\n[set_loras vs fresh] {'merged' if merge else 'unmerged'}: worst |switched - fresh| "
          f"{WORST['switch']:.1e}")


def _bf16_switches(rank, root, sets):
    model = sat_dist.load_model(os.path.join(root, "transformer"), tp=2, dtype="bf16", lora=sets[0])
    out = []
    for loras in sets[1:]:
        stats = sat_dist.set_loras(model, loras)
        out.append((stats, state_dict_digest(model.state_dict())))
    return out


def _bf16_fresh(rank, root, loras):
    model = sat_dist.load_model(os.path.join(root, "transformer"), tp=2, dtype="bf16", lora=loras)
    return state_dict_digest(model.state_dict())


def test_bf16_switch_back_is_bit_exact(files):
    """A bf16 run: merged A -> B -> A equals a fresh bf16 load bit for bit (the switch re-reads the fp32
    base rows and merges afresh, nothing is unmerged); the bytes are the stored (fp32) base rows'."""
    root, out = files
    sets = [[(out["A"], 0.7)], [(out["B"], -0.9)], [(out["A"], 0.7)]]
    results = values(run_ranks(2, _bf16_switches, root, sets))
    base_item = _base_itemsize(root)
    for step, (prev, cur) in enumerate(zip(sets, sets[1:])):
        fresh = values(run_ranks(2, _bf16_fresh, root, cur))
        touched, base, factors = _expected([p for p, _ in prev], [p for p, _ in cur], 2, base_item, True)
        for rank in range(2):
            stats, digest = results[rank][step]
            assert digest == fresh[rank], (step, rank)
            assert stats.touched == touched and (stats.bytes_base, stats.bytes_factors) == (base, factors), stats
            assert stats.bytes_read == base + factors, stats


def _cfg_switch(rank, root, first, then):
    engine = sat_dist.load_engine(root, tp=2, vae_tiling=TILE, lora=first)
    stats = engine.set_loras(then)
    got = (stats, state_dict_digest(engine.dit.state_dict()), *_run(engine))
    rep = engine.finish().to_dict()
    return (*got, (rep["dp"], rep["cfg_parallel"]))


def test_switch_with_cfg_parallel_replicas(files):
    """World 4 = 2 CFG replicas x TP 2: the switch agrees across the replicas, each rank's DiT equals the
    TP-2 fresh load of its TP rank, and the sample equals the fresh TP-2 (sequential CFG) engine's within
    the oracle's tolerances."""
    root, out = files
    first, then = [(out["A"], 0.7)], [(out["B"], -0.9)]
    results = values(run_ranks(4, _cfg_switch, root, first, then))
    digests = values(run_ranks(2, _fresh_digest, root, 2, then, True))
    ref = values(run_ranks(2, _sample, root, 2, then, True))
    touched, base, factors = _expected([out["A"]], [out["B"]], 2, _base_itemsize(root), True)
    for rank, (stats, digest, lat, frames, mesh) in enumerate(results):
        assert mesh == (2, True), mesh
        assert digest == digests[rank % 2], rank  # ranks 0, 1: replica 0's TP ranks; 2, 3: replica 1's
        assert stats.touched == touched and (stats.bytes_base, stats.bytes_factors) == (base, factors), stats
        for ours, want in zip(lat, ref[0][0], strict=True):
            assert _rel(ours, want) <= LAT_TOL, rank
        assert (frames is None) == (rank != 0)
    assert float(abs(results[0][3] - ref[0][1]).max()) <= FRAME_TOL


# --- 3. LoRAs that do not fit ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_files(files, tmp_path_factory):
    """{name: (path, tensor name the error must give)}: LoRAs for other DiTs, written by PEFT on them."""
    from diffusers import CogVideoXTransformer3DModel

    root, _ = files
    out = {}
    for name, change, tensor in [
            ("layers", {"num_layers": 3}, "transformer.transformer_blocks.2.attn1."),
            ("hidden", {"attention_head_dim": 8}, "transformer.transformer_blocks.0.attn1.")]:
        other = str(tmp_path_factory.mktemp(f"other_{name}"))
        torch.manual_seed(0)
        CogVideoXTransformer3DModel(**{**dit_kwargs(KIND), **change}).save_pretrained(
            os.path.join(other, "transformer"))
        out[name] = (write_peft_lora(other, str(tmp_path_factory.mktemp(f"lora_{name}")), rank=4, alpha=8), tensor)
    path = str(tmp_path_factory.mktemp("lora_attn2") / "attn2.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({"transformer.transformer_blocks.0.attn2.to_q.lora_A.weight": torch.randn(4, HIDDEN, generator=g),
               "transformer.transformer_blocks.0.attn2.to_q.lora_B.weight": torch.randn(HIDDEN, 4, generator=g)},
              path, metadata={"format": "pt"})
    out["attn2"] = (path, "transformer.transformer_blocks.0.attn2.to_q.lora_")
    return out


def _watch_reads() -> dict:
    """Count this rank's calls of the reader (materialize, where the loader and the switch call it) and
    of os.preadv (how it reads)."""
    import sat_dist.loader as loader
    import sat_dist.lora.switch as switch

    calls = {"materialize": 0, "preadv": 0}
    real_mat, real_preadv = loader.materialize, os.preadv

    def mat(*a, **k):
        calls["materialize"] += 1
        return real_mat(*a, **k)

    def preadv(*a, **k):
        calls["preadv"] += 1
        return real_preadv(*a, **k)

    loader.materialize = switch.materialize = mat
    os.preadv = preadv
    return calls


def _load_bad(rank, root, path, engine):
    calls = _watch_reads()
    try:
        if engine:
            sat_dist.load_engine(root, tp=2, lora=[(path, 0.5)])
        else:
            sat_dist.load_model(os.path.join(root, "transformer"), tp=2, lora=[(path, 0.5)])
    except sat_dist.GroupLoadError as exc:
        return exc.phase, str(exc), dict(exc.failures), dict(calls)
    return "loaded", "", {}, dict(calls)


def _switch_bad(rank, root, good, path):
    engine = sat_dist.load_engine(root, tp=2, lora=good)
    before = state_dict_digest(engine.dit.state_dict())
    try:
        engine.set_loras([(path, 0.5)])
    except sat_dist.GroupLoadError as exc:
        got = exc.phase, str(exc), dict(exc.failures)
    else:
        got = "switched", "", {}
    return got, before, state_dict_digest(engine.dit.state_dict())


@pytest.mark.parametrize("bad", ["layers", "hidden", "attn2"])
def test_a_lora_that_does_not_fit_fails_every_rank_at_plan(files, bad_files, bad):
    root, out = files
    path, tensor = bad_files[bad]
    for engine in (False, True):
        got = values(run_ranks(2, _load_bad, root, path, engine))
        phases, messages, failures, calls = zip(*got)
        assert phases == ("plan", "plan"), (bad, engine, phases, messages)
        assert len(set(messages)) == 1, (bad, engine, messages)
        msg = messages[0]
        assert path in msg and tensor in msg, (bad, engine, msg)
        assert set(failures[0]) == {0, 1}
        assert all(f.startswith("LoraError: ") and path in f for f in failures[0].values()), failures[0]
        assert calls == ({"materialize": 0, "preadv": 0},) * 2, (bad, engine, calls)  # no byte read
    (got0, before0, after0), (got1, before1, after1) = values(run_ranks(2, _switch_bad, root,
                                                                        [(out["A"], 0.5)], path))
    assert got0 == got1 and got0[0] == "lora-plan", got0
    assert path in got0[1] and tensor in got0[1], got0
    assert (before0, before1) == (after0, after1)  # a failed switch changes nothing
