"""torch.distributed.checkpoint (DCP) folders, as `FileSystemWriter` writes them (FSDP2/DTensor jobs):
`.metadata` plus one `__<rank>_<n>.distcp` file per writer.

Every chunk of a tensor (one saving rank's `ChunkStorageMetadata(offsets, sizes)`; a Replicate
DTensor is saved once, DCP deduplicates it) becomes one Piece: its fragment is
`Box(offsets, sizes)` at local offset 0 and its StoredTensor points at the chunk's raw data
inside the `.distcp` file. The planner then intersects boxes as for any format, so any saving
world size and DTensor placement (Shard(d), Replicate, 2-D meshes) loads at any TP.

Where the bytes are (pytorch/pytorch torch/distributed/checkpoint/filesystem.py, `_write_item`,
torch 2.13): with the default `SerializationFormat.TORCH_SAVE` each tensor item is a whole
`torch.save(tensor)` zip written at `_StorageInfo.offset` (`length` bytes) of the file. Inside
it, offsets are relative to the item's start; torch's writer sets the local headers' data-descriptor
flag (sizes 0), so records are found through the item's central directory (zip64 when needed),
then each record's local header gives where its data starts. The item's `data.pkl` (read by the
restricted unpickler of `dcp_metadata`) gives the storage key, offset, size and strides; the
storage record's size must be exactly numel x itemsize and the view must be dense and inside it.
Each rank reads `.metadata`, then only the first/last 4 KiB of the items it needs, in only the
`.distcp` files that hold them. Stream transforms (compression), safetensors-serialized DCP and
non-stored zip records are refused by name.
"""
from __future__ import annotations

import os
import struct
from collections import Counter
from typing import Iterator, Mapping, Optional

from ..errors import CheckpointError, ConfigError
from ..index import CheckpointIndex, Piece, StoredTensor
from ..placement import Box, Fragment, TensorSpec
from .base import IndexRequest, check_names, check_shape, folder_model_config, split_absent
from .dcp_metadata import (ITEM_GLOBALS, METADATA_FILE, Chunk, DcpMetadata, DcpTensor, Item, SavedTensor,
                           read_metadata, unpickle)

NAME = "dcp"
_WINDOW = 4096  # bytes read at each end of an item: data.pkl and headers in front, directory at the end
_LIMIT = 1 << 20  # a one-tensor item's central directory / data.pkl is a few hundred bytes
_U32 = 0xFFFFFFFF


def _root(path: str, tag: Optional[str]) -> str:
    return os.path.join(path, tag) if tag else path


def recognise(path: str, tag: Optional[str] = None) -> bool:
    """A folder holding DCP's `.metadata` (at `<path>/<tag>` when a tag is given)."""
    return os.path.isfile(os.path.join(_root(path, tag), METADATA_FILE))


# A DCP save holds no model config: SAT's `model_config.json` in the folder, else None.
model_config = folder_model_config


# --- one item: a torch.save zip inside a .distcp file -------------------------------------------

class _Item:
    """Bounded reads inside one item (item-relative offsets), served from its first and last
    `_WINDOW` bytes when they cover the range."""

    def __init__(self, fd: int, path: str, item: Item, what: str) -> None:
        self.fd, self.path, self.base, self.length, self.what = fd, path, item.offset, item.length, what
        n = min(item.length, _WINDOW)
        self.head = self._pread(0, n)
        self.tail_at = item.length - n
        self.tail = self._pread(self.tail_at, n)

    def bad(self, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {self.what} (bytes {self.base}+{self.length}): {msg}")

    def _pread(self, off: int, n: int) -> bytes:
        data = os.pread(self.fd, n, self.base + off)
        if len(data) != n:
            raise self.bad(f"unexpected end of file at byte {self.base + off + len(data)}: the file is truncated")
        return data

    def read(self, off: int, n: int, what: str) -> bytes:
        if off < 0 or n < 0 or off + n > self.length:
            raise self.bad(f"{what} at item bytes {off}+{n} lies outside the item")
        if off + n <= len(self.head):
            return self.head[off:off + n]
        if off >= self.tail_at:
            return self.tail[off - self.tail_at:off - self.tail_at + n]
        return self._pread(off, n)


def _zip64(extra: bytes, fields: list[int]) -> list[int]:
    """Replace the 0xFFFFFFFF fields (usize, csize, local header offset order) from a zip64 extra."""
    p = 0
    while p + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, p)
        if tag == 1:
            values = iter(struct.unpack_from(f"<{size // 8}Q", extra, p + 4))
            return [next(values, -1) if v == _U32 else v for v in fields]
        p += 4 + size
    return fields


