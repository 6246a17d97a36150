"""`sat-dist bench-sample` (issue 20 item 5): the engine's layouts timed side by side on forked ranks.
On the demo's tiny pipeline (`--tiny mini`), 2 ranks, 2 steps: TP 2 and SP 2 both time every step,
encode and decode (positive seconds), sample the same latents and frames (fp32 reassociation only), the
table has both rows with ratios against the first, and TP 4 on 2 ranks is shown skipped with the
engine's own refusal. Timings are never asserted beyond being there."""
import json

import pytest

from sat_dist.bench.sample import parse_layout
from sat_dist.cli import main


def test_parse_layout():
    assert parse_layout("2,1,off") == (2, 1, False)
    assert parse_layout("1, 2, on") == (1, 2, True)
    assert parse_layout("1,4") == (1, 4, False)
    for bad in ("2", "2,1,maybe", "0,1,off", "a,b,c", "1,1,on,2"):
        with pytest.raises(ValueError, match="expected tp,sp,cfg"):
            parse_layout(bad)


def test_bench_sample_two_layouts_and_a_skip(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench-sample", str(tmp_path / "mini"), "--tiny", "mini", "--world", "2", "--steps", "2",
               "--layouts", "2,1,off", "1,2,off", "4,1,off", "--json", str(out)])
    table = capsys.readouterr().out
    assert rc == 0, table
    rep = json.loads(out.read_text())
    rows = {r["layout"]: r for r in rep["layouts"]}
    assert list(rows) == ["2,1,off", "1,2,off", "4,1,off"]
    for name in ("2,1,off", "1,2,off"):
        r = rows[name]
        assert r["skipped"] is None and r["steps_timed"] == 2
        for key in ("seconds_per_step", "seconds_encode", "seconds_decode", "seconds_total", "seconds_load"):
            assert r[key] > 0, (name, key, r[key])
        assert len(r["runs"]) == 1 and r["runs"][0]["steps"] == 2  # the timed sample's record (warm-up dropped)
    assert (rows["2,1,off"]["mesh"]["tp"], rows["1,2,off"]["mesh"]["sp"]) == (2, 2)
    assert rows["2,1,off"]["x_first_per_step"] == 1.0 and rows["1,2,off"]["x_first_per_step"] > 0
    # the same sample: latents within fp32 reassociation of the first layout's, frames too
    assert rows["1,2,off"]["latents_shape"] == rows["2,1,off"]["latents_shape"]
    assert rows["1,2,off"]["latents_vs_first"] <= 1e-5
    assert rows["1,2,off"]["frames_shape"] == rows["2,1,off"]["frames_shape"] == [9, 32, 48, 3]
    assert rows["1,2,off"]["frames_vs_first"] <= 1e-4
    skip = rows["4,1,off"]
    assert skip["skipped"] and "--tp 4 does not divide the world size 2" in skip["skipped"] and not skip["failed"]
    lines = table.splitlines()
    assert any(line.startswith("2,1,off ") and "tp2 sp1" in line for line in lines), table
    assert any(line.startswith("1,2,off ") and "tp1 sp2" in line for line in lines), table
    assert any(line.startswith("4,1,off ") and "skipped: --tp 4 does not divide" in line for line in lines), table
    assert "x first" in table and "wall " in table
