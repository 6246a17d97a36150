"""The read paths of `materialize` give the same bytes (issue 14, warm-path performance).

A strided run set (a row split: one short run per row) is read one of two ways: from a mapping
of the file with one strided copy when its first row is in the page cache (RWF_NOWAIT), else
with a pread per run (exact storage I/O for a cold cache). Both must place exactly the planned
bytes; a span past the end of the file never gets mapped (it would fault) and fails as truncated.
Fresh host targets are pre-faulted with one madvise each.
"""
import os

import numpy as np
import pytest
import torch

from sat_dist import materialize as M
from sat_dist.errors import CheckpointError
from sat_dist.placement import Box
from sat_dist.plan import CopyOp, RunSet

SIZE = 3 << 20


@pytest.fixture()
def blob(tmp_path):
    data = np.random.default_rng(5).integers(0, 256, SIZE, dtype=np.uint8)
    path = str(tmp_path / "blob.bin")
    data.tofile(path)
    return path, data


def _op(path: str, runs: tuple) -> CopyOp:
    n = sum(r.nbytes for r in runs)
    return CopyOp("w", path, runs, torch.uint8, (n,), Box((), ()))


def _expected(data: np.ndarray, runs) -> np.ndarray:
    return np.concatenate([data[o:o + n] for rs in runs for o, n in rs.runs()])


# (first, length, step, count): page-unaligned starts, rows shorter and longer than a page, spans
# that cross several MAP_CHUNKs and allocation-granularity boundaries, a single run.
GEOMETRIES = [
    (RunSet(123, 512, 2048, 700),),
    (RunSet(4096, 8192, 32768, 60), RunSet(5, 3, 7, 1000)),
    (RunSet(SIZE - 17 - 99 * 1000, 17, 1000, 100),),
    (RunSet(77, 100_000, 100_000, 1),),
]


@pytest.mark.parametrize("runs", GEOMETRIES)
def test_mapped_and_pread_paths_place_the_same_bytes(blob, runs, monkeypatch):
    path, data = blob
    monkeypatch.setattr(M, "MAP_CHUNK", 64 << 10)  # many chunks, each rebased to the granularity
    mapped = []
    real_copy = M._copy_mapped
    monkeypatch.setattr(M, "_copy_mapped", lambda *a: (mapped.append(a[1]), real_copy(*a))[1])
    op, files = _op(path, runs), M._Files()
    try:
        warm = torch.empty(op.nbytes, dtype=torch.uint8)
        assert M._read_op(files, op, warm) == op.nbytes
        assert [rs for rs in runs if rs.count > 1] == mapped  # just written: cached, so mapped
        monkeypatch.setattr(M, "_cached_first_row", lambda *a: False)
        cold = torch.empty(op.nbytes, dtype=torch.uint8)
        assert M._read_op(files, op, cold) == op.nbytes
    finally:
        files.close()
    want = _expected(data, runs)
    assert np.array_equal(warm.numpy(), want) and np.array_equal(cold.numpy(), want)


def test_evicted_file_takes_the_exact_pread_path(blob, monkeypatch):
    """After the pages are dropped, the RWF_NOWAIT probe of the first row reports a miss, so the
    rows are pread one by one (no mapping: its faults would read other ranks' rows too)."""
    path, data = blob
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    mapped = []
    monkeypatch.setattr(M, "_copy_mapped", lambda *a: mapped.append(a))
    runs = (RunSet(1 << 20, 4096, 16384, 64),)
    op, files = _op(path, runs), M._Files()
    try:
        buf = torch.empty(op.nbytes, dtype=torch.uint8)
        assert M._read_op(files, op, buf) == op.nbytes
    finally:
        files.close()
    assert mapped == []
    assert np.array_equal(buf.numpy(), _expected(data, runs))


def test_span_past_the_end_is_truncated_not_mapped(blob):
    path, _ = blob
    runs = (RunSet(SIZE - 1000, 100, 400, 5),)  # the last run ends 500 bytes past the end
    op, files = _op(path, runs), M._Files()
    try:
        with pytest.raises(CheckpointError, match="truncated") as info:
            M._read_op(files, op, torch.empty(op.nbytes, dtype=torch.uint8))
    finally:
        files.close()
    assert path in str(info.value) and "'w'" in str(info.value)


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def test_prefault_makes_fresh_targets_resident():
    t = torch.empty(64 << 20, dtype=torch.uint8)
    before = _rss()
    done = M.prefault([t])
    grown = _rss() - before
    assert done >= (64 << 20) - 2 * 4096  # all but the partial pages at both ends
    assert grown >= done - (1 << 20)  # resident now, before any write
    assert M.prefault([torch.empty(100, dtype=torch.uint8)]) == 0  # small tensors: not worth a call
