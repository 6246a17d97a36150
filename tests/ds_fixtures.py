"""Real DeepSpeed ZeRO checkpoints of the project's SATModel, for the DeepSpeed reader's tests.

Run as a script in a subprocess (the pytest process itself never imports deepspeed, so the tests
can prove the load path does not either):

    python tests/ds_fixtures.py OUT --dp 2

It forks `dp * mp` gloo ranks (sat_dist/testing/dist.py) that each build SATModel (TP=mp, Megatron
style: DeepSpeed gets an `mpu`), let DeepSpeed 0.19.8 on CPU train it one step and save it, once
per variant below. References the tests compare against, all computed by DeepSpeed's own code:

- `OUT/<variant>/zero_to_fp32.pt`: `get_fp32_state_dict_from_zero_checkpoint(ckpt)` (mp=1 only;
  zero_to_fp32 neither supports mp>1 nor BF16_Optimizer files: then `{}`);
- `OUT/<variant>/live_fp32_mp<m>.pt`: `deepspeed.utils.safe_get_full_fp32_param(p)` for every
  trainable param, taken from the live engine right after the step (mp rank m's TP-local shapes);
- `OUT/<variant>/module_mp<m>.pt`: the `module` dict of mp rank m's model-states file;
- `OUT/<variant>/init_full.pt`: the full (TP=1) initial weights (frozen params never change);
- `OUT/<variant>/bad_global_optim.pt`: dp rank 1's optim file plus a pickled `argparse.Namespace`
  (a global no real DeepSpeed file carries), for the unknown-global test.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

# Odd sizes on purpose: hidden 42 and max_seq 5 are not multiples of 4, so ZeRO-3 partitions at
# dp=4 carry tail padding, ZeRO-1/2 flat groups get 2*dp alignment padding, and params straddle
# partition boundaries mid-row. heads, ffn and vocab stay divisible by 4 for TP in {1, 2, 4}.
MODEL = dict(num_layers=2, hidden_size=42, num_attention_heads=4, hidden_size_per_attention_head=10,
             inner_hidden_size=52, vocab_size=1004, max_sequence_length=5)
# Rotary: a persistent buffer (inv_freq) that only `module` holds, and a replicated embedding.
ROTARY = dict(num_layers=1, hidden_size=40, num_attention_heads=4, vocab_size=100, max_sequence_length=8,
              is_rotary_emb=True)

FROZEN = ("transformer.position_embeddings.weight", "transformer.layers.0.input_layernorm.bias")


@dataclass(frozen=True)
class Variant:
    """One DeepSpeed save: ZeRO stage, precision and the knobs that change the on-disk layout."""

    name: str
    stage: int
    bf16: bool = False
    model: str = "MODEL"
    frozen: tuple = ()  # params with requires_grad=False
    two_groups: bool = False  # SAT's weight-decay / no-decay param groups
    round_robin: bool = False
    sub_group_size: Optional[int] = None  # ZeRO-3 sub-groups
    grad_accum_fp32: bool = False  # bf16 + ZeRO-1 + fp32 grad accumulation -> BF16_Optimizer
    sat_style: bool = False  # tag "1000", SAT client state, model_config.json
    mp: int = 1  # Megatron-style model parallel size of the training run


VARIANTS = [
    Variant("z1_fp32", 1),
    Variant("z2_fp32", 2, frozen=FROZEN),
    Variant("z3_fp32", 3, frozen=FROZEN, sub_group_size=4000),
    Variant("z1_bf16", 1, bf16=True, frozen=FROZEN),
    Variant("z2_bf16", 2, bf16=True, round_robin=True),
    Variant("z3_bf16", 3, bf16=True, frozen=FROZEN),
    Variant("sat_z2_bf16", 2, bf16=True, two_groups=True, sat_style=True),
    Variant("sat_z3_fp32", 3, two_groups=True, sat_style=True),
    Variant("z3_rotary_bf16", 3, bf16=True, model="ROTARY"),
    Variant("z1_bf16_fp32acc", 1, bf16=True, grad_accum_fp32=True),
    # Megatron-style TP inside the training run: each mp rank's ZeRO partitions hold its TP shard.
    Variant("mp2_z1_fp32", 1, mp=2),
    Variant("mp2_z2_bf16", 2, bf16=True, mp=2, frozen=FROZEN),
    Variant("mp2_z3_fp32", 3, mp=2, frozen=FROZEN + ("transformer.layers.1.mlp.dense_h_to_4h.weight",)),
]
BY_NAME = {v.name: v for v in VARIANTS}


def model_cfg(v: Variant) -> dict:
    cfg = dict(MODEL if v.model == "MODEL" else ROTARY)
    return cfg


class MPU:
    """The Megatron-style `mpu` DeepSpeed takes: ranks [i*mp, (i+1)*mp) form a model-parallel group."""

    def __init__(self, mp: int, rank: int, world: int):
        import torch.distributed as dist

        self.mp, self.dp = mp, world // mp
        self.mp_rank, self.dp_rank = rank % mp, rank // mp
        for i in range(self.dp):
            g = dist.new_group(list(range(i * mp, (i + 1) * mp)))
            if i == self.dp_rank:
                self.mp_group = g
        for j in range(mp):
            g = dist.new_group(list(range(j, world, mp)))
            if j == self.mp_rank:
                self.dp_group = g

    def get_model_parallel_rank(self): return self.mp_rank
    def get_model_parallel_world_size(self): return self.mp
    def get_model_parallel_group(self): return self.mp_group
    def get_data_parallel_rank(self): return self.dp_rank
    def get_data_parallel_world_size(self): return self.dp
    def get_data_parallel_group(self): return self.dp_group


def ds_config(v: Variant) -> dict:
    zero: dict = {"stage": v.stage}
    if v.round_robin:
        zero["round_robin_gradients"] = True
    if v.sub_group_size:
        zero["sub_group_size"] = v.sub_group_size
    cfg = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": zero, "bf16": {"enabled": v.bf16}, "steps_per_print": 10 ** 9,
    }
    if v.grad_accum_fp32:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def sat_client_state(iteration: int) -> dict:
    """What SAT's save_checkpoint passes as client_state (sat/training/model_io.py)."""
    import numpy as np
    import torch

    return {
        "iteration": iteration,
        "client_lr_scheduler": {"start_lr": 1e-2, "warmup_iter": 10, "num_iters": iteration, "decay_style": "cosine",
                                "end_iter": 10000, "decay_ratio": 0.1, "min_lr": 0.0},
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
    }


