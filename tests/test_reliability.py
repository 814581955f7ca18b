"""Nothing lost, nothing silently wrong (issue 14): finite checkpoints, resuming with deliberate changes,
one run per workdir, metrics of one config, the corpus checked on resume, paths and one-line errors."""
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from absl import flags

from moejax import config as config_lib
from moejax import main as main_lib  # noqa: F401  (defines the CLI's flags for parse_cli_flags)
from moejax import metrics as metrics_lib
from moejax import checkpoint, train
from tests.test_train import ROOT, TABLE1, _steps_saved, corpus, losses, tiny  # noqa: F401 (corpus: fixture)
from tests.conftest import FAST_COMPILE


def _history(w):
    return [json.loads(l) for l in open(w / "history.jsonl")]


# --- finite checkpoints and resuming with changed hyper-parameters ---------------------------------------

def test_non_finite_state_is_never_saved_and_resume_with_lower_lr(corpus, tmp_path):
    """lr 1e6: the state goes non-finite one step before the loss does. No checkpoint holds a NaN, the error
    names the last (finite) one, and the documented way out (lower lr + allow_changes) resumes from it."""
    c = tiny(corpus, tmp_path, method="dense", steps=8, lr=1e6, warmup_steps=5, checkpoint_every=1)
    w = tmp_path / "w"
    with pytest.raises(train.NonFiniteLossError, match=r"stopped without saving it\. The last good checkpoint is "
                                                       r"step (\d+) .*--allow_changes=train\.lr") as e:
        train.train_and_evaluate(c, str(w))
    named = int(re.search(r"checkpoint is step (\d+)", str(e.value)).group(1))
    assert named == max(_steps_saved(w))
    for step in _steps_saved(w):
        ck = train.load_checkpoint(str(w), step=step)
        assert ck.trainer.is_finite(ck.state), step
    assert _history(w)[-1]["event"] == "stop" and _history(w)[-1]["reason"].startswith("non-finite")
    # Steps 2.. trained at lr 2e5 and more: finite but ruined. Resume from step 1 (lr 0 so far), as advised:
    import shutil
    for step in _steps_saved(w):
        if step > 1:
            shutil.move(w / "checkpoints" / str(step), tmp_path / f"aside{step}")
    # a lower lr is refused unless named ...
    lower = tiny(corpus, tmp_path, method="dense", steps=8, lr=3e-3, warmup_steps=5, checkpoint_every=1)
    with pytest.raises(train.IncompatibleCheckpointError, match=r"train\.lr: saved 1000000\.0, now 0\.003"):
        train.train_and_evaluate(lower, str(w))
    with pytest.raises(ValueError, match=r"allow_changes: 'model\.d_model' is invalid; allowed: train\.\* keys"):
        train.train_and_evaluate(lower, str(w), allow_changes=["model.d_model"])
    # ... and resumes when named; the change is recorded, later checkpoints hold the new config.
    s = train.train_and_evaluate(lower, str(w), allow_changes=["train.lr"])
    assert s["steps"] == 8 and np.isfinite(s["val_loss"])
    resume = [h for h in _history(w) if h["event"] == "resume"][-1]
    assert resume["step"] == 1 and resume["changes"] == {"train.lr": [1e6, 3e-3]}
    assert json.load(open(w / "config.json"))["train"]["lr"] == 3e-3
    assert train.train_and_evaluate(lower, str(w))["steps"] == 8  # no change left to allow


def test_non_finite_before_any_checkpoint_names_none(corpus, tmp_path):
    c = tiny(corpus, tmp_path, method="dense", steps=8, lr=1e6, warmup_steps=5, checkpoint_every=5)
    w = tmp_path / "w"
    with pytest.raises(train.NonFiniteLossError, match=r"No checkpoint was saved before it: run again with a "
                                                       r"lower learning rate"):
        train.train_and_evaluate(c, str(w))
    assert not _steps_saved(w)


def test_resume_refuses_a_non_finite_checkpoint(corpus, tmp_path):
    """A checkpoint with NaNs (written by an older moejax) is reported, not resumed from."""
    import orbax.checkpoint as ocp

    c = tiny(corpus, tmp_path, method="hash", steps=4, checkpoint_every=2)
    w = tmp_path / "w"
    train.train_and_evaluate(c, str(w))
    mngr = checkpoint.manager(str(w), config_lib.to_typed(c).train)
    trainer = train.load_checkpoint(str(w)).trainer
    state = mngr.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore(trainer.abstract_state())))["state"]
    state = __import__("jax").tree.map(lambda x: x * np.nan if x.dtype.kind == "f" else x, state)
    from moejax import data as data_lib
    run = config_lib.to_typed(c)
    checkpoint.save(mngr, 6, state, data_lib.train_iterator(run.data, data_lib.get_tokenizer(run.data)),
                json.loads(c.to_json()), {})
    mngr.wait_until_finished()
    mngr.close()
    more = tiny(corpus, tmp_path, method="hash", steps=8, checkpoint_every=2)
    with pytest.raises(train.CorruptCheckpointError, match=r"step 6\) .* holds NaN or inf values; nothing was changed"):
        train.train_and_evaluate(more, str(w), allow_changes=["train.steps"])


