"""A corpus of malformed and malicious checkpoints, generated from one good SAT checkpoint (mp=2)
and its safetensors, DeepSpeed ZeRO-3 and DCP twins. Each case names the error type every rank must
report; malicious pickles carry a canary file that exists only if their payload ran.

Hostile torch zips are written with torch's own zip writer (torch._C.PyTorchFileWriter) around a
hand-made `data.pkl`, so headers can claim what torch.save never would (a 1 PB storage, a view past
its storage, negative strides). Formats: torch.save's zip (pytorch/pytorch torch/serialization.py),
safetensors (huggingface/safetensors README, "Format"), DCP (`FileSystemWriter`), ZeRO-3 optimizer
files (microsoft/DeepSpeed deepspeed/runtime/zero/stage3.py, deepspeed/utils/zero_to_fp32.py).
"""
from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import shutil
import struct
import subprocess
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from sat_rules import CONFIGS, full_state_dict, write_sat_checkpoint

CFG = CONFIGS["plain"]
MODEL_CONFIG = {"model_class": "BaseModel", **CFG, "model_parallel_size": 1}
DENSE = "transformer.layers.0.mlp.dense_h_to_4h.weight"  # column-split at TP=2


@dataclass
class Case:
    name: str
    path: str  # what `sat-dist load` is given
    cause: tuple[str, ...]  # acceptable error type(s) of the cause on the failing rank(s)
    needles: tuple[str, ...] = ()  # each in the error text
    canary: Optional[str] = None  # exists only if a pickled payload ran
    tp: int = 2
    overrides: tuple[str, ...] = ()


# --- payloads and hand-made torch zips ---------------------------------------------------------

class Payload:
    """Unpickling this calls `fn(*args)`: what a malicious checkpoint does."""

    def __init__(self, fn: Callable, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def payloads(canary: str) -> dict[str, Payload]:
    return {
        "os_system": Payload(os.system, f"touch {canary}"),
        "builtins_eval": Payload(eval, f"open({canary!r}, 'w').close()"),
        "subprocess_popen": Payload(subprocess.Popen, ["touch", canary]),
    }


class _Storage:
    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _View:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...), as torch.save does."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, torch.Size(size), stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def write_torch_zip(path: str, obj, records: dict[str, bytes]) -> None:
    """A torch.save-layout zip holding `obj` pickled (with _Storage/_View for tensors) and `records`."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    w = torch._C.PyTorchFileWriter(path)
    w.write_record("data.pkl", buf.getvalue(), len(buf.getvalue()))
    w.write_record("byteorder", b"little", 6)
    for key, data in records.items():
        w.write_record(f"data/{key}", data, len(data))
    w.write_record("version", b"3\n", 2)
    w.write_end_of_file()
    del w


def hostile_view(path: str, size: tuple, stride: tuple, numel: int = 16, offset: int = 0) -> None:
    """A file whose one tensor is `size`/`stride` over a storage that claims `numel` floats (holds 16)."""
    write_torch_zip(path, {"module": {DENSE: _View(_Storage("0", numel), offset, size, stride)}},
                    {"0": bytes(64)})


def _patch_central_size(path: str, record_suffix: bytes, delta: int) -> None:
    """Add `delta` to the sizes the zip's central directory gives one record (a wrong record size)."""
    data = bytearray(open(path, "rb").read())
    pos = 0
    while (pos := data.find(b"PK\x01\x02", pos)) >= 0:
        nlen = struct.unpack_from("<H", data, pos + 28)[0]
        name = bytes(data[pos + 46:pos + 46 + nlen])
        if name.endswith(record_suffix):
            for off in (20, 24):  # compressed, uncompressed size
                (v,) = struct.unpack_from("<I", data, pos + off)
                struct.pack_into("<I", data, pos + off, v + delta)
            open(path, "wb").write(bytes(data))
            return
        pos += 4
    raise AssertionError(f"{path}: no central directory record ending in {record_suffix!r}")


# --- the good checkpoints -----------------------------------------------------------------------------

def base_sat(root: str) -> str:
    write_sat_checkpoint(root, CFG, full_state_dict(CFG, seed=3), 2)
    return root


def _mp(root: str, r: int) -> str:
    return os.path.join(root, "1000", f"mp_rank_{r:02d}_model_states.pt")


def _rewrite(path: str, fn: Callable[[dict], object]) -> None:
    """Load, edit in place (or return a replacement dict), save."""
    obj = torch.load(path, weights_only=True)
    new = fn(obj)
    torch.save(new if isinstance(new, dict) else obj, path)


