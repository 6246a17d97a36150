"""The structure the import contracts (.importlinter) cannot express: the pure layer never touches
torch.distributed, every reader has the one interface, every model family is a complete entry of
the explicit table, and no module outgrows one concept (~400 lines)."""
from __future__ import annotations

import ast
import inspect
import os

import pytest

import sat_dist
from sat_dist import formats, models
from sat_dist.models.family import ModelFamily

PKG = os.path.dirname(sat_dist.__file__)
PURE = ["placement.py", "index.py", "plan.py", "formats"]


def _sources(rel: str) -> list[str]:
    path = os.path.join(PKG, rel)
    if os.path.isfile(path):
        return [path]
    return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".py")]


def _imports(path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("rel", PURE)
def test_pure_layer_never_imports_torch_distributed(rel: str) -> None:
    for path in _sources(rel):
        bad = {m for m in _imports(path) if m == "torch.distributed" or m.startswith("torch.distributed.")}
        assert not bad, f"{os.path.relpath(path, PKG)} imports {sorted(bad)}: planning and readers are pure"


def test_every_reader_has_the_one_interface() -> None:
    assert [r.NAME for r in formats.READERS][0] == "deepspeed" and formats.READERS[-1].NAME == "sat"
    for reader in formats.READERS:
        for fn, params in (("recognise", ["path", "tag"]), ("index", ["req"]), ("describe", ["path", "tag"]),
                           ("model_config", ["path"])):
            sig = inspect.signature(getattr(reader, fn))
            assert len(sig.parameters) == len(params), (reader.NAME, fn, sig)


def test_model_families_are_an_explicit_complete_table() -> None:
    classes = [c for f in models.FAMILIES for c in f.model_classes]
    assert len(classes) == len(set(classes))
    assert {f.name for f in models.FAMILIES} == {"sat_gpt", "cogvideox", "t5", "cogvideox_vae"}
    for family in models.FAMILIES:
        assert isinstance(family, ModelFamily)
        assert callable(family.build) and hasattr(family.config_cls, "check_tp")
        for cls in family.model_classes:
            assert models.family_for(cls) is family


def test_no_module_over_400_lines() -> None:
    long = {os.path.relpath(p, PKG): n for p in _sources(".")
            if (n := sum(1 for _ in open(p))) > 400}
    assert not long, f"modules over ~400 lines (split by concept): {long}"
