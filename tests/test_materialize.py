"""The read paths of `materialize` give the same bytes (issue 14, warm-path performance).

A strided run set (a row split: one short run per row) is read chunk by chunk one of two ways:
from a mapping of the file with one strided copy when cachestat says the chunk's pages are cached
(but for a few, each then read alone on its fault),
else with a pread per run (exact storage I/O for a cold cache), after one WILLNEED of the rows
left. Where the kernel cannot tell (before 6.5, not the file's owner), every run is pread. All must
place exactly the planned bytes; a span past the end of the file is never mapped (it would
fault) and fails as truncated. Fresh host targets are pre-faulted with one madvise each.
"""
import os

import numpy as np
import pytest
import torch

from sat_dist import materialize as M
from sat_dist.errors import CheckpointError
from sat_dist.pagecache import evict
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


def _read(path: str, runs: tuple) -> torch.Tensor:
    op, files = _op(path, runs), M._Files()
    try:
        buf = torch.empty(op.nbytes, dtype=torch.uint8)
        assert M._read_op(files, op, buf) == op.nbytes
    finally:
        files.close()
    return buf




@pytest.fixture()
def spies(monkeypatch):
    """Records each chunk's cachestat verdict and each strided pread pass's prefetch flag."""
    seen = {"cached": [], "prefetched": []}
    real_missing, real_rows = M.pages_missing, M._pread_rows

    def missing(*a):
        n = real_missing(*a)
        seen["cached"].append(n is not None and n * M.MAP_MISSING <= a[2] // 4096)
        return n

    monkeypatch.setattr(M, "pages_missing", missing)
    monkeypatch.setattr(M, "_pread_rows", lambda *a: seen["prefetched"].append(real_rows(*a)) or seen["prefetched"][-1])
    monkeypatch.setattr(M, "MAP_CHUNK", 64 << 10)  # many chunks, each rebased to the granularity
    return seen


@pytest.mark.parametrize("runs", GEOMETRIES)
def test_mapped_and_pread_paths_place_the_same_bytes(blob, runs, spies, monkeypatch):
    path, data = blob
    want = _expected(data, runs)
    strided = any(rs.count > 1 for rs in runs)
    warm = _read(path, runs)  # just written: every chunk cached, so copied from the mapping
    assert np.array_equal(warm.numpy(), want)
    assert spies["cached"] and all(spies["cached"]) if strided else not spies["cached"]
    assert spies["prefetched"] == []
    monkeypatch.setattr(M, "pages_missing", lambda *a: None)
    blind = _read(path, runs)  # the kernel cannot say (before 6.5, not the owner): pread per run
    assert np.array_equal(blind.numpy(), want)
    assert spies["prefetched"] == ([False] * len(spies["prefetched"])) and (bool(spies["prefetched"]) == strided)


def test_cold_rows_are_pread_after_one_prefetch(blob, spies):
    """Dropped pages: cachestat reports the chunks missing, so the rows are pread (a fault on a mapping
    would read other ranks' rows too), after one WILLNEED of every remaining row."""
    path, data = blob
    runs = (RunSet(1 << 20, 4096, 16384, 64),)
    evict(path)
    buf = _read(path, runs)
    assert np.array_equal(buf.numpy(), _expected(data, runs))
    assert spies["cached"][0] is False and spies["prefetched"][0] is True
    assert all(spies["prefetched"])  # once issued, it stays issued for the run set


def test_partly_cached_file_mixes_both_paths(blob, spies):
    path, data = blob
    runs = (RunSet(100, 3000, 9000, 300),)  # 2.6 MiB span, 64 KiB chunks
    evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:  # bring back the first 256 KiB only (no readahead past it)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.pread(fd, 256 << 10, 0)
    finally:
        os.close(fd)
    buf = _read(path, runs)
    assert np.array_equal(buf.numpy(), _expected(data, runs))
    assert True in spies["cached"] and False in spies["cached"]


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


def test_pages_missing_follows_the_page_cache(blob):
    path, _ = blob
    fd = os.open(path, os.O_RDONLY)
    try:
        assert M.pages_missing(fd, 5, SIZE - 10) == 0  # just written
        evict(path)
        assert M.pages_missing(fd, 0, SIZE) == SIZE // 4096
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.pread(fd, 3 * 4096, 4096)  # pages 1-3 only
        assert M.pages_missing(fd, 4096 + 1, 3 * 4096 - 2) == 0
        assert M.pages_missing(fd, 4096, 3 * 4096 + 1) == 1  # one byte into page 4
        assert M.pages_missing(fd, 4095, 2) == 1  # page 0 is not cached
        assert M.pages_missing(fd, 0, 10 * 4096) == 7
    finally:
        os.close(fd)


def test_a_few_evicted_pages_still_map_and_read_exactly(blob, spies, monkeypatch):
    """The kernel evicts a page here and there; a chunk missing a few pages is still mapped
    (each missing page read alone on its fault), and the bytes are exact."""
    path, data = blob
    runs = (RunSet(100, 3000, 9000, 300),)  # 2.6 MiB span, 64 KiB chunks
    monkeypatch.setattr(M, "MAP_CHUNK", 1 << 20)  # 256 pages: up to 4 may be missing
    evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:  # page by page (no readahead), all but a few
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for page in set(range(SIZE // 4096)) - {3, 40, 41, 300, 600}:
            os.pread(fd, 4096, page * 4096)
        assert M.pages_missing(fd, 0, SIZE) == 5
    finally:
        os.close(fd)
    buf = _read(path, runs)
    assert np.array_equal(buf.numpy(), _expected(data, runs))
    assert all(spies["cached"]) and spies["prefetched"] == []


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


def test_unmappable_file_falls_back_to_pread(blob, spies, monkeypatch):
    """A file system that cannot map (some FUSE mounts) still loads, row by row."""
    path, data = blob

    def refuse(*a, **k):
        raise OSError(19, "No such device")

    monkeypatch.setattr(M.mmap, "mmap", refuse)
    runs = (RunSet(100, 3000, 9000, 300),)
    buf = _read(path, runs)
    assert np.array_equal(buf.numpy(), _expected(data, runs))
    assert all(spies["cached"]) and spies["prefetched"]  # cached, yet read by the pread path


def _willneeds(monkeypatch, fn):
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append((off, n, advice)))
    fn()
    return calls


def test_stripes_split_the_cold_prefetch_among_tp_peers(monkeypatch):
    """With a Stripe (TP peers on one kernel), the cold prefetch of a row split is whole-row chunks,
    every `count`-th for each peer: together the peers ask once for every byte of the rows from the
    first miss on, in MAP_CHUNK requests; without one, a rank asks for each of its own rows."""
    monkeypatch.setattr(M, "MAP_CHUNK", 64 << 10)
    rs, start = RunSet(1000, 2048, 8192, 100), 3  # 8 whole rows per chunk: chunks 0..12, the last partial
    per = (64 << 10) // rs.step
    own = _willneeds(monkeypatch, lambda: M._prefetch_rows(7, rs, start, None))
    assert own == [(rs.first + j * rs.step, rs.length, os.POSIX_FADV_WILLNEED) for j in range(start, rs.count)]
    got = {i: _willneeds(monkeypatch, lambda i=i: M._prefetch_rows(7, rs, start, M.Stripe(i, 3))) for i in range(3)}
    ranges = sorted((off, off + n) for calls in got.values() for off, n, _ in calls)
    assert ranges[0][0] == rs.first + start * rs.step and ranges[-1][1] == rs.first + rs.count * rs.step
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no overlap
    assert all(n <= per * rs.step for calls in got.values() for _, n, _ in calls)
    for i, calls in got.items():  # peer i asks for chunks i, i+3, ...
        assert [(off - rs.first) // rs.step // per for off, _, _ in calls] == \
            [c for c in range(start // per, -(-rs.count // per)) if c % 3 == i]


def test_cold_rows_with_a_stripe_place_the_same_bytes(blob, spies):
    path, data = blob
    runs = (RunSet(1 << 20, 4096, 16384, 64),)
    for i in range(4):
        evict(path)
        op, files = _op(path, runs), M._Files()
        try:
            buf = torch.empty(op.nbytes, dtype=torch.uint8)
            assert M._read_op(files, op, buf, M.Stripe(i, 4)) == op.nbytes
        finally:
            files.close()
        assert np.array_equal(buf.numpy(), _expected(data, runs)), i


def test_a_cold_chunk_of_a_peers_turn_is_asked_for_whole(blob, spies, monkeypatch):
    """One rank alone (its peers lag or never come): it queues its own turns at the first miss, and
    each missing chunk of a peer's turn it reaches it asks for itself, whole. Every chunk is asked
    for once, as whole rows; never a request per row; the bytes are exact."""
    path, data = blob
    rs = RunSet(1 << 20, 4096, 16384, 64)  # 4 rows per 64 KiB chunk: 16 chunks
    calls, real = [], os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, adv: (calls.append((off, n)), real(fd, off, n, adv))[1])
    evict(path)
    op, files = _op(path, (rs,)), M._Files()
    try:
        buf = torch.empty(op.nbytes, dtype=torch.uint8)
        M._read_op(files, op, buf, M.Stripe(1, 4))
    finally:
        files.close()
    assert np.array_equal(buf.numpy(), _expected(data, (rs,)))
    chunk = 4 * rs.step
    asked = sorted(c for c in calls if c[1] > 0)
    assert asked == [(rs.first + c * chunk, chunk) for c in range(16)], asked
