"""Write reference checkpoints and tensors with the real SwissArmyTransformer (SAT) package.

Run with the reference venv, 4 ranks on gloo (one launch does everything):

    .venv-sat/bin/torchrun --standalone --nproc_per_node=4 tests/sat_ref/gen_sat_reference.py --out DIR

For every config in `configs.py` (SAT `BaseModel`, deterministic random weights):

* `DIR/<cfg>/mp1/`  : written by SAT's `save_checkpoint` in inference mode at model parallel 1;
* `DIR/<cfg>/mp2/`  : written by SAT's `save_checkpoint` at model parallel 2 (ranks 0 and 1);
* `DIR/<cfg>/expected.pt` : `{"split": {tp: [state_dict of mp rank r, ...]}, "inputs": [...],
  "logits": {mp: [logits per input]}}` where
  - `split[1]` is the full model's state dict,
  - `split[2]`, `split[4]` are SAT's own split: the full model is built at mp=1, then
    `sat.mpu.operation.mp_split_model(model, n)` repartitions it in place on n ranks;
  - `logits[1]` is SAT's mp=1 forward (`model(input_ids=, position_ids=, attention_mask=)[0]`),
    `logits[n]` the forward of the split model on mp rank 0 (SAT's gathered output: for a
    vocabulary < 1000 it is (B, L, n*V), SAT's replicated-embedding quirk).
* `DIR/manifest.json` : versions, configs, timings.

SAT's rotary embedding (`FastRotaryEmbedding`) applies a triton kernel. On a CPU-only machine it
runs in triton's interpreter (`TRITON_INTERPRET=1`); the only shim is that
`torch.cuda.device(None)` (which SAT enters with the CPU tensor's device index) becomes a no-op
context, as it is meant to be for a CPU tensor. SAT's own code is not modified.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import configs as C  # noqa: E402

if not torch.cuda.is_available():
    _cuda_device = torch.cuda.device
    torch.cuda.device = lambda idx: contextlib.nullcontext() if idx is None else _cuda_device(idx)

T0 = time.perf_counter()
import sat  # noqa: E402
from sat import get_args, mpu  # noqa: E402
from sat.model import BaseModel  # noqa: E402
from sat.mpu.operation import mp_split_model  # noqa: E402
from sat.training.model_io import save_checkpoint  # noqa: E402

IMPORT_S = time.perf_counter() - T0
ITERATION = 1000


def log(*a):
    if torch.distributed.get_rank() == 0:
        print("[gen_sat_reference]", *a, flush=True)


def set_mp(n: int) -> None:
    mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(n)
    assert mpu.get_model_parallel_world_size() == n


def model_args(base: argparse.Namespace, cfg: dict, mp: int, save: str | None = None) -> argparse.Namespace:
    args = copy.copy(base)
    for k, v in cfg.items():
        if k != "dtype":
            setattr(args, k, v)
    args.model_parallel_size = mp
    args.save = save
    args.mode = "inference"
    return args


def fill_(model: torch.nn.Module, seed: int) -> None:
    """Deterministic, well-conditioned random values for every tensor of the full (mp=1) model,
    in sorted-name order (SAT's computed `inv_freq` buffer is kept as SAT made it)."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    with torch.no_grad():
        for name in sorted(sd):
            t = sd[name]
            if name.endswith("inv_freq"):
                continue
            r = torch.randn(t.shape, generator=g, dtype=torch.float32)
            if t.dim() == 1 and "layernorm" in name and name.endswith("weight"):
                r = 1.0 + 0.1 * r
            elif t.dim() == 1:
                r = 0.1 * r
            elif "embeddings" in name:
                r = 0.1 * r
            else:
                r = r / math.sqrt(t.shape[1])
            t.copy_(r.to(t.dtype))


def build_full(base, name: str) -> torch.nn.Module:
    """The full model at mp=1 with this config's deterministic weights (same on every rank)."""
    cfg = C.full_config(name)
    set_mp(1)
    model = BaseModel(model_args(base, cfg, 1))
    fill_(model, C.SEED + sorted(C.CONFIGS).index(name))
    if cfg["dtype"] == "bfloat16":
        model = model.bfloat16()
    return model.eval()


def make_inputs(name: str) -> list[dict]:
    """Two fixed inputs: a causal mask (SAT's SDPA path) and an arbitrary 0/1 mask with
    non-contiguous positions (SAT's standard_attention path)."""
    cfg = C.full_config(name)
    g = torch.Generator().manual_seed(C.SEED)
    B, L = C.BATCH, C.SEQ
    ids = torch.randint(0, cfg["vocab_size"], (B, L), generator=g)
    pos = torch.arange(L).unsqueeze(0).expand(B, L).contiguous()
    causal = torch.ones(1, 1, L, L).tril()
    ids2 = torch.randint(0, cfg["vocab_size"], (B, L), generator=g)
    pos2 = torch.sort(torch.randperm(cfg["max_sequence_length"], generator=g)[: B * L].view(B, L), dim=1).values
    mask2 = (torch.rand(B, 1, L, L, generator=g) > 0.4).float()
    mask2 = torch.maximum(mask2, torch.eye(L).expand(B, 1, L, L))  # every query sees itself
    return [dict(input_ids=ids, position_ids=pos, attention_mask=causal),
            dict(input_ids=ids2, position_ids=pos2, attention_mask=mask2)]


def forward(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**x)[0].detach().clone() for x in inputs]


