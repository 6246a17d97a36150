"""Bounded fuzzing (hypothesis) of the parsers that read untrusted bytes: safetensors headers, the
torch zip / data.pkl structure of SAT files, and DeepSpeed ZeRO-3 optimizer files. Whatever the
input, the reader either returns locations that lie inside the file or raises a named
sat_dist error; no other exception, no example over a few seconds, and no allocation sized by the
input (peak RSS stays flat). CI runs a few hundred derandomized examples (the same every run, so
CI is repeatable); `make fuzz` (HYPOTHESIS_PROFILE=fuzz) runs thousands of fresh random ones.
Inputs a random run found are pinned below with @example.
"""
from __future__ import annotations

import collections
import json
import os
import resource
import shutil
import signal
import struct
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from corpus_lib import CFG, DENSE, _Storage, _View, _zero3, write_torch_zip
from sat_dist.errors import SatDistError
from sat_dist import formats
from sat_dist.formats.base import IndexRequest
from sat_dist.formats.safetensors_header import DTYPES, read_header
from sat_dist.formats.torchfile import iter_tensors, load_structure, locate
from sat_dist.models import TPInfo, build_meta_model, collect_specs
from sat_dist.config import build_model_config

settings.register_profile("ci", max_examples=int(os.environ.get("SAT_DIST_FUZZ_EXAMPLES", "150")), deadline=None,
                          suppress_health_check=list(HealthCheck), derandomize=True)
