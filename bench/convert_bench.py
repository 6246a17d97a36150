"""Benchmark: `sat-dist convert` of a >= 1 GiB SAT checkpoint to safetensors vs the naive conversion.

    .venv/bin/python bench/convert_bench.py [--dir /tmp/sat_dist_bench] [--shard-size 256MB] [--also sat dcp]

Writes (once; the same file as bench/load_bench.py) an mp=1 fp32 SAT checkpoint of a 5-layer,
hidden-2048, vocab-32000 GPT (~1.2 GiB), then runs, each in a fresh subprocess:
  naive     torch.load(file)['module'] + safetensors.torch.save_file (the whole model in memory)
  convert   sat_dist.convert.convert(SRC, DST, "safetensors", shard_size=...) (streaming, shards)
and, with --also, convert to the other formats. Prints seconds, files and bytes written, the peak
RSS of the process (VmHWM) and its growth during the conversion (the high-water mark is reset after
the imports through /proc/self/clear_refs). Page cache warm (the source was just read or written).
Numbers are measurements, not tests.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

MODEL = dict(num_layers=5, hidden_size=2048, num_attention_heads=16, vocab_size=32000, max_sequence_length=2048)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def child(mode: str, src: str, dst: str, shard_size: str) -> None:
    """One measured conversion in this (fresh) process; prints one JSON line."""
    import torch
    import torch.distributed.checkpoint  # noqa: F401  (imported before the measurement, like torch)
    from safetensors.torch import save_file

    from sat_dist.convert import convert

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base, t0 = _status("VmRSS"), time.perf_counter()
    if mode == "naive":
        os.makedirs(dst)
        sd = torch.load(os.path.join(src, "1", "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=True)
        save_file(sd["module"], os.path.join(dst, "model.safetensors"))
        files = 1
    else:
        rep = convert(src, dst, mode, shard_size=shard_size)
        files = len(rep.files)
    seconds = time.perf_counter() - t0
    written = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(dst) for n in ns)
    print(json.dumps({"mode": mode, "seconds": seconds, "files": files, "written": written,
                      "peak_rss": _status("VmHWM"), "growth": _status("VmHWM") - base}))


def ensure_checkpoint(root: str) -> str:
    from sat_dist.models import TPInfo, build_meta_model, collect_specs
    from sat_dist.models.sat_gpt import TransformerConfig
    from sat_dist.writer import model_config_dict, random_state_dict, save_sat_checkpoint

    cfg = TransformerConfig(**MODEL)
    path = os.path.join(root, f"h{MODEL['hidden_size']}_l{MODEL['num_layers']}_v{MODEL['vocab_size']}")
    if not os.path.isfile(os.path.join(path, "latest")):
        t = time.perf_counter()
        specs = collect_specs(build_meta_model(cfg, TPInfo()))
        save_sat_checkpoint(path, random_state_dict(specs), specs, 1, "1", model_config_dict(cfg))
        print(f"wrote {path} in {time.perf_counter() - t:.1f}s")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/sat_dist_bench")
    ap.add_argument("--shard-size", default="256MB")
    ap.add_argument("--also", nargs="*", default=[], choices=["sat", "dcp"], help="also convert to these formats")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "SRC", "DST", "SHARD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    src = ensure_checkpoint(args.dir)
    size = os.path.getsize(os.path.join(src, "1", "mp_rank_00_model_states.pt"))
    print(f"source: {src} ({size / 2**30:.2f} GiB, mp=1 fp32), {os.cpu_count()} cores, page cache warm")
    mib = 2**20
    print(f"{'conversion':<26} {'sec':>6} {'files':>5} {'written MiB':>11} {'peak RSS MiB':>12} {'RSS growth MiB':>14}")
    for mode in ("naive", "safetensors", *args.also):
        dst = os.path.join(args.dir, f"out_{mode}")
        shutil.rmtree(dst, ignore_errors=True)
        proc = subprocess.run([sys.executable, __file__, "--child", mode, src, dst, args.shard_size],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        label = {"naive": "naive (load + save)", "safetensors": f"convert safetensors {args.shard_size}"}.get(
            mode, f"convert {mode}")
        print(f"{label:<26} {r['seconds']:>6.2f} {r['files']:>5} {r['written'] / mib:>11.0f} "
              f"{r['peak_rss'] / mib:>12.0f} {r['growth'] / mib:>14.0f}")
        shutil.rmtree(dst, ignore_errors=True)


if __name__ == "__main__":
    main()
