"""Shared helpers for the DeepSpeed reader tests: real-DeepSpeed fixtures (generated once per
pytest session in a subprocess), the expectations built from DeepSpeed's own outputs, and an
independent SAT merge (the inverse of tests/sat_rules.sat_split). Nothing here uses sat_dist's
placement code, so a wrong placement or a wrong ZeRO offset in sat_dist cannot hide."""
from __future__ import annotations

import contextlib
import importlib.abc
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from typing import Any, Optional

import torch

import ds_fixtures
from sat_rules import qkv_ratios, sat_split

HERE = os.path.dirname(os.path.abspath(__file__))
_CACHE: dict[str, str] = {}
# (dp, mp) of each fixture set; the variants of each are in ds_fixtures.VARIANTS.
KINDS = {"dp2": (2, 1), "dp4": (4, 1), "mp2": (2, 2)}


def warm_up() -> None:
    """Import sat_dist's model and config modules once in the parent, so forked ranks start warm."""
    from sat_dist.config import build_model_config
    from sat_dist.models import TPInfo, build_meta_model

    build_meta_model(build_model_config(dict(ds_fixtures.MODEL)), TPInfo())


def fixtures(tmp_path_factory, kind: str) -> str:
    """Folder with one subfolder per variant (ckpt/ + references), generated once per session."""
    if kind not in _CACHE:
        dp, mp = KINDS[kind]
        out = str(tmp_path_factory.getbasetemp() / f"deepspeed_{kind}")
        if os.path.isdir(out):
            shutil.rmtree(out)
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, os.path.join(HERE, "ds_fixtures.py"), out, "--dp", str(dp),
                               "--mp", str(mp)], capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"DeepSpeed fixture generation failed ({kind}):\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-6000:]}")
        _CACHE[kind] = out
    return _CACHE[kind]


@dataclass
class Case:
    """One fixture checkpoint and everything the tests derive from it."""

    dir: str
    v: dict  # ds_fixtures.Variant as saved in variant.json (+ model_cfg, tag)

    @property
    def ckpt(self) -> str:
        return os.path.join(self.dir, "ckpt")

    @property
    def cfg(self) -> dict:
        return self.v["model_cfg"]

    @property
    def tag_dir(self) -> str:
        return os.path.join(self.ckpt, self.v["tag"])

    def overrides(self) -> list[str]:
        """SAT-style fixtures carry model_config.json; DeepSpeed-native ones get the config here."""
        return [] if self.v["sat_style"] else [f"model.{k}={val}" for k, val in self.cfg.items()]

    def ref(self, name: str) -> Any:
        return torch.load(os.path.join(self.dir, name), map_location="cpu", weights_only=True)


def case(tmp_path_factory, kind: str, name: str) -> Case:
    d = os.path.join(fixtures(tmp_path_factory, kind), name)
    with open(os.path.join(d, "variant.json")) as f:
        return Case(d, json.load(f))


def sat_merge(name: str, parts: list[torch.Tensor], cfg: dict) -> torch.Tensor:
    """Full tensor from SAT's mp shards (inverse of sat_split)."""
    n = len(parts)
    if n == 1:
        return parts[0]
    if ".attention.query_key_value." in name:
        ratios = qkv_ratios(cfg)
        local = parts[0].shape[0] // sum(ratios)
        blocks = [torch.split(p, [local * s for s in ratios], dim=0) for p in parts]
        return torch.cat([torch.cat([b[i] for b in blocks], 0) for i in range(len(ratios))], 0)
    if name.endswith("attention.dense.weight") or name.endswith("mlp.dense_4h_to_h.weight"):
        return torch.cat(parts, 1)
    if ".mlp.dense_h_to_4h." in name or (name == "transformer.word_embeddings.weight" and cfg["vocab_size"] >= 1000):
        return torch.cat(parts, 0)
    for p in parts[1:]:  # replicated: every mp rank holds the same values
        assert torch.equal(p, parts[0]), name
    return parts[0]


