"""`sat-dist demo`: a small SAT-format checkpoint and a tiny CogVideoX pipeline, each written once into
a cache folder; the checkpoint is loaded (the load table), then the pipeline sampled across the ranks
(TP x CFG parallel) into an mp4 (cli.cmd_demo)."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Callable

from .models import TPInfo, build_meta_model, collect_specs
from .models.sat_gpt import TransformerConfig
from .writer import model_config_dict, random_state_dict, save_sat_checkpoint

DEMO_MODEL = TransformerConfig(num_layers=2, hidden_size=256, num_attention_heads=8, vocab_size=2048,
                               max_sequence_length=128)


def cache_dir(name: str = "demo-ckpt-v1") -> str:
    base = os.environ.get("SAT_DIST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sat_dist")
    return os.path.join(base, name)


def _once(path: str, done: str, write: Callable[[str], None], writer: bool, timeout_s: float) -> str:
    """`write` a folder once (into a temporary folder, then renamed: it appears whole or not at all);
    non-writers wait until the file `done` inside it exists."""
    if os.path.isfile(os.path.join(path, done)):
        return path
    if not writer:
        deadline = time.monotonic() + timeout_s
        while not os.path.isfile(os.path.join(path, done)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"demo files {path} did not appear within {timeout_s:.0f}s")
            time.sleep(0.1)
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=os.path.dirname(path))
    write(tmp)
    try:
        os.rename(tmp, path)
    except OSError:  # another node/process won the race: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _write_checkpoint(folder: str) -> None:
    specs = collect_specs(build_meta_model(DEMO_MODEL, TPInfo()))
    save_sat_checkpoint(folder, random_state_dict(specs, seed=1234), specs, mp_size=1, iteration="1",
                        model_config=model_config_dict(DEMO_MODEL))


def ensure_demo_checkpoint(path: str | None = None, writer: bool = True, timeout_s: float = 120.0) -> str:
    """The demo SAT checkpoint (written once by `writer`; the others wait for it)."""
    return _once(path or cache_dir(), "latest", _write_checkpoint, writer, timeout_s)


def ensure_demo_pipeline(path: str | None = None, writer: bool = True, timeout_s: float = 120.0) -> str:
    """The demo CogVideoX pipeline folder (written once by `writer`; the others wait for it)."""
    from .demo_pipeline import write_demo_pipeline

    return _once(path or cache_dir("demo-pipeline-v1"), "model_index.json", write_demo_pipeline, writer, timeout_s)
