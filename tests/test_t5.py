"""HF T5 encoder folders, written by transformers' own `save_pretrained`, loaded tensor-parallel into
sat_dist's T5 encoder with no YAML (the config comes from config.json) at TP 1 and 2 on forked gloo
ranks: a gated-gelu (T5 v1.1, like CogVideoX's t5-v1_1-xxl) and a relu T5EncoderModel, the gated one
also sharded, and a T5ForConditionalGeneration folder (single file and sharded) whose decoder is
never read.

Forward tolerance: |ours - transformers| <= 1e-5 * max|transformers| in fp32, with and without a
padding mask, against transformers' default (SDPA) path, which itself agrees with its eager path
within that tolerance. Worst seen: 0 at TP 1 (bitwise equal), 5.4e-7 at TP 2 (the all-reduce's
summation order); printed with -s. A wrong split or a scaled attention would be O(1). In bf16 TP 1
is bitwise equal too (test_bf16_matches_transformers).
bytes_read <= 1.05 * bytes_needed on every rank (it is exactly equal), and bytes_needed is at most
the encoder's bytes: the decoder's bytes are never read, its shards never opened.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel, T5ForConditionalGeneration

import sat_dist
from sat_dist import formats
from sat_dist.config import resolve
from sat_dist.errors import CheckpointError, ConfigError
from sat_dist.formats import hf_t5
from sat_dist.formats.base import IndexRequest
from sat_dist.formats.safetensors_header import read_header, read_weight_map
from sat_dist.models import TPInfo, build_meta_model, collect_specs
from sat_dist.testing.dist import run_ranks, values

REL_TOL = 1e-5
WORST: dict = {}
TIE = "encoder.embed_tokens.weight"  # HF's alias of shared.weight
COL = ("SelfAttention.q.", "SelfAttention.k.", "SelfAttention.v.", "DenseReluDense.wi")  # split on dim 0
ROW = ("SelfAttention.o.", "DenseReluDense.wo.")  # split on dim 1


def _hf_config(act: str) -> HFT5Config:
    # 8 buckets, max distance 12, 14 tokens: both the exact and the logarithmic buckets are used
    return HFT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=12, feed_forward_proj=act)


def _inputs():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (2, 14), generator=g)
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, 10:] = 0  # right padding in the second prompt
    return ids, mask


def _write_alias(src_folder: str, dst: str, keep_shared: bool) -> None:
    """An older-style save: `encoder.embed_tokens.weight` stored too, or instead of `shared.weight`."""
    os.makedirs(dst)
    shutil.copy(os.path.join(src_folder, "config.json"), dst)
    sd = load_file(os.path.join(src_folder, "model.safetensors"))
    sd[TIE] = sd["shared.weight"].clone()
    if not keep_shared:
        del sd["shared.weight"]
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    out = {}
    for i, (case, cls, act, shard) in enumerate([
            ("gated", T5EncoderModel, "gated-gelu", None), ("gated_sharded", T5EncoderModel, "gated-gelu", "6KB"),
            ("relu", T5EncoderModel, "relu", None), ("seq2seq", T5ForConditionalGeneration, "gated-gelu", None),
            ("seq2seq_sharded", T5ForConditionalGeneration, "gated-gelu", "6KB")]):
        torch.manual_seed(100 + i)
        model = cls(_hf_config(act)).eval()
        folder = str(root / case)
        model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
        out[case] = folder
    _write_alias(out["gated"], str(root / "alias_only"), keep_shared=False)
    _write_alias(out["gated"], str(root / "alias_both"), keep_shared=True)
    out["alias_only"], out["alias_both"] = str(root / "alias_only"), str(root / "alias_both")
    return out


def _load_run(rank, path, tp, ids, mask):
    model, rep = sat_dist.load_model(path, tp=tp, return_report=True)
    with torch.no_grad():
        outs = (model(ids), model(ids, mask))
    r = rep.ranks[rank]
    return outs, {k: v.clone() for k, v in model.state_dict().items()}, r.bytes_read, r.bytes_needed


def _hf_split(name: str, t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    if any(s in name for s in COL):
        return t.chunk(tp, 0)[rank]
    if any(s in name for s in ROW):
        return t.chunk(tp, 1)[rank]
    return t


def _encoder_bytes(folder: str) -> int:
    """Bytes of the encoder's tensors in the files, the embedding counted once."""
    files = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors")]
    enc = {k: t for f in files for k, t in read_header(f).tensors.items() if k.startswith(("shared.", "encoder."))}
    if "shared.weight" in enc:
        enc.pop(TIE, None)
    return sum(t.extent_bytes() for t in enc.values())


@pytest.mark.parametrize("case", ["gated", "gated_sharded", "relu", "seq2seq", "seq2seq_sharded", "alias_only",
                                  "alias_both"])
