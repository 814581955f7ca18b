"""Smoke tests of experiments/benchmarks/: every row of --quick (--smoke) runs and the JSON is strict.
Speed itself is measured by the benchmark, never asserted here."""
import json
import math

import numpy as np
import pytest

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
    2x-active MoE row on its default backend and on 'blocked', one timed step each; the JSON is strict and
    the ratios pick the right baselines."""
    from experiments.benchmarks import train_throughput

    out = tmp_path / "rows.json"
    train_throughput.main(["--quick", "--methods", "gshard@blocked", "--repeats", "1", "--json", str(out)])
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["dense", "dense2x", "gshard", "gshard@blocked"]  # baselines and the method added
    assert [r["equal_active_baseline"] for r in rows.values()] == ["dense", "dense2x", "dense2x", "dense2x"]
    assert math.isfinite(rows["gshard@blocked"]["ratio_vs_default_backend"])
    assert len(rows["gshard@blocked"]["ratios_vs_default_backend"]) == 1
    assert "ratio_vs_default_backend" not in rows["gshard"]
    for bad in ("dense@blocked", "gshard@nope", "nope"):
        with pytest.raises(ValueError, match=rf"methods \['{bad}'\] are invalid; allowed: .*@ a backend in"):
            train_throughput.rows_for([bad])
    assert rows["dense"]["ratio_vs_dense"] == 1.0 and rows["dense2x"]["ratio_vs_equal_active"] == 1.0
    assert rows["gshard"]["params_active_ffn"] == rows["dense2x"]["params_active_ffn"]
    assert rows["gshard"]["params_total"] > 5 * rows["gshard"]["params_active"]
    for r in rows.values():
        assert r["scale"] == "tiny" and len(r["times_ms"]) == 1 and r["tokens_per_s"] > 0
        assert math.isfinite(r["ratio_vs_dense"]) and math.isfinite(r["ratio_vs_equal_active"])
        assert math.isfinite(r["loss_last"]) and r["temp_mib"] > 0 and r["flops_per_token"] > 0
    assert rows["dense"]["max_vio"] == [] and len(rows["gshard"]["max_vio"]) == 1  # timed steps x routed layers
    assert len(rows["gshard"]["max_vio"][0]) == rows["gshard"]["n_layers"]
    assert all(0 <= v <= rows["gshard"]["n_experts"] - 1 for v in rows["gshard"]["max_vio"][0])


def test_train_throughput_stdlib_batches(tmp_path):
    """--data stdlib: the Table-1 runs' first batches (packed byte tokens of the stdlib corpus), one per step."""
    from experiments.benchmarks import train_throughput

    s = train_throughput.scales()["tiny"]
    b = train_throughput.stdlib_batches(s, 2, tfds_data_dir=str(tmp_path))
    assert len(b) == 2 and set(b[0]) == {"inputs", "targets", "segment_ids", "positions", "weights"}
    assert all(v.shape == (s.batch, s.seq_len) for batch in b for v in batch.values())
    assert not np.array_equal(b[0]["inputs"], b[1]["inputs"])
    assert 0 <= int(b[0]["inputs"].min()) and int(b[0]["inputs"].max()) < train_throughput.VOCAB
    np.testing.assert_array_equal(b[0]["targets"][:, :-1], b[0]["inputs"][:, 1:])  # next-token targets


