"""`sat-dist demo`: a small SAT-format checkpoint written once into a cache folder, then loaded."""
from __future__ import annotations

import os
import shutil
import tempfile
import time

from .models import TPInfo, build_meta_model, collect_specs
from .models.sat_gpt import TransformerConfig
from .writer import model_config_dict, random_state_dict, save_sat_checkpoint

DEMO_MODEL = TransformerConfig(num_layers=2, hidden_size=256, num_attention_heads=8, vocab_size=2048,
                               max_sequence_length=128)


def cache_dir() -> str:
    base = os.environ.get("SAT_DIST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sat_dist")
    return os.path.join(base, "demo-ckpt-v1")


def ensure_demo_checkpoint(path: str | None = None, writer: bool = True, timeout_s: float = 120.0) -> str:
    """Write the demo checkpoint once (atomically: temp folder + rename); non-writers wait for it."""
    path = path or cache_dir()
    if os.path.isfile(os.path.join(path, "latest")):
        return path
    if not writer:
        deadline = time.monotonic() + timeout_s
        while not os.path.isfile(os.path.join(path, "latest")):
            if time.monotonic() > deadline:
                raise TimeoutError(f"demo checkpoint {path} did not appear within {timeout_s:.0f}s")
            time.sleep(0.1)
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=os.path.dirname(path))
    specs = collect_specs(build_meta_model(DEMO_MODEL, TPInfo()))
    save_sat_checkpoint(tmp, random_state_dict(specs, seed=1234), specs, mp_size=1, iteration="1",
                        model_config=model_config_dict(DEMO_MODEL))
    try:
        os.rename(tmp, path)
    except OSError:  # another node/process won the race: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return path
