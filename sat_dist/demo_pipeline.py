"""The demo's tiny CogVideoX pipeline folder, as the releases lay it out, written by diffusers' and
transformers' own `save_pretrained` from random weights (nothing is downloaded): a 5B-style DiT
(RoPE, 4 heads so TP 2 and 4 divide them), a T5 encoder, a CogVideoX VAE, the release's DPM
scheduler and a T5 tokenizer whose sentencepiece model is trained here on a few sentences. The
video it makes is noise-like (random weights); it shows the path, not a model."""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import torch

PROMPT = "a red panda eating bamboo by a river"
_WORDS = [PROMPT, "a cat playing piano in the snow", "waves crash on a rocky beach at sunset",
          "the quick brown fox jumps over the lazy dog"]
TEXT_TOKENS = 8


def _tokenizer(folder: str) -> None:
    """spiece.model + tokenizer_config.json, the files the releases ship for their T5 tokenizer."""
    import sentencepiece as spm

    os.makedirs(folder, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_WORDS * 10), model_writer=buf, vocab_size=40,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    for name in os.listdir(folder):
        if name.startswith(("tokenizer", "special_tokens", "added_tokens", "spiece")):
            os.remove(os.path.join(folder, name))
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(buf.getvalue())
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": TEXT_TOKENS}, f)


@dataclass(frozen=True)
class TinySpec:
    """The sizes of a tiny pipeline; the defaults are the demo's (4 heads so TP 2 and 4 divide them)."""

    heads: int = 4
    head_dim: int = 16
    layers: int = 2
    time_embed_dim: int = 32
    frames: int = 9
    dit_hw: tuple[int, int] = (8, 12)  # the DiT's sample_height / sample_width
    vae_hw: tuple[int, int] = (32, 48)  # the VAE's sample_height / sample_width (pixels)
    rope: bool = True  # 5B-style RoPE; False: 2B-style sincos positions
    dit_scale: float = 0.1  # the DiT's random weights' scale
    ddim: bool = False  # False: 5B's DPM scheduler; True: 2B's DDIM (snr_shift_scale 3)


def write_demo_pipeline(root: str, seed: int = 0, spec: TinySpec = TinySpec()) -> str:
    """Write the pipeline folder at `root` (model_index.json and the five component folders)."""
    import diffusers
    import transformers
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    gen = torch.Generator().manual_seed(seed)
    os.makedirs(root, exist_ok=True)
    _tokenizer(os.path.join(root, "tokenizer"))
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False))
    dit = CogVideoXTransformer3DModel(num_attention_heads=spec.heads, attention_head_dim=spec.head_dim,
                                      in_channels=4, out_channels=4, time_embed_dim=spec.time_embed_dim,
                                      text_embed_dim=32, num_layers=spec.layers, sample_width=spec.dit_hw[1],
                                      sample_height=spec.dit_hw[0], sample_frames=spec.frames, patch_size=2,
                                      max_text_seq_length=TEXT_TOKENS, use_rotary_positional_embeddings=spec.rope)
    with torch.no_grad():  # random weights everywhere (norms near 1), so no path is zero-initialised away
        for model, scale in ((t5, 0.3), (dit, spec.dit_scale)):
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else noise * scale)
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 16), down_block_types=("CogVideoXDownBlock3D",) * 3,
                                 up_block_types=("CogVideoXUpBlock3D",) * 3, latent_channels=4, layers_per_block=1,
                                 norm_num_groups=4, sample_height=spec.vae_hw[0], sample_width=spec.vae_hw[1],
                                 scaling_factor=0.7)
    # THUDM/CogVideoX-5b (and -2b) scheduler/scheduler_config.json
    sched_kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                    set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing")
    sched = (CogVideoXDDIMScheduler(**sched_kw, snr_shift_scale=3.0) if spec.ddim
             else CogVideoXDPMScheduler(**sched_kw, snr_shift_scale=1.0))
    tok = AutoTokenizer.from_pretrained(os.path.join(root, "tokenizer"))
    CogVideoXPipeline(tokenizer=tok, text_encoder=t5.eval(), vae=vae.eval(), transformer=dit.eval(),
                      scheduler=sched).save_pretrained(root)
    _tokenizer(os.path.join(root, "tokenizer"))  # as released: spiece.model, no tokenizer.json
    return root
