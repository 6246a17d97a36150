"""HF T5 folders (`save_pretrained` of transformers' T5EncoderModel / T5ForConditionalGeneration /
T5Model), read as the T5 encoder: the CogVideoX SAT release's `t5-v1_1-xxl/` and diffusers'
`text_encoder/`.

A folder whose `config.json` names a T5 architecture (or `model_type: "t5"`) and holds
`model.safetensors` or shards listed by `model.safetensors.index.json` (transformers' names,
huggingface/transformers src/transformers/utils/__init__.py SAFE_WEIGHTS_NAME / SAFE_WEIGHTS_INDEX_NAME);
a file or index inside such a folder is accepted too. The files are located and their headers
validated by the safetensors reader's code (`safetensors.locate`, `safetensors_header`); each stored
tensor is one full piece, so the planner reads only this rank's rows or column blocks.

Only `shared.*` and `encoder.*` are the encoder. `decoder.*`, `lm_head.*` (T5ForConditionalGeneration,
T5Model) and any other key are reported as ignored (`meta["ignored"]`, `describe`) and never read;
shards holding only them are never opened. `encoder.embed_tokens.weight` is HF's tie of
`shared.weight` (modeling_t5.py `_tied_weights_keys`); save_pretrained writes only `shared.weight`,
older saves may hold both (then `shared.weight` is read, the alias ignored) or only the alias (then
it is read as `shared.weight`): one tensor, read once.

The model config is `config.json` alone: `model_class` T5EncoderModel plus its fields, less those
that do not touch the encoder (`IRRELEVANT`). Everything else goes to the T5 schema
(models/t5/config.py), which refuses fields that would change the encoder's weights
(`is_decoder`, `pruned_heads`, `quantization_config`) and unknown ones, by name.
"""
from __future__ import annotations

import os
from typing import Optional

from ..errors import CheckpointError, ConfigError
from ..index import CheckpointIndex
from . import safetensors
from .base import IndexRequest, check_names, read_json_object, split_absent
from .safetensors_header import SafetensorsFile, read_header

NAME = "hf_t5"
CONFIG = "config.json"
MODEL_CLASS = "T5EncoderModel"  # what every T5 folder loads as
ARCHITECTURES = ("T5EncoderModel", "T5ForConditionalGeneration", "T5Model")
ENCODER = ("shared.", "encoder.")  # the encoder's keys; all others are ignored, never read
TIED = {"shared.weight": "encoder.embed_tokens.weight"}  # model name -> the alias a file may hold too

