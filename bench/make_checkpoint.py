"""Write the benchmark checkpoint (once): an mp=1 fp32 SAT checkpoint of a GPT-style model
(default ~1.2 GiB) and a `.safetensors` file holding the same tensors under the same names, for
`sat-dist bench` (`make bench`).

    .venv/bin/python bench/make_checkpoint.py [--dir /tmp/sat_dist_bench] [--hidden 2048 --layers 5 --vocab 32000]

Prints the two paths (one a line). Weights are deterministic (sat_dist.writer.random_state_dict).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from safetensors.torch import save_file

from sat_dist.models import TPInfo, build_meta_model, collect_specs
from sat_dist.models.sat_gpt import TransformerConfig
from sat_dist.writer import model_config_dict, random_state_dict, save_sat_checkpoint


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The benchmark model's size options, shared by every bench script."""
    ap.add_argument("--dir", default="/tmp/sat_dist_bench")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=32000)


def ensure_sat_checkpoint(args: argparse.Namespace) -> tuple[TransformerConfig, str]:
    """(model, folder) of the mp=1 fp32 SAT checkpoint for `args`, written once."""
    model = TransformerConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=16,
                              vocab_size=args.vocab, max_sequence_length=2048)
    root = os.path.join(args.dir, f"h{args.hidden}_l{args.layers}_v{args.vocab}")
    if not os.path.isfile(os.path.join(root, "latest")):
        t = time.perf_counter()
        specs = collect_specs(build_meta_model(model, TPInfo()))
        save_sat_checkpoint(root, random_state_dict(specs), specs, 1, "1", model_config_dict(model))
        print(f"wrote {root} in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    return model, root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    args = ap.parse_args()
    model, root = ensure_sat_checkpoint(args)
    st_path = os.path.join(root + "_safetensors", "model.safetensors")
    if not os.path.isfile(st_path):
        t = time.perf_counter()
        specs = collect_specs(build_meta_model(model, TPInfo()))
        full = random_state_dict(specs)  # deterministic: the same tensors the SAT file holds
        os.makedirs(os.path.dirname(st_path), exist_ok=True)
        save_file({k: v.contiguous() for k, v in full.items()}, st_path + ".tmp",
                  metadata={"model_config": json.dumps({**model_config_dict(model), "model_parallel_size": 1})})
        os.replace(st_path + ".tmp", st_path)
        print(f"wrote {st_path} in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    print(root)
    print(st_path)


if __name__ == "__main__":
    main()
