"""Header-exact, real-size replicas of the CogVideoX release components, as sparse files.

    python -m sat_dist.testing.replica OUT --component CogVideoX-5b [--layout diffusers|sat|both] [--fill zeros|random]
    python -m sat_dist.testing.replica OUT --component all --layout both          # `make replicas`

Every file is what the release's own writer puts on disk — the same names, shapes, dtypes, shard
cuts, headers and zip records — except that the tensor data is a hole (`--fill zeros`, the default:
the header or zip structure is written, then the file is extended past the data with `truncate` /
a seek, so a 10 GiB file takes a few KiB of disk and reads as zeros) or real random bytes (`--fill
random`, for timing real I/O). Nothing is materialised: names, shapes and dtypes come from the real
model classes built on the meta device, and the torch zip's tensors are never-touched allocations.

Components (`COMPONENTS`) and where each is written under OUT:

- the five DiTs (`RELEASES`), diffusers layout: `OUT/transformer/config.json` + safetensors shards of
  at most 5 GB named as the releases (`diffusion_pytorch_model-0000K-of-0000N.safetensors` +
  `diffusion_pytorch_model.safetensors.index.json`; one `diffusion_pytorch_model.safetensors` when
  it fits), from `CogVideoXTransformer3DModel(**kwargs)` on meta;
- the same DiTs, SAT layout: `OUT/transformer/latest` -> `1000/mp_rank_00_model_states.pt`, a real
  torch zip (`torch.save` under `torch.serialization.skip_data`: torch's own writer, zip64 once past
  4 GiB) holding `{'module': OrderedDict(name -> tensor)}` under SAT's names (`model.diffusion_model.`
  + the project's SAT DiT built on meta from configs/*.yaml), without the tensors the releases lack
  (the specs with `if_absent`: 2B's sincos table, the v1.0 RoPE tables, the unused
  `transformer.position_embeddings`; see sat_dist/models/cogvideox/model.py);
- `t5-v1_1-xxl`: `OUT/text_encoder/` (config.json + `model-0000K-of-0000N.safetensors` +
  `model.safetensors.index.json`), `T5EncoderModel(T5Config(...))` on meta, encoder only, with
  `encoder.embed_tokens.weight` left out as save_pretrained does (it is tied to `shared.weight`);
- `vae`: `OUT/vae/config.json` + `diffusion_pytorch_model.safetensors`, `AutoencoderKLCogVideoX` on meta.

The files are written by replica_files.py, which says how and why they are exact (checked byte for
byte against safetensors and torch.save by tests/test_replicas.py). Release values (`RELEASES`,
`T5_CONFIG`, `VAE_CONFIG`) and their sources are given beside them. Shares nothing with the
library's writers on purpose: it mirrors diffusers / transformers / torch.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .replica_files import Entry, Filler, nbytes, write_sharded, write_torch_zip

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs")
SAT_ITERATION = "1000"  # CogVideo sat/README.md: transformer/1000/mp_rank_00_model_states.pt + latest
MANIFEST = "replica.json"

# --- the releases ---------------------------------------------------------------------------------
# CogVideoXTransformer3DModel kwargs of each release: huggingface/diffusers
# scripts/convert_cogvideox_to_diffusers.py (the script the releases were converted with; commits
# 2dad462 "Add CogVideoX" (2B), 960c149 (5B), 8336405 "CogVideoX-5b-I2V support", 3b28306 "CogVideoX
# 1.5"): `convert_transformer` passes in_channels=32 if i2v else 16, num_layers, num_attention_heads,
# use_rotary_positional_embeddings, ofs_embed_dim=512 for 1.5-I2V, use_learned_positional_embeddings
# for 1.0-I2V, plus `get_transformer_init_kwargs(version)`: 1.0 patch_size 2, patch_size_t None,
# patch_bias True, sample 60x90, 49 frames; 1.5 patch_size 2, patch_size_t 2, patch_bias False,
# sample 300x300, 81 frames. Everything else is the class default (attention_head_dim 64,
# time_embed_dim 512, text_embed_dim 4096, max_text_seq_length 226, norm_eps 1e-5, ...). The layer and
# head counts are the script's comments ("For CogVideoX-2B, num_layers is 30. For 5B, it is 42";
# heads 30 / 48; RoPE False for 2B, True for 5B) and agree with configs/*.yaml (CogVideo's SAT YAMLs:
# num_layers, num_attention_heads, patch_size, in_channels, latent 60x90 / 300x300, num_frames 49 / 81,
# Basic3D vs Rotary3D, learnable_pos_embed for 5B-I2V, ofs_embed_dim 512 for 1.5-I2V) and FORMATS.md §6.
# dtype: the SAT YAMLs' args.fp16 (2B) / args.bf16 (others), the script's --fp16/--bf16 (the DiT is
# cast, "the model must be run in fp16 (2B) or bf16 (5B)"); README: "Released weights are fp16 / bf16".
_V10 = dict(patch_size=2, patch_size_t=None, patch_bias=True, sample_height=60, sample_width=90, sample_frames=49)
_V15 = dict(patch_size=2, patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300, sample_frames=81)


@dataclass(frozen=True)
class Release:
    name: str  # the Hugging Face repository name (THUDM/<name>)
    kwargs: dict  # CogVideoXTransformer3DModel(**kwargs)
    dtype: torch.dtype
    yaml: str  # configs/<yaml>: CogVideo's SAT YAML of the same DiT

    @property
    def config_path(self) -> str:
        return os.path.join(CONFIGS, self.yaml)


RELEASES: dict[str, Release] = {r.name: r for r in (
    Release("CogVideoX-2b", dict(num_layers=30, num_attention_heads=30, in_channels=16,
                                 use_rotary_positional_embeddings=False, **_V10), torch.float16, "cogvideox_2b.yaml"),
    Release("CogVideoX-5b", dict(num_layers=42, num_attention_heads=48, in_channels=16,
                                 use_rotary_positional_embeddings=True, **_V10), torch.bfloat16, "cogvideox_5b.yaml"),
    Release("CogVideoX-5b-I2V", dict(num_layers=42, num_attention_heads=48, in_channels=32,
                                     use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True,
                                     **_V10), torch.bfloat16, "cogvideox_5b_i2v.yaml"),
    Release("CogVideoX1.5-5B", dict(num_layers=42, num_attention_heads=48, in_channels=16,
                                    use_rotary_positional_embeddings=True, **_V15), torch.bfloat16,
            "cogvideox1.5_5b.yaml"),
    Release("CogVideoX1.5-5B-I2V", dict(num_layers=42, num_attention_heads=48, in_channels=32, ofs_embed_dim=512,
                                        use_rotary_positional_embeddings=True, **_V15), torch.bfloat16,
            "cogvideox1.5_5b_i2v.yaml"),
)}

# text_encoder/config.json: google/t5-v1_1-xxl's config.json as transformers 4.x saved it into the
# releases (convert script: `T5EncoderModel.from_pretrained("google/t5-v1_1-xxl")`; the same fields
# tests/test_t5.py XXL holds and sat_dist/engine/capacity.py T5_XXL uses). dtype: the script's
# `--typecast_text_encoder` casts it to the DiT's dtype; bf16 here (the 5B releases: their first
# text_encoder shard is 4,994,582,224 bytes, which only a 16-bit encoder cut at 5 GB gives — see
# tests/test_replicas.py RELEASE_FILE_SIZES); `--dtype fp16` for the 2B release's.
T5_CONFIG = {
    "_name_or_path": "google/t5-v1_1-xxl", "architectures": ["T5EncoderModel"], "classifier_dropout": 0.0,
    "d_ff": 10240, "d_kv": 64, "d_model": 4096, "decoder_start_token_id": 0, "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
    "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
    "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24, "output_past": True, "pad_token_id": 0,
    "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.41.0.dev0", "use_cache": True, "vocab_size": 32128,
}
T5_TIED = "encoder.embed_tokens.weight"  # transformers modeling_t5 _tied_weights_keys: save_pretrained drops it
# vae/: AutoencoderKLCogVideoX(scaling_factor=0.7) (convert script `convert_vae`: scaling_factor
# 1.15258426 for 2B, 0.7 for 5B; 1.5 adds invert_scale_latents=True), all else the class defaults; kept
# in fp32 ("Keep VAE in float32 for better quality"): the 5B-I2V release's file is 862,388,596 bytes,
# which is this fp32 file exactly (tests/test_replicas.py RELEASE_FILE_SIZES).
VAE_CONFIG = {"scaling_factor": 0.7}
VAE_DTYPE = torch.float32
OTHER = ("t5-v1_1-xxl", "vae")
COMPONENTS = (*RELEASES, *OTHER)
SUBFOLDER = {"t5-v1_1-xxl": "text_encoder", "vae": "vae"}  # DiTs: "transformer"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# --- the components' tensors ---------------------------------------------------------------------

def _quiet() -> None:
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _entries(state: dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> list[Entry]:
    """(name, shape, dtype) in state-dict order; floating tensors cast to `dtype` (as `.to(dtype)`)."""
    return [(k, tuple(v.shape), dtype if dtype is not None and v.is_floating_point() else v.dtype)
            for k, v in state.items()]


def dit_model(name: str):
    """The release's CogVideoXTransformer3DModel on the meta device."""
    from diffusers import CogVideoXTransformer3DModel

    _quiet()
    with torch.device("meta"):
        return CogVideoXTransformer3DModel(**RELEASES[name].kwargs)


