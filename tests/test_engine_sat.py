"""The engine on the SAT release layout (CogVideo's YAML -> transformer/ mp files, t5-v1_1-xxl/,
vae/3d-vae.pt) against CogVideo's own sampler written out here from THUDM/CogVideo
sat/sgm/modules/diffusionmodules/{discretizer,sampling,guiders,denoiser,denoiser_scaling}.py and
sat/sample_video.py (ZeroSNRDDPMDiscretization on the selected steps, VPSDEDPMPP2MSampler,
DiscreteDenoiser + VideoScaling, DynamicCFG, all-zero unconditional text), with diffusers'
CogVideoXTransformer3DModel given the SAT weights (tests/cvx_fixtures.to_diffusers), transformers'
T5EncoderModel and diffusers' AutoencoderKLCogVideoX as the networks. 2B-style (sincos, shift 3) and
5B-style (RoPE, shift 1) DiTs, at TP 1 and 2, fp32 CPU.

Tolerances as tests/test_engine.py: latents |ours - ref| <= 1e-5 * max|ref| after every step, frames
<= 1e-4. Worst seen (printed with -s): latents 3.5e-6, frames 1.8e-5. Where CogVideo's sampler and
diffusers' pipelines differ (engine/sat_sampler.py says how), the difference is shown to exist.
"""
import math

import numpy as np
import pytest
import torch

import sat_dist
from cvx_fixtures import to_diffusers
from engine_fixtures import write_sat_release
from sat_dist.engine import sat_sampler
from sat_dist.testing.dist import run_ranks, values

PROMPT, SEED, STEPS, H, W = "a red panda eating bamboo", 5, 4, 32, 48
WORST: dict = {}