@dataclass
class Expected:
    """Full tensors a load must reproduce, and how each is stored (for dtype and byte checks)."""

    full: dict[str, torch.Tensor]
    stored_dtype: dict[str, torch.dtype]
    default_dtype: Optional[torch.dtype]  # what the loader casts to without --dtype


def expected(c: Case, source: str) -> Expected:
    """From DeepSpeed's own outputs: `module` (ZeRO-1/2 default source), or the fp32 masters as
    `get_fp32_state_dict_from_zero_checkpoint` rebuilds them (mp=1), cross-checked against the live
    engine's `safe_get_full_fp32_param`; where zero_to_fp32 cannot (mp>1, BF16_Optimizer) the live
    values are the reference. Frozen params and buffers are what was stored (16-bit in bf16 runs)."""
    v, cfg, mp = c.v, c.cfg, c.v["mp"]
    modules = [c.ref(f"module_mp{m}.pt") for m in range(mp)]
    init = c.ref("init_full.pt")
    full, stored = {}, {}
    if source == "module":
        for n in init:
            full[n] = sat_merge(n, [m[n] for m in modules], cfg)
            stored[n] = modules[0][n].dtype
        return Expected(full, stored, None)
    z2f = c.ref("zero_to_fp32.pt")
    live_parts = [c.ref(f"live_fp32_mp{m}.pt") for m in range(mp)]
    for n in init:
        if n in live_parts[0]:
            live = sat_merge(n, [lp[n] for lp in live_parts], cfg)
            if z2f:
                # With round_robin_gradients, DeepSpeed 0.19.8's safe_get_full_fp32_param returns
                # values that match neither zero_to_fp32 nor the saved bf16 module (observed on
                # z2_bf16 at dp=2 and 4); zero_to_fp32 agrees with the module, so it is the reference.
                if not v["round_robin"]:
                    assert torch.equal(z2f[n], live), f"zero_to_fp32 and the live engine disagree on {n}"
                elif v["bf16"]:
                    assert torch.equal(z2f[n].bfloat16(), modules[0][n]), n
                full[n] = z2f[n]
            else:
                full[n] = live
            if v["bf16"] and v["stage"] < 3:  # saved bf16 weights = the masters rounded: checks the reference
                assert torch.equal(full[n].bfloat16(), sat_merge(n, [m[n] for m in modules], cfg)), n
            stored[n] = torch.float32
        else:  # frozen or buffer: stored as the module holds it
            dtype = modules[0][n].dtype
            if n in z2f:
                full[n] = z2f[n].to(dtype)  # zero_to_fp32 upcasts buffers; the file holds `dtype`
            elif v["stage"] < 3:
                full[n] = sat_merge(n, [m[n] for m in modules], cfg)
            else:  # ZeRO-3 frozen at mp>1: frozen params keep their initial values
                full[n] = init[n].to(dtype)
            stored[n] = dtype
    return Expected(full, stored, torch.bfloat16 if v["bf16"] else None)


def local_expectation(exp: Expected, cfg: dict, tp: int, tp_rank: int,
                      dtype: Optional[torch.dtype] = None) -> tuple[dict[str, torch.Tensor], int]:
    """This rank's tensors (split by SAT's rule, cast) and the stored bytes of its share."""
    out, share = {}, 0
    for n, t in exp.full.items():
        local = sat_split(n, t, tp, tp_rank, cfg)
        out[n] = local.to(dtype or exp.default_dtype or exp.stored_dtype[n])
        share += local.numel() * exp.stored_dtype[n].itemsize
    return out, share