def dit_entries(name: str, dtype: Optional[torch.dtype] = None) -> list[Entry]:
    """The diffusers transformer's state dict as the release stores it (in its dtype)."""
    return _entries(dit_model(name).state_dict(), dtype or RELEASES[name].dtype)


def t5_model():
    from transformers import T5Config, T5EncoderModel

    _quiet()
    with torch.device("meta"):
        return T5EncoderModel(T5Config(**{k: v for k, v in T5_CONFIG.items() if not k.startswith("_")}))


def t5_entries(dtype: torch.dtype = torch.bfloat16) -> list[Entry]:
    """T5-XXL encoder, tied `encoder.embed_tokens.weight` left out as save_pretrained does."""
    return [e for e in _entries(t5_model().state_dict(), dtype) if e[0] != T5_TIED]


def vae_model():
    from diffusers import AutoencoderKLCogVideoX

    _quiet()
    with torch.device("meta"):
        return AutoencoderKLCogVideoX(**VAE_CONFIG)


def vae_entries(dtype: torch.dtype = VAE_DTYPE) -> list[Entry]:
    return _entries(vae_model().state_dict(), dtype)


def sat_dit(name: str):
    """(the project's SAT DiT on meta from configs/<yaml>, its specs, the YAML's dtype) — built as
    `sat-dist plan --config` builds it (config.resolve + models.build_meta_model)."""
    from sat_dist.config import resolve
    from sat_dist.models import TPInfo, build_meta_model, collect_specs

    cfg = resolve(None, [RELEASES[name].config_path])
    model = build_meta_model(cfg.model, TPInfo(1, 0, None))
    return model, collect_specs(model), cfg.torch_dtype or torch.float32


