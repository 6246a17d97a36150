"""The pickles of a torch.distributed.checkpoint (DCP) folder, read without torch.distributed.

DCP's `FileSystemWriter.finish` writes `.metadata` with a plain `pickle.dump(Metadata)`
(pytorch/pytorch torch/distributed/checkpoint/filesystem.py; the classes are in
torch/distributed/checkpoint/metadata.py, checked against torch 2.13): `Metadata(state_dict_metadata,
planner_data, storage_data, storage_meta, version)`, where `state_dict_metadata` maps each key to a
`TensorStorageMetadata(properties: TensorProperties, size: torch.Size, chunks:
[ChunkStorageMetadata(offsets, sizes)])` or `BytesStorageMetadata()`, and `storage_data` maps
`MetadataIndex(fqn, offset, index)` to `filesystem._StorageInfo(relative_path, offset, length,
transform_descriptors)`. Each tensor item in a `.distcp` file is one `torch.save(tensor)` zip
(`_write_item`), whose `data.pkl` is the second pickle read here.

Both are read by a restricted unpickler that maps exactly those qualified names to local,
data-only stand-ins (the approach of `ds_pickle`) and refuses any other global by name with
UnsafeCheckpointError before it is called: nothing from torch.distributed is imported and no
pickled code runs. `read_metadata` then validates the structure into plain records, every chunk
checked against its tensor's size and every item's path against the folder.
"""
from __future__ import annotations

import io
import math
import os
import pickle
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import CheckpointError, UnsafeCheckpointError

Shape = tuple[int, ...]
METADATA_FILE = ".metadata"
_DCP = "torch.distributed.checkpoint."


class _Bag:
    """A data-only stand-in: pickle fills `__dict__` (BUILD) and nothing else."""

    def __init__(self, *args: Any) -> None:  # only reached through REDUCE; DCP never pickles that way
        raise CheckpointError(f"unexpected constructor call for {type(self).__name__} in a DCP pickle")


class Metadata(_Bag):
    state_dict_metadata = planner_data = storage_data = storage_meta = version = None


class TensorStorageMetadata(_Bag):
    properties = size = chunks = None


class ChunkStorageMetadata(_Bag):
    offsets = sizes = None


class BytesStorageMetadata(_Bag):
    pass


class StorageMeta(_Bag):
    checkpoint_id = save_id = load_id = modules = None


class MetadataIndex(_Bag):
    fqn = offset = index = None


class StorageInfo(_Bag):
    """`filesystem._StorageInfo` (its `__getstate__` drops None fields, hence the defaults)."""

    relative_path = offset = length = transform_descriptors = None


class TensorProperties(_Bag):
    """`TensorProperties.__getstate__` pickles a tuple: (dtype, layout, requires_grad, memory format
    encoding, pin_memory)."""

    dtype = layout = None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 5:
            self.dtype, self.layout = state[0], state[1]
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            raise CheckpointError(f"unexpected TensorProperties state {type(state).__name__}")


def _size(values: Any = ()) -> Shape:  # torch.Size((...)) -> a tuple
    return tuple(values)


def _layout(name: Any) -> str:  # torch.serialization._get_layout("torch.strided")
    return str(name)


def _mem_format(value: Any) -> int:  # metadata._MEM_FORMAT_ENCODING(0)
    return int(value)


def _path(*parts: Any) -> str:  # StorageMeta.checkpoint_id: a pathlib path -> str (informative)
    if not all(isinstance(p, str) for p in parts):
        raise CheckpointError("unexpected pathlib arguments in a DCP pickle")
    return os.path.join(*parts) if parts else ""


