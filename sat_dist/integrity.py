"""Checkpoint integrity: a manifest of SHA-256 over fixed-size blocks of every file, `--verify`
checking the blocks under one rank's own reads, and atomic writes for everything sat_dist writes.

The manifest (`sat-dist manifest CKPT` -> `CKPT/sat-dist-manifest.json`; `write_manifest(paths,
out)` for writers such as `convert`) is JSON:

    {"format": "sat-dist-manifest", "version": 1, "algorithm": "sha256", "block_bytes": 4194304,
     "files": {"<path relative to the manifest's folder>": {"bytes": N, "sha256": ["<hex>", ...]}}}

Block i of a file covers bytes [i * block_bytes, min((i + 1) * block_bytes, N)); an empty file has
no blocks. With `--verify`, each rank hashes only the blocks that its plan's byte runs touch, plus
the first and last block of each file it opens (where the headers it parsed live: a torch zip's
`data.pkl` and central directory, a safetensors header), so a load verifies about its own bytes and
a flipped bit anywhere a rank reads fails the load, naming the file and the block. Files are
written atomically: a temporary name in the same folder, fsync, rename, fsync of the folder; a
killed run leaves no file that looks complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Collection, Iterable, Mapping, Optional, Sequence

from .errors import IntegrityError
from .plan import ReadPlan

MANIFEST_NAME = "sat-dist-manifest.json"
FORMAT = "sat-dist-manifest"
BLOCK_BYTES = 4 << 20
_MAX_MANIFEST = 256 << 20  # bytes: ~3.5 M blocks (14 TB at 4 MiB); a larger file is not a manifest
_HASH_THREADS = 4


# --- atomic writes -------------------------------------------------------------------------------

def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent/old or complete: temporary file in
    the same folder, fsync, rename over `path`, fsync of the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed: no partial file is left behind
            os.unlink(tmp)
    with contextlib.ExitStack() as stack:  # the rename itself reaches storage
        dfd = os.open(folder, os.O_RDONLY)
        stack.callback(os.close, dfd)
        os.fsync(dfd)


def atomic_write_json(path: str, obj: object) -> None:
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


# --- writing a manifest ---------------------------------------------------------------------------

def hash_blocks(path: str, block_bytes: int = BLOCK_BYTES) -> tuple[int, list[str]]:
    """(size, SHA-256 hex of each block) of one file, read sequentially."""
    out = []
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        buf = bytearray(block_bytes)
        view = memoryview(buf)
        for _ in range(-(-size // block_bytes)):
            n = f.readinto(buf)
            while n < block_bytes and (more := f.readinto(view[n:])):
                n += more
            out.append(hashlib.sha256(view[:n]).hexdigest())
    return size, out


def write_manifest(paths: Iterable[str], out: str, block_bytes: int = BLOCK_BYTES) -> dict:
    """Hash `paths` (files under `out`'s folder) and write the manifest to `out` atomically.
    Returns the manifest. For writers (`convert`): call it after the files are complete."""
    if block_bytes <= 0 or block_bytes % 4096:
        raise ValueError(f"block_bytes must be a positive multiple of 4096, got {block_bytes}")
    root = os.path.dirname(os.path.abspath(out))
    files = {}
    for p in sorted(set(os.path.abspath(p) for p in paths)):
        rel = os.path.relpath(p, root)
        if rel.startswith(os.pardir + os.sep) or rel == os.pardir:
            raise ValueError(f"{p} is not under {root}, the manifest's folder")
        size, blocks = hash_blocks(p, block_bytes)
        files[rel.replace(os.sep, "/")] = {"bytes": size, "sha256": blocks}
    manifest = {"format": FORMAT, "version": 1, "algorithm": "sha256", "block_bytes": block_bytes, "files": files}
    atomic_write_json(out, manifest)
    return manifest


def checkpoint_files(root: str) -> list[str]:
    """Every regular file under folder `root` (or `root` itself), except manifests and temporaries."""
    if os.path.isfile(root):
        return [root]
    out = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for n in sorted(names):
            if n == MANIFEST_NAME or (n.startswith(".") and n.endswith(".tmp")):
                continue
            p = os.path.join(folder, n)
            if os.path.isfile(p):
                out.append(p)
    return out


def manifest_path(checkpoint: str) -> str:
    """Where a checkpoint's manifest lives: in the folder, or beside a single file."""
    return os.path.join(checkpoint_folder(checkpoint), MANIFEST_NAME)


# --- reading and verifying --------------------------------------------------------------------------

@dataclass(frozen=True)
class Manifest:
    path: str
    block_bytes: int
    files: Mapping[str, tuple[int, Sequence[str]]]  # relative path -> (bytes, block hashes)
    root: str  # the folder the relative paths start from: the checkpoint's

    def entry(self, path: str) -> tuple[str, int, Sequence[str]]:
        rel = os.path.relpath(os.path.realpath(path), os.path.realpath(self.root)).replace(os.sep, "/")
        if rel not in self.files:
            raise IntegrityError(f"{path} is not in the manifest {self.path}, which lists {len(self.files)} files: "
                                 f"the manifest is older than the file; write it again (sat-dist manifest)")
        return (rel, *self.files[rel])


def _bad(path: str, what: str) -> IntegrityError:
    return IntegrityError(f"{path} is not a usable sat-dist manifest: {what}; write it again with "
                          f"`sat-dist manifest CHECKPOINT`")


def checkpoint_folder(checkpoint: str) -> str:
    return checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))