settings.register_profile("fuzz", max_examples=int(os.environ.get("SAT_DIST_FUZZ_EXAMPLES", "5000")), deadline=None,
                          suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

EXAMPLE_S = 10  # one example taking longer is a hang
RUN = collections.Counter()
_DIR = tempfile.mkdtemp(prefix="sat-dist-fuzz-")
_RSS0: list[int] = []  # peak RSS (KiB) when this file's first test starts, not at collection:
# other files' tests run in this process between collection and here


@pytest.fixture(autouse=True)
def _rss_baseline():
    if not _RSS0:
        _RSS0.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    yield


class _Hang(Exception):
    pass


def _alarm(*_):
    raise _Hang(f"one example ran past {EXAMPLE_S}s")


def bounded(fn, *args):
    """fn(*args) under an alarm: its result, or the named error it raised (anything else fails)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(EXAMPLE_S)
    try:
        return fn(*args)
    except SatDistError as exc:
        return exc
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _inside(stored, size: int) -> None:
    assert 0 <= stored.byte_offset and stored.byte_offset + stored.extent_bytes() <= size, (stored, size)


# --- safetensors headers --------------------------------------------------------------------------

_DIM = st.one_of(st.integers(0, 8), st.integers(0, 1 << 62), st.integers(-3, -1))
_ENTRY = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=5), st.integers()),
    "shape": st.one_of(st.lists(_DIM, max_size=4), st.integers(), st.none()),
    "data_offsets": st.one_of(st.lists(st.one_of(st.integers(0, 256), st.integers(-5, 1 << 63)), max_size=3),
                              st.text(max_size=3)),
})
_HEADER = st.dictionaries(st.text(max_size=8), st.one_of(_ENTRY, st.integers(), st.text(max_size=4)), max_size=5)


@given(header=_HEADER, meta=st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.one_of(st.text(max_size=4),
                                                                                                  st.integers()))),
       data=st.binary(max_size=300), length_delta=st.one_of(st.just(0), st.integers(-20, 20), st.just(1 << 60)))
def test_safetensors_header(header, meta, data, length_delta):
    if meta is not None:
        header = {**header, "__metadata__": meta}
    raw = json.dumps(header).encode()
    path = os.path.join(_DIR, "f.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", max(0, len(raw) + length_delta) % (1 << 64)) + raw + data)
    out = bounded(read_header, path)
    RUN["safetensors"] += 1
    if not isinstance(out, SatDistError):
        for t in out.tensors.values():
            _inside(t, os.path.getsize(path))


_GOOD_ST = None


def _good_safetensors() -> bytes:
    global _GOOD_ST
    if _GOOD_ST is None:
        from safetensors.torch import save_file

        p = os.path.join(_DIR, "good.safetensors")
        save_file({"a": torch.randn(4, 3), "b": torch.arange(5), "c": torch.zeros(0)}, p, metadata={"k": "v"})
        _GOOD_ST = open(p, "rb").read()
    return _GOOD_ST


_MUTATIONS = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8)


def _mutate(data: bytes, edits, cut) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        b[pos % len(b)] = val
    return bytes(b[:cut]) if cut is not None else bytes(b)


@given(edits=_MUTATIONS, cut=st.one_of(st.none(), st.integers(0, 400)))
def test_safetensors_bytes(edits, cut):
    path = os.path.join(_DIR, "m.safetensors")
    data = _mutate(_good_safetensors(), edits, cut)
    open(path, "wb").write(data)
    out = bounded(read_header, path)
    RUN["safetensors"] += 1
    if not isinstance(out, SatDistError):
        for t in out.tensors.values():
            _inside(t, len(data))


# --- SAT files: the torch zip and its data.pkl -------------------------------------------------------

def _structure(path: str) -> None:
    """What the SAT reader does with one file: load_structure, then locate every tensor."""
    obj = load_structure(path)
    size = os.path.getsize(path)
    module = obj.get("module") if isinstance(obj, dict) else None
    for name, t in (module.items() if isinstance(module, dict) else []):
        if isinstance(t, torch.Tensor):
            _inside(locate(path, t, name, size), size)
    for t in iter_tensors(obj):
        assert t.untyped_storage().nbytes() <= size


_GOOD_PT = None


def _good_pt() -> bytes:
    global _GOOD_PT
    if _GOOD_PT is None:
        p = os.path.join(_DIR, "good.pt")
        torch.save({"module": {"a": torch.randn(8, 4), "b": torch.arange(6).half()}, "iteration": 3}, p)
        _GOOD_PT = open(p, "rb").read()
    return _GOOD_PT


@given(edits=_MUTATIONS, cut=st.one_of(st.none(), st.integers(0, 2000)))
def test_sat_zip_bytes(edits, cut):
    data = _good_pt()
    # aim half of the edits at the structure (data.pkl at the front, the directory at the back)
    edits = [(p if i % 2 else (len(data) - 1 - p % 600 if p % 3 else p % 400), v) for i, (p, v) in enumerate(edits)]
    path = os.path.join(_DIR, "m.pt")
    open(path, "wb").write(_mutate(data, edits, cut))
    bounded(_structure, path)
    RUN["sat_zip"] += 1


_BIG = st.one_of(st.integers(0, 40), st.integers(0, 1 << 62))


@given(numel=_BIG, offset=st.one_of(_BIG, st.integers(-5, -1)), size=st.lists(_BIG, max_size=3),
       stride=st.lists(st.one_of(_BIG, st.integers(-3, 0)), max_size=3), record=st.integers(0, 200))
def test_sat_pickled_tensor_header(numel, offset, size, stride, record):
    path = os.path.join(_DIR, "h.pt")
    stride = (stride + [1] * 3)[:len(size)]
    write_torch_zip(path, {"module": {DENSE: _View(_Storage("0", numel), offset, tuple(size), tuple(stride))}},
                    {"0": bytes(record)})
    bounded(_structure, path)
    RUN["sat_pickle"] += 1


# --- DeepSpeed ZeRO-3 optimizer and model-states files ------------------------------------------------

_ZERO3 = None


def _zero3_template() -> str:
    global _ZERO3
    if _ZERO3 is None:
        _ZERO3 = os.path.join(_DIR, "zero3")
        _zero3(_ZERO3)
    return _ZERO3


def _specs():
    model = build_meta_model(build_model_config(dict(model_class="BaseModel", **CFG)), TPInfo())
    return collect_specs(model)


SPECS = None


def _ds_index(root: str, tp: int, rank: int) -> None:
    idx, files = formats.open_index(IndexRequest(root, SPECS, tp, rank, weights="fp32"))
    for pieces in idx.pieces.values():
        for p in pieces:
            _inside(p.stored, os.path.getsize(p.file))


@given(partition_count=st.one_of(st.integers(0, 4), st.integers(), st.text(max_size=2), st.lists(st.integers(0, 3))),
       stage=st.one_of(st.integers(-1, 4), st.none(), st.text(max_size=2)),
       cut=st.integers(0, 100000), dims=st.lists(_BIG, min_size=1, max_size=3),
       dp_world=st.one_of(st.integers(0, 4), st.none()), drop_groups=st.booleans(), tp=st.sampled_from([1, 2]))
# found by CI's random run: a saved partition_count of 10**20 made the error message build range(dp, 10**20)
@example(partition_count=10**20, stage=3, cut=0, dims=[4, 4], dp_world=2, drop_groups=False, tp=1)
@example(partition_count=[0, 1 << 62], stage=3, cut=0, dims=[4, 4], dp_world=None, drop_groups=False, tp=2)
def test_deepspeed_optimizer_files(partition_count, stage, cut, dims, dp_world, drop_groups, tp):
    global SPECS
    SPECS = SPECS or _specs()
    root = os.path.join(_DIR, "ds")
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(_zero3_template(), root)
    tag = os.path.join(root, "global_step1")
    optim = os.path.join(tag, "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    o = torch.load(optim, weights_only=True)
    osd = o["optimizer_state_dict"]
    osd.update(partition_count=partition_count, zero_stage=stage)
    osd["fp32_flat_groups"] = [] if drop_groups else [osd["fp32_flat_groups"][0][:cut].clone()]
    torch.save(o, optim)
    model = os.path.join(tag, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    m = torch.load(model, weights_only=True)
    m["param_shapes"][0][DENSE] = torch.Size(dims)
    if dp_world is None:
        m.pop("dp_world_size")
    else:
        m["dp_world_size"] = dp_world
    torch.save(m, model)
    bounded(_ds_index, root, tp, tp - 1)
    RUN["deepspeed"] += 1


def test_zz_fuzz_summary():
    """Runs last: every fuzz target ran, and peak RSS did not grow by what a header claimed."""
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - _RSS0[0]) * 1024
    print(f"fuzz examples run: {dict(RUN)} ({sum(RUN.values())} in all); peak RSS grew {grew / 2**20:.0f} MiB")
    if len(RUN) < 4:
        pytest.skip("run with the other tests of this file")
    assert grew < 512 << 20, f"peak RSS grew {grew / 2**20:.0f} MiB while fuzzing"