def _patch_tp_autograd() -> None:
    """sat_dist's TP layers are inference-only (their collectives have no backward). For the mp>1
    fixtures, give them Megatron's f/g so replicated params get identical gradients on every TP
    rank, as in real TP training: f = identity forward / all-reduce backward at the input of a
    column-parallel linear; g = all-reduce forward / identity backward after a row-parallel one."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from sat_dist.models import layers, tp_ops

    class CopyToTP(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return x

        @staticmethod
        def backward(ctx, grad):
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, group=ctx.group)
            return grad, None

    class ReduceFromTP(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group):
            x = x.contiguous().clone()
            dist.all_reduce(x, group=group)
            return x

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    # layers imports reduce_from_tp by name: patch the name its forwards look up.
    layers.reduce_from_tp = lambda x, group: x if tp_ops.tp_world(group) == 1 else ReduceFromTP.apply(x, group)
    layers.ColumnParallelLinear.forward = lambda self, x: F.linear(CopyToTP.apply(x, self.tp.group), self.weight,
                                                                   self.bias)


def _build(v: Variant, mpu: Optional[MPU]):
    """SATModel holding mp rank's TP shard of deterministic full weights (split by sat_rules)."""
    import torch

    from sat_dist.config import build_model_config
    from sat_dist.models import TPInfo
    from sat_dist.models.sat_gpt import SATModel
    from sat_rules import sat_split

    cfg = build_model_config(model_cfg(v))
    full = SATModel(cfg, TPInfo())
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in full.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if "layernorm.weight" in name else 0.0))
    init = {k: t.detach().clone() for k, t in full.state_dict().items()}
    if mpu is None:
        model = full
    else:
        model = SATModel(cfg, TPInfo(mpu.mp, mpu.mp_rank, mpu.mp_group))
        with torch.no_grad():
            for name, t in model.state_dict(keep_vars=True).items():
                t.copy_(sat_split(name, init[name], mpu.mp, mpu.mp_rank, model_cfg(v)))
    for name, p in model.named_parameters():
        p.requires_grad_(name not in v.frozen)
    return model, cfg, init


