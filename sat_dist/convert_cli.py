"""`sat-dist convert`'s command line: the checkpoint conversions (convert.py) and the LoRA ones
(lora/export.py: `--to diffusers-lora | sat-lora`)."""
from __future__ import annotations

import argparse
import json

from .errors import ConfigError


def add_convert_parser(sub) -> None:
    conv = sub.add_parser("convert", help="convert any checkpoint to sat|safetensors|diffusers|dcp, streaming; "
                                          "under torchrun each rank writes its own part")
    conv.add_argument("src", help="any checkpoint `load` reads (SAT, DeepSpeed, safetensors, diffusers, DCP)")
    conv.add_argument("dst", help="the new output folder (appears complete, or not at all)")
    conv.add_argument("--to", required=True, choices="sat safetensors diffusers dcp diffusers-lora sat-lora".split())
    conv.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]", help="LoRA merged into DST")
    conv.add_argument("--lora-alpha", type=float, default=None, help="SAT LoRAs: LoraMixin's lora_alpha")
    conv.add_argument("--base", default=None, help="--to sat-lora: the base checkpoint folder the LoRA is for")
    conv.add_argument("--tp", type=int, default=None, help="model-parallel size of a SAT output (default 1)")
    conv.add_argument("--shard-size", default="5GB", help="largest safetensors/diffusers file (default 5GB)")
    conv.add_argument("--dtype", default=None, help="cast to fp32|fp16|bf16 (default: the stored dtype)")
    conv.add_argument("--config", nargs="+", default=[], metavar="YAML", help="model config YAMLs, as for load")
    conv.add_argument("--extra-keys", choices=["drop", "separate"], default="drop",
                      help="tensors outside the model (a fine-tuned CogVideoX's conditioner.*): reported and "
                           "dropped (default), or written to DST/extra/ as safetensors")
    conv.add_argument("--force", action="store_true", help="replace an existing DST (once the new one is complete)")
    conv.add_argument("--tag", default=None, help="iteration folder to read instead of what 'latest' says")
    conv.add_argument("--weights", choices=["auto", "module", "fp32"], default=None, help="DeepSpeed: as for load")
    conv.add_argument("--timeout", type=float, default=None, dest="timeout_s", help="seconds (default 300)")
    conv.add_argument("--json", action="store_true", help="print the report as JSON (rank 0)")
    conv.add_argument("--dry-run", action="store_true",
                      help="plan the conversion (index, names, shapes, the writer's checks) and write nothing")
    conv.set_defaults(overrides=[])


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert
    from .launch import detect_launch

    if args.to in ("diffusers-lora", "sat-lora"):  # a LoRA (small): this process alone, dst a file / folder
        from .launch import rank_and_world
        from .lora.export import export_lora

        if (rank_and_world()[1] or 1) > 1:
            raise ConfigError(f"convert --to {args.to} runs in one process (a LoRA is small): start it without "
                              f"torchrun / srun / mpirun")
        rep = export_lora(args.src, args.dst, args.to, alpha=args.lora_alpha, model_config=args.base or args.config,
                          tag=args.tag, force=args.force)
        return print(rep.summary(), flush=True) or 0
    report = convert(args.src, args.dst, args.to, tp=args.tp, shard_size=args.shard_size, dtype=args.dtype,
                     config=args.config, overrides=args.overrides, extra_keys=args.extra_keys, force=args.force,
                     tag=args.tag, weights=args.weights, timeout_s=args.timeout_s, dry_run=args.dry_run,
                     lora=args.lora, lora_alpha=args.lora_alpha)
    if args.dry_run or detect_launch().rank == 0:
        print(json.dumps(report.to_dict(), indent=2) if args.json else report.table(), flush=True)
    return 0
