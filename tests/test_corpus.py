"""Every malformed or malicious checkpoint of the corpus (tests/corpus_lib.py: truncated and damaged
files, wrong zip record sizes, missing/dangling/escaping `latest`, missing mp files and model
configs, shape/dtype/key mismatches, mp counts disagreeing with the files, forbidden pickle globals,
legacy torch files, hostile tensor headers, bad DeepSpeed partitions, safetensors and DCP header
damage) fails a 2-rank load with its named error on every rank: no traceback, no hang, and no
canary file (nothing ran)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import sat_dist
from corpus_lib import build
from sat_dist.errors import SatDistError
from sat_dist.testing.dist import run_ranks


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("corpus")))


def _load(rank, path, tp, overrides):
    try:
        sat_dist.load_model(path, tp=tp, overrides=list(overrides), timeout_s=30)
    except SatDistError as exc:
        return {"type": type(exc).__name__, "text": str(exc), "failures": getattr(exc, "failures", None),
                "agreed": getattr(exc, "agreed", None)}
    return {"type": None}


def _check(case, results) -> list[str]:
    bad = [f"rank {r.rank}: {r.error_type}: {r.error}\n{r.traceback or ''}" for r in results if not r.ok]
    if bad:  # an exception that is not a named sat_dist error, a dead rank or a hang
        return bad
    out = []
    vals = [r.value for r in results]
    for r, v in enumerate(vals):
        if v["type"] is None:
            out.append(f"rank {r} loaded it")
        elif v["type"] == "GroupLoadError":
            causes = {c.split(":", 1)[0] for c in (v["failures"] or {}).values()}
            if not v["agreed"] or not causes or not causes <= set(case.cause):
                out.append(f"rank {r}: causes {causes} (agreed {v['agreed']}), expected {case.cause}: {v['text']}")
        elif v["type"] not in case.cause:
            out.append(f"rank {r}: {v['type']}, expected {case.cause}: {v['text']}")
    if not out and len({v["text"] for v in vals}) != 1:
        out.append(f"ranks report different errors: {[v['text'] for v in vals]}")
    for needle in case.needles:
        if not out and needle not in vals[0]["text"]:
            out.append(f"{needle!r} not in: {vals[0]['text']}")
    if case.canary and os.path.exists(case.canary):
        out.append(f"the payload ran: {case.canary} exists")
    return out


def test_corpus_every_case_a_named_error_on_every_rank(corpus):
    assert len(corpus) >= 30
    failures = {}
    for case in corpus:
        problems = _check(case, run_ranks(2, _load, case.path, case.tp, case.overrides, timeout=90))
        if problems:
            failures[case.name] = problems
    assert not failures, "\n\n".join(f"{n}:\n  " + "\n  ".join(p) for n, p in failures.items())
    print(f"corpus: {len(corpus)} cases, {len(corpus) - len(failures)} passed")


def test_corpus_payloads_are_armed_and_never_run(corpus):
    """Unpickled by plain pickle (what weights_only=False would do), each malicious file runs its
    payload; sat_dist's loads above never did."""
    armed = [c for c in corpus if c.canary]
    assert len(armed) >= 5
    assert not [c.name for c in armed if os.path.exists(c.canary)]
    script = textwrap.dedent("""
        import glob, os, pickle, sys, time, torch
        for path in sys.argv[1:]:
            files = sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True))
            for f in files + [os.path.join(path, ".metadata")]:
                if f.endswith(".pt"):
                    torch.load(f, weights_only=False)
                elif f.endswith(".metadata") and os.path.exists(f):
                    pickle.load(open(f, "rb"))
        time.sleep(0.5)  # Popen's child
    """)
    subprocess.run([sys.executable, "-c", script, *[c.path for c in armed]], capture_output=True, timeout=120)
    assert [c.name for c in armed if not os.path.exists(c.canary)] == []
    for c in armed:
        os.remove(c.canary)


def test_corpus_cli_prints_no_traceback(corpus):
    """Through the CLI in one process: exit 1 and one error line per case, never a Python traceback."""
    script = textwrap.dedent("""
        import sys
        from sat_dist.cli import main
        codes = [main(["load", p, "--timeout", "30"]) for p in sys.argv[1:]]
        print("CODES", codes)
    """)
    paths = [c.path for c in corpus]
    out = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "Traceback" not in out.stderr, out.stderr[-5000:]
    codes = eval(out.stdout.split("CODES", 1)[1])
    assert codes == [1] * len(paths), list(zip([c.name for c in corpus], codes))
    assert out.stderr.count("[rank 0]") == len(paths), out.stderr[-5000:]
