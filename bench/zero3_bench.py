"""ZeRO-3 (dp=4) checkpoint of a >=500M-parameter SAT-shaped model, loaded at TP=4 by sat_dist,
against DeepSpeed's `zero_to_fp32` + a full load, side by side in one run.

    python bench/zero3_bench.py [--workdir /tmp/sat_dist_zero3_bench] [--cold]

1. Once (cached in --workdir): the checkpoint files, in DeepSpeed 0.19.8's exact ZeRO-3 layout
   (bf16 run, dp=4: `bf16_zero_pp_rank_R_mp_rank_00_optim_states.pt` with fp32 partitions AND the
   Adam moments, `zero_pp_rank_R_mp_rank_00_model_states.pt` with placeholders), written by
   sat_dist/testing/zero3_writer.py. Real DeepSpeed training of this model at dp=4 on this 24 GiB / 2-core
   machine reached ~18 GiB RSS before the optimizer step and was stopped; the writer mirrors
   DeepSpeed's partitioning and pickles and is checked against real DeepSpeed fixtures by
   tests/test_deepspeed_writer.py (same files, partitions, pickles, zero_to_fp32 output).
2. sat_dist: `torchrun --nproc_per_node 4`, each rank `sat_dist.load_model(ckpt, tp=4)` (default
   dtype: bf16, as the run was bf16). Per rank: bytes the loader read (its report), bytes the
   process read through read()/pread() syscalls during the load (/proc/self/io rchar: includes
   every pickle header and lazily imported modules), bytes fetched from disk (read_bytes;
   meaningful with --cold), peak RSS, seconds.
3. Baseline, one process: `get_fp32_state_dict_from_zero_checkpoint(ckpt)` (DeepSpeed's own code,
   what `zero_to_fp32.py` does) and then the full load DeepSpeed users do next: build the TP=1
   model and `load_state_dict` (cast to bf16). It mmaps the optim files, so rchar misses its
   reads; read_bytes (with --cold) and the fp32 bytes it must touch are reported instead.
4. Both loads are checked to agree: every sat_dist rank's state-dict digest equals the digest of
   the baseline's full state dict split 4 ways by SAT's rule (split here independently).

--cold drops the page cache (root only, `echo 3 > /proc/sys/vm/drop_caches`) before each
measured load, so read_bytes counts real disk reads.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# SAT BaseModel shape: 16 layers x hidden 1536 (16 heads), vocab 32000 (TP-split), 1024 positions:
# 503.9M parameters.
MODEL = dict(model_class="BaseModel", num_layers=16, hidden_size=1536, num_attention_heads=16, vocab_size=32000,
             max_sequence_length=1024)
DP = TP = 4
TAG = "global_step1"


def _io() -> dict:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k.strip()] = int(v)
    return out


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# --- 1. the checkpoint, in DeepSpeed's exact ZeRO-3 layout (sat_dist/testing/zero3_writer.py) ----------

def ds_config() -> dict:
    """The config such a run would use (recorded in the files; bf16 gives the `bf16_` prefix)."""
    return {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}},
        "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}, "steps_per_print": 10 ** 9,
    }


def write_checkpoint(out: str) -> None:
    """Deterministic weights (normal(0, 0.02), norms near 1), one param at a time."""
    import torch
    from collections import OrderedDict

    from sat_dist.testing.zero3_writer import Zero3Spec, write_zero3_checkpoint
    from sat_dist.config import build_model_config
    from sat_dist.models import TPInfo, build_meta_model

    t0 = time.perf_counter()
    model = build_meta_model(build_model_config(dict(MODEL)), TPInfo())
    shapes = OrderedDict((n, tuple(p.shape)) for n, p in model.named_parameters())
    index = {n: i for i, n in enumerate(shapes)}
    hp = {k: v for k, v in torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4).state_dict()
          ["param_groups"][0].items() if k != "params"}
    spec = Zero3Spec(param_shapes=shapes, groups=[list(shapes)], module_order=list(model.state_dict()), dp=DP,
                     bf16=True, ds_config=ds_config(), param_group_hparams=[hp], global_samples=DP)

    def value(name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(index[name])
        t = torch.randn(shapes[name], generator=g) * 0.02
        return t + 1.0 if "layernorm" in name and name.endswith("weight") else t

    write_zero3_checkpoint(os.path.join(out, "ckpt"), TAG, spec, value)
    with open(os.path.join(out, "ckpt", "model_config.json"), "w") as f:
        json.dump({**MODEL, "model_parallel_size": 1}, f)
    print(json.dumps({"write_seconds": round(time.perf_counter() - t0, 1)}), flush=True)


# --- 2. sat_dist at TP=4 (runs on each torchrun rank) -------------------------------------------

def sat_dist_rank(ckpt: str, out: str) -> None:
    import sat_dist
    from sat_dist.report import state_dict_digest

    io0, t0 = _io(), time.perf_counter()  # after the imports: the load itself (incl. process group)
    model, rep = sat_dist.load_model(ckpt, tp=TP, return_report=True)
    seconds = time.perf_counter() - t0
    io1 = _io()
    import torch.distributed as dist

    rank = dist.get_rank()
    me = rep.ranks[rank]
    result = {"rank": rank, "seconds": round(seconds, 2), "bytes_read": me.bytes_read,
              "bytes_needed": me.bytes_needed, "rchar": io1["rchar"] - io0["rchar"],
              "read_bytes": io1["read_bytes"] - io0["read_bytes"], "peak_rss": _peak_rss(),
              "local_params": sum(t.numel() for t in model.state_dict().values()),
              "digest": state_dict_digest(model.state_dict()), "deepspeed_imported": "deepspeed" in sys.modules}
    with open(os.path.join(out, f"sat_dist_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    sat_dist.shutdown()


# --- 3. baseline: zero_to_fp32 + full load (one process) ----------------------------------------

def _sat_split(name: str, full, n: int, r: int):
    """SAT's TP split (sat/mpu partition()), written here independently of sat_dist's placements."""
    import torch

    if ".attention.query_key_value." in name:
        return torch.cat([b.chunk(n, 0)[r] for b in full.chunk(3, 0)], 0)
    if name.endswith("attention.dense.weight") or name.endswith("mlp.dense_4h_to_h.weight"):
        return full.chunk(n, 1)[r]
    if ".mlp.dense_h_to_4h." in name or name == "transformer.word_embeddings.weight":
        return full.chunk(n, 0)[r]
    return full


def baseline(ckpt: str, out: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from sat_dist.config import build_model_config
    from sat_dist.models import TPInfo
    from sat_dist.models.sat_gpt import SATModel
    from sat_dist.report import state_dict_digest

    io0, t0 = _io(), time.perf_counter()  # after the imports, as for sat_dist
    sd = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag=TAG)
    t_convert = time.perf_counter() - t0
    with torch.device("meta"):
        model = SATModel(build_model_config(dict(MODEL)), TPInfo())
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in sd.items()}, assign=True)
    seconds = time.perf_counter() - t0
    io1 = _io()
    full = model.state_dict()
    digests = [state_dict_digest({k: _sat_split(k, v, TP, r).contiguous() for k, v in full.items()})
               for r in range(TP)]
    result = {"seconds": round(seconds, 2), "convert_seconds": round(t_convert, 2),
              "rchar": io1["rchar"] - io0["rchar"], "read_bytes": io1["read_bytes"] - io0["read_bytes"],
              "peak_rss": _peak_rss(), "fp32_bytes_touched": sum(v.numel() * 4 for v in sd.values()),
              "params": sum(v.numel() for v in sd.values()), "digests": digests}
    with open(os.path.join(out, "baseline.json"), "w") as f:
        json.dump(result, f)


# --- driver -------------------------------------------------------------------------------------

def _torchrun(args: list[str], env: dict) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={DP}", __file__] + args
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/sat_dist_zero3_bench")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each measured load (root)")
    ap.add_argument("--regenerate", action="store_true")
    ap.add_argument("_role", nargs="?", default=None, help=argparse.SUPPRESS)
    ap.add_argument("_arg", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._role == "_write":
        write_checkpoint(args._arg[0])
        return 0
    if args._role == "_sat_dist":
        sat_dist_rank(*args._arg)
        return 0
    if args._role == "_baseline":
        baseline(*args._arg)
        return 0

    work = args.workdir
    ckpt = os.path.join(work, "ckpt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT}
    if args.regenerate and os.path.isdir(ckpt):
        shutil.rmtree(ckpt)
    if not os.path.isfile(os.path.join(ckpt, "latest")):
        os.makedirs(work, exist_ok=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "_write", work], check=True, env=env, cwd=ROOT)
        print(f"checkpoint written in DeepSpeed's ZeRO-3 layout in {time.perf_counter() - t:.0f}s", flush=True)
    results = os.path.join(work, "results")
    shutil.rmtree(results, ignore_errors=True)
    os.makedirs(results)
    files = sorted(os.listdir(os.path.join(ckpt, TAG)))
    sizes = {f: os.path.getsize(os.path.join(ckpt, TAG, f)) for f in files}
    total = sum(sizes.values())

    cold = args.cold and _drop_caches()
    t = time.perf_counter()
    _torchrun(["_sat_dist", ckpt, results], env)
    sat_wall = time.perf_counter() - t
    ranks = [json.load(open(os.path.join(results, f"sat_dist_rank{r}.json"))) for r in range(TP)]

    cold = (args.cold and _drop_caches()) and cold
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "_baseline", ckpt, results], check=True, env=env, cwd=ROOT)
    base_wall = time.perf_counter() - t
    base = json.load(open(os.path.join(results, "baseline.json")))

    gib = 1 << 30
    print(f"\ncheckpoint: {ckpt}  ({len(files)} files, {total / gib:.2f} GiB; ZeRO-3 dp={DP}, bf16 run, "
          f"{base['params'] / 1e6:.1f}M params){'  [cold page cache]' if cold else ''}")
    for f in files:
        print(f"  {f:48s} {sizes[f] / gib:7.3f} GiB")
    print(f"\n{'':34s}{'bytes read':>12s}{'syscall rchar':>15s}{'disk read':>12s}{'peak RSS':>11s}{'seconds':>9s}")
    for r in ranks:
        print(f"sat_dist TP=4 rank {r['rank']:<15d}{r['bytes_read'] / gib:10.3f}Gi{r['rchar'] / gib:13.3f}Gi"
              f"{r['read_bytes'] / gib:10.3f}Gi{r['peak_rss'] / gib:9.3f}Gi{r['seconds']:9.2f}")
    print(f"{'zero_to_fp32 + full load':34s}{base['fp32_bytes_touched'] / gib:10.3f}Gi{base['rchar'] / gib:13.3f}Gi"
          f"{base['read_bytes'] / gib:10.3f}Gi{base['peak_rss'] / gib:9.3f}Gi{base['seconds']:9.2f}"
          f"   (zero_to_fp32 alone {base['convert_seconds']:.2f}s; bytes read = fp32 it must touch via mmap)")
    worst = max(ranks, key=lambda r: r["bytes_read"])
    worst_rss = max(r["peak_rss"] for r in ranks)
    share = base["fp32_bytes_touched"] / TP
    print(f"\nwall: sat_dist {sat_wall:.1f}s (torchrun, 4 ranks, incl. start-up), "
          f"baseline {base_wall:.1f}s (incl. start-up)")
    print(f"ratios: per-rank bytes read / baseline = {worst['bytes_read'] / base['fp32_bytes_touched']:.3f}; "
          f"per-rank bytes read / (fp32 weights / 4) = {worst['bytes_read'] / share:.3f}; "
          f"per-rank bytes read / checkpoint size = {worst['bytes_read'] / total:.3f}; "
          f"peak RSS per rank / baseline = {worst_rss / base['peak_rss']:.3f}; "
          f"seconds (slowest rank) / baseline = {max(r['seconds'] for r in ranks) / base['seconds']:.3f}")
    same = all(r["digest"] == d for r, d in zip(ranks, base["digests"]))
    print(f"every sat_dist rank equals the baseline's full weights split by SAT's rule (digest): {same}; "
          f"deepspeed imported by sat_dist ranks: {any(r['deepspeed_imported'] for r in ranks)}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
