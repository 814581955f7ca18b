"""Training system: schedule, steps, configs and parameter ratios, checkpoint/resume, faults, CLI."""
import importlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax import main as main_lib
from moejax import metrics as metrics_lib
from moejax import model as model_lib
from moejax import train, trainer
from tests.tolerances import F32
from tests.conftest import FAST_COMPILE

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE1 = ROOT / "configs" / "deepseekmoe_table1.py"


from configs import deepseekmoe_table1 as table1  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text directory: 40 standard-library modules (~1 MB)."""
    root = tmp_path_factory.mktemp("corpus")
    files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    for f in files:
        shutil.copy(f, root / f.name)
    return root


def tiny(corpus, tmp, method="deepseekmoe", **train_overrides):
    """The tiny Table-1 config shrunk further for tests (d 64, 2 layers, 8 x 64 tokens per step)."""
    c = table1.get_config(f"method={method},scale=tiny")
    c.model.d_model, c.model.moe.d_ff = 64, 176
    c.data.update(source="text_dir", text_dir=str(corpus), tfds_data_dir=str(tmp / "tfds"), seq_len=64,
                  batch_size=8, eval_steps=2)
    c.train.update(dict(steps=12, warmup_steps=2, lr=3e-3, log_every=1, eval_every=100, checkpoint_every=4),
                   **train_overrides)
    return c


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if "loss" in r}


# --- schedule and optimiser -------------------------------------------------------------------------

def test_deepseekmoe_schedule():
    """Linear warmup over 2K steps, then x0.316 at 80% and 90% of steps (Dai et al. 2024 sec. 4.1.3)."""
    t = config_lib.TrainConfig(steps=25000, warmup_steps=2000, lr=1.08e-3)
    lr = trainer.lr_schedule(t)
    np.testing.assert_allclose([lr(0), lr(1000), lr(2000), lr(19999), lr(20000), lr(22499), lr(22500), lr(24999)],
                               [0, 0.54e-3, 1.08e-3, 1.08e-3, 1.08e-3 * 0.316, 1.08e-3 * 0.316,
                                1.08e-3 * 0.316 ** 2, 1.08e-3 * 0.316 ** 2], rtol=1e-6)


def test_cosine_schedule():
    t = config_lib.TrainConfig(steps=110, warmup_steps=10, lr=1.0, schedule="cosine", min_lr_ratio=0.1)
    lr = trainer.lr_schedule(t)
    np.testing.assert_allclose([lr(5), lr(10), lr(60), lr(110)], [0.5, 1.0, 0.55, 0.1], rtol=1e-6)


def _trainer(method="dense", grad_accum=1, **moe_kw):
    m = table1.moe_config(method, 32, 64)
    m = type(m)(**{**m.__dict__, **moe_kw})
    mc = model_lib.ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, moe=m, max_len=16)
    return train.Trainer(mc, config_lib.TrainConfig(steps=10, warmup_steps=0, grad_accum=grad_accum), seed=0)


def _batch(B=4, S=16, seed=0):
    toks = np.random.default_rng(seed).integers(0, 128, (B, S + 1)).astype(np.int32)
    weights = np.ones((B, S), np.float32)
    weights[0, 5:] = 0  # uneven targets per micro-batch
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.ones((B, S), np.int32),
            "positions": np.tile(np.arange(S, dtype=np.int32), (B, 1)), "weights": weights}


@pytest.mark.parametrize("method", ["dense", "hash"])
def test_grad_accumulation_equals_full_batch(method):
    """Two micro-batches of 2 give the update of one batch of 4 (no routing-group coupling here)."""
    out = []
    for A in (1, 2):
        tr = _trainer(method, grad_accum=A)
        state = tr.init()
        grads, ce, _ = jax.jit(tr.grads)(state["params"], state["rest"], _batch(), 0)
        out.append((grads, ce.sum()))
    np.testing.assert_allclose(out[0][1], out[1][1], **F32)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32), out[0][0], out[1][0])


def test_aux_free_bias_updated_outside_gradient():
    """DeepSeek-V3 bias: b_i += u * sign(mean load - load_i) after the step; it is not an optimiser param."""
    tr = _trainer("deepseekmoe", aux_free_bias=True, aux_loss_coef=0.0, bias_update_rate=0.01)
    state = tr.init()
    new, m = tr.train_step(jax.tree.map(jnp.copy, state), _batch(), jnp.asarray(0))
    for layer in (0, 1):
        bias = new["rest"]["blocks"][layer]["ffn"]["bias"][...]
        load = np.asarray(m["load"][layer])
        np.testing.assert_allclose(bias, 0.01 * np.sign(load.mean() - load), atol=1e-7)
    assert "bias" not in str(jax.tree_util.tree_structure(state["opt"]))


def test_train_step_is_deterministic():
    tr = _trainer("gshard")
    a = tr.train_step(tr.init(), _batch(), jnp.asarray(3))[1]
    b = tr.train_step(tr.init(), _batch(), jnp.asarray(3))[1]
    c = tr.train_step(tr.init(), _batch(), jnp.asarray(4))[1]  # another step: another routing key
    assert float(a["loss"]) == float(b["loss"])
    assert float(a["loss"]) != float(c["loss"])


# --- configs: every config builds; parameter ratios of Table 1 -----------------------------------------

def _expert_params(config_dict, vocab=384):
    run = config_lib.to_typed(config_dict)
    mc = run.model_config(vocab)
    model = nnx.eval_shape(lambda: model_lib.Transformer(mc, rngs=nnx.Rngs(0)))
    sizes = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    blocks = list(model.blocks) + ([model.scanned] if model.n_scanned else [])  # scanned: stacked [L, ...]
    ffn = sum(sizes(nnx.state(b.ffn, nnx.Param)) - (b.ffn.router.size if hasattr(b.ffn, "router") else 0)
              for b in blocks)
    return mc, sizes(nnx.state(model, nnx.Param)), ffn, metrics_lib.active_params(mc)["ffn"]


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__"))
def test_every_config_builds(name):
    """Every config module's default get_config() validates and its model builds (shapes only)."""
    module = importlib.import_module(f"configs.{name}")
    c = module.get_config()
    mc, total, _, _ = _expert_params(c)
    assert total > 0 and mc.max_len == c.data.seq_len
    doc = module.__doc__
    assert "python -m moejax.main --config=configs/" in doc and "Expected" in doc, "docstring: command, result, time"


