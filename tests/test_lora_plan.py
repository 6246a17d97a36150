"""LoRA planning and file checks, without a process group.

* The TP rule, from the base tensor's Layout: a column-parallel base (SAT's fused QKV, split per block) reads
  the rank's rows of B and all of A, a row-parallel one (`attention.dense`) the rank's columns of A and all of
  B; assembled from the rank's slices with `merge_boxes`, ΔW equals the rank's slice of the full scale·B·A
  exactly, for every TP size and rank, for to_q / to_k / to_v pairs and whole-tensor pairs.
* A PEFT file that does not fit the model is refused from its header, naming the file and the tensor: a
  target the model lacks, another layer count, other shapes, a lone lora_A, DoRA / text-encoder keys.
* Scale semantics (README "LoRA"): PEFT alpha / r from `lora_adapter_metadata` (with rank_pattern /
  alpha_pattern), no metadata -> 1 (diffusers' alpha = r); SAT lora_alpha / r, where an unknown lora_alpha
  is refused rather than guessed.
* `--prompts` lines with their own adapters, and the groups the engine switches between.
"""
import json

import pytest
import torch
from safetensors.torch import save_file

from sat_dist.engine import adapters
from sat_dist.errors import ConfigError, LoraError
from sat_dist.lora import files
from sat_dist.lora.plan import layouts, merge_boxes, plan_loras
from sat_dist.placement import Box, Fragment, Layout, TensorSpec

H, IN, R = 8, 6, 2
QKV = "transformer.layers.0.attention.query_key_value.weight"
DENSE = "transformer.layers.0.attention.dense.weight"
SPECS = {QKV: TensorSpec((3 * H, IN), Layout(0, (1, 1, 1))), DENSE: TensorSpec((IN, H), Layout(1)),
         "transformer.layers.0.attention.query_key_value.bias": TensorSpec((3 * H,), Layout(0, (1, 1, 1)))}


def _pair(target, base, rows, a_shape, b_shape, scale=0.5):
    return files.Pair(target, base, target + ".A", target + ".B", a_shape, b_shape, scale, rows)


def _rows(lo, n, cols):
    return (Fragment(Box((lo, 0), (n, cols)), (0, 0)),)


def test_layouts_follow_the_base_split():
    to_k = _pair("to_k", QKV, _rows(H, H, IN), (R, IN), (H, R))
    assert layouts(to_k, SPECS[QKV], "f") == (Layout(), Layout(0, (H,)))
    dense = _pair("to_out", DENSE, _rows(0, IN, H), (R, H), (IN, R))
    assert layouts(dense, SPECS[DENSE], "f") == (Layout(1, (1,)), Layout())
    whole = _pair("qkv", QKV, _rows(0, 3 * H, IN), (R, IN), (3 * H, R))
    assert layouts(whole, SPECS[QKV], "f") == (Layout(), Layout(0, (H, H, H)))
    cut = _pair("half", QKV, _rows(H // 2, H, IN), (R, IN), (H, R))
    with pytest.raises(LoraError, match="cut one of its tensor-parallel blocks"):
        layouts(cut, SPECS[QKV], "f")


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_rank_slices_of_b_and_a_give_the_rank_slice_of_delta(tp):
    g = torch.Generator().manual_seed(0)
    pairs = [_pair(f"to_{c}", QKV, _rows(i * H, H, IN), (R, IN), (H, R)) for i, c in enumerate("qkv")]
    pairs += [_pair("to_out", DENSE, _rows(0, IN, H), (R, H), (IN, R), 0.25)]
    full = {p.target: (torch.randn(p.a_shape, generator=g), torch.randn(p.b_shape, generator=g)) for p in pairs}
    want = {QKV: torch.zeros(3 * H, IN), DENSE: torch.zeros(IN, H)}
    for p in pairs:
        a, b = full[p.target]
        (frag,) = p.rows
        lo, n = frag.logical.offsets[0], frag.logical.sizes[0]
        want[p.base][lo:lo + n] += (b @ a) * p.scale
    for rank in range(tp):
        got = {n: torch.zeros(SPECS[n].placement(tp, rank).local_shape(SPECS[n].global_shape)) for n in want}
        for p in pairs:
            la, lb = layouts(p, SPECS[p.base], "f")
            sa, sb = TensorSpec(p.a_shape, la), TensorSpec(p.b_shape, lb)
            a, b = (_local(t, s, tp, rank) for t, s in zip(full[p.target], (sa, sb)))
            for box, (b0, b1), (a0, a1) in merge_boxes(p, SPECS[p.base], sa, sb, tp, rank):
                got[p.base][tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))] += \
                    (b[b0:b1] @ a[:, a0:a1]) * p.scale
        for n in want:
            assert torch.equal(got[n], _local(want[n], SPECS[n], tp, rank)), (n, tp, rank)


def _local(full: torch.Tensor, spec: TensorSpec, tp: int, rank: int) -> torch.Tensor:
    pl = spec.placement(tp, rank)
    out = torch.zeros(pl.local_shape(spec.global_shape))
    for f in pl.fragments(spec.global_shape):
        src = tuple(slice(o, o + s) for o, s in zip(f.logical.offsets, f.logical.sizes))
        dst = tuple(slice(o, o + s) for o, s in zip(f.local_offsets, f.logical.sizes))
        out[dst] = full[src]
    return out


# --- PEFT files ------------------------------------------------------------------------------------

def _peft(tmp_path, tensors, meta=None, name="lora.safetensors"):
    path = str(tmp_path / name)
    header = {"format": "pt"}
    if meta is not None:
        header["lora_adapter_metadata"] = json.dumps({f"transformer.{k}": v for k, v in meta.items()})
    save_file({k: torch.randn(*s) for k, s in tensors.items()}, path, metadata=header)
    return path