def _directory(it: _Item) -> dict[str, tuple[int, int]]:
    """Record name (without the archive folder) -> (local header offset, size), stored records only."""
    e = it.tail.rfind(b"PK\x05\x06")
    if e < 0 or len(it.tail) - e < 22:
        raise it.bad("no zip end record: not a torch.save item (safetensors-serialized DCP is not supported)")
    count, cd_size, cd_off = struct.unpack_from("<HII", it.tail, e + 10)
    if count == 0xFFFF or _U32 in (cd_size, cd_off):
        locator = it.read(it.tail_at + e - 20, 20, "zip64 locator")
        if locator[:4] != b"PK\x06\x07":
            raise it.bad("zip64 end record locator missing")
        record = it.read(struct.unpack_from("<Q", locator, 8)[0], 56, "zip64 end record")
        if record[:4] != b"PK\x06\x06":
            raise it.bad("zip64 end record missing")
        count, cd_size, cd_off = struct.unpack_from("<QQQ", record, 32)
    if count > 64 or cd_size > _LIMIT:
        raise it.bad(f"a zip directory of {count} records / {cd_size} bytes is not a one-tensor torch.save item")
    cd, out, p = it.read(cd_off, cd_size, "zip central directory"), {}, 0
    for _ in range(count):
        if cd[p:p + 4] != b"PK\x01\x02":
            raise it.bad("corrupt zip central directory")
        method, = struct.unpack_from("<H", cd, p + 10)
        csize, usize, nlen, elen, clen = struct.unpack_from("<IIHHH", cd, p + 20)
        name = cd[p + 46:p + 46 + nlen].decode("utf-8", "replace")
        lho, = struct.unpack_from("<I", cd, p + 42)
        usize, csize, lho = _zip64(cd[p + 46 + nlen:p + 46 + nlen + elen], [usize, csize, lho])
        if method != 0 or csize != usize:
            raise it.bad(f"zip record {name!r} is compressed; torch.save writes stored records")
        out[name.split("/", 1)[-1]] = (lho, usize)
        p += 46 + nlen + elen + clen
    return out


def _record(it: _Item, records: dict[str, tuple[int, int]], name: str) -> tuple[int, int]:
    """(item offset of the record's data, its size), from its local header."""
    if name not in records:
        raise it.bad(f"the torch.save zip has no {name!r} record")
    lho, size = records[name]
    header = it.read(lho, 30, f"local header of {name!r}")
    if header[:4] != b"PK\x03\x04":
        raise it.bad(f"corrupt local header of {name!r}")
    nlen, elen = struct.unpack_from("<HH", header, 26)
    start = lho + 30 + nlen + elen
    if start + size > it.length:
        raise it.bad(f"record {name!r} ends at item byte {start + size}, past the item")
    return start, size