# config.json keys that change neither the encoder's weights nor its forward: T5's decoder,
# training and generation settings (tie_word_embeddings only scales the decoder's output and ties
# lm_head) and PretrainedConfig's bookkeeping, transformers v4 and v5. Keys starting with "_" too.
IRRELEVANT = frozenset({
    "num_decoder_layers", "dropout_rate", "classifier_dropout", "initializer_factor", "is_encoder_decoder",
    "use_cache", "tie_word_embeddings", "scale_decoder_outputs", "output_past", "n_positions",
    "task_specific_params", "gradient_checkpointing", "tie_encoder_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "pad_token_id", "eos_token_id", "bos_token_id", "sep_token_id",
    "decoder_start_token_id", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_bfloat16", "id2label", "label2id", "finetuning_task", "problem_type", "tokenizer_class", "prefix",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "chunk_size_feed_forward",
    "tf_legacy_loss", "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})


def _folder(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def read_config(folder: str) -> dict:
    """The folder's config.json, parsed; CheckpointError when absent or not a JSON object."""
    return read_json_object(os.path.join(folder, CONFIG), "the HF config")


def _is_t5(cfg: dict) -> bool:
    archs = cfg.get("architectures") or []
    return cfg.get("model_type") == "t5" or (isinstance(archs, list) and any(a in ARCHITECTURES for a in archs))


def recognise(path: str, tag: Optional[str] = None) -> bool:
    """A folder whose config.json is a T5 config, or a safetensors file / index inside one."""
    if not (os.path.isdir(path) or (os.path.isfile(path) and path.endswith(
            (safetensors.SUFFIX, safetensors.INDEX_SUFFIX)))):
        return False
    try:
        return _is_t5(read_config(_folder(path)))
    except CheckpointError:
        return False


def _config(path: str) -> dict:
    folder = _folder(path)
    cfg = read_config(folder)
    if not _is_t5(cfg):
        raise CheckpointError(f"{os.path.join(folder, CONFIG)} names no T5 architecture {list(ARCHITECTURES)} "
                              f"and no model_type 't5'")
    return cfg


def model_config(path: str) -> dict:
    """`{"model_class": "T5EncoderModel", ...}` from config.json, less the IRRELEVANT keys."""
    cfg = _config(path)
    return {"model_class": MODEL_CLASS,
            **{k: v for k, v in cfg.items() if k not in IRRELEVANT and not k.startswith("_")}}


def _source(path: str) -> safetensors.Source:
    """safetensors.locate, with the hint for folders that hold only pickled weights."""
    try:
        return safetensors.locate(path)
    except CheckpointError as exc:
        folder = _folder(path)
        if any(n.endswith(".bin") for n in os.listdir(folder)):
            raise CheckpointError(f"{exc}; its pickled *.bin weights are not read: re-save the model with "
                                  f"save_pretrained(..., safe_serialization=True)") from exc
        raise


def _weights(path: str) -> tuple[safetensors.Source, dict[str, str], list[str], dict[str, SafetensorsFile]]:
    """(source, tensor name -> file, all files, headers read so far): a sharded folder's map comes
    from the index alone, a single file's from its header."""
    src = _source(path)
    where, files = safetensors.shard_map(src)
    headers: dict[str, SafetensorsFile] = {}
    if src.file:
        headers[src.file] = read_header(src.file)
        where = dict.fromkeys(headers[src.file].tensors, src.file)
    return src, where, files, headers


def _split_keys(where, specs) -> tuple[dict[str, str], list[str]]:
    """(model name -> stored key for each name the files hold, keys ignored: not the encoder, or a
    tied alias that is not read)."""
    stored = {}
    for name in specs:
        alias = TIED.get(name)
        if name in where:
            stored[name] = name
        elif alias in where:
            stored[name] = alias
    used = set(stored.values())
    ignored = [k for k in where if k not in used and (not k.startswith(ENCODER) or k in TIED.values())]
    return stored, sorted(ignored)


def index(req: IndexRequest) -> tuple[CheckpointIndex, list[str]]:
    """This rank's pieces: the encoder's full stored tensors, from the shards holding them."""
    if req.weights == "fp32":
        raise ConfigError(f"--weights fp32 selects DeepSpeed ZeRO fp32 master partitions, but {req.path} is a "
                          f"HF T5 folder holding only the weights; drop --weights")
    safetensors.refuse_tag(req.path, req.tag)
    _config(req.path)
    src, where, files, headers = _weights(req.path)
    named_in = src.index_json or src.file
    stored, ignored = _split_keys(where, req.specs)
    absent, missing = split_absent(req.specs, [n for n in req.specs if n not in stored])
    used = set(stored.values())
    check_names(named_in, missing, [k for k in where if k not in used and k not in ignored])
    needed = [f for f in files if f in {where[k] for k in used}]
    idx = CheckpointIndex(root=req.path, format=NAME, meta={
        "tag": None, "mp_size": 1, "absent": absent, "files": len(needed), "files_total": len(files),
        "ignored": ignored})
    for name, spec in req.specs.items():
        if name not in absent:
            idx.add(safetensors.full_piece(name, stored[name], spec, where, headers, src.index_json))
    return idx, needed


def describe(path: str, tag: Optional[str] = None) -> dict:
    """The safetensors description of the weights, plus the T5 architecture, the encoder it loads
    as and what is ignored; headers and config.json only."""
    cfg = _config(path)
    src, where, _, _ = _weights(path)
    info = safetensors.describe(src.index_json or src.file, tag)
    encoder = sorted(k for k in where if k.startswith(ENCODER) and k not in TIED.values())
    ignored = sorted(set(where) - set(encoder))
    archs = ", ".join(cfg.get("architectures") or []) or f"model_type {cfg.get('model_type')}"
    info["summary"][0] = info["summary"][0].replace("format: safetensors", f"format: HF T5 ({archs}), safetensors")
    info["summary"].insert(1, f"loads as {MODEL_CLASS}: {cfg.get('num_layers')} layers, d_model {cfg.get('d_model')}, "
                              f"{cfg.get('num_heads')} heads x d_kv {cfg.get('d_kv')}, d_ff {cfg.get('d_ff')} "
                              f"({cfg.get('feed_forward_proj', 'relu')}), vocab {cfg.get('vocab_size')}")
    info["summary"].insert(2, f"encoder tensors: {len(encoder)}; ignored, never read: {len(ignored)} "
                              f"(decoder.*, lm_head.*, the tied encoder.embed_tokens.weight, other heads)")
    info.update({"format": NAME, "root": path, "architectures": cfg.get("architectures"), "model_class": MODEL_CLASS,
                 "encoder_tensors": len(encoder), "ignored": ignored})
    return info
