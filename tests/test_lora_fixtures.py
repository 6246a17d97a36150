"""The LoRA fixtures (tests/lora_fixtures.py) against diffusers itself, on the tiny '5b' pipeline
(inner dim 4 x 16 = 64, 2 layers), CPU fp32, 2 steps: the files' keys, shapes and header metadata; what
CogVideoXPipeline.fuse_lora adds to a weight (strength x alpha / r x B @ A with metadata, strength x
B @ A without); two adapters combined by set_adapters + fuse_lora (the weighted sum); and the oracle
run_pipeline_with_loras: the LoRA changes the frames, and the unmerged path (fuse=False) gives the
fused path's frames."""
import warnings

import pytest
import torch
from safetensors.torch import load_file

from engine_fixtures import write_pipeline, run_pipeline
from lora_fixtures import (TARGETS, lora_metadata, peft_scale, read_header_metadata, run_pipeline_with_loras,
                           write_peft_lora)

KIND, PROMPT, SEED, STEPS = "5b", "a red panda eating bamboo", 7, 2
INNER, LAYERS = 64, 2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """root and {name: (path, rank, alpha or None)}."""
    root = write_pipeline(str(tmp_path_factory.mktemp("pipe")), KIND, seed=3)
    out = {}
    for name, rank, alpha, seed, meta in [("meta", 4, 8, 0, True), ("nometa", 4, 8, 1, False),
                                          ("meta_r2", 2, 6, 2, True)]:
        path = write_peft_lora(root, str(tmp_path_factory.mktemp(name)), rank=rank, alpha=alpha, seed=seed,
                               metadata=meta)
        out[name] = (path, rank, alpha if meta else None)
    return root, out


def _ba(sd, module):
    return sd[f"transformer.{module}.lora_B.weight"] @ sd[f"transformer.{module}.lora_A.weight"]


def _modules():
    return [f"transformer_blocks.{i}.attn1.{t}" for i in range(LAYERS) for t in TARGETS]


def _pipe(root):
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(root)
    base = {m: pipe.transformer.get_submodule(m).weight.detach().clone() for m in _modules()}
    return pipe, base


def _fused(pipe, module):
    layer = pipe.transformer.get_submodule(module)
    return getattr(layer, "base_layer", layer).weight.detach()


@pytest.mark.parametrize("name", ["meta", "nometa", "meta_r2"])
def test_keys_shapes_and_metadata(files, name):
    _, out = files
    path, rank, alpha = out[name]
    sd = load_file(path)
    want = {f"transformer.{m}.lora_{ab}.weight" for m in _modules() for ab in "AB"}
    assert set(sd) == want
    for m in _modules():
        assert sd[f"transformer.{m}.lora_A.weight"].shape == (rank, INNER)
        assert sd[f"transformer.{m}.lora_B.weight"].shape == (INNER, rank)
        assert sd[f"transformer.{m}.lora_B.weight"].abs().min() > 0  # B non-zero: the LoRA does something
    header = read_header_metadata(path)
    meta = lora_metadata(path)
    if alpha is None:
        assert header == {"format": "pt"} and meta is None
    else:
        assert set(header) == {"format", "lora_adapter_metadata"}
        assert meta["transformer.r"] == rank and meta["transformer.lora_alpha"] == alpha
        assert sorted(meta["transformer.target_modules"]) == sorted(TARGETS)
        assert all(k.startswith("transformer.") for k in meta)


@pytest.mark.parametrize("name,strength,scale", [("meta", 0.5, 1.0), ("nometa", 0.5, 0.5), ("meta_r2", 0.5, 1.5),
                                                 ("meta", 1.0, 2.0)])
def test_fuse_adds_scale_times_BA(files, name, strength, scale):
    """CogVideoXPipeline.load_lora_weights + fuse_lora(lora_scale=strength): W += scale * B @ A with
    scale = alpha / r * strength (metadata) or strength (none: diffusers takes alpha = r)."""
    root, out = files
    path, _, _ = out[name]
    sd = load_file(path)
    pipe, base = _pipe(root)
    pipe.load_lora_weights(path.rsplit("/", 1)[0], weight_name=path.rsplit("/", 1)[1], adapter_name="x")
    pipe.fuse_lora(lora_scale=strength)
    for m in _modules():
        torch.testing.assert_close(_fused(pipe, m) - base[m], scale * _ba(sd, m), atol=1e-6, rtol=0)
    assert peft_scale(path, strength) == pytest.approx(scale, abs=1e-6)
    assert peft_scale(path, strength, pipeline_root=root) == pytest.approx(scale, abs=1e-6)


def test_two_adapters_fuse_to_the_weighted_sum(files):
    """set_adapters([a0, a1], adapter_weights=[s1, s2]) + fuse_lora(): W += s1 sc1 B1A1 + s2 sc2 B2A2."""
    root, out = files
    (p1, r1, al1), (p2, r2, al2) = out["meta"], out["meta_r2"]
    s1, s2 = 0.7, -0.4
    sd1, sd2 = load_file(p1), load_file(p2)
    pipe, base = _pipe(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Already found a `peft_config` attribute" (the 2nd adapter)
        for i, p in enumerate((p1, p2)):
            pipe.load_lora_weights(p.rsplit("/", 1)[0], weight_name=p.rsplit("/", 1)[1], adapter_name=f"a{i}")
    pipe.set_adapters(["a0", "a1"], adapter_weights=[s1, s2])
    pipe.fuse_lora()
    sc1, sc2 = al1 / r1, al2 / r2
    assert (sc1, sc2) == (2.0, 3.0)
    for m in _modules():
        want = s1 * sc1 * _ba(sd1, m) + s2 * sc2 * _ba(sd2, m)
        torch.testing.assert_close(_fused(pipe, m) - base[m], want, atol=1e-6, rtol=0)
    assert [peft_scale(p1, s1), peft_scale(p2, s2)] == pytest.approx([s1 * sc1, s2 * sc2], abs=1e-6)


@pytest.mark.parametrize("names", [["meta"], ["meta", "nometa"]])
def test_oracle_lora_changes_frames_and_unfused_agrees(files, names):
    root, out = files
    loras = [(out[n][0], s) for n, s in zip(names, (0.8, 0.5))]
    lat0, f0 = run_pipeline(root, KIND, PROMPT, STEPS, SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lat1, f1 = run_pipeline_with_loras(root, KIND, loras, PROMPT, STEPS, SEED)
        lat2, f2 = run_pipeline_with_loras(root, KIND, loras, PROMPT, STEPS, SEED, fuse=False)
    assert f1.shape == f0.shape and len(lat1) == len(lat2) == STEPS
    assert float(abs(f1 - f0).max()) > 1e-3
    assert float(abs(f1 - f2).max()) <= 1e-4
    for a, b in zip(lat1, lat2):
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
