"""`sat-dist convert`: any checkpoint a reader recognises -> SAT mp=M, safetensors, diffusers or DCP,
streaming, every rank of the job writing its own part.

One conversion, step by step (the modules of `load`, plus `writers/`):

```
config   the model config from the source (formats.model_config) or --config: config.resolve, as `load`
models   the model on the meta device at TP=1: every tensor's full TensorSpec (SAT's split rules)
formats  the source's CheckpointIndex at TP=1, no tensor byte read; tensors outside the model's key
         prefix (a fine-tuned CogVideoX's `conditioner.*` T5) located as `extras`
writers  the output format lists its files and which rank writes each: pure, the same on every
         rank and for every world size, so 1 rank and N ranks write the same bytes
fetch    per output tensor or shard: make_plan for just those tensors + materialize on the CPU;
         written, fsynced, freed. Peak memory: one tensor (SAT, DCP) or one shard (safetensors,
         diffusers; <= --shard-size) plus the staging budget, never the model
```

Atomic: every rank writes into `DST.tmp-<pid of rank 0>`; once every rank has agreed its part is
written, rank 0 adds the small files (`latest`, index, config), fsyncs the folders and renames it to
DST. A killed convert leaves at most the `.tmp-*` folder, never DST. An existing DST is refused
unless `force` (then replaced only once the new folder is complete). Errors are agreed by the
group (agree.agree_phase): every rank raises the same GroupLoadError, and the temporary folder goes.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import shutil
import sys
import time
from types import SimpleNamespace
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import torch

from . import collectives as C
from . import formats
from .agree import agree_phase
from .config import LoadConfig, resolve
from .errors import CheckpointError, ConfigError
from .formats import dcp as dcp_reader
from .formats import safetensors as st_reader
from .formats import sat as sat_reader
from .formats.base import IndexRequest
from .formats.dcp_metadata import read_metadata
from .formats.safetensors_header import read_header, read_weight_map
from .formats.torchfile import load_structure, locate
from .index import CheckpointIndex, Piece, StoredTensor
from .launch import detect_launch
from .lora import fetch as lora_fetch
from .materialize import materialize
from .models import TPInfo, build_meta_model, check_tp, collect_specs
from .placement import REPLICATED, Replicate, TensorSpec
from .plan import make_plan
from .report import peak_rss_bytes
from .runtime import Runtime
from .writer import model_config_dict
from .writers import writer_for
from .writers.base import Job, Want, Written, parse_size, publish
from .writers.safetensors import write_index, write_shards

CPU = torch.device("cpu")
EXTRA_DIR = "extra"  # --extra-keys separate: tensors outside the model, as safetensors, under DST/extra/


@dataclass
class ConvertReport:
    """What a conversion did (the same object on every rank). `files`: {file, bytes, rank};
    `ranks`: {rank, files, bytes_written, bytes_read, peak_rss_bytes, seconds}; `extra_keys`:
    {count, names, action}; `absent`: model tensors the source lacks (the model computes them)."""

    status: str
    source: str
    source_format: str
    destination: str
    to: str
    tp: int
    world_size: int
    seconds: float
    files: list
    bytes_written: int
    extra_keys: dict
    absent: list
    ranks: list
    tensors: int = 0  # model tensors written (with --dry-run: that would be)
    planned_bytes: int = 0  # their bytes in the output dtypes, before any file overhead

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        mib = 2 ** 20
        if self.status == "dry-run":
            return (f"{self.source} ({self.source_format}) -> {self.destination} ({self.to}"
                    f"{f', mp={self.tp}' if self.to == 'sat' else ''}): {self.tensors} tensors, "
                    f"{self.planned_bytes / mib:.1f} MiB would be written; --dry-run: no tensor read, nothing written"
                    + (f"\n{self.extra_keys['count']} tensors outside the model would be {self.extra_keys['action']}"
                       if self.extra_keys["count"] else ""))
        lines = [f"{self.source} ({self.source_format}) -> {self.destination} ({self.to}"
                 f"{f', mp={self.tp}' if self.to == 'sat' else ''}): {len(self.files)} files, "
                 f"{self.bytes_written / mib:.1f} MiB in {self.seconds:.2f}s",
                 f"{'rank':>4} {'files':>5} {'written MiB':>11} {'read MiB':>9} {'peak RSS MiB':>12} {'sec':>6}"]
        lines += [f"{r['rank']:>4} {len(r['files']):>5} {r['bytes_written'] / mib:11.1f} {r['bytes_read'] / mib:9.1f} "
                  f"{r['peak_rss_bytes'] / mib:12.1f} {r['seconds']:6.2f}" for r in self.ranks]
        x = self.extra_keys
        if x["count"]:
            lines.append(f"{x['count']} tensors outside the model {x['action']}: {x['names'][:8]}"
                         f"{' ...' if x['count'] > 8 else ''}")
        if self.absent:
            lines.append(f"not in the source, computed by the model, not written: {self.absent}")
        return "\n".join(lines)


def convert(src: str, dst: str, to: str, *, tp: Optional[int] = None, shard_size: Union[str, int] = "5GB",
            dtype: Optional[str] = None, config: Union[str, Sequence[str], None] = None,
            overrides: Sequence[str] = (), extra_keys: str = "drop", force: bool = False,
            tag: Optional[str] = None, weights: Optional[str] = None,
            timeout_s: Optional[float] = None, dry_run: bool = False, lora: Sequence = (),
            lora_alpha: Optional[float] = None) -> ConvertReport:
    """Convert `src` into a new folder `dst` in format `to` (sat|safetensors|diffusers|dcp) on every
    rank of the job (torchrun/SLURM/MPI, or one process). `tp`: mp size of a SAT output;
    `shard_size`: largest safetensors shard (`5GB`, `500MiB`, bytes); `dtype`: cast (fp32|fp16|bf16);
    `config`/`overrides`: as `load`; `extra_keys`: drop|separate (tensors outside the model). `dry_run`:
    plan the conversion (the source indexed, every tensor mapped, the writer's checks) in this process
    alone, read no tensor byte, write nothing. `lora`: adapters (PATH[:STRENGTH]) merged into the output (a
    LoraMixin fine-tune source is merged too; `lora_alpha`: its lora_alpha), as a merged load at TP=1."""
    t0 = time.perf_counter()
    writer = writer_for(to)
    if extra_keys not in ("drop", "separate"):
        raise ConfigError(f"--extra-keys must be drop or separate, got {extra_keys!r}")
    files = [config] if isinstance(config, str) else list(config or [])
    cfg = resolve(src, files, overrides, dtype=dtype, tag=tag, timeout_s=timeout_s, weights=weights,
                  lora=list(lora) or None, lora_alpha=lora_alpha)
    out_tp = 1 if tp is None else int(tp)
    if to != "sat" and out_tp != 1:
        raise ConfigError(f"--tp {out_tp} sets the model-parallel size of a SAT output; {to} holds full tensors: drop --tp")
    limit = parse_size(shard_size)
    if dry_run:
        return _dry_run(cfg, writer, os.path.abspath(dst), out_tp, limit, extra_keys, force, t0)
    rt = C.setup(detect_launch(timeout_s=cfg.timeout_s), 1, "cpu", cfg.timeout_s)
    try:
        return _run(rt, cfg, writer, os.path.abspath(dst), out_tp, limit, extra_keys == "separate", force, t0)
    finally:
        C.teardown(rt)


def _dry_run(cfg: LoadConfig, writer, dst: str, tp: int, limit: int, extra_keys: str, force: bool,
             t0: float) -> ConvertReport:
    """What `convert` would write, planned by one process as rank 0 of 1 (no process group)."""
    prep = _prepare(SimpleNamespace(rank=0, world_size=1), cfg, writer, dst, tp, limit, force)
    wants = prep.job.wholes()
    extras = sorted(prep.extras.pieces)
    action = "dropped" if extra_keys == "drop" else f"written to {EXTRA_DIR}/"
    return ConvertReport("dry-run", cfg.checkpoint, prep.source_format, dst, writer.NAME, tp, 1,
                         round(time.perf_counter() - t0, 4), [], 0,
                         {"count": len(extras), "names": extras[:20], "action": action},
                         sorted(prep.index.meta.get("absent", {})), [], len(wants), sum(w.nbytes for w in wants))


# --- planning ---------------------------------------------------------------------------------------

@dataclass
class _Prepared:
    job: Job
    index: CheckpointIndex
    prefer: list
    dtype: Optional[torch.dtype]
    extras: CheckpointIndex
    source_format: str
    lora: Optional[lora_fetch.LoraSetup] = None  # the adapters merged into the output


def _check_paths(src: str, dst: str, force: bool) -> None:
    a, b = os.path.realpath(src), os.path.realpath(dst)
    if a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep):
        raise ConfigError(f"the output {dst} and the source {src} overlap: write the output elsewhere")
    if os.path.lexists(dst) and not force:
        raise ConfigError(f"{dst} already exists: choose a new folder, or pass --force to replace it")


def _iteration(tag: Optional[str]) -> str:
    """SAT's iteration folder: the source's, when SAT can read it back (a number or `release`)."""
    return tag if isinstance(tag, str) and re.fullmatch(r"\d+|release", tag) else "1"


def _prepare(rt: Runtime, cfg: LoadConfig, writer, dst: str, tp: int, limit: int, force: bool) -> _Prepared:
    _check_paths(cfg.checkpoint, dst, force)
    if getattr(cfg.model, "adaln_split", False):  # a load-time TP layout of sat_dist's, never a file's
        cfg.model = dataclasses.replace(cfg.model, adaln_split=False)
    if not all(hasattr(cfg.model, k) for k in ("num_layers", "hidden_size", "num_attention_heads")):
        raise ConfigError(f"convert writes SAT-family models (SAT GPT, the CogVideoX DiT); {cfg.checkpoint} holds "
                          f"a {getattr(cfg.model, 'model_class', type(cfg.model).__name__)}: load it as it is")
    if writer.NAME == "sat":
        check_tp(cfg.model, tp)
    model = build_meta_model(cfg.model, TPInfo(1, 0, None))
    specs = collect_specs(model)
    prefix = getattr(model, "checkpoint_prefix", "")
    setup = lora_fetch.prepare(cfg, specs, prefix)  # before the base is indexed: a wrong LoRA fails first
    reader = formats.reader_for(cfg.checkpoint, cfg.tag)
    index, prefer = reader.index(IndexRequest(cfg.checkpoint, setup.reader_specs(specs) if setup else specs, 1, 0,
                                              cfg.tag, prefix, cfg.weights))
    index = lora_fetch.rekey(index, setup)
    absent = index.meta.get("absent", {})
    dtype = cfg.torch_dtype or index.meta.get("default_dtype")
    names = sorted(n for n in specs if n not in absent)
    model_config = {k: v for k, v in model_config_dict(cfg.model).items()
                    if v is not None and k != "model_parallel_size"}
    job = Job(specs={n: specs[n] for n in names},
              dtypes={n: dtype or index.pieces[n][0].stored.dtype for n in names},
              prefix=prefix, model_config=model_config, tp=tp, shard_size=limit,
              iteration=_iteration(index.meta.get("tag")), rank=rt.rank, world=rt.world_size)
    writer.check(job)
    extras = find_extras(reader.NAME, cfg.checkpoint, cfg.tag, index.meta.get("key_prefix", prefix))
    return _Prepared(job, index, prefer, dtype, extras, index.format, setup)


def find_extras(reader: str, path: str, tag: Optional[str], prefix: str) -> CheckpointIndex:
    """Tensors the source holds outside the model's key `prefix`, located (never read): a
    fine-tuned SAT CogVideoX's `conditioner.*` T5 and `first_stage_model.*` VAE weights beside
    `model.diffusion_model.*`, the other entries of a DCP training save. Only a model with a
    prefix has an outside: under it, every reader refuses names the model lacks. SAT/DeepSpeed
    ZeRO-1/2: the `module` of mp file 0 (the engine's other parts are not model-parallel);
    safetensors: every shard's header; DCP: `.metadata`. A ZeRO-3 folder (no `module` weights)
    and diffusers/T5 folders (one model only) have none."""
    out = CheckpointIndex(root=path, format=f"{reader}-extra")
    if not prefix:
        return out
    if reader in ("sat", "deepspeed"):
        try:
            first = sat_reader.discover(path, tag).files[0]
        except CheckpointError:  # ZeRO-3: no mp_rank_XX_model_states.pt, the weights are partitions only
            return out
        module = load_structure(first)["module"]
        size = os.path.getsize(first)
        for key in sorted(k for k, t in module.items() if not k.startswith(prefix) and isinstance(t, torch.Tensor)):
            _add_whole(out, key, locate(first, module[key], key, size))
    elif reader == "safetensors":
        src = st_reader.locate(path)
        files = [src.file] if src.file else sorted(set(read_weight_map(src.index_json).values()))
        for f in files:
            for key, stored in sorted(read_header(f).tensors.items()):
                if not key.startswith(prefix):
                    _add_whole(out, key, stored)
    elif reader == "dcp":
        md = read_metadata(os.path.join(path, tag) if tag else path)
        keys = sorted(k for k in md.tensors if not k.startswith(prefix))
        if keys:  # the reader locates chunks of the tensors asked for; asked for all, nothing is unexpected
            every = {k: TensorSpec(tuple(t.shape), REPLICATED) for k, t in md.tensors.items()}
            idx, _ = dcp_reader.index(IndexRequest(path, every, 1, 0, tag, ""))
            out.pieces = {k: idx.pieces[k] for k in keys if k in idx.pieces}
    return out


def _add_whole(index: CheckpointIndex, key: str, stored: StoredTensor) -> None:
    index.add(Piece(key, stored, tuple(Replicate().fragments(stored.shape))))


# --- reading: one group of output tensors at a time -----------------------------------------------

class _Fetcher:
    """`fetch(wants)`: make_plan for just these output tensors (pieces of their source tensors,
    re-keyed by output name) and materialize them on the CPU. Counts the bytes it reads."""

    def __init__(self, index: CheckpointIndex, prefer: list, dtype: Optional[torch.dtype], op_bytes: int):
        self.index, self.prefer, self.dtype, self.op_bytes = index, prefer, dtype, op_bytes
        self.bytes_read = 0

    def __call__(self, wants: Sequence[Want]) -> dict[str, torch.Tensor]:
        _trim_heap()  # what the writer freed since the last fetch goes back to the OS first
        sub = CheckpointIndex(self.index.root, self.index.format,
                              {w.name: self.index.pieces.get(w.source, []) for w in wants})
        plan = make_plan({w.name: w for w in wants}, 1, 0, sub, self.dtype, self.prefer, self.op_bytes)
        tensors, stats = materialize(plan, CPU)
        self.bytes_read += stats.bytes_read
        return tensors


def _libc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # the process's own C library
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _libc_trim() if sys.platform.startswith("linux") else None


def _trim_heap() -> None:
    """glibc's malloc_trim(0). Freed tensors sit in glibc's heap between long-lived allocations
    (the SAT writer's untouched placeholders) that keep it from shrinking, so without this the RSS
    of a conversion crept, in some runs, to 70% of the model (measured: 69 MiB of 98 MiB; with it,
    10 MiB in every run, for about 10 ms per conversion)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _extra_wants(extras: CheckpointIndex) -> list[Want]:
    return [Want(k, k, p[0].stored.shape, Replicate(), p[0].stored.dtype) for k, p in sorted(extras.pieces.items())]


# --- the run ------------------------------------------------------------------------------------------

def _run(rt: Runtime, cfg: LoadConfig, writer, dst: str, tp: int, limit: int, separate: bool, force: bool,
         t0: float) -> ConvertReport:
    err: Optional[BaseException] = None
    prep: Optional[_Prepared] = None
    try:
        prep = _prepare(rt, cfg, writer, dst, tp, limit, force)
    except Exception as exc:  # agreed below: every rank fails alike
        err = exc
    agree_phase(rt, "convert: plan", err, cfg.timeout_s)
    tmp = f"{dst}.tmp-{C.all_gather_objects(os.getpid(), rt.ctrl_group)[0]}"
    job = prep.job
    # materialize may keep several staging buffers of one op each: ops of 1/8 of the budget
    op_bytes = max(1, (cfg.staging_mib << 20) // 8)
    fetch = _Fetcher(prep.index, prep.prefer, prep.dtype, op_bytes)
    if prep.lora is not None:
        fetch = lora_fetch.MergingFetch(fetch, prep.lora, prep.index, prep.prefer, job.dtypes, op_bytes)
    extra_wants = _extra_wants(prep.extras)
    mine: list[Written] = []
    try:
        err = None
        try:
            if rt.rank == 0:
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.makedirs(tmp)
        except Exception as exc:
            err = exc
        agree_phase(rt, "convert: create the output folder", err, cfg.timeout_s)
        err = None
        try:
            mine = writer.write(job, tmp, fetch)
            if separate and extra_wants:
                extra_fetch = _Fetcher(prep.extras, [], None, op_bytes)
                mine += _under(EXTRA_DIR, write_shards(os.path.join(tmp, EXTRA_DIR), "model", extra_wants, limit,
                                                       {"format": "pt"}, extra_fetch, rt.rank, rt.world_size))
                fetch.bytes_read += extra_fetch.bytes_read
        except Exception as exc:
            err = exc
        rss, seconds = peak_rss_bytes(), round(time.perf_counter() - t0, 4)
        agree_phase(rt, "convert: write", err, cfg.timeout_s)
        err = None
        if rt.rank == 0:
            try:
                mine += writer.finish(job, tmp)
                if separate and extra_wants:
                    mine += _under(EXTRA_DIR, write_index(os.path.join(tmp, EXTRA_DIR), "model", extra_wants, limit))
                publish(tmp, dst, force)
            except Exception as exc:
                err = exc
        agree_phase(rt, "convert: finish", err, cfg.timeout_s)
    except BaseException:
        if rt.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    ranks = C.all_gather_objects({"rank": rt.rank, "files": [(w.file, w.bytes) for w in mine],
                                  "bytes_written": sum(w.bytes for w in mine), "bytes_read": fetch.bytes_read,
                                  "peak_rss_bytes": rss, "seconds": seconds}, rt.ctrl_group)
    files = sorted(({"file": f, "bytes": b, "rank": r["rank"]} for r in ranks for f, b in r["files"]),
                   key=lambda d: d["file"])
    for r in ranks:
        r["files"] = [f for f, _ in r["files"]]
    names = sorted(prep.extras.pieces)
    return ConvertReport(
        status="ok", source=cfg.checkpoint, source_format=prep.source_format, destination=dst, to=writer.NAME,
        tp=tp, world_size=rt.world_size, seconds=round(time.perf_counter() - t0, 4), files=files,
        bytes_written=sum(f["bytes"] for f in files),
        extra_keys={"count": len(names), "names": names,
                    "action": f"written to {EXTRA_DIR}/" if separate and names else "dropped"},
        absent=sorted(prep.index.meta.get("absent", {})), ranks=ranks)


def _under(folder: str, written: list[Written]) -> list[Written]:
    return [Written(os.path.join(folder, w.file), w.bytes) for w in written]
