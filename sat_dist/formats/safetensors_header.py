"""safetensors headers and `*.safetensors.index.json` weight maps, validated before use.

The format (huggingface/safetensors README, "Format"; https://huggingface.co/docs/safetensors):
8 bytes `N`, a little-endian u64; `N` bytes of UTF-8 JSON, an object mapping each tensor name to
`{"dtype", "shape", "data_offsets": [BEGIN, END]}` (offsets relative to the byte after the header,
END one past the last byte) plus an optional `__metadata__` str -> str map; then the data. Duplicate
keys are disallowed; empty and 0-rank tensors are allowed; data is little-endian and row-major; the
reference implementation refuses headers over 100 MB. A sharded checkpoint adds an index
(`huggingface_hub`/transformers: `{"metadata": {"total_size": N}, "weight_map": {name: shard}}`,
shards relative to the index's folder).

Every number in the header is checked against the file before anything is sized by it, so a
damaged or hostile file costs at most its (bounded) header in memory and fails with a
MalformedCheckpointError naming the file, the tensor and what to do. The `safetensors` package is
not used to read: it would map the whole file on every rank.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import CheckpointError, MalformedCheckpointError
from ..index import StoredTensor

MAX_HEADER = 100_000_000  # the reference implementation's limit (safetensors' MAX_HEADER_SIZE)
MAX_INDEX = 100_000_000
METADATA = "__metadata__"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _code, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_code] = getattr(torch, _attr)
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class SafetensorsFile:
    """One validated header: tensors located (absolute file offsets), metadata as stored."""

    path: str
    size: int
    metadata: dict[str, str]
    tensors: dict[str, StoredTensor]
    header_bytes: int = 0  # N: the JSON header's length

    def data_bytes(self) -> int:
        return sum(t.extent_bytes() for t in self.tensors.values())


def _bad(path: str, what: str, tensor: Optional[str] = None) -> MalformedCheckpointError:
    where = f"tensor {tensor!r}: " if tensor is not None else ""
    return MalformedCheckpointError(
        f"{path}: {where}{what}; the file is damaged or not a safetensors file: copy or download it again, "
        f"or re-save it with safetensors.torch.save_file"
    )


class _Duplicate(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def parse_json_object(path: str, raw: bytes, what: str) -> dict:
    """`raw` as a UTF-8 JSON object with no duplicate keys at any level, else a named error."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise _bad(path, f"the {what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except _Duplicate as exc:
        raise _bad(path, f"the {what} names {exc.key!r} twice (duplicate keys are not allowed)") from exc
    except (ValueError, RecursionError) as exc:
        raise _bad(path, f"the {what} is not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise _bad(path, f"the {what} is a JSON {type(obj).__name__}, not an object")
    return obj


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_prefix(path: str) -> tuple[int, int, bytes]:
    """(file size, N, the N header bytes), with N checked before it sizes a read."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _bad(path, f"the file has {size} bytes, fewer than the 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER:
                raise _bad(path, f"the header length field says {n} bytes, over the format's limit of {MAX_HEADER}")
            if 8 + n > size:
                raise _bad(path, f"the header length field says {n} bytes but only {size - 8} follow it")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if len(raw) != n:
        raise _bad(path, f"read {len(raw)} of the {n} header bytes (the file changed while being read)")
    return size, n, raw


def _entry(path: str, name: str, entry: Any, data_start: int, size: int) -> tuple[StoredTensor, int, int]:
    """One header entry checked against the dtype table and the file: (stored, begin, end)."""
    if not isinstance(entry, dict):
        raise _bad(path, f"its header entry is a JSON {type(entry).__name__}, not an object", name)
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str) or code not in DTYPES:
        raise _bad(path, f"unknown dtype {code!r} (this reader knows {sorted(DTYPES)})", name)
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise _bad(path, f"shape {shape!r} is not a list of non-negative integers", name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise _bad(path, f"data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end", name)
    dtype, (begin, end) = DTYPES[code], offsets
    want = math.prod(shape) * dtype.itemsize
    if end - begin != want:
        raise _bad(path, f"data_offsets {offsets} span {end - begin} bytes but shape {shape} of {code} "
                         f"needs {want}", name)
    if data_start + end > size:
        raise _bad(path, f"its data ends at byte {data_start + end} but the file has {size} bytes "
                         f"(the data section is truncated or the offsets are out of range)", name)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return StoredTensor(path, data_start + begin, dtype, tuple(shape), stride), begin, end


def _check_disjoint(path: str, spans: list[tuple[int, int, str]]) -> None:
    """No two tensors' byte ranges overlap (empty tensors hold no bytes)."""
    prev_end, prev_name = 0, ""
    for begin, end, name in sorted(s for s in spans if s[0] < s[1]):
        if begin < prev_end:
            raise _bad(path, f"its bytes [{begin}, {end}) overlap those of tensor {prev_name!r} "
                             f"(ending at {prev_end})", name)
        if end > prev_end:
            prev_end, prev_name = end, name


def read_header(path: str) -> SafetensorsFile:
    """Read and validate the header of one `.safetensors` file; no tensor data is read."""
    size, n, raw = _read_prefix(path)
    header = parse_json_object(path, raw, "header")
    meta = header.pop(METADATA, {})
    if not isinstance(meta, dict):
        raise _bad(path, f"{METADATA} must map strings to strings, but it is a JSON {type(meta).__name__}")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise _bad(path, f"{METADATA} must map strings to strings, but {key!r} maps to {json.dumps(value)[:60]}")
    data_start, tensors, spans = 8 + n, {}, []
    for name, entry in header.items():
        stored, begin, end = _entry(path, name, entry, data_start, size)
        tensors[name] = stored
        spans.append((begin, end, name))
    _check_disjoint(path, spans)
    return SafetensorsFile(path, size, dict(meta), tensors, n)


def read_weight_map(index_json: str) -> dict[str, str]:
    """A `*.safetensors.index.json`'s `weight_map` as tensor name -> shard path (beside the index).

    Every shard it names must exist (an error names the first missing one and a tensor in it)."""
    try:
        size = os.path.getsize(index_json)
        if size > MAX_INDEX:
            raise _bad(index_json, f"the index is {size} bytes, over {MAX_INDEX}")
        with open(index_json, "rb") as f:
            raw = f.read(MAX_INDEX + 1)
    except OSError as exc:
        raise CheckpointError(f"cannot read {index_json}: {exc}") from exc
    weight_map = parse_json_object(index_json, raw, "index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
        raise _bad(index_json, "'weight_map' is missing or does not map tensor names to shard file names")
    folder = os.path.dirname(os.path.abspath(index_json))
    out, checked = {}, {}
    for name, shard in weight_map.items():
        full = checked.get(shard)
        if full is None:
            full = checked[shard] = os.path.normpath(os.path.join(folder, shard))
            if not os.path.isfile(full):
                raise CheckpointError(
                    f"{index_json}: weight_map puts tensor {name!r} in shard {shard!r}, but {full} does not exist; "
                    f"copy every shard the index names into {folder}"
                )
        out[name] = full
    return out
