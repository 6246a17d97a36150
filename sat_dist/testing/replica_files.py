"""The file writers of the replicas (sat_dist/testing/replica.py): safetensors files and shards, and
torch zip files, whose data are holes (`Filler("zeros")`) or random bytes (`Filler("random")`).

- safetensors: `safetensors_header` is the safetensors serializer (0.8: tensors sorted by dtype,
  largest first, then name; `__metadata__` first; JSON without spaces; padded with spaces to a
  multiple of 8), checked byte for byte against `safetensors.torch.save_file` by
  tests/test_replicas.py; metadata `{"format": "pt"}` as diffusers and transformers write it; shards
  cut by huggingface_hub's `split_torch_state_dict_into_shards` (what their `save_pretrained` calls)
  in state-dict order at max_shard_size "5GB" (diffusers scripts/convert_cogvideox_to_diffusers.py
  `pipe.save_pretrained(..., max_shard_size="5GB")`); index JSON as they write it (indent 2, sorted keys).
- torch zip: torch's writer leaves every data record's bytes unwritten under `skip_data` and stores
  CRC-32 0 for them; `_patch_crcs` then writes each record's true CRC (of the zeros a hole reads as,
  computed in O(log n) by `crc32_zeros`, or of the random bytes written) into its data descriptor
  and its central-directory entry, so the file equals `torch.save` of all-zero tensors byte for byte
  except the random `.data/serialization_id` (tests/test_replicas.py) and `zipfile.testzip` passes.
  torch itself checks no CRC on load (measured: a CRC-0 file loads with and without mmap).
"""
from __future__ import annotations

import functools
import json
import os
import struct
import zipfile
import zlib
from typing import Callable, Optional, Sequence

import torch

GB5 = "5GB"  # diffusers/transformers save_pretrained max_shard_size used for the releases (5 * 10**9 bytes)
CHUNK = 64 << 20  # random fill: bytes generated and written at a time

Entry = tuple[str, tuple[int, ...], torch.dtype]  # (name, shape, dtype) of one stored tensor


def nbytes(e: Entry) -> int:
    n = 1
    for s in e[1]:
        n *= s
    return n * e[2].itemsize


# --- CRC-32 of zeros, in O(log n) ----------------------------------------------------------------

