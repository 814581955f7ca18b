"""The DeepSeekMoE ablation runner and report (experiments/deepseekmoe): bad input is refused, a suite trains,
skips and resumes its runs, and the report's tables hold the right numbers."""
import json
import os

import numpy as np
import pytest

from experiments.deepseekmoe import report, run, suites
from moejax import config as config_lib

# Every run of these tests: 2 steps of the tiny config, one validation batch.
FAST = {"train.steps": 2, "train.warmup_steps": 1, "train.eval_every": 2, "train.checkpoint_every": 2,
        "train.log_every": 1, "data.eval_steps": 1}


def test_every_variant_of_every_suite_builds_at_every_scale():
    for suite in suites.SUITES.values():
        for row in suite.rows:
            for scale in suites.SCALES:
                config_lib.to_typed(run.run_config(row.variant, scale, 0, {}))


def test_variants_keep_the_papers_compute_rules():
    """Expert parameters 16 d_ff and active FFN width 2 d_ff (GShard's top-2), except where the variant is
    about exactly that."""
    scale_d_ff = 352
    for variant in ("gshard", "deepseekmoe", "seg_0s_2of16", "seg_1s_1of15", "seg_1s_3of31", "shared_2of64",
                    "shared_4of64", "aux_free", "no_balance", "olmoe", "olmoe_shared", "expert_choice"):
        m = config_lib.to_typed(run.run_config(variant, "tiny", 0, {})).model["moe"]
        f = m.expert_width
        assert (m.n_experts + m.n_shared) * f == 16 * scale_d_ff, variant
        assert (m.top_k + m.n_shared) * f == 2 * scale_d_ff, variant


@pytest.mark.parametrize("kwargs,match", [
    (dict(suite_name="tabel1"), r"--suite='tabel1' is invalid; allowed: \('table1', 'larger'"),
    (dict(scale="huge"), r"--scale='huge' is invalid; allowed: \('tiny', 'small', 'paper'\)"),
    (dict(seeds=0), r"--seeds=0 is invalid"),
    (dict(only=["moe"]), r"--only='moe' is invalid for suite 'table1'; allowed: \['dense'"),
    (dict(overrides={"train.stepz": 3}), r"--set train.stepz: the config has no key 'stepz'"),
    (dict(overrides={"model.moe.top_k": 99}), r"top_k=99 is invalid"),
])
def test_bad_arguments_name_the_valid_ones(tmp_path, kwargs, match):
    args = dict(suite_name="table1", scale="tiny", seeds=1, workdir=str(tmp_path / "w"))
    with pytest.raises(ValueError, match=match):
        run.run_suite(**{**args, **kwargs})
    assert not os.path.exists(tmp_path / "w"), "nothing is written before the arguments are checked"


def test_parse_set():
    assert run.parse_set(["train.steps=5", "data.tokenizer=byte", "train.lr=0.5"]) == {
        "train.steps": 5, "data.tokenizer": "byte", "train.lr": 0.5}
    with pytest.raises(ValueError, match="section.key=value"):
        run.parse_set(["steps5"])


def test_workdir_of_another_suite_scale_or_overrides_is_refused(tmp_path):
    run.claim(str(tmp_path), "table1", "tiny", {})
    run.claim(str(tmp_path), "table1", "tiny", {})  # the same: fine
    for args in (("segmentation", "tiny", {}), ("table1", "small", {}), ("table1", "tiny", {"train.steps": 5})):
        with pytest.raises(run.SuiteMismatchError, match="holds results of suite='table1', scale='tiny'"):
            run.claim(str(tmp_path), *args)


def test_results_file_of_another_config_is_refused(tmp_path):
    config = json.loads(run.run_config("gshard", "tiny", 0, {}).to_json())
    path = tmp_path / "gshard-seed0.json"
    assert not run.check_result(str(path), config)
    path.write_text(json.dumps({"config": config}))
    assert run.check_result(str(path), config)
    other = json.loads(run.run_config("gshard", "tiny", 1, {}).to_json())
    with pytest.raises(run.SuiteMismatchError, match="different config.*seed: saved 0, now 1"):
        run.check_result(str(path), other)