def _dense(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Non-overlapping and gap-free (contiguous up to a permutation of dims, as clone() keeps)."""
    expect = 1
    for st, s in sorted((st, s) for s, st in zip(size, stride) if s != 1):
        if st != expect:
            return False
        expect *= s
    return len(size) == len(stride)


def _locate(it: _Item, t: DcpTensor, chunk: Chunk) -> StoredTensor:
    """Where the chunk's elements are in the file, every fact checked against the item."""
    records = _directory(it)
    start, n = _record(it, records, "data.pkl")
    if n > _LIMIT:
        raise it.bad(f"data.pkl of {n} bytes is not a one-tensor pickle")
    saved = unpickle(it.read(start, n, "data.pkl"), ITEM_GLOBALS, f"{it.path}: {it.what} data.pkl")
    if not isinstance(saved, SavedTensor):
        raise it.bad(f"data.pkl holds a {type(saved).__name__}, not a tensor")
    if "byteorder" in records:
        s, m = _record(it, records, "byteorder")
        if it.read(s, min(m, 16), "byteorder") != b"little":
            raise it.bad("saved big-endian; sat_dist reads little-endian bytes as they are")
    start, nbytes = _record(it, records, f"data/{saved.key}")
    item = t.dtype.itemsize
    last = saved.offset + sum((s - 1) * st for s, st in zip(saved.size, saved.stride))
    problems = [
        saved.dtype != t.dtype and f"dtype {saved.dtype} (metadata: {t.dtype})",
        saved.size != chunk.sizes and f"shape {list(saved.size)} (metadata chunk: {list(chunk.sizes)})",
        nbytes != saved.storage_numel * saved.storage_dtype.itemsize
        and f"a {nbytes}-byte storage record for {saved.storage_numel} x {saved.storage_dtype.itemsize} bytes",
        not (_dense(saved.size, saved.stride) and saved.offset >= 0 and (last + 1) * item <= nbytes)
        and f"a view (offset {saved.offset}, stride {list(saved.stride)}) that is not dense inside its storage",
    ]
    if any(problems):
        raise it.bad("; ".join(p for p in problems if p))
    return StoredTensor(it.path, it.base + start + saved.offset * item, t.dtype, saved.size, saved.stride)


def _pieces(path: str, wanted: list[tuple[str, DcpTensor, Chunk]]) -> Iterator[Piece]:
    """Open one .distcp file once and locate the wanted chunks' items in it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CheckpointError(f"cannot open {path}, named by the folder's .metadata: {exc}") from exc
    try:
        size = os.fstat(fd).st_size
        for name, t, c in sorted(wanted, key=lambda w: w[2].item.offset):
            what = f"tensor {t.key!r} chunk at {list(c.offsets)}"
            end = c.item.offset + c.item.length
            if end > size:
                raise CheckpointError(f"{path}: {what} ends at byte {end} but the file has {size} bytes: "
                                      f"the file is truncated; copy it again")
            try:
                stored = _locate(_Item(fd, path, c.item, what), t, c)
            except (struct.error, ValueError) as exc:
                raise CheckpointError(f"{path}: {what}: corrupt torch.save item: {exc}") from exc
            yield Piece(name, stored, (Fragment(Box(c.offsets, c.sizes), (0,) * len(c.offsets)),))
    finally:
        os.close(fd)


# --- the reader interface -------------------------------------------------------------------------

def _wrapper(md: DcpMetadata, specs: Mapping[str, TensorSpec], prefix: str) -> str:
    """The one key prefix (e.g. `model.` of `{"model": sd, "optim": ...}`) under which every model
    tensor is stored; '' when the names are top level or no single prefix fits."""
    names = [n for n, s in specs.items() if not s.if_absent] or list(specs)
    if not names or all(prefix + n in md.tensors for n in names):
        return ""
    probe = prefix + names[0]
    fits = {k[:-len(probe)] for k in md.tensors if k.endswith(probe) and k[:-len(probe)].endswith(".")}
    fits = [w for w in fits if all(w + prefix + n in md.tensors for n in names)]
    return fits[0] if len(fits) == 1 else ""


def index(req: IndexRequest) -> tuple[CheckpointIndex, list[str]]:
    """This rank's chunks of a DCP folder: only the items and files overlapping its TP shard."""
    if req.weights == "fp32":
        raise ConfigError(f"--weights fp32 reads DeepSpeed ZeRO optimizer partitions, but {req.path} is a DCP "
                          f"folder; drop --weights")
    root = _root(req.path, req.tag)
    md = read_metadata(root)
    pre = _wrapper(md, req.specs, req.prefix) + req.prefix
    stored = {k[len(pre):] for k in md.tensors if k.startswith(pre)}
    absent, missing = split_absent(req.specs, [n for n in req.specs if n not in stored])
    not_tensors = [pre + n for n in missing if pre + n in md.other]
    if not_tensors:
        raise CheckpointError(f"{root}: {not_tensors[:8]} are saved as non-tensor (bytes) entries, not tensors")
    check_names(root, missing, [k for k in md.tensors if k.startswith(pre) and k[len(pre):] not in req.specs])
    idx = CheckpointIndex(root=root, format=NAME, meta={"tag": req.tag, "key_prefix": pre, "absent": absent,
                                                        "dcp_version": md.version})
    wanted: dict[str, list[tuple[str, DcpTensor, Chunk]]] = {}
    for name, spec in req.specs.items():
        if name in absent:
            continue
        t = md.tensors[pre + name]
        check_shape(root, t.key, t.shape, spec, 0, 1)  # DCP stores the global shape
        mine = [f.logical for f in spec.placement(req.tp, req.tp_rank).fragments(spec.global_shape)]
        for c in t.chunks:
            if c.numel and any(Box(c.offsets, c.sizes).intersect(m) for m in mine):
                wanted.setdefault(c.item.file, []).append((name, t, c))
        if not Box.full(t.shape).numel:  # an empty tensor: one empty piece gives the planner its dtype
            c = next((c for c in t.chunks if c.item), None)
            if c is not None:
                wanted.setdefault(c.item.file, []).append((name, t, c))
    files = [os.path.join(root, rel) for rel in sorted(wanted)]
    for rel, path in zip(sorted(wanted), files):
        for piece in _pieces(path, wanted[rel]):
            idx.add(piece)
    return idx, files


def describe(path: str, tag: Optional[str] = None) -> dict:
    """What the folder holds, from `.metadata` and file sizes only (`sat-dist inspect`)."""
    root = _root(path, tag)
    md = read_metadata(root)
    chunks: Counter = Counter()
    nbytes: Counter = Counter()
    keys: dict[str, set] = {}
    for t in md.tensors.values():
        for c in t.chunks:
            if c.item is not None:
                chunks[c.item.file] += 1
                nbytes[c.item.file] += c.numel * t.dtype.itemsize
                keys.setdefault(c.item.file, set()).add(t.key)
    ends: dict[str, int] = {}
    entries = Counter(item.file for _, item in md.items)
    for _, item in md.items:
        ends[item.file] = max(ends.get(item.file, 0), item.offset + item.length)
    files, problems = [], []
    for rel in sorted(ends):
        p = os.path.join(root, rel)
        size = os.path.getsize(p) if os.path.isfile(p) else None
        holds = (f"{chunks[rel]} chunks of {len(keys.get(rel, ()))} tensors, {nbytes[rel]:,} tensor bytes, "
                 f"{entries[rel] - chunks[rel]} other entries")
        if size is None or size < ends[rel]:
            state = "missing" if size is None else f"truncated (items end at byte {ends[rel]})"
            problems.append(f"{rel} is {state}")
            holds = f"{state.upper()}: {holds}"
        files.append({"file": rel, "bytes": size or 0, "holds": holds})
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in md.tensors.values()})
    total = sum(t.dtype.itemsize * Box.full(t.shape).numel for t in md.tensors.values())
    heads = Counter(k.split(".", 1)[0] for k in md.tensors)
    summary = [
        f"format: dcp (torch.distributed.checkpoint, version {md.version or 'unknown'}), {len(files)} .distcp files",
        f"{len(md.tensors)} tensors in {sum(chunks.values())} chunks, {total:,} bytes ({', '.join(dtypes)}); "
        f"{len(md.other)} non-tensor entries",
        "top-level keys: " + ", ".join(f"{h} ({n})" for h, n in heads.most_common(8)),
        *(f"PROBLEM: {p}" for p in problems),
    ]
    return {"format": NAME, "root": root, "tag": tag, "summary": summary, "files": files,
            "tensors": len(md.tensors), "version": md.version}
