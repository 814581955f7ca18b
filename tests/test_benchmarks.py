"""Smoke test of experiments/benchmarks/moe_layer.py: every row of --quick runs and the JSON is strict.
Speed itself is measured by the benchmark, never asserted here."""
import json
import math

from experiments.benchmarks import moe_layer


def test_moe_layer_quick(tmp_path):
    out = tmp_path / "rows.json"
    moe_layer.main(["--quick", "--json", str(out)])
    rows = json.loads(out.read_text())
    want = {(d, b, e.get("capacity_factor"), e.get("block_size")) for d, b, e in moe_layer.variants(quick=True)}
    got = {(r["dispatch"], r["backend"], r["cf"], r["block"]) for r in rows if r["dispatch"] != "dense"}
    assert got == want
    assert len([r for r in rows if r["dispatch"] == "dense"]) == len(moe_layer.QUICK_SHAPES)
    for r in rows:
        assert r["time_ms"] is not None and r["time_ms"] > 0 and math.isfinite(r["ratio_vs_dense"])
        assert r["temp_mib"] >= 0 and r["temp_mib_big"] >= r["temp_mib"] * 0.5