def test_specialisation_suite_trains_skips_resumes_and_reports(tmp_path):
    """One DeepSeekMoE run of 2 steps with its evaluation-time ablations; a second command skips it; with the
    results file gone, the finished checkpoint is resumed (not retrained) and the same result written."""
    from moejax import train

    workdir = str(tmp_path / "spec")
    assert run.run_suite("specialisation", "tiny", 1, workdir, only=["deepseekmoe"], overrides=FAST) is None
    path = run.result_path(workdir, "deepseekmoe", 0)
    with open(path) as f:
        result = json.load(f)
    assert result["steps"] == 2 and result["variant"] == "deepseekmoe" and result["config"]["seed"] == 0
    assert set(result["evals"]) == {"disable_top=4", "disable_top=8", "disable_top=12", "disable_top=16",
                                    "no_shared", *(f"top_k={k}" for k in range(1, 7))}
    assert result["evals"]["no_shared"]["changes"] == {"n_shared": 0, "top_k": 8}
    assert len(result["val_load"]) == 2 and len(result["val_load"][0]) == 63
    np.testing.assert_allclose(np.sum(result["val_load"], -1), 1.0, rtol=1e-5)
    assert result["curves"]["step"] == [1, 2] and result["curves"]["val_step"] == [2]
    assert result["params_total"] > result["params_active"] > 0
    run_dir = os.path.join(workdir, "runs", "deepseekmoe", "seed0")
    ck = train.load_checkpoint(run_dir)
    assert ck.evaluate()["val_loss"] == pytest.approx(result["val_loss"], rel=1e-6)
    with pytest.raises(ValueError, match="unknown config key moe_changes.topk; did you mean 'top_k'"):
        ck.with_moe(topk=3)
    with pytest.raises(ValueError, match="MoEConfig.top_k=99 is invalid"):
        ck.with_moe(top_k=99)

    mtime = os.path.getmtime(path)
    run.run_suite("specialisation", "tiny", 1, workdir, only=["deepseekmoe"], overrides=FAST)
    assert os.path.getmtime(path) == mtime, "a finished run is skipped"

    os.remove(path)
    run.run_suite("specialisation", "tiny", 1, workdir, only=["deepseekmoe"], overrides=FAST, report=False)
    with open(path) as f:
        again = json.load(f)
    assert again["val_loss"] == result["val_loss"] and again["evals"] == result["evals"]
    assert again["curves"]["step"] == [1, 2], "resumed from the finished checkpoint, not retrained"

    out = os.path.join(workdir, "report")
    md = open(os.path.join(out, "tables.md")).read()
    assert f"| DeepSeekMoE | 1 | {result['val_loss']:.3f} | 1.808 |" in md
    assert "no shared expert, +1 routed (paper: 2.414)" in md
    for name in ("loss_curves", "expert_load", "max_vio", "disabled_top", "active_experts"):
        assert os.path.getsize(os.path.join(out, f"{name}.png")) > 0
        assert os.path.getsize(os.path.join(out, f"{name}.pdf")) > 0


def _fake(variant, seed, loss):
    return {"variant": variant, "seed": seed, "val_loss": loss, "params_total": 1e6, "params_active": 2e5,
            "flops_per_token": 3e6, "wall_s": 10.0, "curves": {"tokens_per_s": 100.0}}


def test_report_tables_mean_std_paper_and_ordering():
    suite = suites.get_suite("table1")
    losses = {"dense": (2.0, 2.2), "hash": (1.9, 1.9), "switch": (1.95, 1.85), "gshard": (1.8, 1.8),
              "deepseekmoe": (1.7, 1.9)}
    results = [_fake(v, s, l[s]) for v, l in losses.items() for s in (0, 1)]
    rows = report.summarise(suite, results)
    assert [r["variant"] for r in rows] == ["dense", "hash", "switch", "gshard", "deepseekmoe"]
    md, tex = report.tables(suite, {"scale": "tiny"}, rows)
    assert f"| Dense | 2 | 2.100 ± {np.std([2.0, 2.2], ddof=1):.3f} | 2.060 | 1.00M | 0.20M | 0.0030 | 10 |" in md
    assert "| GShard | 2 | 1.800 ± 0.000 | 1.867 |" in md
    assert "- DeepSeekMoE < GShard: mixed in 1/2 seeds (loss difference +0.000 ± 0.141)" in md
    assert "- GShard < Switch: holds in 2/2 seeds" in md
    assert "- Switch < Hash Layer: mixed in 1/2 seeds" in md
    assert "- Hash Layer < Dense: holds in 2/2 seeds" in md
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"2.100 $\pm$ 0.141" in tex


def test_load_checkpoint_names_what_is_missing(tmp_path):
    from moejax import train

    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        train.load_checkpoint(str(tmp_path))


def test_report_refuses_a_directory_that_is_not_a_results_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no suite.json"):
        report.write_report(str(tmp_path))


def test_citation_cff_and_readme_bibtex_agree():
    import yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "CITATION.cff")) as f:
        cff = yaml.safe_load(f)
    for key in ("cff-version", "message", "title", "authors", "version", "repository-code"):
        assert cff.get(key), f"CITATION.cff lacks {key}"
    readme = open(os.path.join(root, "README.md")).read()
    bib = readme[readme.index("@software{moejax"):]
    assert f"version = {{{cff['version']}}}" in bib and f"url     = {{{cff['repository-code']}}}" in bib
    assert "experiments/deepseekmoe/RESULTS.md" in readme


def test_cli_exits_with_one_line_naming_the_valid_suites(tmp_path):
    with pytest.raises(SystemExit, match=r"experiments.deepseekmoe.run: error: --suite='foo' is invalid; allowed: "):
        run.main(["--suite=foo", f"--workdir={tmp_path}"])