def _qkv_lora(layer=0, r=R, in_=IN, out=H, targets=("to_q", "to_k", "to_v")):
    t = {}
    for m in targets:
        t[f"transformer.transformer_blocks.{layer}.attn1.{m}.lora_A.weight"] = (r, in_)
        t[f"transformer.transformer_blocks.{layer}.attn1.{m}.lora_B.weight"] = (out, r)
    return t


def test_peft_scale_from_metadata_and_diffusers_rule(tmp_path):
    with_meta = files.peft_adapter(_peft(tmp_path, _qkv_lora(), {"r": R, "lora_alpha": 8}, "a.safetensors"), SPECS)
    assert {p.scale for p in with_meta.pairs} == {8 / R}
    assert {p.base for p in with_meta.pairs} == {QKV}
    assert sorted(p.rows[0].logical.offsets[0] for p in with_meta.pairs) == [0, H, 2 * H]
    bare = files.peft_adapter(_peft(tmp_path, _qkv_lora(), None, "b.safetensors"), SPECS)
    assert {p.scale for p in bare.pairs} == {1.0}
    patterned = files.peft_adapter(_peft(tmp_path, _qkv_lora(), {"r": R, "lora_alpha": 4,
                                                                   "alpha_pattern": {"to_k": 6}}, "c.safetensors"), SPECS)
    assert {p.target.rsplit(".", 1)[-1]: p.scale for p in patterned.pairs} == {"to_q": 2.0, "to_k": 3.0, "to_v": 2.0}


@pytest.mark.parametrize("case, tensors, words", [
    ("lacking", {"transformer.transformer_blocks.0.attn2.to_q.lora_A.weight": (R, IN),
                 "transformer.transformer_blocks.0.attn2.to_q.lora_B.weight": (H, R)}, "attn2.to_q"),
    ("layers", _qkv_lora(layer=3), "layer 3, the model has 1 layers"),
    ("shapes", _qkv_lora(in_=IN + 2), "transformer.transformer_blocks.0.attn1.to_k.lora_A.weight"),
    ("lone", {"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": (R, IN)}, "no lora_B"),
    ("dora", {**_qkv_lora(), "transformer.transformer_blocks.0.attn1.to_q.lora_magnitude_vector": (H,)},
     "lora_magnitude_vector"),
    ("text", {"text_encoder.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": (R, IN)}, "text-encoder"),
])
def test_a_lora_for_another_model_is_named(tmp_path, case, tensors, words):
    path = _peft(tmp_path, tensors)
    with pytest.raises(LoraError) as exc:
        files.peft_adapter(path, SPECS)
    assert path in str(exc.value) and words in str(exc.value)


def test_rank_metadata_must_match(tmp_path):
    path = _peft(tmp_path, _qkv_lora(), {"r": R + 1, "lora_alpha": 8})
    with pytest.raises(LoraError, match="rank"):
        files.peft_adapter(path, SPECS)


def test_tp_that_cuts_a_block_is_named(tmp_path):
    adapter = files.peft_adapter(_peft(tmp_path, _qkv_lora()), SPECS)
    with pytest.raises(LoraError, match="cannot be split 3 ways"):
        plan_loras([adapter], [1.0], SPECS, 3, 0)


def test_is_peft_lora_and_describe(tmp_path):
    path = _peft(tmp_path, _qkv_lora(), {"r": R, "lora_alpha": 4})
    assert files.is_peft_lora(path)
    info = files.describe(path)
    assert info["lora"]["rank"] == [R] and info["lora"]["layers"] == [0]
    assert "lora_alpha 4 / r 2 = 2" in "\n".join(info["summary"])
    plain = str(tmp_path / "model.safetensors")
    save_file({"w": torch.zeros(2)}, plain)
    assert not files.is_peft_lora(plain)


# --- SAT alpha -------------------------------------------------------------------------------------

def test_sat_alpha_is_given_or_read_never_guessed(tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    with pytest.raises(LoraError, match="--lora-alpha"):
        files.sat_alpha(str(folder), None)
    assert files.sat_alpha(str(folder), 2.0) == (2.0, "given")
    (folder / files.SAT_LORA_CONFIG).write_text(json.dumps({"r": 4, "lora_alpha": 64}))
    assert files.sat_alpha(str(folder), None) == (64.0, files.SAT_LORA_CONFIG)
    (folder / files.SAT_LORA_CONFIG).write_text(json.dumps({"lora_alpha": "x"}))
    with pytest.raises(LoraError, match="positive number"):
        files.sat_alpha(str(folder), None)


# --- --prompts lines -------------------------------------------------------------------------------

def test_prompt_lines_with_their_own_adapters(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"")
    b.write_bytes(b"")
    lines = ["a red panda", f"a cat --lora {b}:0.5", "a dog --lora none", f"the fox --lora {a} --lora {b}:-1"]
    prompts, loras = adapters.per_prompt(lines, [f"{a}:0.8"])
    assert prompts == ["a red panda", "a cat", "a dog", "the fox"]
    assert loras == [((str(a), 0.8),), ((str(b), 0.5),), (), ((str(a), 1.0), (str(b), -1.0))]
    assert adapters.batches(loras + [((str(b), 0.5),)]) == [(loras[0], [0]), (loras[1], [1, 4]), ((), [2]),
                                                          (loras[3], [3])]
    with pytest.raises(ConfigError, match="does not exist"):
        adapters.per_prompt(["x --lora missing.safetensors"], [])
    with pytest.raises(ConfigError, match="cannot go with"):
        adapters.per_prompt([f"x --lora none --lora {a}"], [])
    with pytest.raises(ConfigError, match="'x' is not a number"):
        adapters.per_prompt([f"y --lora {a}:x"], [])