def test_forward_and_shards_match_transformers_at_tp_1_2(folders, case):
    folder = folders[case]
    assert formats.reader_for(folder).NAME == "hf_t5"
    if case.endswith("sharded"):
        assert len([n for n in os.listdir(folder) if n.endswith(".safetensors")]) > 4
    # transformers' own load of the folder (an alias-only file: of the folder it was made from)
    ref_model = T5EncoderModel.from_pretrained(folders["gated"] if case.startswith("alias") else folder).eval()
    hf_sd = ref_model.state_dict()
    ids, mask = _inputs()
    with torch.no_grad():
        refs = (ref_model(input_ids=ids).last_hidden_state,
                ref_model(input_ids=ids, attention_mask=mask).last_hidden_state)
    eager = T5EncoderModel.from_pretrained(folder if not case.startswith("alias") else folders["gated"],
                                           attn_implementation="eager").eval()
    with torch.no_grad():  # transformers' eager path (v4's only one) agrees with its SDPA path
        for ref, out in zip(refs, (eager(input_ids=ids).last_hidden_state,
                                   eager(input_ids=ids, attention_mask=mask).last_hidden_state)):
            assert (out - ref).abs().max().item() <= REL_TOL * ref.abs().max().item()
    encoder_bytes = _encoder_bytes(folder)
    for tp in (1, 2):
        for rank, (outs, sd, read, needed) in enumerate(values(run_ranks(tp, _load_run, folder, tp, ids, mask))):
            for out, ref in zip(outs, refs):
                err = (out - ref).abs().max().item() / ref.abs().max().item()
                WORST[case] = max(WORST.get(case, 0.0), err)
                assert out.shape == ref.shape and err <= REL_TOL, (case, tp, rank, err)
            assert read <= 1.05 * needed, (case, tp, rank, read, needed)
            assert needed <= encoder_bytes, (case, tp, rank, needed, encoder_bytes)
            assert set(sd) == set(hf_sd) - {TIE}
            for name, value in sd.items():
                assert torch.equal(value, _hf_split(name, hf_sd[name], tp, rank)), (case, tp, rank, name)
    print(f"\n[t5 load] {case}: worst |ours - transformers| / max|ref| = {WORST[case]:.2e} over TP 1, 2")


def _load_bf16(rank, path, tp, ids, mask):
    model = sat_dist.load_model(path, tp=tp, dtype="bf16")
    with torch.no_grad():
        return model(ids, mask)