def read_manifest(path: str, root: Optional[str] = None) -> Manifest:
    """Parse and validate a manifest (it is as untrusted as the checkpoint it describes); its paths
    are relative to `root` (default: the manifest's folder)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_MANIFEST + 1)
    except FileNotFoundError:
        raise IntegrityError(f"--verify needs a manifest, but {path} does not exist; write it where the "
                             f"checkpoint was produced with `sat-dist manifest CHECKPOINT`") from None
    except OSError as exc:
        raise IntegrityError(f"cannot read the manifest {path}: {exc}") from exc
    if len(raw) > _MAX_MANIFEST:
        raise _bad(path, f"it is larger than {_MAX_MANIFEST} bytes")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _bad(path, f"not JSON ({exc})") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or obj.get("algorithm") != "sha256":
        raise _bad(path, f"'format' must be {FORMAT!r} and 'algorithm' 'sha256'")
    block = obj.get("block_bytes")
    if type(block) is not int or block <= 0:
        raise _bad(path, f"block_bytes {block!r} is not a positive integer")
    files = obj.get("files")
    if not isinstance(files, dict):
        raise _bad(path, "'files' is not an object")
    out = {}
    for rel, e in files.items():
        size, blocks = (e.get("bytes"), e.get("sha256")) if isinstance(e, dict) else (None, None)
        if type(size) is not int or size < 0 or not isinstance(blocks, list) or len(blocks) != -(-size // block) \
                or not all(isinstance(h, str) and len(h) == 64 for h in blocks):
            raise _bad(path, f"the entry of {rel!r} is not {{bytes, sha256: one 64-digit hash per block}}")
        out[rel] = (size, tuple(blocks))
    return Manifest(path, block, out, root or os.path.dirname(os.path.abspath(path)))


def blocks_read(plan: ReadPlan, block_bytes: int, sizes: Mapping[str, int],
                names: Optional[Collection[str]] = None) -> dict[str, set[int]]:
    """Block indices that each file's planned byte runs touch (only the ops of tensors in `names`,
    the ones this rank reads itself, when given), plus the first and last block of every file of
    the plan (its headers, which this rank parsed)."""
    out: dict[str, set[int]] = {f: set() for f in plan.files}
    for op in plan.ops:
        if names is not None and op.name not in names:
            continue
        blocks = out.setdefault(op.file, set())
        for rs in op.runs:
            if rs.count == 0 or rs.length == 0:
                continue
            last_end = rs.span()[1]
            if rs.count == 1 or rs.step - rs.length < block_bytes:  # gaps shorter than a block: all touched
                blocks.update(range(rs.first // block_bytes, (last_end - 1) // block_bytes + 1))
            else:
                for off, n in rs.runs():
                    blocks.update(range(off // block_bytes, (off + n - 1) // block_bytes + 1))
    for f, blocks in out.items():
        n = -(-sizes.get(f, 0) // block_bytes)
        blocks.update({0, n - 1} if n else set())
    return out


@dataclass
class VerifyStats:
    files: int = 0
    blocks: int = 0
    bytes_hashed: int = 0


def _check_file(path: str, rel: str, size: int, hashes: Sequence[str], blocks: set[int], block_bytes: int,
                pool: ThreadPoolExecutor, manifest: str, stats: VerifyStats) -> None:
    try:
        f = open(path, "rb", buffering=0)
    except OSError as exc:
        raise IntegrityError(f"--verify: cannot open {path}: {exc}") from exc
    with f:
        fd = f.fileno()
        actual = os.fstat(fd).st_size
        if actual != size:
            raise IntegrityError(f"{path} has {actual} bytes but the manifest {manifest} says {size}: the file is "
                                 f"truncated, extended or replaced; copy it again")
        want = sorted(b for b in blocks if 0 <= b < len(hashes))

        local = threading.local()  # one reused block buffer per hashing thread

        def one(b: int) -> Optional[tuple[int, str]]:
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = memoryview(bytearray(block_bytes))
            n = min(block_bytes, size - b * block_bytes)
            got = 0
            while got < n:
                k = os.preadv(fd, [buf[got:n]], b * block_bytes + got)
                if k <= 0:
                    raise IntegrityError(f"{path}: unexpected end of file in block {b}: the file is truncated")
                got += k
            digest = hashlib.sha256(buf[:n]).hexdigest()
            return None if digest == hashes[b] else (b, digest)
        bad = [r for r in pool.map(one, want) if r is not None]
        stats.files += 1
        stats.blocks += len(want)
        stats.bytes_hashed += sum(min(block_bytes, size - b * block_bytes) for b in want)
    if bad:
        b, got = bad[0]
        lo, hi = b * block_bytes, min((b + 1) * block_bytes, size)
        more = f" (and {len(bad) - 1} more block(s): {[x for x, _ in bad[1:6]]})" if len(bad) > 1 else ""
        raise IntegrityError(
            f"{path}: block {b} (bytes {lo}-{hi - 1}) does not match the manifest {manifest}: SHA-256 "
            f"{got[:16]}... where the manifest has {hashes[b][:16]}...{more}; the file is corrupt: copy it again"
        )


def verify_plan(plan: ReadPlan, manifest: Manifest, names: Optional[Collection[str]] = None) -> VerifyStats:
    """Hash the blocks under `plan`'s reads (of the tensors in `names`, if given) and compare them
    with `manifest`; IntegrityError names the first file and block that differ."""
    stats = VerifyStats()
    entries = {f: manifest.entry(f) for f in plan.files}
    touched = blocks_read(plan, manifest.block_bytes, {f: e[1] for f, e in entries.items()}, names)
    with ThreadPoolExecutor(min(_HASH_THREADS, os.cpu_count() or 1), thread_name_prefix="sat_dist-verify") as pool:
        for f in sorted(touched):
            rel, size, hashes = entries[f]
            _check_file(f, rel, size, hashes, touched[f], manifest.block_bytes, pool, manifest.path, stats)
    return stats


def verify_load(plan: ReadPlan, checkpoint: str, manifest: Optional[str] = None,
                names: Optional[Collection[str]] = None) -> VerifyStats:
    """`--verify`: check `plan`'s reads (of `names`: the tensors this rank reads itself, the others
    arrive from the peer that verified them) against the manifest (default: the checkpoint's own;
    its paths are relative to the checkpoint's folder wherever the manifest is kept)."""
    return verify_plan(plan, read_manifest(manifest or manifest_path(checkpoint), checkpoint_folder(checkpoint)),
                       names)
