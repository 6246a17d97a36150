"""LoRA files for the tiny CogVideoX pipelines of tests/engine_fixtures.py, written by diffusers' and
PEFT's own code the way diffusers' LoRA finetune scripts write them, and the oracle that samples with
diffusers' own CogVideoXPipeline after loading and fusing them. Shares no code with sat_dist.

What diffusers 0.42 / PEFT 0.22 do (read from their sources, checked by tests/test_lora_fixtures.py):
- `CogVideoXPipeline.save_lora_weights(dir, transformer_lora_layers=get_peft_model_state_dict(model),
  weight_name=..., transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())` writes a
  safetensors file whose keys are `transformer.` + PEFT's names (`transformer.transformer_blocks.0.attn1.
  to_q.lora_A.weight`, ...; lora_A [r, in], lora_B [out, r]). The metadata goes into the safetensors
  header (`__metadata__`) as `{"format": "pt", "lora_adapter_metadata": json}`, the json being the
  LoraConfig's dict with every key prefixed `transformer.` (`"transformer.r": 4`, `"transformer.
  lora_alpha": 8`, ...). Without transformer_lora_adapter_metadata the header has only `format`.
- On load, with metadata the LoraConfig is rebuilt from it (scaling alpha / r); without it, r is read
  from lora_B's shape and alpha = r (no network alphas in a PEFT file), i.e. scaling 1.
- `fuse_lora(lora_scale=s)` multiplies each active adapter's scaling by s (PEFT `scale_layer`) and
  merges: W += s * alpha / r * B @ A. `set_adapters(names, adapter_weights=ws)` sets each adapter's
  scaling to w * alpha / r (PEFT `set_scale`) and activates them all; a following `fuse_lora()` merges
  every active adapter: W += sum_i w_i * alpha_i / r_i * B_i @ A_i.
"""
from __future__ import annotations

import json
import os
import re

import torch

from engine_fixtures import _quiet, run_pipeline

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def write_peft_lora(pipeline_root: str, out_dir: str, *, rank: int = 4, alpha: float = 8,
                    targets=TARGETS, seed: int = 0, metadata: bool = True, scale: float = 0.05,
                    weight_name: str = "pytorch_lora_weights.safetensors") -> str:
    """A LoRA for the transformer of the pipeline at `pipeline_root`, saved by
    CogVideoXPipeline.save_lora_weights into `out_dir/weight_name` (returned). Every lora_A / lora_B
    weight is randn(seed) * `scale`. `metadata`: pass transformer_lora_adapter_metadata (the adapter's
    LoraConfig, as diffusers' finetune scripts do through training_utils._collate_lora_metadata), so the
    file carries r and alpha; without it diffusers reads the file as alpha = r."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
    from diffusers.training_utils import _collate_lora_metadata
    from peft import LoraConfig, get_peft_model_state_dict

    _quiet()
    transformer = CogVideoXTransformer3DModel.from_pretrained(os.path.join(pipeline_root, "transformer"))
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                       init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(transformer.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    extra = _collate_lora_metadata({"transformer": transformer}) if metadata else {}
    CogVideoXPipeline.save_lora_weights(out_dir, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                        weight_name=weight_name, **extra)
    path = os.path.join(out_dir, weight_name)
    if not metadata:
        assert "lora_adapter_metadata" not in read_header_metadata(path), path
    return path


def read_header_metadata(path: str) -> dict:
    """The safetensors header's `__metadata__` (str -> str)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})


def lora_metadata(path: str) -> dict | None:
    """The decoded `lora_adapter_metadata` json of a diffusers LoRA file (keys `transformer.r`, ...), or None."""
    raw = read_header_metadata(path).get("lora_adapter_metadata")
    return None if raw is None else json.loads(raw)


def _load_into(transformer, path: str, adapter_name: str) -> None:
    """diffusers' own loading path of CogVideoXPipeline.load_lora_weights, on a bare transformer."""
    from diffusers import CogVideoXPipeline

    state_dict, metadata = CogVideoXPipeline.lora_state_dict(
        os.path.dirname(path), weight_name=os.path.basename(path), return_lora_metadata=True)
    CogVideoXPipeline.load_lora_into_transformer(state_dict, transformer=transformer, adapter_name=adapter_name,
                                                 metadata=metadata)