def _save_one(rank: int, out: str, v: Variant, mpu: Optional[MPU]) -> None:
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    model, cfg, init = _build(v, mpu)
    params = [p for p in model.parameters() if p.requires_grad]
    if v.two_groups:  # SAT get_optimizer_param_groups: no weight decay on biases and norms
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [{"params": [p for n, p in named if not (n.endswith("bias") or "layernorm" in n)]},
                  {"params": [p for n, p in named if n.endswith("bias") or "layernorm" in n], "weight_decay": 0.0}]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config(v), mpu=mpu)
    g = torch.Generator().manual_seed(100 + (mpu.dp_rank if mpu else rank))  # same batch within a TP group
    seq = model_cfg(v)["max_sequence_length"]
    ids = torch.randint(0, cfg.vocab_size, (2, seq), generator=g)
    pos = torch.arange(seq).unsqueeze(0).expand(2, -1)
    if mpu is None:
        logits = engine(ids, pos, torch.ones(1, 1, seq, seq).tril())
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), ids.reshape(-1))
    else:  # the replicated final hidden states: the same loss on every TP rank
        hidden = []
        hook = engine.module.transformer.final_layernorm.register_forward_hook(lambda m, i, o: hidden.append(o))
        engine(ids, pos, torch.ones(1, 1, seq, seq).tril())
        hook.remove()
        loss = hidden[0].float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    save = os.path.join(out, v.name, "ckpt")
    if v.sat_style:
        engine.save_checkpoint(save, tag="1000", client_state=sat_client_state(1000))
        if rank == 0:
            with open(os.path.join(save, "model_config.json"), "w") as f:
                json.dump({"model_class": "BaseModel", **model_cfg(v), "model_parallel_size": 1}, f)
    else:
        engine.save_checkpoint(save, tag="global_step1")
    # DeepSpeed's own view of the fp32 masters (collective under ZeRO-3: every rank calls it).
    live = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters() if p.requires_grad}
    mp_rank, dp_rank = (mpu.mp_rank, mpu.dp_rank) if mpu else (0, rank)
    if dp_rank == 0:
        torch.save({n: t.clone() for n, t in live.items()}, os.path.join(out, v.name, f"live_fp32_mp{mp_rank}.pt"))
        if mp_rank == 0:
            torch.save(init, os.path.join(out, v.name, "init_full.pt"))
    engine.destroy() if hasattr(engine, "destroy") else None


def _rank_main(rank: int, out: str, names: list[str], mp: int) -> dict:
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    mpu = MPU(mp, rank, dist.get_world_size()) if mp > 1 else None
    if mpu is not None:
        _patch_tp_autograd()
    times = {}
    for name in names:
        t0 = time.perf_counter()
        _save_one(rank, out, BY_NAME[name], mpu)
        times[name] = round(time.perf_counter() - t0, 2)
    return times


def _write_references(out: str, names: list[str]) -> None:
    import argparse as _argparse

    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for name in names:
        v = BY_NAME[name]
        ckpt = os.path.join(out, name, "ckpt")
        tag = "1000" if v.sat_style else "global_step1"
        ref = {}
        if not v.grad_accum_fp32 and v.mp == 1:  # zero_to_fp32 refuses BF16_Optimizer files and mp > 1
            sd = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag=tag)
            ref = {k: t.contiguous().clone() for k, t in sd.items()}
        torch.save(ref, os.path.join(out, name, "zero_to_fp32.pt"))
        for m in range(v.mp):
            model_file = (f"zero_pp_rank_0_mp_rank_{m:02d}_model_states.pt" if v.stage == 3
                          else f"mp_rank_{m:02d}_model_states.pt")
            full = torch.load(os.path.join(ckpt, tag, model_file), map_location="cpu", weights_only=False)
            torch.save({k: t.clone() for k, t in full["module"].items()}, os.path.join(out, name, f"module_mp{m}.pt"))
        prefix = "bf16_" if v.bf16 else ""
        optim = torch.load(os.path.join(ckpt, tag, f"{prefix}zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                           map_location="cpu", weights_only=False)
        optim["args"] = _argparse.Namespace(lr=0.1, note="a global no DeepSpeed file carries")
        torch.save(optim, os.path.join(out, name, "bad_global_optim.pt"))
        with open(os.path.join(out, name, "variant.json"), "w") as f:
            json.dump({**asdict(v), "model_cfg": model_cfg(v), "tag": tag}, f)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--dp", type=int, required=True)
    ap.add_argument("--mp", type=int, default=1, help="run the mp=M variants on dp*mp ranks")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import deepspeed  # noqa: F401  (imported once here, inherited by the forked ranks)

    # Skip the g++ JIT build of deepspeed_shm_comm (ENVIRONMENT.md section 4).
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    from sat_dist.testing.dist import run_ranks, values

    names = args.only or [v.name for v in VARIANTS if v.mp == args.mp]
    t0 = time.perf_counter()
    times = values(run_ranks(args.dp * args.mp, _rank_main, args.out, names, args.mp, timeout=600))
    _write_references(args.out, names)
    print(json.dumps({"dp": args.dp, "mp": args.mp, "seconds": round(time.perf_counter() - t0, 1),
                      "per_variant": times[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
