"""Write a LoRA fine-tune reference with the real SwissArmyTransformer (SAT 0.4.12) package.

Run with the reference venv, 2 ranks on gloo (one launch does everything):

    .venv-sat/bin/torchrun --standalone --nproc_per_node=2 tests/sat_ref/gen_sat_lora.py --out DIR

One config, `CONFIG` below (`plain_vocab_parallel` of `configs.py`: 2 layers, hidden 64, 4 heads,
vocab 1024 so the embedding is SAT's VocabParallelEmbedding and SAT's mp=2 logits are (B, L, V)).
The base weights are those of `gen_sat_reference.py` (its `build_full`: same seed, same values), the
CPU/triton shim is its own (this script imports its helpers). Then SAT's
`model.add_mixin("lora", LoraMixin(num_layers, r=R, lora_alpha=ALPHA), reinit=True)`
(`sat/model/finetune/lora2.py`) replaces every layer's `attention.query_key_value` and
`attention.dense` by a `LoraLinear`, and every `matrix_A.i` and `matrix_B.i` gets deterministic
random values (SAT zero-initialises `matrix_B`; here it must not be zero, or the LoRA would be a no-op).

Written:

* `DIR/mp1/` : SAT's `save_checkpoint` (inference mode) of the LoRA model at model parallel 1: names
  `transformer.layers.N.attention.query_key_value.original.{weight,bias}`, `...query_key_value.matrix_A.{0,1,2}`,
  `...query_key_value.matrix_B.{0,1,2}`, `...attention.dense.original.{weight,bias}`, `...dense.matrix_A.0`,
  `...dense.matrix_B.0`, plus the untouched base names.
* `DIR/mp2/` : SAT's `save_checkpoint` at model parallel 2 (ranks 0 and 1 write their shard). The model is built
  the way SAT builds a LoRA model at mp=2: the full base model is split with SAT's own
  `sat.mpu.operation.mp_split_model(model, 2)` BEFORE the mixin is added (SAT's split does not know the LoRA
  matrices: it would repartition `original` and leave `matrix_A/B` alone), then `add_mixin("lora", ..., reinit=True)`
  at mp=2 and the LoRA tensors are set to the slices of the mp=1 ones (rules below).
* `DIR/expected.pt` : `{"config": name, "config_args": {...}, "r": R, "alpha": ALPHA, "inputs": [...],
  "logits_lora": [SAT mp=1 forward of the unmerged LoRA model, per input],
  "merged": {1: [state dict after SAT's `model.mixins.lora.merge_lora()` at mp=1],
             2: [rank 0 state dict, rank 1 state dict] after `merge_lora()` on the mp=2 model},
  "merged_split": {2: [SAT's `mp_split_model` split of merged[1] for 2: rank 0, rank 1]},
  "logits_merged": [mp=1 forward after the merge], "logits_lora_mp2": [SAT's own mp=2 LoRA forward, rank 0],
  "lora_sd": {1: [the LoRA model's state dict at mp=1], 2: [rank 0, rank 1]} (what `mp1/`, `mp2/` hold),
  "lora_shapes": {mp: {name: shape}}, "facts": {...}}`.
* `DIR/manifest.json` : versions, timings, the facts.

What SAT's LoraLinear gives at mp=2 (hidden h=64, r=4, checked by the asserts below):

* `query_key_value` (ColumnParallelLinear, stride 3): `original.weight` [3h/2, h] (SAT's strided split: rows
  [q_r; k_r; v_r]); `matrix_A.i` [r, h] (replicated: it takes `original_obj.weight.shape[1]`, the full input);
  `matrix_B.i` [h/2, r] (`weight.shape[0] // 3`): row chunk `mp_rank` of the mp=1 `matrix_B.i` -- the same rule as
  SAT's strided split of the qkv weight, so `cat_i(B_i @ A_i)` on rank r is SAT's split of the merged delta.
* `dense` (RowParallelLinear): `original.weight` [h, h/2] (column chunk), `original.bias` [h] (replicated, added
  after the all-reduce); `matrix_A.0` [r, h/2] (`original_obj.weight.shape[1]` is the LOCAL input width): column
  chunk `mp_rank` of the mp=1 `matrix_A.0`; `matrix_B.0` [h, r] (replicated).
* In `LoraLinear.forward` the low-rank path is `copy_to_model_parallel_region(x @ A.T) @ B.T * scaling`:
  `copy_to_model_parallel_region` is the identity in the forward (an all-reduce only in the backward). For `dense`,
  whose input is parallel, `x_r @ A_r.T` is only rank r's partial sum over the input columns and is never
  all-reduced, so SAT's own mp=2 LoRA forward is NOT the mp=1 one (facts["mp2_vs_mp1_logits_max_abs_diff"]); with the
  dense LoRA switched off (its matrix_B zeroed on both sides) mp=2 matches mp=1 again
  (facts["mp2_vs_mp1_qkv_lora_only_max_abs_diff"]), which isolates the cause. This is recorded, not asserted.
* `merge_lora()` at mp=2 computes each rank's shard of the merged weight correctly (dense: `B @ A_r` = the column
  chunk of `B @ A`; qkv: `cat_i(B_i,r @ A_i)`), so the merged state dicts are the right shards (compared with
  SAT's split of merged[1], facts["merged_mp2_vs_split_of_merged_mp1"]); but it replaces the layers by a plain
  `nn.Linear`, so the merged model's mp=2 forward loses dense's all-reduce (facts["merged_mp2_vs_mp1_logits_max_abs_diff"]).
  The state dict (names `...attention.dense.weight`, `...query_key_value.weight`, ...) is the reference, not that
  forward.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_sat_reference as G  # noqa: E402  (env defaults, the torch.cuda.device shim, `import sat`)

import torch  # noqa: E402
import configs as C  # noqa: E402
import sat  # noqa: E402
from sat import get_args  # noqa: E402
from sat.model.finetune.lora2 import LoraMixin  # noqa: E402
from sat.mpu.operation import mp_split_model  # noqa: E402
from sat.training.model_io import save_checkpoint  # noqa: E402

CONFIG = "plain_vocab_parallel"
R = 4
ALPHA = 2.0
MP = 2
LORA_SEED = C.SEED + 4242


def log(*a):
    if torch.distributed.get_rank() == 0:
        print("[gen_sat_lora]", *a, flush=True)


def add_lora(model, cfg):
    model.add_mixin("lora", LoraMixin(cfg["num_layers"], r=R, lora_alpha=ALPHA), reinit=True)
    return model.eval()


def is_lora(name: str) -> bool:
    return ".matrix_A." in name or ".matrix_B." in name


def fill_lora_(model) -> dict:
    """Deterministic random A and B (same on every rank), sorted-name order; returns them."""
    g = torch.Generator().manual_seed(LORA_SEED)
    sd = model.state_dict()
    out = {}
    with torch.no_grad():
        for name in sorted(n for n in sd if is_lora(n)):
            t = sd[name]
            # A [r, in], B [out, r]: both randn / sqrt(fan-in), so B @ A * scaling is of the order of W
            r = torch.randn(t.shape, generator=g) / math.sqrt(t.shape[1])
            t.copy_(r.to(t.dtype))
            out[name] = t.detach().clone()
    return out


def lora_shard(name: str, full: torch.Tensor, mp_rank: int, mp: int) -> torch.Tensor:
    """SAT's rule for one LoRA tensor of the mp=1 model on mp rank `mp_rank` (see the docstring)."""
    if ".query_key_value.matrix_B." in name:  # [h, r] -> rows chunk (one stride part of the qkv output)
        n = full.shape[0] // mp
        return full[mp_rank * n:(mp_rank + 1) * n].clone()
    if ".dense.matrix_A." in name:  # [r, h] -> columns chunk (dense's input is parallel)
        n = full.shape[1] // mp
        return full[:, mp_rank * n:(mp_rank + 1) * n].clone()
    return full.clone()  # qkv matrix_A.i, dense matrix_B.0: replicated