def test_bf16_matches_transformers(folders):
    """bf16 (CogVideoX's text-encoder dtype): TP 1 equals transformers' bf16 forward (same ops, same
    order: 0 on CPU); TP 2 differs by bf16 rounding of the all-reduced partial sums (~1e-2 relative,
    as much as transformers' own eager and SDPA paths differ from each other)."""
    ids, mask = _inputs()
    ref_model = T5EncoderModel.from_pretrained(folders["gated"], dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    for tp, tol in ((1, 1e-6), (2, 3e-2)):
        for out in values(run_ranks(tp, _load_bf16, folders["gated"], tp, ids, mask)):
            assert out.dtype == torch.bfloat16
            assert (out.float() - ref).abs().max().item() <= tol * ref.abs().max().item(), tp


def test_seq2seq_decoder_is_ignored_and_its_shards_never_opened(folders):
    folder = folders["seq2seq_sharded"]
    where = read_weight_map(os.path.join(folder, "model.safetensors.index.json"))
    decoder = sorted(k for k in where if not k.startswith(("shared.", "encoder.")))
    assert decoder and all(k.startswith("decoder.") for k in decoder)
    encoder_files = {where[k] for k in where if k not in decoder}
    decoder_only = set(where.values()) - encoder_files
    assert decoder_only  # the test means something: some shards hold only decoder tensors
    cfg = resolve(folder).model
    for rank in range(2):
        specs = collect_specs(build_meta_model(cfg, TPInfo(2, rank)))
        idx, needed = formats.open_index(IndexRequest(folder, specs, 2, rank))
        assert idx.meta["ignored"] == decoder and set(needed) == encoder_files
        assert set(idx.pieces) == set(specs)
    info = formats.describe(folder)
    assert info["format"] == "hf_t5" and info["ignored"] == decoder and info["encoder_tensors"] == len(specs)
    assert "T5ForConditionalGeneration" in info["summary"][0] and "ignored, never read: " in info["summary"][2]
    assert formats.render(info)


def test_tp_not_dividing_heads_refused_before_any_read(folders, tmp_path):
    bad = tmp_path / "t5"
    shutil.copytree(folders["gated"], bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")  # any read would fail differently
    results = run_ranks(3, _load_run, str(bad), 3, *_inputs())
    assert {r.error_type for r in results} == {"GroupLoadError"} and len({r.error for r in results}) == 1
    msg = results[0].error
    assert "during 'plan'" in msg and "TP=3 does not divide num_heads=4" in msg and "[1, 2, 4]" in msg
    assert "damaged" not in msg and "header" not in msg


# config.json of a T5 v1.1 XXL encoder as transformers 4.x saved it (the fields of google/t5-v1_1-xxl's,
# which CogVideoX's text_encoder/ and SAT's t5-v1_1-xxl/ carry)
XXL = {"_name_or_path": "google/t5-v1_1-xxl", "architectures": ["T5EncoderModel"], "classifier_dropout": 0.0,
       "d_ff": 10240, "d_kv": 64, "d_model": 4096, "decoder_start_token_id": 0, "dense_act_fn": "gelu_new",
       "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
       "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
       "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24, "output_past": True, "pad_token_id": 0,
       "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
       "torch_dtype": "bfloat16", "transformers_version": "4.41.0.dev0", "use_cache": True, "vocab_size": 32128}


def _config_folder(tmp_path, cfg: dict) -> str:
    folder = tmp_path / "cfg"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_config_json_fields(tmp_path):
    cfg = resolve(_config_folder(tmp_path, XXL)).model
    assert (cfg.model_class, cfg.act, cfg.gated, cfg.d_model, cfg.num_heads, cfg.d_ff) == \
        ("T5EncoderModel", "gelu_new", True, 4096, 64, 10240)
    cfg.check_tp(8)
    with pytest.raises(ConfigError, match=r"TP=3 does not divide num_heads=64, d_ff=10240.*\[1, 2, 4, 8, 16, 32, 64\]"):
        cfg.check_tp(3)
    # T5-XXL encoder at TP 4 on the meta device: q/k/v/wi_* rows and o/wo columns split 4 ways
    model = build_meta_model(cfg, TPInfo(4, 1))
    local = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert local["encoder.block.3.layer.0.SelfAttention.q.weight"] == (1024, 4096)
    assert local["encoder.block.3.layer.0.SelfAttention.o.weight"] == (4096, 1024)
    assert local["encoder.block.3.layer.1.DenseReluDense.wi_1.weight"] == (2560, 4096)
    assert local["encoder.block.3.layer.1.DenseReluDense.wo.weight"] == (4096, 2560)
    assert local["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == (32, 64)
    assert local["shared.weight"] == (32128, 4096) and len(local) == 1 + 24 * 9 + 1 + 1
    full = sum(torch.Size(s.global_shape).numel() for s in collect_specs(model).values())
    mine = sum(torch.Size(s).numel() for s in local.values())
    print(f"\n[t5-xxl encoder] {full / 1e9:.2f} B params; TP=4 rank: {mine / 1e9:.2f} B "
          f"({mine * 2 / 2**30:.2f} GiB bf16; replicated embedding {32128 * 4096 * 2 / 2**30:.2f} GiB)")

    # saved dense_act_fn / is_gated_act win over feed_forward_proj, as in transformers
    odd = {**XXL, "dense_act_fn": "relu", "is_gated_act": False}
    cfg = resolve(_config_folder(tmp_path, odd)).model
    hf = HFT5Config.from_dict(odd)
    assert (cfg.act, cfg.gated) == (hf.dense_act_fn, hf.is_gated_act) == ("relu", False)
    for extra, match in ((({"is_decoder": True}), "is_decoder=True is not supported"),
                         (({"pruned_heads": {"0": [1]}}), "pruned_heads=.* is not supported"),
                         (({"quantization_config": {"quant_method": "bitsandbytes"}}), "quantization_config="),
                         (({"n_layer_typo": 3}), "unknown model option 'n_layer_typo'"),
                         (({"feed_forward_proj": "gated-quick_gelu", "dense_act_fn": None}), "quick_gelu"),
                         (({"feed_forward_proj": "geglu-x-y"}), "is not 'ACT' or 'gated-ACT'")):
        with pytest.raises(ConfigError, match=match):
            resolve(_config_folder(tmp_path, {**XXL, **extra}))


def test_files_recognised_and_errors(folders, tmp_path):
    assert formats.reader_for(os.path.join(folders["gated"], "model.safetensors")).NAME == "hf_t5"
    index = os.path.join(folders["gated_sharded"], "model.safetensors.index.json")
    assert formats.reader_for(index).NAME == "hf_t5"
    assert formats.model_config(index) == formats.model_config(folders["gated_sharded"])
    assert not hf_t5.recognise(str(tmp_path), None)

    only_bin = tmp_path / "bin"
    only_bin.mkdir()
    shutil.copy(os.path.join(folders["gated"], "config.json"), only_bin)
    (only_bin / "pytorch_model.bin").write_bytes(b"")
    specs = collect_specs(build_meta_model(resolve(str(only_bin)).model, TPInfo()))
    with pytest.raises(CheckpointError, match=r"pickled \*\.bin weights are not read.*safe_serialization=True"):
        formats.open_index(IndexRequest(str(only_bin), specs, 1, 0))

    extra = tmp_path / "extra"
    _write_alias(folders["gated"], str(extra), keep_shared=True)
    sd = load_file(str(extra / "model.safetensors"))
    sd["encoder.block.7.layer.0.layer_norm.weight"] = torch.ones(32)
    del sd["encoder.final_layer_norm.weight"]
    save_file(sd, str(extra / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['encoder.final_layer_norm.weight'\].*"
                                              r"unexpected tensors \['encoder.block.7.layer.0.layer_norm.weight'\]"):
        formats.open_index(IndexRequest(str(extra), specs, 1, 0))