def test_expert_parallel_quick(tmp_path):
    """Smoke test of experiments/benchmarks/expert_parallel.py on 8 simulated CPU devices: GShard at tiny
    shapes, dropless and capacity, on data=8 and expert=8, one timed round. The HLO must move at least the
    minimum bytes (T K d x 4 x (1 - 1/D) per direction) on the expert-parallel all-to-all paths, and no
    token rows at all on the data-parallel mesh."""
    from experiments.benchmarks import expert_parallel

    out = tmp_path / "rows.json"
    expert_parallel.main(["--quick", "--no-tpu", "--methods", "gshard", "--meshes", "data=8;expert=8",
                          "--json", str(out)])
    rows = json.loads(out.read_text())
    assert {(r["dispatch"], r["mesh"]) for r in rows} == {
        (d, m) for d in ("dropless", "capacity") for m in ("data=8", "expert=8")}
    for r in rows:
        assert r["platform"] == "cpu" and r["method"] == "gshard" and r["fwd_bwd_error"] is None
        assert r["collectives_in_loops"] == 0 and len(r["times_ms"]) == 1 and r["step_ms"] > 0
        assert math.isfinite(r["ratio_vs_data"]) and r["temp_mib"] >= 0
        if r["mesh"] == "data=8":
            assert r["ratio_vs_data"] == 1.0 and r["min_fwd_mib"] == 0 and r["hlo_fwd_bwd_mib"] == 0
            assert r["allreduce_fwd_bwd_mib"] > 0  # replicated expert weights: gradients summed
            continue
        assert r["exchange_ops"] == ["all-to-all"] and r["exchange_dtypes"] == ["f32"]
        assert r["hlo_fwd_mib"] >= r["min_fwd_mib"] > 0 and r["hlo_fwd_bwd_mib"] >= r["min_fwd_bwd_mib"]
        assert r["hlo_fwd_bwd_mib"] >= 2 * r["hlo_fwd_mib"] * 0.999  # the backward exchanges as much again
        assert 0 < r["routed_fwd_mib"] <= r["min_fwd_mib"] * 8 / 7 + 1e-9  # no more than every pick, sent away
        if r["dispatch"] == "capacity":  # fixed [b, E, C, d] buffers: E C / (S K) = capacity factor 1.25
            assert abs(r["hlo_vs_min_fwd"] - 1.25) < 0.01


def test_expert_parallel_reads_collectives():
    """expert_parallel.collectives on hand-written HLO: bytes one device sends per collective, the group
    size in its three spellings, async pairs counted once, operand types looked up by name."""
    from experiments.benchmarks import expert_parallel

    hlo = """HloModule m
%body.1 (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %ar.9 = f32[4]{0} all-reduce(%p), replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
}
ENTRY %main.1 (a: f32[2,16,8,4], b: s32[8], c: f32[6,4]) -> f32[2,16,8,4] {
  %a = f32[2,16,8,4]{3,2,1,0} parameter(0)
  %b = s32[8]{0} parameter(1)
  %c = f32[6,4]{1,0} parameter(2)
  %a2a = f32[2,16,8,4]{3,2,1,0} all-to-all(%a), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={1}
  %ag = s32[64]{0} all-gather(%b), replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, dimensions={0}
  %out = f32[48,4]{1,0} parameter(3)
  %r = f32[48,4]{1,0} ragged-all-to-all(%c, %out, %b, %b, %b, /*index=5*/%b), replica_groups=[1,8]<=[8]
  %ars = f32[6,4]{1,0} all-reduce-start(%c), replica_groups=[2,4]<=[8], to_apply=%add
  %ard = f32[6,4]{1,0} all-reduce-done(%ars)
  %w = f32[4]{0} while(%c), condition=%cond.1, body=%body.1
  ROOT %t = (f32[2,16,8,4]{3,2,1,0}, s32[64]{0}) tuple(%a2a, %ag)
}
"""
    ops = {o["name"]: o for o in expert_parallel.collectives(hlo, 8)}
    assert set(ops) == {"ar.9", "a2a", "ag", "r", "ars"}
    assert ops["a2a"]["bytes"] == 2 * 16 * 8 * 4 * 4 * 7 / 8 and ops["a2a"]["kind"] == "exchange"
    assert ops["ag"]["bytes"] == 8 * 4 * 7 and ops["ag"]["kind"] == "metadata"
    assert ops["r"]["bytes"] == 6 * 4 * 4 and ops["r"]["ragged_rows"] == 6 and ops["r"]["row_bytes"] == 16
    assert ops["ars"]["bytes"] == 2 * 6 * 4 * 4 * 3 / 4 and ops["ars"]["kind"] == "all-reduce"
    assert ops["ar.9"]["in_loop"] and ops["ar.9"]["bytes"] == 2 * 4 * 4 / 2
    assert not any(o["in_loop"] for n, o in ops.items() if n != "ar.9")
    s = expert_parallel.summarize(list(ops.values()), routed_rows=2)
    assert s["exchange"] == ops["a2a"]["bytes"] + 96 and s["wire"] == ops["a2a"]["bytes"] + 2 * 16


