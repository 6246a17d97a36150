"""Tiny diffusers CogVideoX pipeline folders for the engine tests, written by diffusers' and
transformers' own `save_pretrained` from random weights made here (no downloads): a
CogVideoXTransformer3DModel, a T5EncoderModel, an AutoencoderKLCogVideoX, a CogVideoX scheduler and a
T5 tokenizer whose sentencepiece model is trained here on a few sentences. The tokenizer folder is left
as the releases ship it (spiece.model + tokenizer_config.json). Shares no code with sat_dist."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import torch

TEXT_LEN = 8  # max_text_seq_length of the tiny DiTs (the releases: 226)
SENTENCES = ["a red panda eating bamboo by a river", "a cat playing piano in the snow",
             "the quick brown fox jumps over the lazy dog", "waves crash on a rocky beach at sunset"]
# kind -> (frames, height, width) the tests sample at: the 1.0 DiTs' configured size; 1.5 on its table
SIZES = {"2b": (9, 32, 48), "5b": (9, 32, 48), "5b_i2v": (9, 32, 48), "15": (9, 32, 48), "15_i2v": (9, 32, 48)}
# The releases' scheduler_config.json (THUDM/CogVideoX-2b: DDIM, snr_shift_scale 3; -5b and later: DPM, 1)
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
             "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
             "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "trailing"}


def dit_kwargs(kind: str) -> dict:
    v15, i2v = kind.startswith("15"), kind.endswith("i2v")
    return dict(num_attention_heads=4, attention_head_dim=16, in_channels=8 if i2v else 4, out_channels=4,
                time_embed_dim=32, ofs_embed_dim=32 if kind == "15_i2v" else None, text_embed_dim=24, num_layers=2,
                sample_width=12, sample_height=8, sample_frames=9, patch_size=2, patch_size_t=2 if v15 else None,
                patch_bias=not v15, max_text_seq_length=TEXT_LEN, use_rotary_positional_embeddings=kind != "2b",
                use_learned_positional_embeddings=kind == "5b_i2v")


VAE_KWARGS = dict(block_out_channels=(8, 8, 16), down_block_types=("CogVideoXDownBlock3D",) * 3,
                  up_block_types=("CogVideoXUpBlock3D",) * 3, latent_channels=4, layers_per_block=1,
                  norm_num_groups=4, sample_height=32, sample_width=48, scaling_factor=0.7)
T5_KWARGS = dict(vocab_size=64, d_model=24, d_kv=6, d_ff=48, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
                 is_encoder_decoder=False, use_cache=False)


def _quiet() -> None:
    """diffusers' and transformers' progress bars and warnings (truncated prompts, no accelerate) off."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _randomize(module: torch.nn.Module, g: torch.Generator, scale: float) -> torch.nn.Module:
    """Every weight random (norms near 1), so no path is zero-initialised away."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def write_tokenizer(folder: str) -> None:
    import sentencepiece as spm

    os.makedirs(folder, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 10), model_writer=model, vocab_size=40,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    for name in os.listdir(folder):  # a save_pretrained's tokenizer files (tokenizer.json): not released
        if name.startswith(("tokenizer", "special_tokens", "added_tokens", "spiece")):
            os.remove(os.path.join(folder, name))
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(model.getvalue())
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": TEXT_LEN}, f)


def write_pipeline(root: str, kind: str, seed: int = 0, scheduler: str | None = None) -> str:
    """A tiny `kind` pipeline folder ('2b', '5b', '5b_i2v', '15', '15_i2v') at `root`; the scheduler
    is the release's (DDIM for 2b, DPM otherwise) unless named."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler,
                           CogVideoXImageToVideoPipeline, CogVideoXPipeline, CogVideoXTransformer3DModel)
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    _quiet()
    g = torch.Generator().manual_seed(seed)
    os.makedirs(root, exist_ok=True)
    write_tokenizer(os.path.join(root, "tokenizer"))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(root, "tokenizer"))
    text_encoder = _randomize(T5EncoderModel(T5Config(**T5_KWARGS)), g, 0.3).eval()
    transformer = _randomize(CogVideoXTransformer3DModel(**dit_kwargs(kind)), g, 0.1).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(**VAE_KWARGS).eval()  # diffusers' own init: variance-preserving convs
    scheduler = scheduler or ("CogVideoXDDIMScheduler" if kind == "2b" else "CogVideoXDPMScheduler")
    cls = {"CogVideoXDDIMScheduler": CogVideoXDDIMScheduler, "CogVideoXDPMScheduler": CogVideoXDPMScheduler}[scheduler]
    sched = cls(**SCHEDULER, snr_shift_scale=3.0 if kind == "2b" else 1.0)
    pipe_cls = CogVideoXImageToVideoPipeline if kind.endswith("i2v") else CogVideoXPipeline
    pipe_cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
             scheduler=sched).save_pretrained(root)
    write_tokenizer(os.path.join(root, "tokenizer"))  # as released: spiece.model, no tokenizer.json
    return root


