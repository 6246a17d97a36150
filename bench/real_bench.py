"""`make bench-real`: the release replicas (`make replicas`) loaded at real size, as a user meets them.

For each component and TP size (as this machine's memory allows, one rank per TP rank), `sat-dist bench`
runs the storage limit and sat_dist side by side in fresh processes (rounds interleaved) and this prints
one row: per-rank bytes read against the read plan's bytes (must be equal), peak RSS against the
rank's tensors (must be within +300 MiB), seconds against the limit, and the rendezvous on its own.
Sparse replicas (the default) read holes: bytes and memory are exact, time is not I/O; for timing,
write filled replicas (`make replicas REPLICA_ARGS="--fill random"`) and pass --cold.

    .venv/bin/python bench/real_bench.py /tmp/sat_dist_replicas [--cold] [--repeat 3] [--only t5-v1_1-xxl]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Optional

from sat_dist.bench import run_bench
from sat_dist.bench.methods import prepare

MIB, GIB = 1 << 20, 1 << 30
RSS_SLACK = 300 * MIB
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (folder under the replicas' root, TP sizes, CogVideo's YAML for a SAT-layout DiT, which carries no config):
# 24 GiB holds TP x (shard + page cache) for these
CASES = [("vae", (1,), None), ("t5-v1_1-xxl", (1, 2, 4), None), ("CogVideoX-5b", (2, 4), None),
         ("CogVideoX-5b-sat", (4,), "cogvideox_5b.yaml"), ("CogVideoX1.5-5B", (4,), None)]


def source(path: str, yaml_name: Optional[str] = None) -> tuple[str, list[str]]:
    """(what to load, config files) of one replica folder: its replica.json's root; a VAE's safetensors
    file with its config.json as the model config, as the engine loads it (engine/layout.vae_model_config)."""
    root = json.load(open(os.path.join(path, "replica.json")))["root"]
    if yaml_name:
        return root, [os.path.join(REPO, "configs", yaml_name)]
    cfg = os.path.join(os.path.dirname(root), "config.json")
    if not root.endswith(".safetensors") or json.load(open(cfg)).get("_class_name") != "AutoencoderKLCogVideoX":
        return root, []
    import yaml

    from sat_dist.engine.layout import vae_model_config

    fd, yml = tempfile.mkstemp(suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump({"model": vae_model_config(os.path.dirname(root))}, f)
    return root, [yml]


def one(path: str, tp: int, cold: bool, repeat: int, yaml_name: Optional[str] = None) -> tuple[str, bool]:
    ckpt, configs = source(path, yaml_name)
    res = run_bench(ckpt, tp, tp, cold, repeat, ["limit", "sat_dist"], configs, log=lambda _: None)
    lim, sat = (next(m for m in res.methods if m.method == name) for name in ("limit", "sat_dist"))
    if sat.skipped or lim.skipped:
        return f"{os.path.basename(path):<22} {tp:>2}  skipped: {sat.skipped or lim.skipped}", not sat.failed
    planned = [prepare(r, ckpt, tp, configs, ())[3].bytes_needed for r in range(tp)]
    last = sat.rounds[-1]
    read = [s["bytes_read"] for s in last]
    over = max(s["peak_rss"] - s["bytes_kept"] for s in last)
    ok = read == planned and over <= RSS_SLACK
    row = (f"{os.path.basename(path):<22} {tp:>2} {max(read) / GIB:>9.3f} {max(planned) / GIB:>9.3f} "
           f"{'=' if read == planned else '!='}  {max(s['bytes_kept'] for s in last) / GIB:>8.2f} {over / MIB:>8.0f} "
           f"{lim.seconds():>7.2f} {sat.seconds():>7.2f} {res.ratio(sat):>6.2f} "
           f"{sat.median_max('rendezvous_seconds'):>6.2f}  {'ok' if ok else 'FAIL'}")
    return row, ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="the replicas' folder (make replicas: /tmp/sat_dist_replicas)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every run (filled replicas)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--only", nargs="+", default=None, help="component folders to run")
    args = ap.parse_args(argv)
    print(f"{'component':<22} tp  read GiB  plan GiB    need GiB RSS-need  limit s  sat_dist s  x lim rdzv s"
          f"  ({'cold' if args.cold else 'warm'}, median of {args.repeat}, largest rank)", flush=True)
    good = True
    for name, tps, yaml_name in CASES:
        path = os.path.join(args.root, name)
        if (args.only and name not in args.only) or not os.path.isdir(path):
            continue
        for tp in tps:
            row, ok = one(path, tp, args.cold, args.repeat, yaml_name)
            print(row, flush=True)
            good &= ok
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