@pytest.mark.parametrize("scale", list(table1.SCALES))
def test_table1_parameter_ratios(scale):
    """Expert parameters 16x a standard FFN for every MoE method; active 1x (dense, hash, switch) or 2x."""
    standard = None
    for method in table1.METHODS:
        mc, total, ffn, active = _expert_params(table1.get_config(f"method={method},scale={scale}"))
        d_ff = mc.moe.d_ff
        standard = 3 * mc.d_model * d_ff * mc.n_layers  # SwiGLU FFNs of all layers
        assert ffn == (standard if method == "dense" else 16 * standard), method
        assert active == (2 * standard if method in ("gshard", "deepseekmoe") else standard), method


def test_table1_paper_scale_matches_the_paper():
    """Sec. 4.1: ~2.0B total / 0.3B active (GShard, DeepSeekMoE), 0.2B (dense); Table 1 FLOPs per 2K tokens
    2.9T (1x active) and 4.3T (2x); here with tied 8K embeddings and PaLM's FLOP count (6 N + 12 L d S)."""
    expect = {"dense": (0.2e9, 2.9e12), "hash": (2.0e9, 2.9e12), "switch": (2.0e9, 2.9e12),
              "gshard": (2.0e9, 4.3e12), "deepseekmoe": (2.0e9, 4.3e12)}
    for method, (params, flops) in expect.items():
        c = table1.get_config(f"method={method},scale=paper")
        mc, total, _, _ = _expert_params(c, vocab=8192)
        assert (mc.n_layers, mc.d_model, mc.n_heads, c.data.seq_len, c.data.batch_size) == (9, 1280, 10, 2048, 2048)
        assert abs(total / params - 1) < 0.1, (method, total)
        assert abs(metrics_lib.flops_per_token(mc, 2048) * 2048 / flops - 1) < 0.03, method


def test_deepseekmoe_segmentation_in_table1():
    c = table1.get_config("method=deepseekmoe,scale=paper")
    m = config_lib.to_typed(c).model["moe"]
    assert (m.n_experts, m.top_k, m.n_shared, m.expert_width, m.dispatch, m.aux_loss_coef) == \
        (63, 7, 1, 864, "dropless", 0.01)


# --- config errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path,bad,near", [
    ("model", "d_modle", "d_model"),
    ("model.moe", "topk", "top_k"),
    ("data", "seq_length", "seq_len"),
    ("train", "warmup", "warmup_steps"),
])
def test_unknown_config_key_names_nearest(path, bad, near):
    c = table1.get_config("method=gshard,scale=tiny").to_dict()
    node = c
    for p in path.split("."):
        node = node[p]
    node[bad] = 1
    with pytest.raises(ValueError, match=rf"config\.{path}\.{bad}.*did you mean '{near}'"):
        config_lib.to_typed(c)