# --- one run per workdir, one config per workdir ----------------------------------------------------------

def test_a_locked_workdir_is_refused_naming_the_holder(corpus, tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    with checkpoint.workdir_lock(str(w)):
        with pytest.raises(train.WorkdirBusyError, match=rf"in use by another run \(pid {os.getpid()} on "):
            train.train_and_evaluate(tiny(corpus, tmp_path, steps=2), str(w))
    assert not (w / "config.json").exists()
    assert train.train_and_evaluate(tiny(corpus, tmp_path, steps=2), str(w))["steps"] == 2  # released


def test_config_json_of_another_config_is_refused_before_the_first_checkpoint(corpus, tmp_path):
    """A run killed before its first checkpoint leaves config.json and metrics; another method on the same
    workdir is refused; the same config starts over without mixing its metrics with the old ones."""
    w = tmp_path / "w"
    c = tiny(corpus, tmp_path, steps=6, checkpoint_every=100)
    train.train_and_evaluate(c, str(w))
    for step in ("6",):  # as if killed before the first checkpoint
        import shutil
        shutil.rmtree(w / "checkpoints" / step)
    before = (w / "config.json").read_text()
    with pytest.raises(train.IncompatibleCheckpointError, match=r"config\.json \(no checkpoint yet\) is of a "
                                                                r"different config.*n_experts: saved 63, now 16"):
        train.train_and_evaluate(tiny(corpus, tmp_path, method="gshard", steps=6), str(w))
    assert (w / "config.json").read_text() == before
    first = losses(w)
    train.train_and_evaluate(c, str(w))
    steps = [r["step"] for r in map(json.loads, open(w / "metrics.jsonl")) if "loss" in r]
    assert steps == list(range(1, 7))  # each step once
    assert losses(w) == first  # the same config from scratch: the same losses


def test_metrics_after_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    metrics_lib.truncate_jsonl(str(path), 4)
    assert [r["step"] for r in metrics_lib.read_jsonl(str(path))] == [1, 2, 3, 4]
    metrics_lib.truncate_jsonl(str(tmp_path / "missing.jsonl"), 0)
    assert not (tmp_path / "missing.jsonl").exists()


# --- the corpus, wall time, paths ---------------------------------------------------------------------------

def test_resume_on_a_changed_corpus_is_refused_and_wall_time_adds_up(tmp_path):
    import shutil
    import sysconfig

    docs = tmp_path / "docs"
    docs.mkdir()
    for f in sorted(os.listdir(sysconfig.get_paths()["stdlib"]))[:60]:
        if f.endswith(".py"):
            shutil.copy(os.path.join(sysconfig.get_paths()["stdlib"], f), docs / f)
    w = tmp_path / "w"
    first = train.train_and_evaluate(tiny(docs, tmp_path, method="hash", steps=4, checkpoint_every=2), str(w))
    more = tiny(docs, tmp_path, method="hash", steps=6, checkpoint_every=2)
    s = train.train_and_evaluate(more, str(w), allow_changes=["train.steps"])
    assert s["wall_s"] > first["wall_s"]  # every part of the run
    (docs / "zzz_new.py").write_text("print('a new document')\n" * 50)
    longer = tiny(docs, tmp_path, method="hash", steps=8, checkpoint_every=2)
    with pytest.raises(train.IncompatibleCheckpointError, match=r"trained on another corpus"):
        train.train_and_evaluate(longer, str(w), allow_changes=["train.steps"])


def test_tilde_is_expanded_in_flag_values():
    home = os.path.expanduser("~")
    assert config_lib.expand_user_flags(["--workdir=~/run", "--json", "~/r.json", "--config=a.py", "x=~"]) == [
        f"--workdir={home}/run", "--json", f"{home}/r.json", "--config=a.py", "x=~"]


# --- one-line errors ----------------------------------------------------------------------------------------

@pytest.fixture
def fresh_flags():
    yield
    flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("args,match", [
    ([f"--config={TABLE1}:method=foo,scale=tiny"], r"method='foo' is invalid; allowed: \('dense'"),
    ([f"--config={TABLE1}:method=gshard,scale=huge"], r"scale='huge' is invalid"),
    (["--config=configs/missing.py"], r"config file 'configs/missing\.py' does not exist"),
    (["--config", f"{TABLE1}:method=hash", "--config.train.stepz=3"], r"--config\.train\.stepz: the config has no "
                                                                      r"key train\.stepz; did you mean --config\.train\.steps\?"),
    ([f"--config={TABLE1}", "--config.model.moe.n_expert=4"], r"did you mean --config\.model\.moe\.n_experts\?"),
    ([f"--config={TABLE1}", "--config.train.steps=abc"], r"--config\.train\.steps=abc: invalid literal for int"),
])
def test_cli_config_errors_are_one_line(fresh_flags, monkeypatch, args, match):
    argv = ["moejax.main", "--workdir=/tmp/unused", *args]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags finds the --config.* overrides in sys.argv
    with pytest.raises(SystemExit) as e:
        config_lib.parse_cli_flags(argv)
    message = str(e.value.code)
    assert message.startswith("moejax: error: ") and "\n" not in message and re.search(match, message), message


def test_cli_valid_overrides_and_tilde_parse(fresh_flags, monkeypatch):
    argv = ["moejax.main", "--workdir=~/run", "--config", f"{TABLE1}:method=hash", "--config.model.moe.n_experts=4"]
    monkeypatch.setattr(sys, "argv", argv)
    config_lib.parse_cli_flags(argv)
    assert flags.FLAGS.config.model.moe.n_experts == 4 and flags.FLAGS.workdir == os.path.expanduser("~/run")


def test_cli_workdir_errors_are_one_line(tmp_path):
    """Workdir problems (a file, under a file, not writable, empty) and a second run on a busy workdir end
    with one line naming the path; one interpreter runs every case (moejax.main.run as the CLI does)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {"is a file": str(a_file), "under a file": str(a_file / "w"), "not writable": "/sys/kernel",
             "empty": "", "busy": str(tmp_path / "busy")}
    (tmp_path / "busy").mkdir()
    driver = textwrap.dedent(f"""
        import json, sys
        from absl import flags
        from moejax import checkpoint, main
        out = {{}}
        with checkpoint.workdir_lock({str(tmp_path / 'busy')!r}):
            for name, workdir in json.loads(sys.argv[1]).items():
                sys.argv = ["moejax.main", "--config={TABLE1}:method=dense,scale=tiny", "--workdir=" + workdir]
                try:
                    main.run()
                except SystemExit as e:
                    out[name] = str(e.code)
                flags.FLAGS.unparse_flags()
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", driver, json.dumps(cases)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, message in out.items():
        assert message.startswith("moejax: error: ") and "\n" not in message, (name, message)
    assert f"{a_file}: File exists" in out["is a file"] or "Not a directory" in out["is a file"], out
    assert "Not a directory" in out["under a file"], out
    assert "/sys/kernel" in out["not writable"] and "use a directory you can write to" in out["not writable"], out
    assert "workdir='' is invalid" in out["empty"], out
    assert "is in use by another run (pid" in out["busy"], out
    assert "Traceback" not in proc.stderr


def test_runner_bad_set_value_is_one_line():
    from experiments.deepseekmoe import run

    with pytest.raises(SystemExit) as e:
        run.main(["--suite=table1", "--scale=tiny", "--workdir=/tmp/unused_runner", "--set=train.steps=abc"])
    assert re.fullmatch(r"experiments\.deepseekmoe\.run: error: --set train\.steps='abc' is invalid; allowed: a "
                        r"value of the key's type int.*", str(e.value.code))


def test_aot_checks_json_path_and_overrides_before_compiling(tmp_path):
    base = [sys.executable, "-m", "moejax.aot", f"--config={TABLE1}:method=dense,scale=tiny", "--topology=v5e:2x2"]
    for extra, match in [(["--json=/missing/dir/r.json"], r"--json=/missing/dir/r\.json: /missing/dir is not a "
                                                          r"directory you can write to"),
                         (["--config.train.grad_acum=2"], r"did you mean --config\.train\.grad_accum\?")]:
        proc = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        lines = [l for l in proc.stderr.splitlines() if l.startswith("moejax: error:")]
        assert len(lines) == 1 and re.search(match, lines[0]), proc.stderr[-2000:]


def test_cpu_run_prints_no_libtpu_noise():
    """With libtpu installed (the test extra) and no TPU attached, importing moejax keeps libtpu quiet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "JAX_PLATFORMS", "ALLOW_MULTIPLE"))}
    proc = subprocess.run([sys.executable, "-c", "import moejax, jax; print(jax.numpy.ones(2).sum())"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "2.0", proc.stderr
    for noise in ("could not determine TPU accelerator type", "unexpected worker hostname", "E0000"):
        assert noise not in proc.stderr, proc.stderr
