"""Train every run of a DeepSeekMoE ablation suite (experiments/deepseekmoe/suites.py) and write its results.

  python -m experiments.deepseekmoe.run --suite=table1 --scale=tiny --seeds=3 --workdir=/tmp/table1

Suites: table1, larger, segmentation, shared_ratio, specialisation, balancing, olmoe, gate_scale, tokens.
Scales: tiny (2-core CPU, about a minute per run), small, paper (see configs/deepseekmoe_table1.py). Seed s
sets config.seed (initialisation, routing noise) and config.data.shuffle_seed (data order) to s, for
s = 0 .. seeds - 1. The token sweep (`tokens`) trains every row at each of its budgets (suites.Budget: steps
at the scale, seeds), short budgets first, on the PyPI corpus.

The workdir holds
  suite.json                     the suite, scale and --set overrides it was made for; a later command with
                                 others is refused (more seeds or --only subsets are fine)
  runs/VARIANT/[sSTEPS/]seedS/   each run's training workdir (checkpoints, metrics.jsonl, TensorBoard)
  results/VARIANT-[sSTEPS-]seedS.json
                                 each finished run: its config, commit, wall time, parameters, FLOPs per token,
                                 final validation loss and the number of tokens it averages, the routed gate
                                 mass at initialisation, loss and MaxVio curves, validation expert load, and
                                 (specialisation) the evaluation-time ablations
  report/                        tables (markdown, LaTeX) and figures (experiments/deepseekmoe/report.py)
A run with a results file is skipped, so a suite resumes on any machine from its committed results files
(--commit commits each one as it is written); a run that was killed resumes from its last checkpoint, and
SIGTERM / Ctrl-C checkpoint the current run and stop (exit status 128 + signal). A results file of a
different config is refused rather than mixed in. A run whose identical config has a results file in a
sibling directory (another suite's workdir beside this one) is copied from there, not retrained.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

from absl import logging

from experiments.deepseekmoe import suites

class SuiteMismatchError(ValueError):
    """The results directory belongs to another suite, scale or set of overrides, or a results file to another
    config."""


def parse_set(items: list[str]) -> dict:
    """['train.steps=50', ...] -> {'train.steps': 50, ...} (values parsed as JSON where they parse)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--set item {item!r} is invalid; allowed: section.key=value, e.g. train.steps=50")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def budget_overrides(budget: suites.Budget | None) -> dict:
    """train.* overrides that make a run `budget.steps` long: warmup 10% of the steps, as the tiny scale's
    30 of 300, and evaluations / checkpoints every fifth of the run."""
    if budget is None:
        return {}
    every = max(1, budget.steps // 5)
    return {"train.steps": budget.steps, "train.warmup_steps": max(1, budget.steps // 10),
            "train.eval_every": every, "train.checkpoint_every": every}


def run_config(variant: str, scale: str, seed: int, overrides: dict, budget: suites.Budget | None = None,
               suite_set=()):
    """The experiment ConfigDict of one run: the variant at the scale, the suite's own overrides, the budget's
    length, then `overrides` (--set)."""
    from moejax import config as config_lib

    c = config_lib.load(f"{suites.CONFIG}:variant={variant},scale={scale}")
    c.seed = seed
    c.data.shuffle_seed = seed
    for key, value in {**dict(suite_set), **budget_overrides(budget), **overrides}.items():
        config_lib.override(c, key, value, flag="--set ")
    return c


def claim(workdir: str, suite: str, scale: str, overrides: dict) -> None:
    """Write workdir/suite.json, or refuse a workdir made for another suite, scale or overrides."""
    path = os.path.join(workdir, "suite.json")
    want = {"suite": suite, "scale": scale, "set": overrides}
    if os.path.exists(path):
        with open(path) as f:
            have = json.load(f)
        have = {k: have.get(k) for k in want}
        if have != want:
            raise SuiteMismatchError(
                f"--workdir={workdir} holds results of suite={have['suite']!r}, scale={have['scale']!r}, "
                f"set={have['set']}; this command asks for suite={suite!r}, scale={scale!r}, set={overrides}. "
                f"Results of different experiments are never mixed: use another --workdir.")
        return
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        json.dump({**want, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit()}, f, indent=1)


def commit() -> str:
    """The repository's git commit (with '+dirty' if tracked files changed), or 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=suites.REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=suites.REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_name(variant: str, seed: int, budget: suites.Budget | None = None) -> str:
    """'gshard-seed0', or with a budget 'gshard-s3000-seed0' (the file name of its results)."""
    return f"{variant}-s{budget.steps}-seed{seed}" if budget else f"{variant}-seed{seed}"


def result_path(workdir: str, variant: str, seed: int, budget: suites.Budget | None = None) -> str:
    return os.path.join(workdir, "results", run_name(variant, seed, budget) + ".json")


def reusable(workdir: str, name: str, config_dict: dict, needs_evals: bool) -> dict | None:
    """The result of the same run (identical config) in a sibling results directory of `workdir`, e.g. the
    DeepSeekMoE runs that table1, segmentation and balancing share; training is deterministic, so it is
    the result this run would produce (checked: same losses per seed in every suite)."""
    from moejax import config as config_lib

    parent = os.path.dirname(os.path.abspath(workdir))
    for other in sorted(os.listdir(parent)) if os.path.isdir(parent) else ():
        path = os.path.join(parent, other, "results", name + ".json")
        if os.path.abspath(os.path.join(parent, other)) == os.path.abspath(workdir) or not os.path.isfile(path):
            continue
        with open(path) as f:
            saved = json.load(f)
        same = not config_lib.incompatible(saved["config"], config_dict, ignore=())
        if same and (saved.get("evals") or not needs_evals) and "val_tokens" in saved:
            return {**saved, "reused_from": os.path.relpath(path, parent)}
    return None


def check_result(path: str, config_dict: dict) -> bool:
    """True if `path` holds a finished result of this config; SuiteMismatchError if it holds another config's."""
    from moejax import config as config_lib

    if not os.path.exists(path):
        return False
    with open(path) as f:
        saved = json.load(f)
    diff = config_lib.incompatible(saved["config"], config_dict)
    if diff:
        raise SuiteMismatchError(f"{path} holds the result of a different config; refusing to mix it in. Use "
                                 f"another --workdir, or move the file aside. Differences: " + "; ".join(diff))
    return True


def model_facts(config) -> dict:
    """Parameter counts and training FLOPs per token of a config's model (byte or SentencePiece vocabulary)."""
    import jax
    from flax import nnx

    from moejax import config as config_lib, data as data_lib, metrics, model as model_lib

    run = config_lib.to_typed(config)
    mc = run.model_config(data_lib.get_tokenizer(run.data).vocab_size)
    abstract = nnx.eval_shape(lambda: model_lib.Transformer(mc, rngs=nnx.Rngs(0)))
    total = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    active = metrics.active_params(mc)
    return {"params_total": int(total), "params_active": int(sum(active.values())),
            "params_active_ffn": int(active["ffn"]), "flops_per_token": metrics.flops_per_token(mc, run.data.seq_len)}


def init_gate_mass(config) -> list[float]:
    """Per MoE layer with a token-choice router: the mean over tokens of the routed gates' sum, sum_k g_{t,k},
    at initialisation (config.seed), on the first validation batch. It is the weight with which the routed
    experts enter the residual stream at the start of training: 1 for GShard's normalised top-2 and for hash
    routing, about 0.24 for Switch's top-1 softmax and 0.11 for DeepSeekMoE's 7-of-63 softmax gates (the
    shared expert's gate is 1). Empty for the dense model and expert choice."""
    import jax
    from flax import nnx

    from moejax import config as config_lib, data as data_lib, model as model_lib, routing

    run = config_lib.to_typed(config)
    tokenizer = data_lib.get_tokenizer(run.data)
    model = model_lib.Transformer(run.model_config(tokenizer.vocab_size), rngs=nnx.Rngs(params=run.seed))  # as Trainer.init
    first = dataclasses.replace(run.data, eval_steps=1, final_eval_steps=1)  # read one batch, not the whole set
    batch = data_lib.eval_batches(first, tokenizer, final=True)[0]  # the split's first batch

    @nnx.jit  # one compiled program, not the forward op by op
    def masses(model, batch):
        out = []
        for r in model.routes(batch["inputs"], batch["positions"], batch["segment_ids"]):
            if isinstance(r, routing.Routing):
                w = jax.numpy.where(r.mask, r.weights, 0.0).sum(-1).reshape(batch["weights"].shape)  # [B, S]
                out.append((w * batch["weights"]).sum() / batch["weights"].sum())
        return out

    return [float(m) for m in masses(model, batch)]


def curves(run_dir: str) -> dict:
    """Training and validation curves of a run from its metrics.jsonl."""
    from moejax import metrics

    rows = metrics.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    out = {"step": [r["step"] for r in train], "loss": [r["loss"] for r in train],
           "ce_loss": [r["ce_loss"] for r in train], "val_step": [r["step"] for r in val],
           "val_loss": [r["val_loss"] for r in val]}
    if train and "max_vio" in train[0]:
        out["max_vio"] = [r["max_vio"] for r in train]  # [steps logged][L]
    speeds = sorted(r["tokens_per_s"] for r in train if r.get("tokens_per_s"))
    out["tokens_per_s"] = speeds[len(speeds) // 2] if speeds else None  # median over log windows
    return out


def write_result(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)  # a killed write leaves no half file behind


def add_downstream(path: str, run_dir: str, tasks: dict) -> bool:
    """Score the run's final checkpoint on the tasks {name: JSONL} its results file lacks (moejax.downstream)
    and add them under 'downstream'; False (and a warning) if its checkpoint is not on this machine."""
    with open(path) as f:
        result = json.load(f)
    todo = {k: v for k, v in tasks.items() if k not in result.get("downstream", {})}
    if not todo:
        return False
    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        print(f"    warning: no checkpoint in {run_dir}: tasks {sorted(todo)} not scored", flush=True)
        return False
    from moejax import downstream
    from moejax.checkpoint import load_checkpoint
    from moejax.generate import for_inference

    ck = load_checkpoint(run_dir)
    scores = downstream.evaluate(for_inference(ck), ck.tokenizer, todo)
    for name, r in scores.items():
        print(f"    {name}: acc {r['acc']:.3f}, acc_norm {r['acc_norm']:.3f} (n = {r['n']})", flush=True)
    result["downstream"] = {**result.get("downstream", {}), **scores}
    write_result(path, result)
    return True


def train_run(row: suites.Row, scale: str, seed: int, overrides: dict, workdir: str,
              budget: suites.Budget | None = None, suite_set=(), tasks: dict | None = None) -> dict | None:
    """Train (or resume, or reuse) one run and return its result dict; None if it was done already (tasks
    its results lack are scored then), {'interrupted': signal name} if a signal stopped it."""
    import jax

    from moejax import train

    config = run_config(row.variant, scale, seed, overrides, budget, suite_set)
    config_dict = json.loads(config.to_json())
    name = run_name(row.variant, seed, budget)
    path = result_path(workdir, row.variant, seed, budget)
    run_dir = os.path.join(workdir, "runs", row.variant, *([f"s{budget.steps}"] if budget else []), f"seed{seed}")
    if check_result(path, config_dict):
        print(f"  {name}: done ({os.path.relpath(path, workdir)})")
        if tasks and add_downstream(path, run_dir, tasks):
            with open(path) as f:
                return json.load(f)
        return None
    reused = reusable(workdir, name, config_dict, row.evals)
    if reused:
        write_result(path, {**reused, "label": row.label})
        print(f"  {name}: same run as {reused['reused_from']}, copied")
        return reused
    print(f"  {name}: training in {run_dir}", flush=True)
    os.makedirs(run_dir, exist_ok=True)
    summary = train.train_and_evaluate(config, run_dir, progress=False)
    trained = time.time()  # wall_s: the training's (every part of a resumed run) plus what follows it
    if summary["interrupted"]:
        return {"interrupted": summary["interrupted"]}
    result = {"variant": row.variant, "label": row.label, "seed": seed, "scale": scale, "config": config_dict,
              "commit": commit(), "jax": jax.__version__, "device": jax.devices()[0].device_kind,
              "host": platform.node(), "wall_s": summary["wall_s"], "train_wall_s": summary["wall_s"],
              "steps": summary["steps"], "tokens": summary["tokens"], "val_loss": summary["val_loss"],
              "val_bpb": summary["val_bpb"], "val_tokens": summary["val_tokens"], **model_facts(config),
              "init_gate_mass": init_gate_mass(config), "curves": curves(run_dir)}
    for key in ("val_load", "val_max_vio", "val_max_vio_batch"):
        if key in summary:
            result[key] = summary[key].tolist()
    if row.evals:
        result["evals"] = {}
        ck = train.load_checkpoint(run_dir)
        for ev_name, changes in suites.evals(config_dict["model"]["moe"]).items():
            ev = ck.with_moe(**changes).evaluate()
            result["evals"][ev_name] = {"changes": changes, "val_loss": ev["val_loss"], "val_bpb": ev["val_bpb"],
                                        "val_tokens": ev["val_tokens"]}
            print(f"    eval {ev_name}: val_loss {ev['val_loss']:.4f}", flush=True)
        result["wall_s"] = summary["wall_s"] + time.time() - trained
    if budget:
        result["budget_steps"] = budget.steps
    write_result(path, result)
    if tasks:
        add_downstream(path, run_dir, tasks)
        with open(path) as f:
            result = json.load(f)
    return result


def plan(suite: suites.Suite, seeds: int, only=()) -> list[tuple[suites.Row, int, suites.Budget | None]]:
    """(row, seed, budget) of every run, in training order: seed by seed, every row of a seed together, so
    that an early stop still leaves complete paired comparisons; a token sweep goes budget by budget (the
    short ones first), each with min(budget.seeds, seeds) seeds."""
    rows = [r for r in suite.rows if not only or r.variant in only]
    if not suite.budgets:
        return [(row, seed, None) for seed in range(seeds) for row in rows]
    return [(row, seed, b) for b in suite.budgets for seed in range(min(b.seeds, seeds)) for row in rows]


def git_commit(path: str, message: str, tries: int = 5) -> None:
    """Commit one file (a finished run's results) to the repository that holds it (not necessarily the one
    whose code runs), that file only, retrying while git's index is locked by another command; a failure is
    reported and the run goes on."""
    where, name = os.path.split(os.path.abspath(path))
    status = subprocess.run(["git", "status", "--porcelain", "--", name], cwd=where, capture_output=True, text=True)
    if status.returncode == 0 and not status.stdout.strip():
        return  # committed already
    for attempt in range(tries):
        done = subprocess.run(["git", "add", name], cwd=where, capture_output=True, text=True)
        if done.returncode == 0:
            done = subprocess.run(["git", "commit", "-q", "-m", message, "--", name], cwd=where,
                                  capture_output=True, text=True)
        if done.returncode == 0:
            return
        time.sleep(2 + 3 * attempt)
    print(f"  warning: could not commit {path}: {done.stderr.strip()}", flush=True)


def run_suite(suite_name: str, scale: str, seeds: int, workdir: str, only=(), overrides=None,
              report: bool = True, commit_results: bool = False, tasks: dict | None = None) -> str | None:
    """Train every run of the suite not finished yet (`plan`); returns the name of the signal that stopped
    it, or None. Writes workdir/report/ when all runs are done and `report`. commit_results: git-commit each
    results file as soon as it is written (long sweeps: a later machine resumes from what is committed).
    tasks: {name: JSONL path} of downstream tasks to score every run on (moejax.downstream; finished runs
    whose checkpoints are here get them added)."""
    suite = suites.get_suite(suite_name)
    suites.check_scale(scale)
    if seeds < 1:
        raise ValueError(f"--seeds={seeds} is invalid; allowed: an integer >= 1")
    names = [r.variant for r in suite.rows]
    for v in only:
        if v not in names:
            raise ValueError(f"--only={v!r} is invalid for suite {suite_name!r}; allowed: {names}")
    overrides = dict(overrides or {})
    from moejax import config as config_lib

    for variant in names:  # every config builds and validates before anything is trained
        for budget in suite.budgets or (None,):
            config_lib.to_typed(run_config(variant, scale, 0, overrides, budget, suite.set))
    claim(workdir, suite_name, scale, overrides)
    if commit_results:
        git_commit(os.path.join(workdir, "suite.json"), f"{suite_name} ({scale}): suite.json")
    runs = plan(suite, seeds, only)
    print(f"suite {suite_name} ({suite.title}), scale {scale}: {len(runs)} runs in {workdir}", flush=True)
    for row, seed, budget in runs:
        out = train_run(row, scale, seed, overrides, workdir, budget, suite.set, tasks)
        if out and out.get("interrupted"):
            return out["interrupted"]
        if out and commit_results:
            git_commit(result_path(workdir, row.variant, seed, budget),
                       f"{suite_name} ({scale}): results of {run_name(row.variant, seed, budget)}")
    if report:
        from experiments.deepseekmoe import report as report_lib

        out = report_lib.write_report(workdir)
        print(f"report: {out}")
    return None


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", required=True, help=f"one of {tuple(suites.SUITES)}")
    p.add_argument("--scale", default="tiny", help=f"one of {suites.SCALES}")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. seeds - 1 of every variant")
    p.add_argument("--workdir", required=True, type=os.path.expanduser, help="results directory of this suite (created; resumed if present)")
    p.add_argument("--only", default="", help="comma-separated variants of the suite to train (default: all)")
    p.add_argument("--set", default="", help="comma-separated config overrides for every run, key=value (e.g. "
                                             "train.steps=50); recorded in suite.json")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write report/ (tables and figures) when the runs are done")
    p.add_argument("--commit", action="store_true", help="git-commit each run's results file when it is written")
    p.add_argument("--tasks", default="", help="comma-separated NAME:PATH.jsonl downstream tasks to score every "
                                               "run on (moejax.downstream); the report shows their accuracy")
    args = p.parse_args(argv)
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    split = lambda text: [x for x in text.split(",") if x]
    try:
        tasks = None
        if args.tasks:
            from moejax import downstream

            tasks = downstream.parse_tasks(split(args.tasks))
            for path in tasks.values():  # a bad task file fails now, not after hours of training
                downstream.read_task(path)
        stopped = run_suite(args.suite, args.scale, args.seeds, args.workdir, split(args.only),
                            parse_set(split(args.set)), args.report, args.commit, tasks)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"experiments.deepseekmoe.run: error: {e}")
    if stopped:
        import signal

        sys.exit(128 + signal.Signals[stopped].value)


if __name__ == "__main__":
    main()