def _gf2_times(mat: Sequence[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat: Sequence[int]) -> list[int]:
    return [_gf2_times(mat, mat[n]) for n in range(32)]


@functools.lru_cache(maxsize=None)
def _zero_byte_ops() -> tuple[tuple[int, ...], ...]:
    """The GF(2) operators that run the CRC register over 2**k zero bytes, k = 0..63 (zlib crc32.c's
    `gf2_matrix_square` of the one-zero-bit operator: 3 squarings make a byte, each next one doubles)."""
    op = [0xEDB88320] + [1 << n for n in range(31)]  # one zero bit (the reflected polynomial)
    for _ in range(3):
        op = _gf2_square(op)
    ops = [tuple(op)]
    for _ in range(63):
        op = _gf2_square(op)
        ops.append(tuple(op))
    return tuple(ops)


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A || B from crc(A), crc(B) and len(B), as zlib's crc32_combine (which Python's zlib
    does not expose): crc(A) run over len(B) zero bytes, xor crc(B). O(log len2)."""
    ops, k = _zero_byte_ops(), 0
    while len2 > 0:
        if len2 & 1:
            crc1 = _gf2_times(ops[k], crc1)
        len2 >>= 1
        k += 1
    return crc1 ^ crc2


def crc32_zeros(n: int) -> int:
    """zlib.crc32(bytes(n)) without the bytes: the register starts at ~0, n zero bytes shift it, the
    result is inverted, so crc = M^(8n)(~0) ^ ~0 = crc32_combine(~0, ~0, n)."""
    return crc32_combine(0xFFFFFFFF, 0xFFFFFFFF, n) if n else 0


# --- fill ----------------------------------------------------------------------------------------

class Filler:
    """Writes a data region: a hole (`zeros`) or random bytes (`random`, numpy PCG64, seeded per
    file), returning its CRC-32 when asked."""

    def __init__(self, mode: str, seed: int = 0):
        if mode not in ("zeros", "random"):
            raise ValueError(f"--fill must be zeros or random, got {mode!r}")
        self.mode, self.seed = mode, seed
        self.written = 0  # real bytes written (random)

    def region(self, f, offset: int, size: int, crc: bool = False) -> int:
        """Fill [offset, offset + size) of the open file `f`; CRC-32 of the region if `crc`."""
        if self.mode == "zeros":
            return crc32_zeros(size) if crc else 0
        import numpy as np

        rng = np.random.default_rng([self.seed, offset, size])
        f.seek(offset)
        value, left = 0, size
        while left:
            chunk = rng.bytes(min(CHUNK, left))
            f.write(chunk)
            if crc:
                value = zlib.crc32(chunk, value)
            left -= len(chunk)
        self.written += size
        return value


# --- safetensors ---------------------------------------------------------------------------------

# safetensors' Dtype enum in declaration order (the serializer sorts by it, largest first; checked
# against safetensors 0.8 save_file by tests/test_replicas.py).
_ST_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64",
             "F64", "I64", "U64")
_ST_CODE = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
            torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
            torch.int64: "I64", torch.complex64: "C64"}
for _code, _attr in (("F8_E5M2", "float8_e5m2"), ("F8_E4M3", "float8_e4m3fn"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_CODE[getattr(torch, _attr)] = _code


def safetensors_header(entries: Sequence[Entry], metadata: Optional[dict[str, str]] = None) -> tuple[bytes, int]:
    """(the 8-byte length + JSON header safetensors.torch.save_file writes for these tensors, data
    bytes). Order, offsets, separators and padding as the Rust serializer (safetensors/src/tensor.rs
    `prepare` and `Metadata`'s Serialize)."""
    rank = {c: i for i, c in enumerate(_ST_ORDER)}
    order = sorted(entries, key=lambda e: (-rank[_ST_CODE[e[2]]], e[0].encode()))
    obj: dict = {}
    if metadata:
        obj["__metadata__"] = metadata
    offset = 0
    for name, shape, dtype in order:
        end = offset + nbytes((name, shape, dtype))
        obj[name] = {"dtype": _ST_CODE[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def write_safetensors(path: str, entries: Sequence[Entry], metadata: Optional[dict[str, str]], filler: Filler) -> int:
    """One safetensors file: header, then the data as a hole or random bytes; returns its size."""
    header, data = safetensors_header(entries, metadata)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + data)
        if data:
            filler.region(f, len(header), data)
    return len(header) + data


def _meta_state(entries: Sequence[Entry]) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape, dtype in entries}


def write_sharded(folder: str, pattern: str, index_name: str, entries: Sequence[Entry], filler: Filler,
                  max_shard_size=GB5) -> list[str]:
    """`save_pretrained`'s safetensors files: huggingface_hub's shard split in state-dict order, each
    shard `{"format": "pt"}` metadata, the index (indent 2, sorted keys, final newline) when sharded."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(_meta_state(entries), filename_pattern=pattern,
                                               max_shard_size=max_shard_size)
    by_name = {e[0]: e for e in entries}
    files = []
    for filename, names in split.filename_to_tensors.items():
        write_safetensors(os.path.join(folder, filename), [by_name[n] for n in names], {"format": "pt"}, filler)
        files.append(filename)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        with open(os.path.join(folder, index_name), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append(index_name)
    return files


# --- torch zip (torch.save) ----------------------------------------------------------------------

def _central_directory(path: str) -> dict[str, tuple[int, int, int]]:
    """record name -> (local header offset, data offset, central-directory entry offset)."""
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        infos = zf.infolist()
        pos = zf.start_dir
        for info in infos:
            f.seek(pos)
            cd = f.read(46)
            if cd[:4] != b"PK\x01\x02":
                raise ValueError(f"{path}: no central-directory entry at {pos}")
            n, m, k = struct.unpack("<HHH", cd[28:34])
            f.seek(info.header_offset)
            local = f.read(30)
            ln, lm = struct.unpack("<HH", local[26:30])
            out[info.filename] = (info.header_offset, info.header_offset + 30 + ln + lm, pos)
            pos += 46 + n + m + k
    return out


def _patch_crcs(path: str, filler: Filler) -> None:
    """Fill every `data/N` record torch left unwritten and write its CRC-32 where miniz keeps it
    (the records have flag bit 3: the local header holds 0, the data descriptor after the data and
    the central directory hold the CRC)."""
    with zipfile.ZipFile(path) as zf:
        infos = [i for i in zf.infolist() if i.filename.split("/", 1)[-1].startswith("data/")]
    where = _central_directory(path)
    with open(path, "r+b") as f:
        for info in infos:
            local, data, cd = where[info.filename]
            crc = filler.region(f, data, info.file_size, crc=True)
            f.seek(data + info.file_size)
            if f.read(4) != b"PK\x07\x08":
                raise ValueError(f"{path}: {info.filename} has no data descriptor after its data")
            packed = struct.pack("<I", crc)
            f.seek(data + info.file_size + 4)
            f.write(packed)
            f.seek(cd + 16)
            f.write(packed)
            if info.flag_bits & 0x8 == 0:  # no descriptor flag: the local header holds it too
                f.seek(local + 14)
                f.write(packed)


def write_torch_zip(path: str, obj_of: Callable[[Callable[[tuple, torch.dtype], torch.Tensor]], object],
                    filler: Filler) -> int:
    """`torch.save(obj, path)` under `torch.serialization.skip_data`: torch's own writer (pickle, zip
    records, 64-byte alignment, zip64) leaves every data record's bytes unwritten, i.e. a hole;
    `_patch_crcs` then fills them (random) and writes their CRCs. `obj_of(empty)` builds the object
    with `empty(shape, dtype)`: CPU tensors whose memory is reserved but never touched (skip_data
    never reads it), so RSS stays flat. (FakeTensors would need no reservation, but their storages
    pickle the location "cpu" as a new string each time, which pickle cannot memoize: data.pkl grows
    ~7 bytes per tensor and the file is no longer torch.save's. Measured on torch 2.13.) Returns the
    file size."""
    obj = obj_of(lambda shape, dtype: torch.empty(shape, dtype=dtype))
    with torch.serialization.skip_data():
        torch.save(obj, path)
    del obj
    _patch_crcs(path, filler)
    return os.path.getsize(path)
