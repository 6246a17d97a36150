"""Benchmark: a LoRA on a real-size DiT — a fresh load with the adapter against `set_loras` switches, in one run.

    .venv/bin/python bench/lora_bench.py [--transformer /tmp/sat_dist_replicas/CogVideoX-5b/transformer]
                                         [--tp 2] [--rank 128]

The transformer is a header-exact release replica (`make replicas`: CogVideoX-5b's 42 layers, bf16, data
sparse) and the adapters two PEFT files of its shape (to_q, to_k, to_v, to_out.0 of every block, rank
`--rank`, bf16, random), written here. On `--tp` forked gloo ranks: the base loaded alone, then loaded
with adapter A (`load_model(lora=...)`), then `set_loras` A -> B -> none -> A on that model. Per step:
seconds (rank 0, from a barrier), bytes read per rank, and that as a fraction of the load's — a switch
reads only the rows of the tensors the adapters touch (here every layer's fused QKV and dense: 4/12 of a
layer's weights) plus the adapters' rank parts. Digests: after the last switch equal to the load with A.
A measurement, not a test (the replica's data are holes: the seconds are page-cache and CPU time).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import sat_dist
from sat_dist.report import state_dict_digest
from sat_dist.testing.dist import run_ranks, values

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def write_lora(path: str, layers: int, dim: int, rank: int, seed: int) -> int:
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(layers):
        for m in TARGETS:
            key = f"transformer.transformer_blocks.{i}.attn1.{m}"
            t[f"{key}.lora_A.weight"] = (torch.randn(rank, dim, generator=g) * 0.01).bfloat16()
            t[f"{key}.lora_B.weight"] = (torch.randn(dim, rank, generator=g) * 0.01).bfloat16()
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"transformer.r": rank,
                                                                 "transformer.lora_alpha": rank})}
    save_file(t, path, metadata=meta)
    return os.path.getsize(path)


def _timed(fn):
    if dist.is_initialized():  # (the first load forms the group)
        dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    dist.barrier()
    return out, round(time.perf_counter() - t0, 3)


def job(rank: int, root: str, tp: int, a: str, b: str) -> dict:
    rows = []
    base, s = _timed(lambda: sat_dist.load_model(root, tp=tp, return_report=True))
    rows.append(("load", s, base[1].ranks[rank].bytes_read))
    del base
    (m, rep), s = _timed(lambda: sat_dist.load_model(root, tp=tp, lora=[a], return_report=True))
    rows.append(("load + A", s, rep.ranks[rank].bytes_read))
    first = state_dict_digest(m.state_dict())
    for name, loras in (("set_loras B", [b]), ("set_loras none", []), ("set_loras A", [a])):
        st, s = _timed(lambda: sat_dist.set_loras(m, loras))
        rows.append((name, s, st.bytes_read))
    same = state_dict_digest(m.state_dict()) == first
    sat_dist.shutdown()
    return {"rows": rows, "same": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transformer", default="/tmp/sat_dist_replicas/CogVideoX-5b/transformer")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--rank", type=int, default=128)
    args = ap.parse_args()
    with open(os.path.join(args.transformer, "config.json")) as f:
        cfg = json.load(f)
    dim, layers = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["num_layers"]
    with tempfile.TemporaryDirectory() as tmp:
        a, b = os.path.join(tmp, "a.safetensors"), os.path.join(tmp, "b.safetensors")
        size = write_lora(a, layers, dim, args.rank, 1)
        write_lora(b, layers, dim, args.rank, 2)
        got = values(run_ranks(args.tp, job, args.transformer, args.tp, a, b, timeout=1800))
    print(f"{args.transformer}: {layers} layers, dim {dim}; LoRA rank {args.rank}, {size / 2**20:.1f} MiB per "
          f"file; TP {args.tp}")
    print(f"{'step':<16} {'seconds':>8} {'MiB read/rank':>14} {'of the load':>12}")
    load = got[0]["rows"][0][2]
    for name, s, n in got[0]["rows"]:
        print(f"{name:<16} {s:>8.2f} {n / 2**20:>14.1f} {n / load:>12.3f}")
    print(f"after A -> B -> none -> A the weights equal the load with A: {all(g['same'] for g in got)}")


if __name__ == "__main__":
    main()