def test_gmm_smoke(tmp_path):
    """Smoke test of experiments/benchmarks/gmm.py: tiny float32 cases (one with an empty group), every
    (impl, op) row timed, the Pallas results checked against ragged_dot within gmm.TOLERANCE (the run
    raises otherwise); on CPU the full benchmark refuses to run without --allow-cpu."""
    import jax
    import pytest

    from experiments.benchmarks import gmm

    if jax.default_backend() == "cpu":
        with pytest.raises(SystemExit, match="--allow-cpu"):
            gmm.main([])
    out = tmp_path / "rows.json"
    gmm.main(["--smoke", "--json", str(out)])
    rows = json.loads(out.read_text())
    cases = gmm.cases(smoke=True)
    assert len(rows) == len(cases) * len(gmm.IMPLS) * len(gmm.OPS)
    assert {(r["impl"], r["op"]) for r in rows} == {(i, o) for i in gmm.IMPLS for o in gmm.OPS}
    assert 0 in rows[0]["group_sizes"]  # the empty group
    for r in rows:
        assert r["device"] == jax.devices()[0].device_kind and r["platform"] == jax.default_backend()
        assert r["jax"] == jax.__version__ and r["dtype"] == "float32" and len(r["times_ms"]) == 2
        assert r["note"] == "" and r["time_ms"] > 0 and r["tflops"] > 0 and math.isfinite(r["vs_dense"])
        assert r["useful_tflop"] == 2 * 256 * 128 * 256 * gmm.FLOPS_FACTOR[r["op"]] / 1e12
        if r["impl"] == "pallas":
            assert r["max_rel_err"] is not None and r["max_rel_err"] <= gmm.TOLERANCE["float32"]
        else:
            assert r["max_rel_err"] is None
        if r["impl"] == "dense":
            assert r["vs_dense"] == 1.0


def test_data_memory_quick(tmp_path):
    """Smoke test of experiments/benchmarks/data_memory.py: the 10 MB single-line case, 30 batches, in two fresh
    processes (build, then prepared); the JSON is strict and every stage's peak is there."""
    from experiments.benchmarks import data_memory

    out = tmp_path / "rows.json"
    data_memory.main(["--quick", "--cases", "line100/byte", "--json", str(out)])
    (row,) = json.loads(out.read_text())
    assert row["case"] == "line100/byte" and row.get("error") is None and row["error_prepared"] is None
    assert row["train_documents"] == 1 and row["tokens"] == 30 * 16 * 2048
    assert 0 < row["rss_imports_mib"] <= row["rss_build_mib"] <= row["rss_iterator_mib"] <= row["rss_peak_mib"]
    assert row["rss_peak_prepared_mib"] > 0


def test_tpu_estimate_quick(tmp_path):
    """Smoke test of experiments/benchmarks/tpu_estimate.py (libtpu, no TPU): the dense FFN and the MoE layer
    (Pallas and ragged_dot experts) and the attention sublayer (one block of queries, 4 blocks, the flash
    kernels) compile for one v5p chip and the compiler prices each of them (a positive estimate: a scatter in
    the layer would make it negative, see the benchmark's README section)."""
    import importlib.util

    import pytest
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (the test extra)")
    from experiments.benchmarks import tpu_estimate

    out = tmp_path / "rows.json"
    tpu_estimate.main(["--quick", "--attention", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["dense", "auto", "ragged_dot", "attention chunk=0",
                                            "attention chunk=64", "attention flash"]
    for r in rows:
        assert r["gen"] == "v5p" and r["est_ms"] > 0 and r["bytes_accessed_gb"] > 0 and 0 < r["mfu"] < 1, r
    assert rows[0]["ratio_to_dense"] == 1.0 and rows[1]["ratio_to_dense"] > 1.0