def random_image(seed: int = 3, size: tuple[int, int] = (40, 56)):
    """A random RGB PIL image (the pipeline resizes it to the sample size)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def run_pipeline(root: str, kind: str, prompt: str, steps: int, seed: int, guidance: float = 6.0,
                 dynamic: bool = True, image=None, tiling: dict | None = None, prepare=None):
    """diffusers' own pipeline on `root` (CPU, fp32): (latents after every step, [F, H, W, 3] frames).

    SAT's FinalLayerMixin LayerNorm eps is 1e-6 where diffusers' norm_out uses 1e-5 (see
    tests/test_cogvideox_forward.py): the reference takes SAT's value, as the engine runs SAT's DiT.
    The VAE decodes with tiling on, with the engine's tile sizes (`tiling`). `prepare(pipe)`, if
    given, runs on the loaded pipeline before sampling (tests/lora_fixtures.py loads LoRAs there)."""
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    _quiet()
    cls = CogVideoXImageToVideoPipeline if kind.endswith("i2v") else CogVideoXPipeline
    pipe = cls.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.norm_out.norm.eps = 1e-6
    pipe.vae.enable_slicing()
    pipe.vae.enable_tiling(**(tiling or {}))
    if prepare is not None:
        prepare(pipe)
    lat: list = []

    def keep(p, i, t, kw):
        lat.append(kw["latents"].clone())
        return {}

    frames_n, height, width = SIZES[kind]
    extra = {"image": image} if image is not None else {}
    out = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, use_dynamic_cfg=dynamic,
               generator=torch.Generator().manual_seed(seed), output_type="np", callback_on_step_end=keep,
               max_sequence_length=TEXT_LEN, num_frames=frames_n, height=height, width=width, **extra)
    return lat, out.frames[0]


# --- the SAT release layout (CogVideo's YAMLs, transformer/ mp files, t5-v1_1-xxl/, vae/3d-vae.pt) ----------

SAT_VAE = dict(ch=32, ch_mult=[1, 1, 2], z_channels=4, num_res_blocks=1)  # GroupNorm(32): SAT's fixed groups


def sat_vae_names(diffusers_sd: dict, up_blocks: int) -> dict:
    """diffusers AutoencoderKLCogVideoX names -> CogVideo's (sat/vae_modules/cp_enc_dec.py), the
    inverse of diffusers' scripts/convert_cogvideox_to_diffusers.py `convert_vae`, written here."""
    out = {}
    for name, t in diffusers_sd.items():
        n = name.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        n = n.replace("resnets.", "block.").replace("down_blocks.", "down.").replace("downsamplers.0", "downsample")
        n = n.replace("upsamplers.0", "upsample").replace("conv_shortcut", "nin_shortcut")
        if n.startswith("decoder.up_blocks."):
            parts = n.split(".")
            parts[1], parts[2] = "up", str(up_blocks - 1 - int(parts[2]))
            n = ".".join(parts)
        out[n] = t
    return out