def _transformer_for(path: str, pipeline_root: str | None):
    """The pipeline's transformer, or (no root) a CogVideoXTransformer3DModel sized from the LoRA's
    attention shapes (heads 1, head dim = inner dim, as many layers as the file names)."""
    from diffusers import CogVideoXTransformer3DModel
    from safetensors import safe_open

    if pipeline_root is not None:
        return CogVideoXTransformer3DModel.from_pretrained(os.path.join(pipeline_root, "transformer"))
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        a_key = next(k for k in keys if ".attn1." in k and ".lora_A." in k)
        inner = f.get_slice(a_key).get_shape()[1]
    layers = 1 + max(int(m.group(1)) for k in keys if (m := re.search(r"transformer_blocks\.(\d+)\.", k)))
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(num_attention_heads=1, attention_head_dim=inner, num_layers=layers,
                                       text_embed_dim=16, time_embed_dim=16, in_channels=4, out_channels=4,
                                       sample_width=8, sample_height=8, sample_frames=9, patch_size=2)


def peft_scale(path: str, strength: float, pipeline_root: str | None = None,
               target: str = "transformer_blocks.0.attn1.to_q") -> float:
    """The factor diffusers multiplies B @ A by when it fuses the LoRA at `path` with
    fuse_lora(lora_scale=strength): measured, not computed — load the file into a transformer with
    diffusers' loader, fuse, and fit (fused - base) = c * B @ A on `target` (which must be in the file)."""
    from safetensors.torch import load_file

    _quiet()
    transformer = _transformer_for(path, pipeline_root).eval()
    module = transformer.get_submodule(target)
    base = module.weight.detach().clone()
    _load_into(transformer, path, "a0")
    transformer.fuse_lora(lora_scale=strength)
    fused = transformer.get_submodule(target).base_layer.weight.detach()
    sd = load_file(path)
    ba = sd[f"transformer.{target}.lora_B.weight"].double() @ sd[f"transformer.{target}.lora_A.weight"].double()
    delta = fused.double() - base.double()
    c = float((delta * ba).sum() / (ba * ba).sum())
    resid = float((delta - c * ba).abs().max())
    assert resid <= 1e-5 * max(1.0, float(delta.abs().max())), (path, c, resid)  # the delta is c * B @ A
    return c


def run_pipeline_with_loras(root: str, kind: str, loras, prompt: str, steps: int, seed: int,
                            guidance: float = 6.0, dynamic: bool = True, image=None, tiling: dict | None = None,
                            fuse: bool = True):
    """run_pipeline (same eps fix, VAE slicing + tiling, TEXT_LEN, SIZES) with `loras`, a list of
    (file path, strength), loaded by `pipe.load_lora_weights(dir, weight_name=file, adapter_name=f"a{i}")`.
    fuse: one LoRA -> `pipe.fuse_lora(lora_scale=strength)`; several -> `pipe.set_adapters(names,
    adapter_weights=strengths)` + `pipe.fuse_lora()`; then `unload_lora_weights()` (the fused weights
    stay, the PEFT layers go). fuse=False: `set_adapters(names, strengths)` and sample with the LoRA
    layers live (PEFT's unmerged forward)."""
    loras = list(loras)

    def prepare(pipe):
        names = []
        for i, (path, _) in enumerate(loras):
            pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), adapter_name=f"a{i}")
            names.append(f"a{i}")
        strengths = [float(s) for _, s in loras]
        if not names:
            return
        if fuse and len(names) == 1:
            pipe.fuse_lora(lora_scale=strengths[0])
        else:
            pipe.set_adapters(names, adapter_weights=strengths)
            if fuse:
                pipe.fuse_lora()
        if fuse:
            pipe.unload_lora_weights()

    return run_pipeline(root, kind, prompt, steps, seed, guidance=guidance, dynamic=dynamic, image=image,
                        tiling=tiling, prepare=prepare)
