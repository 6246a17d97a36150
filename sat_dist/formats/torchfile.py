"""Read a torch zip checkpoint's structure (names, shapes, dtypes, byte offsets) without its data.

`torch.load(weights_only=True, mmap=True)`: torch's own restricted unpickler parses `data.pkl`, and
every storage comes back as a slice of one private, lazy mapping of the file, so no tensor page is
touched (measured: 40 KB of I/O and 2 ms for a 64 MB file). A storage's byte offset in the file is
its pointer minus the mapping's base; the base is derived from the zip's own record offsets and
*verified* for every storage (offset and size must match a `data/<key>` record), so a change in
torch's loader fails loudly instead of reading wrong bytes. Each tensor gets `_sat_dist_offset`.
(FakeTensorMode gives offsets too, but imports torch._dynamo: 1-2.5 s per process.)
Pickled globals are checked by name against an explicit allow-list (numpy RNG state, DeepSpeed's
data-only stand-ins from `ds_pickle`) *before* anything is unpickled.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any, Iterator

import torch

from ..errors import CheckpointError, UnsafeCheckpointError
from ..index import StoredTensor
from .ds_pickle import DEEPSPEED_STUBS


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


def allowed_globals() -> list[Any]:
    """The only pickled globals sat_dist accepts: numpy RNG state (SAT training saves) and DeepSpeed's
    optimizer-file classes (as data-only stand-ins)."""
    return _numpy_globals() + list(DEEPSPEED_STUBS)


def _qualname(g: Any) -> str:
    return f"{g.__module__}.{g.__qualname__}"


def _refuse_unknown_globals(path: str) -> None:
    """Name every pickled global outside the allow-list, reading only `data.pkl`'s opcodes."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:
        raise CheckpointError(f"cannot read the pickle of {path}: {type(exc).__name__}: {exc}; the file is "
                              f"truncated or corrupt: copy it again") from exc
    allowed = {_qualname(g) for g in allowed_globals()}
    bad = [n for n in names if n not in allowed]
    if bad:
        raise UnsafeCheckpointError(
            f"{path} pickles global(s) outside sat_dist's allow-list: {bad}. Checkpoints are "
            f"untrusted input and are never unpickled with weights_only=False; re-save the weights "
            f"as torch.save({{'module': state_dict}}) or report the global if a real SAT/DeepSpeed "
            f"file carries it"
        )


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v)


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested structure (sizes only: nothing is read)."""
    return sum(t.numel() * t.element_size() for t in iter_tensors(obj))


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
    # The lowest pointer is one of the records: the base is the one under which every storage is a
    # record of its own size (a base matching positions only can be a wrong alignment of small records).
    candidates = [lowest - c for c in sorted(records)]
    base = next((b for b in candidates if all(records.get(p - b) == n for p, n in ptrs.items())), None)
    if base is None:
        near = next((b for b in candidates if all(p - b in records for p in ptrs)), None)
        if near is None:
            raise CheckpointError(
                f"{path}: cannot map its tensors to byte offsets (storages do not match the zip's data "
                f"records); this torch version's loader is not supported by sat_dist"
            )
        p, n = next((p, n) for p, n in sorted(ptrs.items()) if records[p - near] != n)
        raise CheckpointError(
            f"{path}: the storage at byte {p - near} holds {n} bytes by data.pkl but its zip record holds "
            f"{records[p - near]}: the file is corrupt or was edited; copy it again"
        )
    for t in tensors:
        t._sat_dist_offset = t.untyped_storage().data_ptr() - base + t.storage_offset() * t.element_size()


def _not_zip(path: str) -> CheckpointError:
    """Why `path` is not a torch zip: legacy torch serialization (a bare pickle, refused: sat_dist
    reads byte ranges of zip records), a damaged zip, or not a torch file at all."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":  # pickle protocol 2+: torch.save(..., _use_new_zipfile_serialization=False)
        return CheckpointError(
            f"{path} uses torch's legacy (pre-1.6, non-zip) serialization, which sat_dist does not read: it "
            f"reads byte ranges of the zip format. Convert it once, where the file is trusted: python -c \"import "
            f"torch, sys; torch.save(torch.load(sys.argv[1], weights_only=True), sys.argv[2])\" OLD.pt NEW.pt")
    if head == b"PK\x03\x04":
        return CheckpointError(f"{path} is a damaged zip (no end-of-central-directory record: truncated or "
                               f"overwritten); copy it again")
    return CheckpointError(f"{path} is not a torch checkpoint (it starts with bytes {head!r}, not a zip); "
                           f"copy it again, or pass the right file")


def load_structure(path: str) -> Any:
    """Unpickle `path` with tensors lazily mapped (never touched) and their byte offsets attached;
    raises CheckpointError naming the file and any disallowed global."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        is_zip = zipfile.is_zipfile(path)
    except Exception:  # zipfile raises BadZipFile, not False, for some damaged end records
        is_zip = False
    if not is_zip:
        raise _not_zip(path)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:  # refused: name every global outside the allow-list, else say why
        _refuse_unknown_globals(path)  # (a second pass over data.pkl, paid only by a refused file)
        raise UnsafeCheckpointError(f"{path}: torch's weights_only unpickler refused it: {exc}") from exc
    except Exception as exc:
        raise CheckpointError(f"cannot read the structure of {path}: {type(exc).__name__}: {exc}; its data.pkl "
                              f"describes tensors its zip records do not hold (the file is damaged, or was "
                              f"crafted): copy it again") from exc
    try:
        _attach_offsets(path, obj)
    except CheckpointError:
        raise
    except Exception as exc:  # zipfile / torch's zip reader on a damaged directory
        raise CheckpointError(f"{path}: its zip directory cannot be read ({type(exc).__name__}: {exc}); the file is "
                              f"damaged: copy it again") from exc
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
