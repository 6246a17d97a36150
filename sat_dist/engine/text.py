"""Prompts -> T5 embeddings, as diffusers' CogVideoX pipelines do (huggingface/diffusers
src/diffusers/pipelines/cogvideo/pipeline_cogvideox.py `_get_t5_prompt_embeds`): pad to
`max_length` tokens (226 for every release: the DiT's text_length), truncate, add the EOS token, and
run the encoder on the ids alone — no attention mask, so the padding tokens are encoded and attended
to as the DiT was trained (CogVideo sat/sgm/modules/encoders/modules.py `FrozenT5Embedder` does the
same). Every rank tokenizes and runs its TP shard of the encoder; the result is the same everywhere.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def load_tokenizer(folder: str):
    """transformers' tokenizer of the release's `tokenizer/` (T5Tokenizer: spiece.model, or tokenizer.json)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # a missing sentencepiece/protobuf or a broken folder: say which folder
        raise ConfigError(f"cannot load the tokenizer in {folder}: {type(exc).__name__}: {exc}") from exc


def encode_prompt(tokenizer, encoder: nn.Module, prompt: str, max_length: int, device) -> torch.Tensor:
    """[1, max_length, d_model] T5 embeddings of one prompt, in the encoder's dtype."""
    ids = tokenizer([prompt], padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids.to(device))