def _reference(kind: str, info: dict) -> tuple[list, np.ndarray]:
    """CogVideo's SAT sampling, written out (see module docstring)."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from transformers import AutoTokenizer, T5EncoderModel

    p = info["params"]
    dit = CogVideoXTransformer3DModel(
        num_attention_heads=6, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=24, num_layers=2, sample_width=12, sample_height=8, sample_frames=9, patch_size=2,
        max_text_seq_length=5, spatial_interpolation_scale=1.875, use_rotary_positional_embeddings=kind != "2b")
    dit.load_state_dict(to_diffusers(info["full"]), strict=False)
    dit.eval().norm_out.norm.eps = 1e-6  # SAT's FinalLayerMixin eps
    rope = None if kind == "2b" else get_3d_rotary_pos_embed(16, ((0, 0), (4, 6)), (4, 6), 3)
    tok, t5 = AutoTokenizer.from_pretrained(info["t5"]), T5EncoderModel.from_pretrained(info["t5"]).eval()
    with torch.no_grad():
        c = t5(tok([PROMPT], padding="max_length", max_length=5, truncation=True, return_tensors="pt").input_ids)[0]
    uc = torch.zeros_like(c)  # sample_video.py: force_uc_zero_embeddings=["txt"]
    # ZeroSNRDDPMDiscretization(shift_scale).get_sigmas(STEPS, return_idx=True) + prepare_sampling_loop
    shift = 3.0 if kind == "2b" else 1.0
    betas = (torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2).numpy()
    ac = np.cumprod(1.0 - betas, axis=0)
    ac = ac / (shift + (1 - shift) * ac)
    idx = np.linspace(999, 0, STEPS, endpoint=False).astype(int)[::-1]
    s = torch.tensor(ac[idx], dtype=torch.float32).sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s -= sT
    s *= s0 / (s0 - sT)
    alphas = torch.cat([torch.flip(s, (0,)), s.new_ones([1])])
    timesteps = torch.cat([torch.tensor(list(idx)).new_zeros([1]) - 1, torch.tensor(list(idx))])
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn((1, 3, 4, 8, 12), generator=g)
    old, out = None, []
    with torch.no_grad():
        for i in range(STEPS):
            a, nxt, prev = alphas[i], alphas[i + 1], alphas[i - 1] if i else None
            t = timesteps[-(i + 1)]
            net = dit(torch.cat([x] * 2), torch.cat([uc, c]), t.expand(2), image_rotary_emb=rope,
                      return_dict=False)[0]
            den = (net * -((1 - a ** 2) ** 0.5) + torch.cat([x] * 2) * a).float()  # VideoScaling
            x_u, x_c = den.chunk(2)
            step_index = STEPS - t  # VideoDDIMSampler.denoise; DynamicCFG(scale 6, exp 5, num_steps 50)
            scale = 1 + 6 * (1 - math.cos(math.pi * (step_index.item() / 50) ** 5)) / 2
            den = x_u + scale * (x_c - x_u)
            if STEPS - i == 1:
                x = den
            else:
                lamb = ((a ** 2 / (1 - a ** 2)) ** 0.5).log()
                h = ((nxt ** 2 / (1 - nxt ** 2)) ** 0.5).log() - lamb
                m1, m2 = ((1 - nxt ** 2) / (1 - a ** 2)) ** 0.5 * (-h).exp(), (-2 * h).expm1() * nxt
                mn = (1 - nxt ** 2) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
                x_std = m1 * x - m2 * den + mn * torch.randn(x.shape, generator=g)
                if old is None:
                    new = x_std
                else:
                    r = (lamb - ((prev ** 2 / (1 - prev ** 2)) ** 0.5).log()) / h
                    new = m1 * x - m2 * ((1 + 1 / (2 * r)) * den - 1 / (2 * r) * old) + mn * torch.randn(
                        x.shape, generator=g)
                x, old = new, den
            out.append(x.clone())
        video = info["vae"].decode(x.permute(0, 2, 1, 3, 4) / 0.7).sample
    frames = torch.clamp((video[0].permute(1, 2, 3, 0) + 1.0) / 2.0, 0.0, 1.0).numpy()
    return out, frames


def _sample(rank, path, tp):
    engine = sat_dist.load_engine(path, tp=tp)
    lat = []
    frames = engine.sample(PROMPT, num_steps=STEPS, seed=SEED, height=H, width=W,
                           on_step=lambda i, t, x: lat.append(x.clone()))
    return lat, frames, engine.report.layout, engine.parts.fps


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    return {kind: write_sat_release(str(tmp_path_factory.mktemp(f"sat_{kind}")), kind, seed=20 + i)
            for i, kind in enumerate(["2b", "5b"])}


@pytest.mark.parametrize("kind", ["2b", "5b"])
def test_sat_layout_matches_cogvideo_sampler(releases, kind):
    path, info = releases[kind]
    ref_lat, ref_frames = _reference(kind, info)
    for tp in (1, 2):
        for rank, (lat, frames, layout, fps) in enumerate(values(run_ranks(tp, _sample, path, tp))):
            assert layout == "sat" and fps == 8 and len(lat) == STEPS
            for ours, ref in zip(lat, ref_lat):
                err = (ours - ref).abs().max().item() / ref.abs().max().item()
                WORST["latents"] = max(WORST.get("latents", 0.0), err)
                assert err <= 1e-5, (kind, tp, rank, err)
            if rank == 0:
                assert frames.shape == ref_frames.shape == (9, H, W, 3)
                WORST["frames"] = max(WORST.get("frames", 0.0), float(abs(frames - ref_frames).max()))
                assert WORST["frames"] <= 1e-4
    print(f"\n[SAT layout vs CogVideo's sampler] {kind}: worst latents {WORST['latents']:.1e} (rel), "
          f"frames {WORST['frames']:.1e} over TP 1, 2")


def test_where_cogvideo_and_diffusers_schedules_differ():
    """(1) timesteps: equal at 50 steps, not at 3; (2) zero-SNR rescale endpoints: the selected steps'
    alphas differ from diffusers' (which rescales all 1000 first)."""
    from diffusers import CogVideoXDPMScheduler

    cfg = {"num_timesteps": 1000, "shift_scale": 1.0, "linear_start": 0.00085, "linear_end": 0.012}
    ref = CogVideoXDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                rescale_betas_zero_snr=True, timestep_spacing="trailing", snr_shift_scale=1.0)
    for n, same in ((50, True), (3, False)):
        ref.set_timesteps(n)
        alphas, ts = sat_sampler.schedule(cfg, n)
        assert (ts == ref.timesteps.tolist()) is same, (n, ts, ref.timesteps.tolist())
    alphas, ts = sat_sampler.schedule(cfg, 50)
    theirs = ref.alphas_cumprod[ts].sqrt().float()
    diff = (alphas[:-1] - theirs).abs().max().item()
    assert 1e-5 < diff < 1e-2, diff  # real but small; the smallest selected step keeps its own alpha
    assert alphas[0] == 0 and alphas[-1] == 1


def test_sat_vae_names_are_diffusers_convert_rules(releases):
    """The sat_vae reader maps every CogVideo VAE name onto diffusers' (and ignores loss.*)."""
    from sat_dist.formats import sat_vae

    path, info = releases["5b"]
    sd = torch.load(path.replace("cogvideox.yaml", "vae/3d-vae.pt"))["state_dict"]
    where = sat_vae.names(sd)
    assert set(where) == set(info["vae"].state_dict()) and "loss.logvar" not in where.values()
    assert where["decoder.up_blocks.0.resnets.0.conv1.conv.weight"] == "decoder.up.2.block.0.conv1.conv.weight"