def write_sat_release(base: str, kind: str, seed: int = 0) -> tuple[str, dict]:
    """A tiny SAT release of `kind` ('2b' / '5b' style) under `base` and CogVideo's YAML for it.
    Returns (yaml path, {"params", "full" (SAT DiT weights), "vae" (diffusers VAE), "t5" folder})."""
    import yaml
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5Config, T5EncoderModel

    from cvx_fixtures import random_weights, shape_table, tiny_params, write_shipped

    params = tiny_params(kind)
    full = random_weights(shape_table(params), seed=seed, scale=0.1)
    for name in ("mixins.pos_embed.pos_embedding", "mixins.pos_embed.freqs_sin", "mixins.pos_embed.freqs_cos",
                 "transformer.position_embeddings.weight"):  # as released: the DiT computes its tables
        full.pop(name, None)
    write_shipped(os.path.join(base, "transformer"), full)
    g = torch.Generator().manual_seed(seed)
    t5_dir = os.path.join(base, "t5-v1_1-xxl")
    _randomize(T5EncoderModel(T5Config(**T5_KWARGS)), g, 0.3).save_pretrained(t5_dir)
    write_tokenizer(t5_dir)
    torch.manual_seed(seed)
    blocks = [SAT_VAE["ch"] * m for m in SAT_VAE["ch_mult"]]
    vae = AutoencoderKLCogVideoX(block_out_channels=blocks, down_block_types=("CogVideoXDownBlock3D",) * len(blocks),
                                 up_block_types=("CogVideoXUpBlock3D",) * len(blocks), latent_channels=4,
                                 layers_per_block=1, scaling_factor=0.7).eval()
    os.makedirs(os.path.join(base, "vae"), exist_ok=True)
    sd = sat_vae_names(vae.state_dict(), len(blocks))
    sd["loss.logvar"] = torch.zeros(())  # the training loss's, ignored (ignore_keys: ['loss'])
    torch.save({"state_dict": sd}, os.path.join(base, "vae", "3d-vae.pt"))
    shift = 3.0 if kind == "2b" else 1.0
    disc = {"target": "sgm.modules.diffusionmodules.discretizer.ZeroSNRDDPMDiscretization",
            "params": {"shift_scale": shift}}
    vae_params = {"double_z": True, "resolution": 256, "in_channels": 3, "out_ch": 3, "attn_resolutions": [],
                  "dropout": 0.0, **SAT_VAE}
    doc = {"model": {
        "scale_factor": 0.7, "disable_first_stage_autocast": True, "log_keys": ["txt"],
        "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
                            "params": {"num_idx": 1000, "quantize_c_noise": False,
                                       "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling."
                                                                    "VideoScaling"},
                                       "discretization_config": disc}},
        "network_config": {"target": "dit_video_concat.DiffusionTransformer", "params": params},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
            {"is_trainable": False, "input_key": "txt", "ucg_rate": 0.1,
             "target": "sgm.modules.encoders.modules.FrozenT5Embedder",
             "params": {"model_dir": t5_dir, "max_length": 5}}]}},
        "first_stage_config": {"target": "vae_modules.autoencoder.VideoAutoencoderInferenceWrapper", "params": {
            "cp_size": 1, "ckpt_path": os.path.join(base, "vae", "3d-vae.pt"), "ignore_keys": ["loss"],
            "encoder_config": {"target": "vae_modules.cp_enc_dec.ContextParallelEncoder3D", "params": vae_params},
            "decoder_config": {"target": "vae_modules.cp_enc_dec.ContextParallelDecoder3D", "params": vae_params}}},
        "sampler_config": {"target": "sgm.modules.diffusionmodules.sampling.VPSDEDPMPP2MSampler", "params": {
            "num_steps": 50, "verbose": True, "discretization_config": disc,
            "guider_config": {"target": "sgm.modules.diffusionmodules.guiders.DynamicCFG",
                              "params": {"scale": 6, "exp": 5, "num_steps": 50}}}},
    }, "args": {"latent_channels": 4, "mode": "inference", "load": os.path.join(base, "transformer"),
                "sampling_num_frames": 3, "sampling_fps": 8, "force_inference": True}}
    path = os.path.join(base, "cogvideox.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return path, {"params": params, "full": full, "vae": vae, "t5": t5_dir}
