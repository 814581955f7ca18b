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
        "train.log_every": 1, "data.eval_steps": 1, "data.final_eval_steps": 2}


def test_every_variant_of_every_suite_builds_at_every_scale():
    for suite in suites.SUITES.values():
        for row in suite.rows:
            for scale in suites.SCALES:
                for budget in suite.budgets or (None,):
                    config_lib.to_typed(run.run_config(row.variant, scale, 0, {}, budget, suite.set))


def test_every_claim_names_rows_of_its_suite_and_a_known_metric():
    r = {"val_loss": 2.0, "val_max_vio": [1.0, 3.0], "config": {"model": {"moe": {"n_experts": 16}}},
         "evals": {"disable_top=1": {"val_loss": 2.5}, "no_shared": {"val_loss": 2.25}}}
    assert report.metric(r, "max_vio_global") == 2.0 and report.metric(r, "rise@disable_top=1/16") == 0.5
    assert report.metric(r, "val_loss", "no_shared") == 2.25 and report.metric(r, "max_vio_batch") is None
    for suite in suites.SUITES.values():
        variants = {row.variant for row in suite.rows}
        for c in suite.all_claims():
            assert {c.lower.split("@")[0], c.higher.split("@")[0]} <= variants, (suite.name, c)
            report.metric(r, c.metric)  # raises for an unknown metric


def test_token_sweep_plan_and_overrides():
    suite = suites.get_suite("tokens")
    runs = run.plan(suite, seeds=3)
    assert [(row.variant, seed, b.steps) for row, seed, b in runs[:5]] == [
        ("dense", 0, 300), ("gshard", 0, 300), ("deepseekmoe", 0, 300), ("deepseekmoe_gs", 0, 300), ("dense", 1, 300)]
    per_budget = {b.steps: len({seed for _, seed, bb in runs if bb == b}) for b in suite.budgets}
    assert per_budget == {300: 3, 950: 3, 3000: 2, 10000: 2}
    assert max(per_budget) * 16 * 128 >= 20e6, "the largest budget trains at least 20M tokens"
    assert {b.steps: len({s for _, s, bb in run.plan(suite, seeds=1) if bb == b}) for b in suite.budgets} == {
        300: 1, 950: 1, 3000: 1, 10000: 1}
    c = run.run_config("gshard", "tiny", 1, {}, suites.Budget(3000, 2), suite.set)
    assert (c.train.steps, c.train.warmup_steps, c.train.eval_every, c.data.source, c.seed) == (3000, 300, 600, "pypi", 1)
    assert run.run_name("gshard", 1, suites.Budget(3000, 2)) == "gshard-s3000-seed1"


def test_gate_scale_controls_start_with_routed_gate_mass_one():
    """GATE_SCALE makes the routed gates of Switch and DeepSeekMoE sum to about 1 at initialisation, as
    GShard's normalised top-2 do (measured on the first validation batch, seed 0). The mass depends on the
    initial draw: Switch x 4 measured 0.97 before c592460 split the attention weights (which changed the
    draw) and 1.16 after, so "about 1" is within 0.2."""
    masses = {v: np.mean(run.init_gate_mass(run.run_config(v, "tiny", 0, {})))
              for v in ("switch", "switch_gs", "deepseekmoe", "deepseekmoe_gs", "gshard")}
    assert masses["gshard"] == pytest.approx(1.0, abs=1e-6)
    assert masses["switch"] < 0.3 and masses["deepseekmoe"] < 0.5
    assert masses["switch_gs"] == pytest.approx(1.0, abs=0.2)
    assert masses["deepseekmoe_gs"] == pytest.approx(1.0, abs=0.2)
    assert run.init_gate_mass(run.run_config("dense", "tiny", 0, {})) == []