def _zero3(root: str, dp: int = 2) -> str:
    """A ZeRO-3 save of the model's weights (one sub-group, dp ranks), laid out by the rules of
    deepspeed/utils/zero_to_fp32.py; `zero_stage` is a plain int, so no DeepSpeed class is needed."""
    full = full_state_dict(CFG, seed=3)
    tag = os.path.join(root, "global_step1")
    os.makedirs(tag)
    shapes = collections.OrderedDict((n, torch.Size(t.shape)) for n, t in full.items())
    for r in range(dp):
        parts = []
        for t in full.values():
            q = math.ceil(t.numel() / dp)
            part = torch.zeros(q)
            piece = t.reshape(-1)[r * q:(r + 1) * q]
            part[:piece.numel()] = piece
            parts.append(part)
        flat = torch.cat(parts)
        torch.save({"optimizer_state_dict": {"zero_stage": 3, "partition_count": dp, "fp32_flat_groups": [flat],
                                             "optimizer_state_dict": {"state": {}, "param_groups": []}}},
                   os.path.join(tag, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
        torch.save({"module": collections.OrderedDict((n, torch.empty(0)) for n in full), "buffer_names": [],
                    "param_shapes": [shapes], "frozen_param_shapes": collections.OrderedDict(), "shared_params": {},
                    "frozen_param_fragments": collections.OrderedDict(), "dp_world_size": dp, "mp_world_size": 1},
                   os.path.join(tag, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("global_step1")
    with open(os.path.join(root, "model_config.json"), "w") as f:
        json.dump(MODEL_CONFIG, f)
    return tag


def _safetensors(path: str) -> None:
    from safetensors.torch import save_file

    save_file(full_state_dict(CFG, seed=3), path, metadata={"format": "pt", "model_config": json.dumps(MODEL_CONFIG)})


def _st_header(path: str, edit: Callable[[dict], None], raw: Optional[bytes] = None, length: Optional[int] = None):
    """Rewrite a safetensors file's JSON header (and/or its length field)."""
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    new = raw if raw is not None else json.dumps(header).encode()
    open(path, "wb").write(struct.pack("<Q", length if length is not None else len(new)) + new + data[8 + n:])


def _dcp(folder: str) -> None:
    import torch.distributed.checkpoint as tdcp

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tdcp.save(full_state_dict(CFG, seed=3), checkpoint_id=folder, no_dist=True)
    with open(os.path.join(folder, "model_config.json"), "w") as f:
        json.dump(MODEL_CONFIG, f)


# --- the cases ----------------------------------------------------------------------------------

def build(root: str) -> list[Case]:
    """Write every case under `root`; returns them (each in its own folder)."""
    os.makedirs(root, exist_ok=True)
    good = base_sat(os.path.join(root, "_good_sat"))
    cases: list[Case] = []

    def sat(name: str, *cause: str, needles=(), canary=None, tp=2, overrides=()) -> str:
        d = os.path.join(root, name)
        shutil.copytree(good, d)
        cases.append(Case(name, d, cause, tuple(needles), canary, tp, tuple(overrides)))
        return d

    def raw(name: str, *cause: str, needles=(), canary=None, tp=2, overrides=()) -> str:
        d = os.path.join(root, name)
        os.makedirs(d)
        cases.append(Case(name, d, cause, tuple(needles), canary, tp, tuple(overrides)))
        return d

    # layout: paths, latest, mp files, model_config.json
    cases.append(Case("no_such_path", os.path.join(root, "no", "such", "dir"), ("CheckpointError",),
                      ("does not exist",)))
    os.remove(os.path.join(sat("missing_latest", "CheckpointError", needles=["no 'latest' file"]), "latest"))
    open(os.path.join(sat("dangling_latest", "CheckpointError", needles=["'2000'", "does not exist"]), "latest"),
         "w").write("2000")
    open(os.path.join(sat("empty_latest", "CheckpointError", needles=["is empty"]), "latest"), "w").write("\n")
    open(os.path.join(sat("latest_escapes_folder", "CheckpointError", needles=["not one folder name"]), "latest"),
         "w").write("../../1000")
    os.remove(_mp(sat("missing_mp_file", "CheckpointError", needles=["missing ['mp_rank_01_model_states.pt']"]), 1))
    os.remove(_mp(sat("missing_first_mp_file", "CheckpointError",
                      needles=["missing ['mp_rank_00_model_states.pt']"]), 0))
    d = sat("mp_files_more_than_config", "CheckpointError", needles=["model_parallel_size=2", "3 mp_rank files"])
    shutil.copy(_mp(d, 1), _mp(d, 2))
    d = sat("mp_config_more_than_files", "CheckpointError",
            needles=["missing ['mp_rank_02_model_states.pt', 'mp_rank_03_model_states.pt']"])
    json.dump({"model_class": "BaseModel", **CFG, "model_parallel_size": 4},
              open(os.path.join(d, "model_config.json"), "w"))
    os.remove(os.path.join(sat("missing_model_config", "ConfigError", needles=["carries no model config"]),
                           "model_config.json"))
    open(os.path.join(sat("model_config_not_json", "CheckpointError", needles=["model_config.json"]),
                      "model_config.json"), "w").write("{not json")
    open(os.path.join(sat("model_config_not_object", "CheckpointError", needles=["JSON list"]),
                      "model_config.json"), "w").write("[1, 2]")
    d = sat("model_config_bad_mp_size", "CheckpointError", "ConfigError", needles=["model_parallel_size"])
    json.dump({"model_class": "BaseModel", **CFG, "model_parallel_size": "two"},
              open(os.path.join(d, "model_config.json"), "w"))

    # damaged files
    p = _mp(sat("truncated_half", "CheckpointError", needles=["mp_rank_01_model_states.pt"]), 1)
    os.truncate(p, os.path.getsize(p) // 2)
    os.truncate(_mp(sat("truncated_empty", "CheckpointError", needles=["mp_rank_01_model_states.pt"]), 1), 0)
    p = _mp(sat("truncated_tail", "CheckpointError", needles=["damaged zip"]), 0)
    os.truncate(p, os.path.getsize(p) - 10)
    _patch_central_size(_mp(sat("zip_record_size_wrong", "CheckpointError", needles=["mp_rank_01"]), 1), b"data/0", 8)
    p = _mp(sat("not_a_torch_file", "CheckpointError", needles=["not a torch checkpoint"]), 1)
    open(p, "wb").write(os.urandom(4096).replace(b"PK", b"pk").replace(b"\x80", b"\x00"))
    p = _mp(sat("legacy_torch_file", "CheckpointError", needles=["legacy", "torch.save(torch.load("]), 1)
    obj = torch.load(p, weights_only=True)
    torch.save(obj, p, _use_new_zipfile_serialization=False)

    # disagreeing with the model or with each other
    _rewrite(_mp(sat("shape_mismatch", "CheckpointError", needles=[DENSE, "has shape"]), 0),
             lambda o: o["module"].update({DENSE: torch.zeros(3, 64)}))
    _rewrite(_mp(sat("dtype_mismatch_between_mp_files", "CheckpointError", needles=[DENSE, "float16"]), 1),
             lambda o: o["module"].update({DENSE: o["module"][DENSE].half()}))
    _rewrite(_mp(sat("extra_key", "CheckpointError", needles=["unexpected tensors ['transformer.extra']"]), 0),
             lambda o: o["module"].update({"transformer.extra": torch.zeros(2)}))
    _rewrite(_mp(sat("missing_key", "CheckpointError", needles=["missing tensors", "final_layernorm.bias"]), 1),
             lambda o: o["module"].pop("transformer.final_layernorm.bias"))
    _rewrite(_mp(sat("no_module_key", "CheckpointError", needles=["no 'module' state dict"]), 0),
             lambda o: {"weights": o["module"]})
    _rewrite(_mp(sat("module_not_a_dict", "CheckpointError", needles=["no 'module' state dict"]), 0),
             lambda o: {"module": torch.zeros(3)})
    _rewrite(_mp(sat("entry_not_a_tensor", "CheckpointError", needles=["not a tensor"]), 1),
             lambda o: o["module"].update({DENSE: 3}))
    hostile_view(_mp(sat("storage_claims_1PB", "CheckpointError"), 0), (1 << 48,), (1,), numel=1 << 48)
    hostile_view(_mp(sat("view_past_its_storage", "CheckpointError"), 0), (1 << 24, 1 << 24), (1 << 24, 1))
    hostile_view(_mp(sat("negative_stride", "CheckpointError"), 0), (16,), (-1,), offset=15)
    hostile_view(_mp(sat("offset_past_storage", "CheckpointError"), 0), (16,), (1,), offset=1 << 40)
    hostile_view(_mp(sat("storage_larger_than_record", "CheckpointError", needles=["zip record"]), 0),
                 (32,), (1,), numel=32)
    p = _mp(sat("data_pkl_garbage", "CheckpointError"), 1)
    write_torch_zip(p, None, {})
    data = bytearray(open(p, "rb").read())
    i = data.find(b"\x80\x02")  # the pickle's protocol opcode, first bytes of data.pkl
    data[i:i + 4] = b"\xff\xfe\xfd\xfc"
    open(p, "wb").write(bytes(data))

    # malicious pickles: a canary proves nothing ran
    for kind in ("os_system", "builtins_eval", "subprocess_popen"):
        canary = os.path.join(root, f"canary_{kind}")
        d = sat(f"pickle_{kind}", "UnsafeCheckpointError", needles=["allow-list"], canary=canary)
        _rewrite(_mp(d, 1), lambda o, k=kind, c=canary: o.update({"args": payloads(c)[k]}))
    canary = os.path.join(root, "canary_in_module")
    _rewrite(_mp(sat("pickle_payload_as_tensor", "UnsafeCheckpointError", canary=canary), 0),
             lambda o: o["module"].update({DENSE: payloads(canary)["os_system"]}))

    # DeepSpeed ZeRO-3 (dp=2)
    def ds(name: str, *cause: str, needles=(), canary=None) -> str:
        d = raw(name, *cause, needles=needles, canary=canary)
        return _zero3(d)

    tag = ds("zero3_partition_short", "CheckpointError", needles=["fp32_flat_groups"])
    _rewrite(os.path.join(tag, "zero_pp_rank_1_mp_rank_00_optim_states.pt"), lambda o: o["optimizer_state_dict"].update(
        fp32_flat_groups=[o["optimizer_state_dict"]["fp32_flat_groups"][0][:-7].clone()]))
    os.remove(os.path.join(ds("zero3_missing_partition_file", "CheckpointError",
                              needles=["dp rank(s) [1]", "zero_pp_rank_1_"]),
                           "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    tag = ds("zero3_partition_count_wrong", "CheckpointError", needles=["partition_count=4"])
    _rewrite(os.path.join(tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
             lambda o: o["optimizer_state_dict"].update(partition_count=4))
    tag = ds("zero3_param_shapes_1PB", "CheckpointError")
    _rewrite(os.path.join(tag, "zero_pp_rank_0_mp_rank_00_model_states.pt"), lambda o: o["param_shapes"][0].update(
        {DENSE: torch.Size([1 << 25, 1 << 25])}))
    canary = os.path.join(root, "canary_zero3")
    tag = ds("zero3_pickle_os_system", "UnsafeCheckpointError", needles=["allow-list"], canary=canary)
    _rewrite(os.path.join(tag, "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
             lambda o: o.update({"ds_config": payloads(canary)["os_system"]}))

    # safetensors (one file, config in the header's metadata)
    def st(name: str, *cause: str, needles=()) -> str:
        d = raw(name, *cause, needles=needles)
        cases[-1].path = p = os.path.join(d, "model.safetensors")
        _safetensors(p)
        return p

    _st_header(st("safetensors_header_length_past_file", "MalformedCheckpointError", needles=["header length"]),
               lambda h: None, length=1 << 40)
    _st_header(st("safetensors_offsets_past_file", "MalformedCheckpointError", needles=[DENSE, "data_offsets"]),
               lambda h: h[DENSE].update(data_offsets=[h[DENSE]["data_offsets"][0], 1 << 50]))
    _st_header(st("safetensors_tensor_claims_1PB", "MalformedCheckpointError", needles=[DENSE]),
               lambda h: h[DENSE].update(shape=[1 << 25, 1 << 23], data_offsets=[0, 1 << 50]))
    _st_header(st("safetensors_header_not_json", "MalformedCheckpointError", needles=["not valid JSON"]),
               lambda h: None, raw=b"{" * 64)
    p = st("safetensors_truncated", "MalformedCheckpointError", needles=["truncated"])
    os.truncate(p, os.path.getsize(p) - 100)

    # DCP (FileSystemWriter layout)
    def dc(name: str, *cause: str, needles=(), canary=None) -> str:
        d = raw(name, *cause, needles=needles, canary=canary)
        _dcp(d)
        return d

    p = os.path.join(dc("dcp_metadata_truncated", "CheckpointError", needles=[".metadata"]), ".metadata")
    os.truncate(p, os.path.getsize(p) // 2)
    canary = os.path.join(root, "canary_dcp")
    d = dc("dcp_metadata_os_system", "UnsafeCheckpointError", needles=["posix.system"], canary=canary)
    open(os.path.join(d, ".metadata"), "wb").write(pickle.dumps(payloads(canary)["os_system"]))
    p = os.path.join(dc("dcp_data_truncated", "CheckpointError", needles=["__0_0.distcp", "truncated"]), "__0_0.distcp")
    os.truncate(p, os.path.getsize(p) // 2)
    os.remove(os.path.join(dc("dcp_data_file_missing", "CheckpointError", needles=["__0_0.distcp"]), "__0_0.distcp"))
    return cases
