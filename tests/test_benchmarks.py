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


def test_train_throughput_quick(tmp_path):
    """Smoke test of experiments/benchmarks/train_throughput.py: tiny scale, the dense baselines and one
    2x-active MoE row, one timed step each; the JSON is strict and the ratios pick the right baselines."""
    from experiments.benchmarks import train_throughput

    out = tmp_path / "rows.json"
    train_throughput.main(["--quick", "--methods", "gshard", "--repeats", "1", "--json", str(out)])
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"dense", "dense2x", "gshard"}  # baselines added for the 2x-active row
    assert [r["equal_active_baseline"] for r in rows.values()] == ["dense", "dense2x", "dense2x"]
    assert rows["dense"]["ratio_vs_dense"] == 1.0 and rows["dense2x"]["ratio_vs_equal_active"] == 1.0
    assert rows["gshard"]["params_active_ffn"] == rows["dense2x"]["params_active_ffn"]
    assert rows["gshard"]["params_total"] > 5 * rows["gshard"]["params_active"]
    for r in rows.values():
        assert r["scale"] == "tiny" and len(r["times_ms"]) == 1 and r["tokens_per_s"] > 0
        assert math.isfinite(r["ratio_vs_dense"]) and math.isfinite(r["ratio_vs_equal_active"])
        assert math.isfinite(r["loss_last"]) and r["temp_mib"] > 0 and r["flops_per_token"] > 0