def gather_sd(model, n: int) -> list[dict] | None:
    """State dicts of mp ranks 0..n-1 (global ranks 0..n-1), on rank 0."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, sd)
    return out[:n]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--only", nargs="*", default=None)
    a = p.parse_args()
    # SAT's own entry point (ENVIRONMENT.md section 5): inference mode, gloo, model parallel 2.
    base = get_args(["--mode", "inference", "--distributed-backend", "gloo", "--model-parallel-size", "2"])
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    assert world == max(C.TP_SIZES), f"run with --nproc_per_node={max(C.TP_SIZES)}"
    torch.set_num_threads(1)
    timings = {}
    names = a.only or list(C.CONFIGS)
    for name in names:
        t = time.perf_counter()
        cfg = C.full_config(name)
        out_dir = os.path.join(a.out, name)
        inputs = make_inputs(name)
        expected = {"config": cfg, "split": {}, "logits": {}, "inputs": inputs}

        # mp=1: the full model; SAT's save_checkpoint (rank 0 writes), SAT's mp=1 logits.
        full = build_full(base, name)
        expected["split"][1] = [{k: v.detach().clone() for k, v in full.state_dict().items()}]
        if C.has_forward(name) and rank == 0:
            expected["logits"][1] = forward(full, inputs)
        save_checkpoint(ITERATION, full, None, None, model_args(base, cfg, 1, os.path.join(out_dir, "mp1")))

        for n in C.TP_SIZES[1:]:
            if not C.allowed_tp(name, n):
                continue
            model = build_full(base, name)
            mp_split_model(model, n)  # SAT's own split, in place, this rank's part
            model.eval()
            # A model built natively at mp=n must have the same keys and shapes.
            native = BaseModel(model_args(base, cfg, n))
            got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            want = {k: tuple(v.shape) for k, v in native.state_dict().items()}
            assert got == want, (name, n, got, want)
            del native
            if C.has_forward(name):
                logits = forward(model, inputs)  # all ranks: collectives inside each mp group
                if rank == 0:
                    expected["logits"][n] = logits
            expected["split"][n] = gather_sd(model, n)
            if n == 2:  # SAT's save_checkpoint at model parallel 2: global ranks 0, 1 write
                save_checkpoint(ITERATION, model, None, None, model_args(base, cfg, 2, os.path.join(out_dir, "mp2")))
            del model
        if rank == 0:
            torch.save(expected, os.path.join(out_dir, "expected.pt"))
        timings[name] = round(time.perf_counter() - t, 2)
        log(f"{name}: {timings[name]} s, tp {sorted(expected['split'])}")
    torch.distributed.barrier()
    if rank == 0:
        manifest = {
            "sat_version": sat.__version__, "torch_version": torch.__version__,
            "triton_interpret": os.environ.get("TRITON_INTERPRET"), "world_size": world,
            "iteration": ITERATION, "import_seconds": round(IMPORT_S, 2), "config_seconds": timings,
            "configs": {n: C.full_config(n) for n in names},
            "tps": {n: sorted(C.tps(n)) for n in names},
        }
        with open(os.path.join(a.out, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