def max_diff(a: list, b: list) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def sd_clone(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def with_dense_lora_off(model, inputs):
    """Forward with every dense matrix_B zeroed (restored afterwards)."""
    sd = model.state_dict()
    saved = {k: v.clone() for k, v in sd.items() if ".dense.matrix_B." in k}
    with torch.no_grad():
        for k in saved:
            sd[k].zero_()
        out = G.forward(model, inputs)
        for k, v in saved.items():
            sd[k].copy_(v)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    t0 = time.perf_counter()
    base = get_args(["--mode", "inference", "--distributed-backend", "gloo", "--model-parallel-size", str(MP)])
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    assert world == MP, f"run with --nproc_per_node={MP}"
    torch.set_num_threads(1)
    cfg = C.full_config(CONFIG)
    assert cfg["dtype"] == "float32"
    h = cfg["hidden_size"]
    inputs = G.make_inputs(CONFIG)
    facts: dict = {}

    # ---------------------------------------------------------------- mp=1: the full LoRA model
    full = add_lora(G.build_full(base, CONFIG), cfg)
    lora_full = fill_lora_(full)
    shapes1 = {k: list(v.shape) for k, v in full.state_dict().items() if is_lora(k) or ".original." in k}
    assert shapes1["transformer.layers.0.attention.query_key_value.matrix_A.0"] == [R, h]
    assert shapes1["transformer.layers.0.attention.query_key_value.matrix_B.2"] == [h, R]
    assert shapes1["transformer.layers.0.attention.dense.matrix_A.0"] == [R, h]
    assert shapes1["transformer.layers.0.attention.dense.matrix_B.0"] == [h, R]
    assert "transformer.layers.0.attention.query_key_value.matrix_A.3" not in shapes1
    logits_lora = G.forward(full, inputs)
    logits_qkv_only_1 = with_dense_lora_off(full, inputs)
    save_checkpoint(G.ITERATION, full, None, None, G.model_args(base, cfg, 1, os.path.join(a.out, "mp1")))
    lora_sd1 = sd_clone(full)
    full.mixins.lora.merge_lora()  # SAT's own merge (a method of the mixin), in place
    full.eval()
    merged1 = sd_clone(full)
    assert not any(is_lora(k) or ".original." in k for k in merged1), sorted(merged1)
    logits_merged = G.forward(full, inputs)
    facts["merged_mp1_vs_lora_mp1_logits_max_abs_diff"] = max_diff(logits_merged, logits_lora)
    del full

    # ---------------------------------------------------------------- mp=2: SAT's split, then LoRA
    model = G.build_full(base, CONFIG)
    mp_split_model(model, MP)  # SAT's split of the base model, in place, this rank's part
    add_lora(model, cfg)  # LoraLinear around the already-split linears
    from sat import mpu
    mp_rank = mpu.get_model_parallel_rank()
    sd = model.state_dict()
    shapes2 = {k: list(v.shape) for k, v in sd.items() if is_lora(k) or ".original." in k}
    assert sorted(shapes2) == sorted(shapes1)
    with torch.no_grad():
        for k, v in lora_full.items():
            want = lora_shard(k, v, mp_rank, MP)
            assert tuple(sd[k].shape) == tuple(want.shape), (k, tuple(sd[k].shape), tuple(want.shape))
            sd[k].copy_(want)
    assert shapes2["transformer.layers.0.attention.query_key_value.original.weight"] == [3 * h // MP, h]
    assert shapes2["transformer.layers.0.attention.query_key_value.matrix_A.0"] == [R, h]
    assert shapes2["transformer.layers.0.attention.query_key_value.matrix_B.0"] == [h // MP, R]
    assert shapes2["transformer.layers.0.attention.dense.original.weight"] == [h, h // MP]
    assert shapes2["transformer.layers.0.attention.dense.original.bias"] == [h]
    assert shapes2["transformer.layers.0.attention.dense.matrix_A.0"] == [R, h // MP]
    assert shapes2["transformer.layers.0.attention.dense.matrix_B.0"] == [h, R]
    logits2 = G.forward(model, inputs)  # every rank: collectives inside the mp group
    logits2_qkv_only = with_dense_lora_off(model, inputs)
    all_logits2 = [None] * world
    torch.distributed.all_gather_object(all_logits2, logits2)
    facts["mp2_ranks_logits_equal"] = all(torch.equal(x, y) for x, y in zip(all_logits2[0], all_logits2[1]))
    facts["mp2_vs_mp1_logits_max_abs_diff"] = max_diff(logits2, logits_lora)
    facts["mp2_vs_mp1_qkv_lora_only_max_abs_diff"] = max_diff(logits2_qkv_only, logits_qkv_only_1)
    facts["qkv_lora_only_vs_full_lora_mp1_max_abs_diff"] = max_diff(logits_qkv_only_1, logits_lora)
    lora2 = G.gather_sd(model, MP)
    save_checkpoint(G.ITERATION, model, None, None, G.model_args(base, cfg, MP, os.path.join(a.out, f"mp{MP}")))
    model.mixins.lora.merge_lora()
    model.eval()
    merged2 = G.gather_sd(model, MP)
    facts["merged_mp2_layer_types"] = sorted({type(m).__name__ for n, m in model.named_modules()
                                              if n.endswith(("attention.dense", "attention.query_key_value"))})
    logits_merged2 = G.forward(model, inputs)  # dense is a plain nn.Linear now: no all-reduce
    facts["merged_mp2_vs_mp1_logits_max_abs_diff"] = max_diff(logits_merged2, logits_lora)
    del model

    # ---------------------------------------------------------------- SAT's split of merged[1], cross-check
    ref = G.build_full(base, CONFIG)
    missing, unexpected = ref.load_state_dict(merged1, strict=True)
    assert not missing and not unexpected
    mp_split_model(ref, MP)
    merged_split = G.gather_sd(ref, MP)
    del ref
    cross = {}
    for r in range(MP):
        assert sorted(merged2[r]) == sorted(merged_split[r]), r
        for k in merged2[r]:
            x, y = merged2[r][k], merged_split[r][k]
            assert x.shape == y.shape and x.dtype == y.dtype, (r, k, x.shape, y.shape, x.dtype, y.dtype)
            if not torch.equal(x, y):
                cross[f"rank{r}:{k}"] = (x - y).abs().max().item()
    facts["merged_mp2_vs_split_of_merged_mp1"] = cross or "torch.equal for every tensor"
    # Is the merged weight exactly W + cat_i(B_i @ A_i * scaling) in fp32, computed in that order (SAT's formula)?
    ex = {}
    for k in sorted(merged1):
        if not k.endswith(("attention.dense.weight", "attention.query_key_value.weight")):
            continue
        pre = k.rsplit(".", 1)[0]
        n = 1 if pre.endswith("dense") else 3
        delta = torch.cat([lora_full[f"{pre}.matrix_B.{i}"].float() @ lora_full[f"{pre}.matrix_A.{i}"].float()
                           * (ALPHA / R) for i in range(n)], -2)
        ex[k] = bool(torch.equal(merged1[k], (lora_sd1[f"{pre}.original.weight"] + delta).to(merged1[k].dtype)))
    facts["merged_mp1_is_W_plus_BA_times_scaling_exactly"] = ex

    if rank == 0:
        expected = {
            "config": CONFIG, "config_args": cfg, "r": R, "alpha": ALPHA, "inputs": inputs,
            "logits_lora": logits_lora, "logits_merged": logits_merged, "logits_lora_mp2": logits2,
            "merged": {1: [merged1], MP: merged2}, "merged_split": {MP: merged_split},
            "lora_sd": {1: [lora_sd1], MP: lora2},
            "lora_shapes": {1: shapes1, MP: shapes2}, "facts": facts,
        }
        torch.save(expected, os.path.join(a.out, "expected.pt"))
        manifest = {"sat_version": sat.__version__, "torch_version": torch.__version__, "config": CONFIG,
                    "r": R, "alpha": ALPHA, "world_size": world, "iteration": G.ITERATION,
                    "seconds": round(time.perf_counter() - t0, 2), "import_seconds": round(G.IMPORT_S, 2),
                    "lora_shapes_layer0": {mp: {k: v for k, v in s.items() if ".layers.0." in k}
                                           for mp, s in ((1, shapes1), (MP, shapes2))},
                    "facts": facts}
        with open(os.path.join(a.out, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
        log(json.dumps(facts, indent=2))
        log(f"done in {manifest['seconds']} s (sat import {manifest['import_seconds']} s)")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