@pytest.mark.parametrize("arg,match", [("method=moe", "method='moe'"), ("scale=huge", "scale='huge'"),
                                       ("size=tiny", "size=tiny")])
def test_bad_config_argument(arg, match):
    with pytest.raises(ValueError, match=match):
        table1.get_config(arg)


@pytest.mark.parametrize("field,value,match", [
    ("steps", 0, r"TrainConfig\.steps=0"), ("schedule", "linear", r"TrainConfig\.schedule='linear'"),
    ("warmup_steps", 50, r"warmup_steps=50.*steps=12"), ("decay_at", (0.9, 0.8), r"decay_at"),
    ("grad_accum", 3, r"batch_size=8.*grad_accum=3"),
])
def test_bad_train_values(corpus, tmp_path, field, value, match):
    c = tiny(corpus, tmp_path, **{field: value})
    with pytest.raises(ValueError, match=match):
        train.train_and_evaluate(c, str(tmp_path / "w"))


# --- end to end -------------------------------------------------------------------------------------

def test_smoke_loss_falls_and_outputs(corpus, tmp_path):
    """The tiny DeepSeekMoE config trains; the loss falls; metrics, TensorBoard and checkpoints appear."""
    c = tiny(corpus, tmp_path, steps=30, eval_every=15, checkpoint_every=15, warmup_steps=3)
    w = tmp_path / "w"
    s = train.train_and_evaluate(c, str(w))
    loss = losses(w)
    assert np.mean([loss[i] for i in (28, 29, 30)]) < np.mean([loss[i] for i in (1, 2, 3)]) - 0.5
    rows = metrics_lib.read_jsonl(w / "metrics.jsonl")
    train_row = next(r for r in rows if r["step"] == 30 and "loss" in r)
    for key in ("ce_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "load", "max_vio", "dropped",
                "entropy"):
        assert key in train_row, key
    assert np.array(train_row["load"]).shape == (2, 63) and np.allclose(np.sum(train_row["load"], 1), 1)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [15, 30] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert s["steps"] == 30 and s["tokens"] == 30 * 8 * 64 and s["val_loss"] == evals[1]["val_loss"]
    assert abs(s["val_bpb"] - s["val_loss"] / np.log(2)) < 0.1 * s["val_bpb"]  # bytes ~ tokens (+EOS)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(w))
    assert sorted(os.listdir(w / "checkpoints")) == ["15", "30"]
    assert json.load(open(w / "config.json"))["model"]["moe"]["n_experts"] == 63
    # Running the finished workdir again resumes at the end: no steps, same validation loss.
    again = train.train_and_evaluate(c, str(w))
    assert again["steps"] == 30 and again["val_loss"] == pytest.approx(s["val_loss"], rel=1e-6)


_METRICS_CHILD = """
import glob, importlib.util, os, sys
import numpy as np
from moejax import metrics
w = metrics.MetricWriter(sys.argv[1])
w.write(3, {"loss": 2.5}, {"load": np.array([0.25, 0.75])})
w.close()
assert "torch" not in sys.modules, "tensorboardX imported torch"
[events] = glob.glob(os.path.join(sys.argv[1], "events.out.tfevents.*"))
assert os.path.getsize(events) > 0 and b"loss" in open(events, "rb").read() and b"load" in open(events, "rb").read()
if importlib.util.find_spec("torch") is not None:
    import torch  # still importable afterwards
    assert torch.zeros(2).sum().item() == 0
print("ok")
"""


