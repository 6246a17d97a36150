"""Three fixes for running on a GPU host, each checked on the CPU:

1. I2V image latents are encoded in the VAE's own dtype (a bf16 VAE used to get fp32 pixels:
   "Input type (float) and bias type (BFloat16) should be the same"), in the diffusers layout (fp32
   text encoder + bf16 VAE) and in the SAT layout (`dtype="bf16"`: everything bf16, latents fp32).
2. The SAT GPT attention decides its mask kind (full / causal / general) once per forward, not with
   two host syncs in every layer, with the same numerics as SAT's attention_fn_default.
3. `run_ranks` pins forked ranks to the CPU (CUDA_VISIBLE_DEVICES="") unless asked for GPUs.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import sat_dist
from engine_fixtures import random_image, write_pipeline, write_sat_release
from sat_dist.engine import video
from sat_dist.testing.dist import run_ranks, values

PROMPT, SEED, STEPS, FRAMES, H, W = "a red panda eating bamboo", 7, 2, 9, 32, 48  # latents: 3 frames, H/4 x W/4
# bf16 vs fp32: latents relative to the fp32 run's max |value|, frames (in [0, 1]) absolute. Worst seen (-s):
# image latents 7.6e-3, final latents 2.6e-2 (SAT: the whole DiT in bf16), frames max 0.15 / mean 7e-3 (the
# decode itself runs in bf16: a tiny random VAE, a few pixels off).
IMAGE_TOL, LATENT_TOL, FRAME_MAX, FRAME_MEAN = 3e-2, 1e-1, 0.3, 2e-2


# --- 1. I2V with a bf16 VAE ----------------------------------------------------------------------------

def _i2v(rank: int, path: str, dtype, image) -> dict:
    """One I2V sample on a world-1 engine: frames, final latents and the image latents handed to the
    DiT (captured around video.image_latents, which the engine calls by module attribute)."""
    seen = []
    orig = video.image_latents

    def keep(*args, **kwargs):
        out = orig(*args, **kwargs)
        seen.append(out.detach().clone())
        return out

    video.image_latents = keep
    engine = sat_dist.load_engine(path, dtype=dtype)
    frames, latents = engine.run(PROMPT, num_steps=STEPS, seed=SEED, num_frames=FRAMES, height=H, width=W,
                                 image=image)
    return {"frames": frames, "latents": latents.float(), "latents_dtype": latents.dtype,
            "image": seen[0].float(), "image_dtype": seen[0].dtype, "vae_dtype": engine.vae.dtype,
            "text_dtype": next(engine.text_encoder.parameters()).dtype}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a - ref).abs().max().item() / ref.abs().max().item()


def _check_sample(out: dict, ref: dict, image_dtype: torch.dtype) -> None:
    assert out["frames"].shape == (FRAMES, H, W, 3)
    assert out["frames"].min() >= 0.0 and out["frames"].max() <= 1.0
    assert out["latents"].shape == ref["latents"].shape == (1, 3, 4, H // 4, W // 4)
    assert torch.isfinite(out["latents"]).all() and torch.isfinite(out["image"]).all()
    assert out["image_dtype"] == out["latents_dtype"] == image_dtype  # the sampler's dtype, not the VAE's
    assert out["image"].shape == ref["image"].shape == (1, 3, 4, H // 4, W // 4)
    assert out["image"][:, 1:].abs().max() == 0  # zero latent frames after the first
    assert _rel(out["image"], ref["image"]) <= IMAGE_TOL
    assert _rel(out["latents"], ref["latents"]) <= LATENT_TOL
    err = abs(out["frames"] - ref["frames"])
    assert err.max() <= FRAME_MAX and err.mean() <= FRAME_MEAN


def test_i2v_bf16_vae_diffusers_layout(tmp_path):
    """A pipeline whose VAE is stored bf16 next to an fp32 T5 and DiT (dtype=None keeps each stored
    dtype): the sampler's dtype is the text encoder's (fp32), the VAE must still get bf16 pixels."""
    from diffusers import AutoencoderKLCogVideoX

    root = write_pipeline(str(tmp_path / "pipe"), "5b_i2v", seed=3)
    vae_dir = os.path.join(root, "vae")
    AutoencoderKLCogVideoX.from_pretrained(vae_dir, torch_dtype=torch.bfloat16).save_pretrained(vae_dir)
    image = random_image(seed=4)
    (ref,) = values(run_ranks(1, _i2v, root, "fp32", image))  # same (bf16-rounded) weights, fp32 compute
    (out,) = values(run_ranks(1, _i2v, root, None, image))
    assert ref["vae_dtype"] == torch.float32
    assert out["vae_dtype"] == torch.bfloat16 and out["text_dtype"] == torch.float32
    _check_sample(out, ref, torch.float32)
    (every,) = values(run_ranks(1, _i2v, root, "bf16", image))  # dtype="bf16": the text encoder too
    assert every["text_dtype"] == every["vae_dtype"] == torch.bfloat16
    _check_sample(every, ref, torch.bfloat16)
    print(f"\n[diffusers I2V, bf16 VAE] image latents {_rel(out['image'], ref['image']):.1e}, "
          f"latents {_rel(out['latents'], ref['latents']):.1e} (rel to fp32), "
          f"frames max {abs(out['frames'] - ref['frames']).max():.1e}, "
          f"mean {abs(out['frames'] - ref['frames']).mean():.1e}")


def _sat_i2v_release(base: str) -> str:
    """A tiny 5B-I2V SAT release: write_sat_release drops the learnable position table as the T2V
    releases do, but the I2V DiT ships it (learnable_pos_embed), so the weights are written again."""
    from cvx_fixtures import random_weights, shape_table, write_shipped

    path, info = write_sat_release(base, "5b_i2v", seed=5)
    full = random_weights(shape_table(info["params"]), seed=5, scale=0.1)
    for name in ("mixins.pos_embed.freqs_sin", "mixins.pos_embed.freqs_cos", "transformer.position_embeddings.weight"):
        full.pop(name, None)
    write_shipped(os.path.join(base, "transformer"), full)
    return path


def test_i2v_bf16_vae_sat_layout(tmp_path):
    """SAT layout at bf16 (every component bf16): the image latents are fp32 (the SAT sampler's dtype)."""
    path = _sat_i2v_release(str(tmp_path / "sat"))
    image = random_image(seed=6)
    (ref,) = values(run_ranks(1, _i2v, path, "fp32", image))
    (out,) = values(run_ranks(1, _i2v, path, "bf16", image))
    assert out["vae_dtype"] == torch.bfloat16 and ref["vae_dtype"] == torch.float32
    _check_sample(out, ref, torch.float32)
    print(f"\n[SAT I2V, bf16] image latents {_rel(out['image'], ref['image']):.1e}, "
          f"latents {_rel(out['latents'], ref['latents']):.1e} (rel to fp32), "
          f"frames max {abs(out['frames'] - ref['frames']).max():.1e}, "
          f"mean {abs(out['frames'] - ref['frames']).mean():.1e}")


# --- 2. SAT GPT: the mask kind once per forward ----------------------------------------------------------

def _old_attention(q, k, v, mask):
    """sat_dist's attention_fn before the fix (SAT's attention_fn_default), verbatim."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    full = bool((mask > 0).all())
    causal = mask.shape[-1] == mask.shape[-2] and bool(
        (mask == torch.ones_like(mask, dtype=torch.float).tril()).all())
    if full or causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=not full)
    scores = torch.matmul(q / math.sqrt(q.shape[-1]), k.transpose(-1, -2))
    scores = torch.mul(scores, mask) - 10000.0 * (1.0 - mask)
    return torch.matmul(F.softmax(scores, dim=-1), v)


L = 6


def _masks() -> dict:
    general = torch.ones(1, 1, L, L).tril()
    general[..., :2] = 1.0  # a prefix seen by every position: neither full nor causal
    padded = torch.ones(2, 1, 1, L)
    padded[1, ..., -2:] = 0.0  # a padding mask (broadcast over queries): not square
    return {"none": None, "full": torch.ones(1, 1, L, L), "causal": torch.ones(1, 1, L, L).tril(),
            "general": general, "padded": padded}


def _tiny_gpt(layers: int = 3, kv_heads: int = 0):
    from sat_dist.config import build_model_config
    from sat_dist.models import TPInfo
    from sat_dist.models.sat_gpt import SATModel

    cfg = build_model_config({"num_layers": layers, "hidden_size": 32, "num_attention_heads": 4,
                              "num_multi_query_heads": kv_heads, "vocab_size": 50, "max_sequence_length": 16})
    model = SATModel(cfg, TPInfo())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "layernorm.weight" in name else 0.0))
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (2, L), generator=g)
    return ids, torch.arange(L).expand(2, L)


@pytest.mark.parametrize("kv_heads", [0, 2])
def test_sat_gpt_mask_kind_once_per_forward(monkeypatch, kv_heads):
    from sat_dist.models.sat_gpt import model as gpt

    model = _tiny_gpt(3, kv_heads)
    ids, pos = _inputs()
    masks = _masks()
    with torch.no_grad():
        ours = {name: model(ids, pos, m) for name, m in masks.items()}

    # the previous formula, in every layer: equal, bit for bit
    monkeypatch.setattr(gpt, "attention_fn", lambda q, k, v, mask, *a, **kw: _old_attention(q, k, v, mask))
    with torch.no_grad():
        for name, m in masks.items():
            assert torch.equal(ours[name], model(ids, pos, m)), name
    monkeypatch.undo()

    # host reads of a tensor's value (bool(t), t.item(), t.tolist()): at most one per forward
    reads = [0]
    for attr in ("__bool__", "item", "tolist"):
        orig = getattr(torch.Tensor, attr)

        def counted(self, *a, _orig=orig, **kw):
            reads[0] += 1
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, attr, counted)
    with torch.no_grad():
        for name, m in masks.items():
            reads[0] = 0
            model(ids, pos, m)
            assert reads[0] <= 1, (name, reads[0])
    monkeypatch.undo()

    # the mask kind: decided once per forward (not per layer), as the masks say
    orig_kind = getattr(gpt, "mask_kind", None)
    assert orig_kind is not None, "sat_gpt.model has no mask_kind"
    kinds: list = []
    monkeypatch.setattr(gpt, "mask_kind", lambda mask: kinds.append(orig_kind(mask)) or kinds[-1])
    expected = {"none": "full", "full": "full", "causal": "causal", "general": "general", "padded": "general"}
    with torch.no_grad():
        for name, m in masks.items():
            kinds.clear()
            model(ids, pos, m)
            assert kinds == [expected[name]], (name, kinds)


def test_sat_gpt_attention_fn_kinds_equal_the_previous_formula():
    """attention_fn with the kind given, or deciding it itself, equals the previous formula."""
    from sat_dist.models.sat_gpt.model import attention_fn, mask_kind

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, L, 8, generator=g) for _ in range(3))
    for name, m in _masks().items():
        m = torch.ones(1, 1) if m is None else m
        ref = _old_attention(q, k, v, m)
        assert torch.equal(attention_fn(q, k, v, m, mask_kind(m)), ref), name
        assert torch.equal(attention_fn(q, k, v, m), ref), name
    half = torch.full((1, 1, L, L), 0.5)  # every entry > 0: SAT treats it as full (SDPA, mask ignored)
    assert mask_kind(half) == "full"
    assert torch.equal(attention_fn(q, k, v, half, "full"), _old_attention(q, k, v, half))


# --- 3. run_ranks pins the ranks to the CPU -------------------------------------------------------------

def _visible(rank: int) -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_run_ranks_pins_cpu_unless_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")  # inherited from the parent at fork
    assert values(run_ranks(2, _visible)) == ["", ""]
    assert values(run_ranks(2, _visible, gpu=True)) == ["5,6", "5,6"]
    assert values(run_ranks(2, _visible, env={1: {"CUDA_VISIBLE_DEVICES": "1"}})) == ["", "1"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert values(run_ranks(1, _visible)) == [""]
    assert values(run_ranks(1, _visible, gpu=True)) == [None]
