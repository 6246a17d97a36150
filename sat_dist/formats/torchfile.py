"""Read a torch zip checkpoint's structure (names, shapes, dtypes, byte offsets) without its data.

`torch.load(weights_only=True, mmap=True)`: torch's own restricted unpickler parses `data.pkl`, and
every storage comes back as a slice of one private, lazy mapping of the file, so no tensor page is
touched (measured: 40 KB of I/O and 2 ms for a 64 MB file). A storage's byte offset in the file is
its pointer minus the mapping's base; the base is derived from the zip's own record offsets and
*verified* for every storage (offset and size must match a `data/<key>` record), so a change in
torch's loader fails loudly instead of reading wrong bytes. Each tensor gets `_sat_dist_offset`.
(FakeTensorMode gives offsets too, but imports torch._dynamo: 1-2.5 s per process.)
Unknown pickled globals are refused by name; the allow-list below is the only extension point.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..errors import CheckpointError

Shape = tuple[int, ...]


def _numpy_globals() -> list[Any]:
    """numpy objects that SAT training saves pickle in `np_rng_state` (numpy 1.x and 2.x names)."""
    import numpy as np

    out: list[Any] = [np.ndarray, np.dtype]
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    out.append(_reconstruct)
    out.extend(type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDGUSO")  # numpy.dtypes.*DType
    return out


# Providers of allowed globals, by name. Other formats (e.g. DeepSpeed stubs) append here.
ALLOWED_GLOBAL_PROVIDERS: dict[str, Callable[[], list[Any]]] = {"numpy rng state": _numpy_globals}


def allowed_globals() -> list[Any]:
    out: list[Any] = []
    for provider in ALLOWED_GLOBAL_PROVIDERS.values():
        out.extend(provider())
    return out


@dataclass(frozen=True)
class StoredTensor:
    """Where one saved tensor's elements live in its file."""

    file: str
    byte_offset: int  # file offset of element (0, ..., 0)
    dtype: torch.dtype
    shape: Shape
    stride: Shape

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.itemsize

    def extent_bytes(self) -> int:
        """Bytes from byte_offset to the last element's end (what must exist in the file)."""
        if any(s == 0 for s in self.shape):
            return 0
        last = sum((s - 1) * st for s, st in zip(self.shape, self.stride))
        return (last + 1) * self.itemsize


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v)


def _records(path: str) -> dict[int, int]:
    """file offset -> size of every `data/<key>` storage record (central directory only)."""
    reader = torch._C.PyTorchFileReader(path)
    with zipfile.ZipFile(path) as zf:
        sizes = {i.filename.split("/", 1)[1]: i.file_size for i in zf.infolist() if "/" in i.filename}
    return {reader.get_record_offset(n): sizes[n] for n in reader.get_all_records()
            if n.startswith("data/") and n in sizes}


def _attach_offsets(path: str, obj: Any) -> None:
    """Give every tensor `_sat_dist_offset`: the file offset of its element 0."""
    tensors = [t for t in iter_tensors(obj) if t.untyped_storage().nbytes() > 0]
    if not tensors:
        return
    records = _records(path)
    ptrs = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    lowest = min(ptrs)
    for candidate in sorted(records):  # the lowest pointer is one of the records: find which
        base = lowest - candidate
        if all(records.get(p - base) == n for p, n in ptrs.items()):
            break
    else:
        raise CheckpointError(
            f"{path}: cannot map its tensors to byte offsets (storages do not match the zip's data "
            f"records); this torch version's loader is not supported by sat_dist"
        )
    for t in tensors:
        t._sat_dist_offset = t.untyped_storage().data_ptr() - base + t.storage_offset() * t.element_size()


def load_structure(path: str) -> Any:
    """Unpickle `path` with tensors lazily mapped (never touched) and their byte offsets attached;
    raises CheckpointError naming the file and any disallowed global."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a torch zip checkpoint (legacy serialization or truncated/corrupt file); "
            f"sat_dist reads byte ranges and needs torch.save's default zip format: re-save it with torch.save"
        )
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        text = str(exc)
        if "Unsupported global" in text or "weights_only" in text.lower():
            try:
                names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:  # pragma: no cover - best effort naming
                names = []
            allowed = {f"{g.__module__}.{g.__qualname__}" for g in allowed_globals()}
            names = [n for n in names if n not in allowed] or names
            raise CheckpointError(
                f"{path} pickles global(s) outside sat_dist's allow-list: {names}. Checkpoints are "
                f"untrusted input and are never unpickled with weights_only=False; re-save the weights "
                f"as torch.save({{'module': state_dict}}) or report the global if a real SAT/DeepSpeed "
                f"file carries it"
            ) from exc
        raise CheckpointError(f"cannot read the structure of {path}: {type(exc).__name__}: {exc}") from exc
    _attach_offsets(path, obj)
    return obj


def locate(path: str, tensor: Any, name: str, file_size: int) -> StoredTensor:
    """Byte location of one tensor from `load_structure(path)`, bounds-checked."""
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
    st = StoredTensor(
        file=path,
        byte_offset=getattr(tensor, "_sat_dist_offset", 0),
        dtype=tensor.dtype,
        shape=tuple(tensor.shape),
        stride=tuple(tensor.stride()),
    )
    if st.byte_offset + st.extent_bytes() > file_size:
        raise CheckpointError(
            f"{path}: tensor {name!r} ends at byte {st.byte_offset + st.extent_bytes()} but the file has "
            f"{file_size} bytes: the file is truncated; copy it again"
        )
    return st