def test_metric_writer_logs_to_tensorboard_without_importing_torch(tmp_path):
    """MetricWriter's tensorboardX does not import PyTorch (moejax.metrics: 1.7 s of every training process'
    start where torch is installed); the events file holds the scalars and histograms; torch imports after."""
    p = subprocess.run([sys.executable, "-c", _METRICS_CHILD, str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


def test_incompatible_checkpoint_is_refused_and_kept(corpus, tmp_path):
    w = tmp_path / "w"
    train.train_and_evaluate(tiny(corpus, tmp_path, steps=4), str(w))
    mtimes = lambda: {p: p.stat().st_mtime_ns for p in w.rglob("*") if p.name != "lock"}  # lock: the holder's name
    before = mtimes()
    other = tiny(corpus, tmp_path, method="gshard", steps=8)
    with pytest.raises(train.IncompatibleCheckpointError, match=r"model\.moe\.n_experts: saved 63, now 16"):
        train.train_and_evaluate(other, str(w))
    assert mtimes() == before
    # Run-control keys may change on resume.
    more = tiny(corpus, tmp_path, steps=4, log_every=2, eval_every=50)
    assert train.train_and_evaluate(more, str(w))["steps"] == 4


def test_corrupt_checkpoint_is_reported_and_kept(corpus, tmp_path):
    w = tmp_path / "w"
    c = tiny(corpus, tmp_path, method="hash", steps=4, checkpoint_every=2)
    train.train_and_evaluate(c, str(w))
    data_files = [p for p in (w / "checkpoints" / "4" / "state").rglob("*") if p.is_file() and p.stat().st_size > 100]
    for p in data_files:
        p.write_bytes(b"\0" * 64)  # truncated to garbage
    before = {p: p.read_bytes() for p in w.rglob("*") if p.is_file() and "checkpoints" in str(p)}
    with pytest.raises(train.CorruptCheckpointError, match=r"checkpoint step 4 .* cannot be read.*saved steps: \[2, 4\]"):
        train.train_and_evaluate(c, str(w))
    assert {p: p.read_bytes() for p in w.rglob("*") if p.is_file() and "checkpoints" in str(p)} == before
    shutil.move(w / "checkpoints" / "4", tmp_path / "step4_corrupt")  # as the message says
    assert train.train_and_evaluate(c, str(w))["steps"] == 4


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    c = tiny(corpus, tmp_path, method="dense", steps=8, lr=1e30, warmup_steps=0, clip_norm=0.0, checkpoint_every=1,
             log_every=4)
    w = tmp_path / "w"
    with pytest.raises(train.NonFiniteLossError, match=r"(at step|after step) (\d+); stopped without saving it\. "
                                                       r"The last good checkpoint") as e:
        train.train_and_evaluate(c, str(w))
    bad = int(re.search(r"(at|after) step (\d+)", str(e.value)).group(2))
    saved = sorted(_steps_saved(w))
    assert saved[-1] < bad and f"last good checkpoint is step {saved[-1]} in" in str(e.value)
    assert saved == list(range(1, saved[-1] + 1))  # every finite step was saved (checkpoint_every=1)


def _cli(workdir, corpus, tmp, *extra):
    args = [f"--config.data.text_dir={corpus}", f"--config.data.tfds_data_dir={tmp / 'tfds'}",
            "--config.data.source=text_dir", "--config.data.seq_len=64", "--config.data.batch_size=8",
            "--config.data.eval_steps=2", "--config.model.d_model=64", "--config.model.moe.d_ff=176",
            "--config.train.steps=12", "--config.train.warmup_steps=2", "--config.train.lr=0.003",
            "--config.train.log_every=1", "--config.train.eval_every=100", "--config.train.checkpoint_every=4"]
    cmd = [sys.executable, "-m", "moejax.main", f"--config={TABLE1}:method=deepseekmoe,scale=tiny",
           f"--workdir={workdir}", *args, *extra]
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, workdir, step, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(workdir / "metrics.jsonl") and max(losses(workdir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    """An uninterrupted CLI run: losses of steps 1..12."""
    tmp = tmp_path_factory.mktemp("ref")
    proc = _cli(tmp / "w", corpus, tmp)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "12 steps, 6,144 tokens, final val loss" in out
    return losses(tmp / "w")


def test_resume_after_sigkill_gives_the_same_losses(corpus, tmp_path, reference_run):
    w = tmp_path / "w"
    proc = _cli(w, corpus, tmp_path)
    _wait_for_step(proc, w, 5)
    while not (w / "checkpoints" / "4").exists():  # finalised (async save renames a tmp dir)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = max(_steps_saved(w))
    proc = _cli(w, corpus, tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resumed from step {saved}" in out and 4 <= saved < 12
    assert losses(w) == reference_run


def _steps_saved(workdir):
    return [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_checkpoints_exits_cleanly_and_resumes(corpus, tmp_path, reference_run, sig):
    w = tmp_path / "w"
    proc = _cli(w, corpus, tmp_path)
    _wait_for_step(proc, w, 2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig.value, err
    assert "Traceback" not in err and f"stopped by {sig.name} (checkpoint saved)" in out
    stopped = max(_steps_saved(w))
    assert 2 <= stopped < 12
    proc = _cli(w, corpus, tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and f"resumed from step {stopped}" in out, err
    assert losses(w) == reference_run


def test_cli_reports_bad_data_without_traceback(tmp_path):
    proc = _cli(tmp_path / "w", tmp_path / "missing", tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err
    assert "text_dir" in err and "missing" in err