DTYPES: dict[str, torch.dtype] = {
    f"torch.{n}": getattr(torch, n) for n in (
        "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
        "complex64", "complex128", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
        "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, n)
}
_PATHS = {f"{m}.{c}": _path for m in ("pathlib", "pathlib._local")
          for c in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")}
METADATA_GLOBALS: dict[str, Any] = {
    **{_DCP + "metadata." + c.__name__: c for c in (
        Metadata, TensorStorageMetadata, ChunkStorageMetadata, BytesStorageMetadata, StorageMeta,
        MetadataIndex, TensorProperties)},
    _DCP + "filesystem._StorageInfo": StorageInfo, _DCP + "metadata._MEM_FORMAT_ENCODING": _mem_format,
    "torch.Size": _size, "torch.serialization._get_layout": _layout, "torch.strided": "torch.strided",
    **DTYPES, **_PATHS,
}


# --- one torch.save(tensor) item: data.pkl ---------------------------------------------------------

@dataclass(frozen=True)
class SavedTensor:
    """What an item's `data.pkl` says: storage record `key` of `storage_numel` elements of
    `storage_dtype`, viewed at `offset` (elements) with `size` and `stride`, as `dtype`."""

    key: str
    storage_dtype: torch.dtype
    storage_numel: int
    dtype: torch.dtype
    offset: int
    size: Shape
    stride: Shape


@dataclass(frozen=True)
class _Storage:
    dtype: torch.dtype
    key: str
    numel: int


def _rebuild(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any,
             *rest: Any) -> SavedTensor:
    """`torch._utils._rebuild_tensor_v2` (rest = [metadata]) / `_v3` (rest = [dtype, metadata])."""
    dtype = rest[0] if rest and isinstance(rest[0], torch.dtype) else None
    extra = rest[1:] if dtype is not None else rest
    if not isinstance(storage, _Storage) or hooks or any(extra):
        raise CheckpointError("the item pickles a tensor with backward hooks or conj/neg bits, or no storage")
    if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
            and all(isinstance(v, int) for v in size + stride)):
        raise CheckpointError("the item pickles a tensor with a non-integer offset, size or stride")
    return SavedTensor(storage.key, storage.dtype, storage.numel, dtype or storage.dtype, offset, size, stride)


# torch.save's legacy storage class names (torch/storage.py `_dtype_to_storage_type_map`); dtypes
# without one are pickled as `torch.storage.UntypedStorage` (bytes) plus `_rebuild_tensor_v3`.
_STORAGES = {"DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
             "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
             "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
             "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128"}
ITEM_GLOBALS: dict[str, Any] = {
    "torch._utils._rebuild_tensor_v2": _rebuild, "torch._utils._rebuild_tensor_v3": _rebuild,
    "collections.OrderedDict": dict, "torch.storage.UntypedStorage": torch.uint8,
    **{f"torch.{k}": getattr(torch, v) for k, v in _STORAGES.items()}, **DTYPES,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, allowed: dict[str, Any], what: str) -> None:
        super().__init__(io.BytesIO(data))
        self.allowed, self.what = allowed, what

    def find_class(self, module: str, name: str) -> Any:
        qual = f"{module}.{name}"
        if qual not in self.allowed:
            raise UnsafeCheckpointError(
                f"{self.what} pickles global {qual!r}, which is not one of the torch.distributed.checkpoint "
                f"classes sat_dist reads as data; checkpoints are untrusted input and nothing else is unpickled")
        return self.allowed[qual]

    def persistent_load(self, pid: Any) -> Any:
        # torch.save: ('storage', storage type, key, location, numel)
        if (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
            return _Storage(pid[1], pid[2], pid[4])
        raise CheckpointError(f"{self.what}: unexpected persistent id {str(pid)[:80]}")


def unpickle(data: bytes, allowed: dict[str, Any], what: str) -> Any:
    """Unpickle `data` allowing only `allowed` globals; any failure is a CheckpointError naming `what`."""
    try:
        return _Unpickler(data, allowed, what).load()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read {what}: {type(exc).__name__}: {exc}; the file is truncated or "
                              f"corrupt") from exc


# --- .metadata -> validated records ----------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One entry of `storage_data`: `length` bytes at `offset` of `file` (relative to the folder)."""

    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class Chunk:
    offsets: Shape
    sizes: Shape
    item: Optional[Item]  # None only for an empty chunk

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class DcpTensor:
    key: str
    dtype: torch.dtype
    shape: Shape
    chunks: tuple[Chunk, ...]


@dataclass
class DcpMetadata:
    root: str
    tensors: dict[str, DcpTensor]
    other: list[str]  # non-tensor entries (BytesStorageMetadata)
    items: list[tuple[str, Item]]  # every storage entry: (key, item)
    version: Optional[str]


def _ints(v: Any, n: Optional[int] = None) -> bool:
    return (isinstance(v, tuple) and all(type(x) is int and x >= 0 for x in v)
            and (n is None or len(v) == n))


def _item(path: str, key: str, info: Any) -> Item:
    if not isinstance(info, StorageInfo):
        raise CheckpointError(f"{path}: storage entry of {key!r} is a {type(info).__name__}, not _StorageInfo")
    if info.transform_descriptors:
        raise CheckpointError(
            f"{path}: {key!r} is stored through DCP stream transform(s) {list(info.transform_descriptors)} "
            f"(compression/encryption extensions); sat_dist reads raw byte ranges only: re-save without _extensions")
    rel = info.relative_path
    if not (isinstance(rel, str) and rel and "\0" not in rel and not os.path.isabs(rel)
            and os.path.normpath(rel).split(os.sep)[0] not in ("..", ".")):
        raise CheckpointError(f"{path}: storage entry of {key!r} names file {rel!r}, which is not inside the folder")
    if not (type(info.offset) is int and type(info.length) is int and info.offset >= 0 and info.length >= 0):
        raise CheckpointError(f"{path}: storage entry of {key!r} has offset {info.offset!r} / length {info.length!r}")
    return Item(os.path.normpath(rel), info.offset, info.length)


def _storage(path: str, md: Metadata) -> tuple[dict[tuple, Item], list[tuple[str, Item]]]:
    if not isinstance(md.storage_data, dict):
        raise CheckpointError(f"{path}: storage_data is a {type(md.storage_data).__name__}, not FileSystemWriter's "
                              f"dict; only FileSystemWriter checkpoints are supported")
    by_key: dict[tuple, Item] = {}
    for idx, info in md.storage_data.items():
        if not (isinstance(idx, MetadataIndex) and isinstance(idx.fqn, str)
                and (idx.offset is None or _ints(idx.offset))):
            raise CheckpointError(f"{path}: storage_data key {str(idx)[:80]} is not a MetadataIndex")
        key = (idx.fqn, idx.offset)
        if key in by_key:
            raise CheckpointError(f"{path}: storage_data lists {idx.fqn!r} at {idx.offset} twice")
        by_key[key] = _item(path, idx.fqn, info)
    spans = sorted(by_key.items(), key=lambda kv: (kv[1].file, kv[1].offset))
    for (ka, a), (kb, b) in zip(spans, spans[1:]):
        if a.file == b.file and a.offset + a.length > b.offset:
            raise CheckpointError(f"{path}: items {ka[0]!r} and {kb[0]!r} overlap in {a.file} "
                                  f"(bytes {a.offset}+{a.length} and {b.offset})")
    return by_key, [(k[0], it) for k, it in spans]


def _tensor(path: str, key: str, tm: TensorStorageMetadata, by_key: dict[tuple, Item]) -> DcpTensor:
    props = tm.properties
    dtype = getattr(props, "dtype", None)
    if not isinstance(dtype, torch.dtype) or f"{dtype}" not in DTYPES:
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype!r}")
    if getattr(props, "layout", "torch.strided") != "torch.strided":
        raise CheckpointError(f"{path}: tensor {key!r} has layout {props.layout}; only strided tensors are supported")
    shape = tm.size
    if not _ints(shape) or not isinstance(tm.chunks, list):
        raise CheckpointError(f"{path}: tensor {key!r} has size {shape!r} / chunks {type(tm.chunks).__name__}")
    chunks: dict[tuple, Chunk] = {}
    for c in tm.chunks:
        if not (isinstance(c, ChunkStorageMetadata) and _ints(c.offsets, len(shape)) and _ints(c.sizes, len(shape))
                and all(o + s <= d for o, s, d in zip(c.offsets, c.sizes, shape))):
            raise CheckpointError(
                f"{path}: tensor {key!r} (size {list(shape)}) has chunk offsets {getattr(c, 'offsets', c)!r} "
                f"sizes {getattr(c, 'sizes', None)!r} outside it")
        item = by_key.get((key, c.offsets))
        chunk = Chunk(c.offsets, c.sizes, item)
        if item is None and chunk.numel:
            raise CheckpointError(f"{path}: chunk {list(c.offsets)} of tensor {key!r} has no storage entry")
        if chunks.setdefault((c.offsets, c.sizes), chunk) != chunk:
            raise CheckpointError(f"{path}: tensor {key!r} lists chunk {list(c.offsets)} twice")
    total = math.prod(shape)
    if sum(c.numel for c in chunks.values()) != total:
        raise CheckpointError(f"{path}: the chunks of tensor {key!r} hold {sum(c.numel for c in chunks.values())} "
                              f"elements but its size {list(shape)} has {total}; the metadata is corrupt")
    return DcpTensor(key, dtype, shape, tuple(chunks.values()))


def read_metadata(root: str) -> DcpMetadata:
    """Read and validate `<root>/.metadata` (never a pickled callable beyond the stand-ins)."""
    path = os.path.join(root, METADATA_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    md = unpickle(data, METADATA_GLOBALS, path)
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CheckpointError(f"{path} holds a {type(md).__name__}, not a DCP Metadata")
    by_key, items = _storage(path, md)
    tensors, other = {}, []
    for key, entry in md.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata) and isinstance(key, str):
            tensors[key] = _tensor(path, key, entry, by_key)
        elif isinstance(entry, BytesStorageMetadata) and isinstance(key, str):
            other.append(key)
        else:
            raise CheckpointError(f"{path}: entry {str(key)[:80]} is a {type(entry).__name__}")
    return DcpMetadata(root, tensors, other, items, md.version if isinstance(md.version, str) else None)