def test_variants_keep_the_papers_compute_rules():
    """Expert parameters 16 d_ff and active FFN width 2 d_ff (GShard's top-2), except where the variant is
    about exactly that."""
    scale_d_ff = 352
    for variant in ("gshard", "deepseekmoe", "seg_1s_1of15", "seg_1s_3of31", "shared_2of64", "deepseekmoe_gs",
                    "shared_4of64", "aux_free", "no_balance", "olmoe", "olmoe_shared", "expert_choice"):
        m = config_lib.to_typed(run.run_config(variant, "tiny", 0, {})).model["moe"]
        f = m.expert_width
        assert (m.n_experts + m.n_shared) * f == 16 * scale_d_ff, variant
        assert (m.top_k + m.n_shared) * f == 2 * scale_d_ff, variant


@pytest.mark.parametrize("kwargs,match", [
    (dict(suite_name="tabel1"), r"--suite='tabel1' is invalid; allowed: \('table1', 'larger'"),
    (dict(scale="huge"), r"--scale='huge' is invalid; allowed: \('tiny', 'small', 'paper', 'proxy', 'gpu'\)"),
    (dict(seeds=0), r"--seeds=0 is invalid"),
    (dict(only=["moe"]), r"--only='moe' is invalid for suite 'table1'; allowed: \['dense'"),
    (dict(overrides={"train.stepz": 3}), r"--set train.stepz: the config has no key train.stepz; did you mean --set train.steps\?"),
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
    assert result["val_tokens"] == 2 * 16 * 128, "the final evaluation takes data.final_eval_steps batches"
    assert all(e["val_tokens"] == 2 * 16 * 128 for e in result["evals"].values())
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

    piqa = os.path.join(os.path.dirname(__file__), "data", "tasks", "piqa.jsonl")
    run.run_suite("specialisation", "tiny", 1, workdir, only=["deepseekmoe"], overrides=FAST, report=False,
                  tasks={"piqa": piqa})  # downstream tasks are added to a finished run from its checkpoint
    with open(path) as f:
        scored = json.load(f)
    assert scored["downstream"]["piqa"]["n"] == 3 and scored["val_loss"] == result["val_loss"]
    mtime = os.path.getmtime(path)
    run.run_suite("specialisation", "tiny", 1, workdir, only=["deepseekmoe"], overrides=FAST, tasks={"piqa": piqa})
    assert os.path.getmtime(path) == mtime, "a task a run has is not scored again"

    out = os.path.join(workdir, "report")
    md = open(os.path.join(out, "tables.md")).read()
    assert f"| DeepSeekMoE | 1 | {result['val_loss']:.3f} | 1.808 |" in md
    assert f"| {scored['downstream']['piqa']['acc']:.3f} | {scored['downstream']['piqa']['acc_norm']:.3f} |" in md
    assert "no shared expert, +1 routed (paper: 2.414)" in md
    for name in ("loss_curves", "expert_load", "max_vio", "disabled_top", "active_experts"):
        assert os.path.getsize(os.path.join(out, f"{name}.png")) > 0
        assert os.path.getsize(os.path.join(out, f"{name}.pdf")) > 0


def _fake(variant, seed, loss):
    return {"variant": variant, "seed": seed, "val_loss": loss, "params_total": 1e6, "params_active": 2e5,
            "flops_per_token": 3e6, "wall_s": 10.0, "curves": {"tokens_per_s": 100.0},
            "config": {"data": {"eval_steps": 1, "batch_size": 8, "seq_len": 128}}}


def test_paired_interval_and_verdicts_by_hand():
    p = report.paired({0: 1.0, 1: 1.0, 2: 1.0}, {0: 1.2, 1: 1.3, 2: 1.25})
    half = 4.302652729911275 * 0.05 / np.sqrt(3)  # t_{0.975, 2} s / sqrt(n) = 0.124
    assert p.held == 3 and p.mean == pytest.approx(0.25)
    np.testing.assert_allclose(p.interval, (0.25 - half, 0.25 + half))
    assert p.verdict == "holds"
    wide = report.paired({0: 1.0, 1: 1.0, 2: 1.0}, {0: 1.1, 1: 1.3, 2: 1.2})  # held 3 of 3, half-width 0.248
    assert (wide.held, wide.verdict) == (3, "inconclusive")
    assert report.paired({0: 1.0, 1: 1.0, 2: 1.0}, {0: 0.9, 1: 0.92, 2: 0.91}).verdict == "reversed"
    mixed = report.paired({0: 1.0, 1: 1.0, 2: 1.0}, {0: 1.3, 1: 0.8, 2: 1.1})
    assert (mixed.held, mixed.verdict) == (2, "inconclusive")
    one = report.paired({0: 1.0, 5: 2.0}, {0: 1.5})
    assert (one.n, one.seeds, one.verdict) == (1, (0,), "inconclusive") and np.isnan(one.interval[0])
    assert report.paired({0: 1.0}, {1: 1.0}) is None


def test_report_tables_mean_std_paper_and_claims():
    suite = suites.get_suite("table1")
    losses = {"dense": (2.0, 2.2), "hash": (1.9, 1.9), "switch": (1.95, 1.85), "gshard": (1.8, 1.8),
              "deepseekmoe": (1.7, 1.9)}
    results = [_fake(v, s, l[s]) for v, l in losses.items() for s in (0, 1)]
    rows = report.summarise(suite, results)
    assert [r["variant"] for r in rows] == ["dense", "hash", "switch", "gshard", "deepseekmoe"]
    md, tex = report.tables(suite, {"scale": "tiny"}, rows, results)
    assert f"| Dense | 2 | 2.100 ± {np.std([2.0, 2.2], ddof=1):.3f} | 2.060 | 1.00M | 0.20M | 0.0030 | 10 |" in md
    assert "| GShard | 2 | 1.800 ± 0.000 | 1.867 |" in md
    assert "on 1,024 held-out tokens" in md
    # GShard - DeepSeekMoE = +0.1, -0.1: held in 1 of 2, mean 0, t_{0.975,1} = 12.706 x 0.1414 / 1.414 = 1.271
    assert ("| DeepSeekMoE < GShard | paper | 1 of 2 seeds | +0.000 | [−1.271, +1.271] | +0.100, −0.100 | "
            "**inconclusive** |") in md
    assert "| GShard < Switch | paper | 2 of 2 seeds | +0.100 |" in md
    assert "| Hash Layer < Dense | paper | 2 of 2 seeds | +0.200 | [−1.071, +1.471] |" in md
    assert "| Switch < Dense | paper |" in md and "| DeepSeekMoE < Dense | paper |" in md
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"2.100 $\pm$ 0.141" in tex
    for r, acc in zip(results, (0.5, 0.7)):  # downstream accuracies: columns, and metrics for claims
        r["downstream"] = {"piqa": {"acc": acc, "acc_norm": acc + 0.1, "n": 10}}
    md, _ = report.tables(suite, {"scale": "tiny"}, report.summarise(suite, results), results)
    assert "| piqa acc | piqa acc_norm |" in md and f"| 0.600 ± {np.std([0.5, 0.7], ddof=1):.3f} | 0.700 ± " in md
    assert report.metric(results[0], "acc_norm@piqa") == 0.6 and report.metric(results[2], "acc@piqa") is None


def test_token_sweep_report_says_where_a_claim_starts_to_hold(tmp_path):
    suite = suites.get_suite("tokens")
    loss = {("gshard", 300): (2.0, 2.1, 2.2), ("deepseekmoe", 300): (2.1, 2.0, 2.3),
            ("gshard", 950): (1.8, 1.9, 1.85), ("deepseekmoe", 950): (1.7, 1.81, 1.74)}
    results = [{**_fake(v, s, l[s]), "budget_steps": b, "tokens": b * 1024} for (v, b), l in loss.items()
               for s in range(3)]
    md, _ = report.tables(suite, {"scale": "tiny"}, report.summarise(suite, results), results)
    assert "| DeepSeekMoE | 0.31M | 3 |" in md and "| GShard | 0.97M | 3 |" in md
    assert "| DeepSeekMoE < GShard | 0.31M | paper | 1 of 3 seeds |" in md
    assert "| DeepSeekMoE < GShard | 0.97M | paper | 3 of 3 seeds | +0.100 |" in md
    text = report.sweep_sentences(suite, results)
    assert text == "- DeepSeekMoE < GShard: holds from 0.97M tokens on (up to 0.97M: +0.100 [+0.075, +0.125], 3 seeds)."
    reversed_ = [{**r, "val_loss": -r["val_loss"]} for r in results]
    assert "does not hold at the largest budget trained so far, 0.97M tokens: reversed (−0.100 [" in report.sweep_sentences(
        suite, reversed_)
    import matplotlib

    matplotlib.use("Agg")
    assert report.plot_token_sweep(suite, results, str(tmp_path))[0].endswith("token_sweep.png")


def test_loss_curves_keep_the_final_evaluation_apart_when_it_read_a_larger_sample():
    """The final evaluation's loss (data.final_eval_steps batches) is not a point of the periodic curve."""
    r = {"curves": {"val_step": [10, 20, 30], "val_loss": [3.0, 2.9, 1.7]}, "config": {
        "train": {"steps": 30}, "data": {"eval_steps": 1, "final_eval_steps": 4}}}
    assert report._periodic(r) == ([10, 20], [3.0, 2.9])
    same = {**r, "config": {**r["config"], "data": {"eval_steps": 1, "final_eval_steps": 0}}}
    assert report._periodic(same) == ([10, 20, 30], [3.0, 2.9, 1.7])
    np.testing.assert_allclose(report._smooth([1, 2, 3, 4, 5], 2), [1, 1.5, 2.5, 3.5, 4.5])


def test_results_md_is_generated_from_the_committed_results():
    """Every generated block of RESULTS.md equals what report.py makes from the committed results files, no
    template leftovers remain, and every committed results directory has its block."""
    with open(report.RESULTS_MD) as f:
        text = f.read()
    assert report.regenerate(text) == text, "stale: python -m experiments.deepseekmoe.report --results-md"
    assert report.leftovers(text) == []
    blocks = {m.group(1) for m in report.BLOCK.finditer(text)}
    committed = {d for d in os.listdir(report.RESULTS_DIR) if os.path.isfile(os.path.join(report.RESULTS_DIR, d,
                                                                                            "suite.json"))}
    assert committed <= blocks and "summary" in blocks
    assert report.leftovers("ok\nANALYSIS_| a |\n") == ["ANALYSIS_| a |"]


def test_reused_run_is_copied_not_retrained(tmp_path, monkeypatch):
    from moejax import train

    first = str(tmp_path / "a")
    run.run_suite("table1", "tiny", 1, first, only=["dense"], overrides=FAST, report=False)
    monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: pytest.fail("retrained"))
    second = str(tmp_path / "b")  # another suite that trains the same dense run
    run.run_suite("table1", "tiny", 1, second, only=["dense"], overrides=FAST, report=False)
    with open(run.result_path(first, "dense", 0)) as f:
        a = json.load(f)
    with open(run.result_path(second, "dense", 0)) as f:
        b = json.load(f)
    assert b["reused_from"] == "a/results/dense-seed0.json" and b["val_loss"] == a["val_loss"]


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


def test_git_commit_commits_one_results_file_in_its_own_repository(tmp_path, monkeypatch):
    import subprocess

    for k, v in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                 "GIT_COMMITTER_EMAIL": "t@t"}.items():
        monkeypatch.setenv(k, v)
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a.json").write_text("{}")
    (tmp_path / "other.txt").write_text("not mine")
    run.git_commit(str(tmp_path / "results" / "a.json"), "a done")
    assert git("log", "--format=%s") == "a done\n"
    assert git("status", "--porcelain") == "?? other.txt\n", "only the results file is committed"
    run.git_commit(str(tmp_path / "results" / "a.json"), "again", tries=1)  # nothing new: no commit, no error
    assert git("log", "--format=%s") == "a done\n"