class _RefuseDeepSpeed(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name == "deepspeed" or name.startswith("deepspeed."):
            self.attempts.append(name)
            raise ImportError(f"{name}: sat_dist's load path must not import deepspeed")
        return None


@contextlib.contextmanager
def deepspeed_blocked():
    """Inside, deepspeed cannot be imported, even when this process imported it before (another test's
    in-process diffusers/accelerate does): its modules are set aside and every import of it is refused and
    recorded in the list this yields. "deepspeed" in sys.modules would only say what the process inherited."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "deepspeed" or k.startswith("deepspeed.")}
    finder = _RefuseDeepSpeed()
    sys.meta_path.insert(0, finder)
    try:
        yield finder.attempts
    finally:
        sys.meta_path.remove(finder)
        sys.modules.update(saved)


def load_rank(rank: int, path: str, tp: int, overrides: list[str], weights: Optional[str] = None,
              dtype: Optional[str] = None, tag: Optional[str] = None):
    """Runs on a forked rank: load through the public API with deepspeed unimportable; return state,
    report and whether the load path tried to import deepspeed."""
    import sat_dist

    with deepspeed_blocked() as attempts:
        model, rep = sat_dist.load_model(path, tp=tp, overrides=overrides, weights=weights, dtype=dtype, tag=tag,
                                         return_report=True, timeout_s=60, digest=True, exchange="off")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, rep.ranks[rank], bool(attempts)


def load_error(rank: int, path: str, tp: int, overrides: list[str], weights: Optional[str] = None) -> str:
    import sat_dist

    sat_dist.load_model(path, tp=tp, overrides=overrides, weights=weights, timeout_s=60)
    return "loaded"


def same_error_everywhere(results, *needles: str) -> str:
    """Every rank failed with the identical error text, containing each needle."""
    assert all(not r.ok for r in results), [r.value for r in results]
    assert len({(r.error_type, r.error) for r in results}) == 1, [(r.error_type, r.error) for r in results]
    for needle in needles:
        assert needle in results[0].error, results[0].error
    return results[0].error


# --- reading a torch zip file without sat_dist or torch.load ------------------------------------

class _Any(dict):
    """Stands for any pickled object: accepts construction, dict items and state."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args = args

    def __setstate__(self, state):
        self.state = state


class _Scan(pickle.Unpickler):
    """Resolves every global to an inert placeholder; tensors become ('T', storage key, offset,
    shape). Used to find which zip records hold what, independently of sat_dist."""

    def find_class(self, module, name):
        if name == "_rebuild_tensor_v2":
            return lambda storage, offset, size, *rest: ("T", storage, offset, tuple(size))
        if name == "_rebuild_from_type_v2":  # a tensor with Python attributes (ZeRO-3 flat groups)
            return lambda func, new_type, args, state: func(*args)
        if name == "_rebuild_parameter":
            return lambda data, *rest: data
        return _Any

    def persistent_load(self, pid):
        return pid[2]  # ('storage', type, key, location, numel)


def scan_pickle(path: str) -> Any:
    with zipfile.ZipFile(path) as z:
        pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        import io

        return _Scan(io.BytesIO(z.read(pkl))).load()


def record_data_ranges(path: str) -> dict[str, tuple[int, int]]:
    """Storage key -> (file offset, size) of each `<stem>/data/<key>` record (ZIP_STORED)."""
    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            parts = info.filename.split("/")
            if len(parts) == 3 and parts[1] == "data":
                f.seek(info.header_offset)
                header = f.read(30)
                name_len = int.from_bytes(header[26:28], "little")
                extra_len = int.from_bytes(header[28:30], "little")
                out[parts[2]] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


def poison_all_but(path: str, keep_keys: set[str]) -> int:
    """Overwrite every tensor record of `path` except `keep_keys` with 0xFF bytes (NaN in fp32 /
    bf16), in place; returns the bytes poisoned. data.pkl and the zip structure stay intact."""
    poisoned = 0
    with open(path, "r+b") as f:
        for key, (off, size) in record_data_ranges(path).items():
            if key not in keep_keys:
                f.seek(off)
                f.write(b"\xff" * size)
                poisoned += size
    return poisoned


def fp32_partition_keys(optim_path: str) -> set[str]:
    """Storage keys of the fp32 master partitions of one optim file (everything else is moments,
    step counters, ...)."""
    osd = scan_pickle(optim_path)["optimizer_state_dict"]
    groups = osd.get("fp32_flat_groups") or osd.get("single_partition_of_fp32_groups")
    return {t[1] for t in groups}


def numel(shape) -> int:
    return math.prod(shape)