def sat_entries(name: str, dtype: Optional[torch.dtype] = None) -> list[Entry]:
    """`model.diffusion_model.<SAT name>` for every tensor the released SAT files hold (all state-dict
    entries but those the model fills itself when absent), full shapes, the YAML's dtype."""
    model, specs, yaml_dtype = sat_dit(name)
    prefix = model.checkpoint_prefix
    return [(prefix + n, tuple(s.global_shape), dtype or yaml_dtype) for n, s in specs.items() if not s.if_absent]


# --- writing a component -------------------------------------------------------------------------

@dataclass
class Written:
    """What one replica holds (also OUT/replica.json)."""

    component: str
    layout: str
    fill: str
    dtype: str
    out: str
    root: str  # what to load / inspect: OUT/transformer, OUT/text_encoder, OUT/vae/<file>
    files: dict[str, int] = field(default_factory=dict)  # path relative to out -> bytes
    tensors: int = 0
    data_bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def line(self) -> str:
        big = sum(self.files.values())
        return (f"{self.component:<20} {self.layout:<9} {self.tensors:>5} tensors  {self.data_bytes / 2**30:7.2f} GiB "
                f"{self.dtype:<4}  {len(self.files)} files {big / 1e9:6.2f} GB  {self.seconds:5.2f} s  {self.root}")


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _prepare(out: str, sub: str) -> str:
    """OUT/<sub>, emptied when a previous replica wrote it (OUT/replica.json), refused otherwise."""
    folder = os.path.join(out, sub)
    if os.path.exists(folder) and os.listdir(folder):
        if not os.path.isfile(os.path.join(out, MANIFEST)):
            raise ValueError(f"{folder} exists and holds files no replica wrote ({MANIFEST} missing in {out}); "
                             f"pick an empty OUT")
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)
    return folder


def write_component(out: str, component: str, layout: str = "diffusers", fill: str = "zeros",
                    dtype: Optional[torch.dtype] = None, seed: int = 0) -> Written:
    """Write one component's replica under `out` (see the module docstring); ValueError for an
    unknown component, a layout it does not ship in, or an `out` holding files no replica wrote."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; one of {', '.join(COMPONENTS)}")
    if layout == "sat" and component not in RELEASES:
        raise ValueError(f"--layout sat is the SAT release layout of the DiTs ({', '.join(RELEASES)}); "
                         f"{component} ships in the diffusers/HF layout only")
    t0 = time.perf_counter()
    filler = Filler(fill, seed)
    os.makedirs(out, exist_ok=True)
    if component in RELEASES:
        entries = (sat_entries if layout == "sat" else dit_entries)(component, dtype)
        folder = _prepare(out, "transformer")
    elif component == "t5-v1_1-xxl":
        entries = t5_entries(dtype or torch.bfloat16)
        folder = _prepare(out, SUBFOLDER[component])
    else:
        entries = vae_entries(dtype or VAE_DTYPE)
        folder = _prepare(out, SUBFOLDER[component])
    dts = {e[2] for e in entries if e[2].is_floating_point}
    w = Written(component, layout, fill, "+".join(sorted(_dtype_name(d) for d in dts)), out, folder,
                tensors=len(entries), data_bytes=sum(nbytes(e) for e in entries))
    if component in RELEASES and layout == "sat":
        it = os.path.join(folder, SAT_ITERATION)
        os.makedirs(it)
        path = os.path.join(it, "mp_rank_00_model_states.pt")

        def obj_of(empty):
            return {"module": collections.OrderedDict((n, empty(s, d)) for n, s, d in entries)}

        write_torch_zip(path, obj_of, filler)
        with open(os.path.join(folder, "latest"), "w") as f:
            f.write(SAT_ITERATION)
        rels = [os.path.join(SAT_ITERATION, "mp_rank_00_model_states.pt"), "latest"]
    elif component in RELEASES:
        dit_model(component).save_config(folder)
        rels = write_sharded(folder, "diffusion_pytorch_model{suffix}.safetensors",
                             "diffusion_pytorch_model.safetensors.index.json", entries, filler) + ["config.json"]
    elif component == "t5-v1_1-xxl":
        rels = write_sharded(folder, "model{suffix}.safetensors", "model.safetensors.index.json", entries, filler)
        cfg = {**T5_CONFIG, "torch_dtype": {torch.float32: "float32", torch.float16: "float16",
                                            torch.bfloat16: "bfloat16"}[dtype or torch.bfloat16]}
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        rels.append("config.json")
    else:
        vae_model().save_config(folder)
        rels = write_sharded(folder, "diffusion_pytorch_model{suffix}.safetensors",
                             "diffusion_pytorch_model.safetensors.index.json", entries, filler) + ["config.json"]
        w.root = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    sub = os.path.relpath(folder, out)
    w.files = {os.path.join(sub, r): os.path.getsize(os.path.join(folder, r)) for r in rels}
    w.seconds = round(time.perf_counter() - t0, 3)
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(w.to_dict(), f, indent=2)
    return w


def targets(out: str, components: Sequence[str], layouts: Sequence[str]) -> list[tuple[str, str, str]]:
    """(folder, component, layout) to write: one component and layout -> OUT itself; several ->
    OUT/<component> (diffusers/HF layout) and OUT/<component>-sat (SAT layout)."""
    todo = [(c, l) for c in components for l in layouts if l == "diffusers" or c in RELEASES]
    if len(todo) == 1:
        return [(out, *todo[0])]
    return [(os.path.join(out, c + ("-sat" if l == "sat" else "")), c, l) for c, l in todo]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sat_dist.testing.replica", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output folder (several components: one subfolder each)")
    ap.add_argument("--component", nargs="+", required=True, metavar="NAME",
                    help=f"{', '.join(COMPONENTS)}, or all")
    ap.add_argument("--layout", choices=["diffusers", "sat", "both"], default="diffusers",
                    help="diffusers/HF release layout (default), CogVideo's SAT layout (DiTs only), or both")
    ap.add_argument("--fill", choices=["zeros", "random"], default="zeros",
                    help="zeros: sparse holes, no disk (default); random: real random bytes, for timing real I/O")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="override the release's dtype (DiTs fp16/bf16, T5 bf16, VAE fp32)")
    ap.add_argument("--seed", type=int, default=0, help="random fill seed")
    args = ap.parse_args(argv)
    lookup = {c.lower(): c for c in COMPONENTS}
    names = list(COMPONENTS) if "all" in args.component else []
    for c in args.component:
        if c != "all":
            if c.lower() not in lookup:
                ap.error(f"unknown component {c!r}; one of {', '.join(COMPONENTS)}, or all")
            names.append(lookup[c.lower()])
    layouts = ["diffusers", "sat"] if args.layout == "both" else [args.layout]
    todo = targets(args.out, list(dict.fromkeys(names)), layouts)
    if not todo:
        ap.error(f"--layout sat is for the DiTs only ({', '.join(RELEASES)})")
    t0 = time.perf_counter()
    total = 0
    for folder, component, layout in todo:
        try:
            w = write_component(folder, component, layout, args.fill, DTYPES.get(args.dtype), args.seed)
        except ValueError as exc:
            ap.error(str(exc))
        total += sum(w.files.values())
        print(w.line(), flush=True)
    print(f"{len(todo)} replica(s), {total / 1e9:.2f} GB apparent, in {time.perf_counter() - t0:.1f} s "
          f"({args.fill} fill) under {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
