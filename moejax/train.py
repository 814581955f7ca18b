"""Train and evaluate a decoder LM from an experiment config: `train_and_evaluate(config, workdir)`, the loop
over moejax.trainer.Trainer's steps with metrics, evaluations and checkpoints (moejax.checkpoint; its errors
and `load_checkpoint` are importable from here too). Routing randomness at step s uses fold_in(PRNGKey(seed),
s), so a run resumed from a checkpoint (parameters, optimiser state, router biases, data iterator state) computes the
same losses as an uninterrupted one.

Workdir: checkpoints/ (orbax: state, data position, config, and meta = corpus identity and cumulative
wall time), metrics.jsonl, TensorBoard events, config.json, history.jsonl (one line per start, resume with
its allowed config changes, and stop), lock.
- One run per workdir: process 0 holds an exclusive lock on WORKDIR/lock for the whole run (the OS drops
  it when the process dies); a second run is refused naming the holder.
- A workdir is resumed only with the config of its checkpoint (or, before the first checkpoint, of its
  config.json), except RUN_CONTROL keys and the train.* keys named in `allow_changes`; and only on the
  same corpus (data.corpus_identity). metrics.jsonl rows after the resumed step are dropped, so the
  metrics never mix two configs or list a step twice.
- SIGTERM (preemption) and SIGINT (Ctrl-C) save a checkpoint and return. A non-finite loss, or a state
  (parameters, optimiser moments, router biases) with a non-finite value, stops the run without saving
  it: every checkpoint is finite, and the error names the last one.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import checkpoint as ckpt
from moejax import config as config_lib
from moejax import metrics as metrics_lib
from moejax import sharding
from moejax.checkpoint import CorruptCheckpointError, IncompatibleCheckpointError, WorkdirBusyError, load_checkpoint
from moejax.trainer import Trainer

__all__ = ["train_and_evaluate", "Trainer", "load_checkpoint", "NonFiniteLossError", "IncompatibleCheckpointError",
           "CorruptCheckpointError", "WorkdirBusyError"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; no checkpoint after the last finite step was written."""


class _Signals:
    """Records SIGTERM / SIGINT instead of dying, so the loop can checkpoint and return."""

    def __init__(self):
        self.received = None

    def __enter__(self):
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave handlers alone
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _host_metrics(window: list[dict]) -> tuple[dict, dict]:
    """Mean of scalar metrics over a log window; arrays from its last step."""
    host = jax.device_get(window)
    scalars = {k: float(np.mean([m[k] for m in host])) for k, v in host[-1].items() if np.ndim(v) == 0}
    arrays = {k: v for k, v in host[-1].items() if np.ndim(v) > 0}
    return scalars, arrays


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress: bool | None = None,
                       allow_changes=()) -> dict:
    """Train config (moejax.config layout) in workdir, resuming from its latest checkpoint.

    allow_changes: train.* keys (e.g. 'train.lr') whose values may differ from the checkpoint's, to resume
    with deliberately changed hyper-parameters; each change is recorded in workdir/history.jsonl.
    Returns a summary {'steps', 'tokens', 'val_loss', 'val_bpb', 'wall_s', 'interrupted'}: wall_s is the
    wall time of every part of the run up to its last checkpoint and this part; interrupted is None or the
    name of the signal that stopped the run (after checkpointing).
    """
    start = time.time()
    if not workdir:
        raise ValueError(f"workdir={workdir!r} is invalid; allowed: the path of a directory (created if missing)")
    workdir = os.path.expanduser(workdir)
    run = config_lib.to_typed(config)
    config_dict = json.loads(config.to_json()) if isinstance(config, ml_collections.ConfigDict) else dict(config)
    allow_changes = ckpt.check_allow_changes(allow_changes, config_dict)
    chief = jax.process_index() == 0  # writes metrics, config.json, history and the progress bar
    os.makedirs(workdir, exist_ok=True)
    with ckpt.workdir_lock(workdir):
        return _train(run, config_dict, workdir, progress, allow_changes, chief, start)


def _train(run, config_dict, workdir, progress, allow_changes, chief, start) -> dict:
    """train_and_evaluate with the workdir locked."""
    from moejax import data as data_lib  # tfds + grain: only the full training run needs them

    t = run.train
    tokenizer = data_lib.get_tokenizer(run.data)
    mesh = sharding.make_mesh(run.mesh)
    sharding.require_batch(run.data.batch_size, mesh, t.grad_accum)
    trainer = Trainer(run.model_config(tokenizer.vocab_size), t, run.seed, mesh)
    train_iter = data_lib.train_iterator(run.data, tokenizer)  # this process's rows
    eval_set, final_set = data_lib.eval_sets(run.data, tokenizer)  # the split read once for both
    token_bytes = np.asarray(tokenizer.token_bytes, np.float32)
    corpus = data_lib.corpus_identity(run.data)

    mngr = ckpt.manager(workdir, t)
    step = mngr.latest_step() or 0
    config_path = os.path.join(workdir, "config.json")
    if step:
        state, meta, changes = ckpt.restore(mngr, step, trainer, config_dict, train_iter, allow_changes, corpus)
        _log(f"resumed from step {step} in {mngr.directory}")
    else:  # no checkpoint yet: a config.json left by an earlier start must be of this config
        changes, meta = {}, {}
        if os.path.isfile(config_path):
            with open(config_path) as f:
                saved = json.load(f)
            changes = ckpt.config_changes(saved, config_dict, allow_changes, f"{config_path} (no checkpoint yet)")
        state = trainer.init()
        if t.init_from:
            state = _start_from(t, trainer, state)
            _log(f"parameters from {t.init_from}" + (f" ({t.upcycle} upcycling)" if t.upcycle != "none" else ""))
    prior_wall = float(meta.get("wall_s", 0.0))
    if chief:
        ckpt.write_json_atomic(config_path, config_dict)
        metrics_lib.truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), step)  # rows of lost steps
        ckpt.history(workdir, "resume" if step else "start", step, corpus=corpus, **({"changes": changes} if changes else {}))

    writer = metrics_lib.MetricWriter(workdir) if chief else _NoWriter()
    tokens_per_step = run.data.batch_size * run.data.seq_len
    flops = metrics_lib.flops_per_token(trainer.model_config, run.data.seq_len)
    devices = jax.devices()
    peak = (t.peak_flops or metrics_lib.peak_flops(devices[0].device_kind)) * len(devices)
    bar = _progress(step, t.steps, progress if chief else False)
    window, summary = [], {"interrupted": None}
    window_start, timed = time.time(), -1  # steps timed for tokens/s; -1: the first (compiling) step
    stop = "error"
    try:
        with _Signals() as signals:
            while step < t.steps and signals.received is None:
                batch = sharding.global_batch(next(train_iter), mesh)
                state, m = trainer.train_step(state, batch, jnp.asarray(step, jnp.int32))
                step += 1
                window.append(m)
                timed += 1
                if timed == 0:  # the first step compiles: keep it out of tokens/s
                    jax.block_until_ready(m)
                    window_start = time.time()
                log_now = step % t.log_every == 0 or step == t.steps
                save_now = step % t.checkpoint_every == 0 or step == t.steps
                if log_now or save_now or signals.received:
                    _check_finite(window, step, mngr)
                if log_now:
                    scalars, arrays = _host_metrics(window)
                    dt = time.time() - window_start
                    if timed > 0:
                        scalars["tokens_per_s"] = timed * tokens_per_step / dt
                        if peak:
                            scalars["mfu"] = scalars["tokens_per_s"] * flops / peak
                        bar.set_postfix(loss=f"{scalars['loss']:.3f}", tok_s=f"{scalars['tokens_per_s']:.0f}")
                    writer.write(step, scalars, arrays)
                    window, window_start, timed = [], time.time(), 0
                if step % t.eval_every == 0 or step == t.steps:
                    ev = trainer.evaluate(state, final_set if step == t.steps else eval_set, token_bytes)
                    writer.write(step, {k: v for k, v in ev.items() if np.ndim(v) == 0},
                                 {k: v for k, v in ev.items() if np.ndim(v) > 0})
                    summary.update(ev)
                    bar.write(f"step {step}: val_loss {ev['val_loss']:.4f} nats/token, {ev['val_bpb']:.4f} bits/byte")
                    window_start, timed = time.time(), 0  # eval time does not count against tokens/s
                if save_now or signals.received:
                    if not trainer.is_finite(state):
                        _non_finite(f"the model state has NaN or inf values after step {step}", mngr)
                    ckpt.save(mngr, step, state, train_iter, config_dict,
                          {"wall_s": prior_wall + time.time() - start, "corpus": corpus})
                bar.update(1)
            summary["interrupted"] = signals.received and signals.received.name
            if not summary["interrupted"] and "val_loss" not in summary:  # resumed a finished run
                summary.update(trainer.evaluate(state, final_set, token_bytes))
            stop = summary["interrupted"] or "finished"
    except NonFiniteLossError as e:
        stop = f"non-finite: {e}"
        raise
    finally:
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
        bar.close()
        if chief:
            ckpt.history(workdir, "stop", step, reason=stop, wall_s=round(time.time() - start, 1))
    wall = prior_wall + time.time() - start
    summary.update(steps=step, tokens=step * tokens_per_step, wall_s=wall)
    val = f"{summary['val_loss']:.4f} nats/token ({summary['val_bpb']:.4f} bits/byte)" if "val_loss" in summary \
        else "not evaluated"
    stopped = f"stopped by {summary['interrupted']} (checkpoint saved), " if summary["interrupted"] else ""
    _log(f"{stopped}{step} steps, {step * tokens_per_step:,} tokens, final val loss {val}, {wall:.0f} s wall"
         + (f", mesh {dict(mesh.shape)}" if mesh.size > 1 else ""))
    return summary


def _start_from(t, trainer: Trainer, state: dict) -> dict:
    """state with the parameters of t.init_from's latest checkpoint (moejax.upcycle, method t.upcycle) and a
    fresh optimiser state for them, on trainer's shardings."""
    from moejax import upcycle

    try:
        source = ckpt.load_checkpoint(os.path.expanduser(t.init_from))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config.train.init_from={t.init_from!r} is not a moejax workdir with a checkpoint "
                                f"({e})") from e
    new = upcycle.upcycle(t.upcycle, source.trainer.model_config, source.state["params"], trainer.model_config,
                          {k: state[k] for k in ("params", "rest")})
    new = jax.device_put(new, {k: trainer.state_sharding[k] for k in ("params", "rest")})
    new["opt"] = jax.jit(trainer.tx.init, out_shardings=trainer.state_sharding["opt"])(new["params"])
    return new


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message)


class _NoWriter:
    """MetricWriter stand-in for processes other than 0."""

    def write(self, *args, **kwargs):
        pass

    def close(self):
        pass


def _check_finite(window: list[dict], step: int, mngr) -> None:
    """NonFiniteLossError if a training loss of the window (steps step - len(window) + 1 .. step) is NaN/inf."""
    losses = [float(m["loss"]) for m in jax.device_get(window)]
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            _non_finite(f"training loss is {loss} at step {step - len(losses) + i + 1}", mngr)


def _non_finite(what: str, mngr) -> None:
    """NonFiniteLossError: what happened, and the last checkpoint (every saved one is finite) with how to
    resume from it."""
    mngr.wait_until_finished()
    last = mngr.latest_step()
    if last is None:
        where = "No checkpoint was saved before it: run again"
    else:
        where = (f"The last good checkpoint is step {last} in {mngr.directory}: resume from it (or from an earlier "
                 f"one, moving the later ones aside)")
    advice = (f"{where} with a lower learning rate, e.g. --config.train.lr=LR --allow_changes=train.lr (or a longer "
              f"warmup, train.warmup_steps)")
    raise NonFiniteLossError(f"{what}; stopped without saving it. {advice}")


def _progress(step: int, total: int, enable: bool | None):
    from tqdm import tqdm  # progress bar on the terminal; auto-disabled when stderr is not a terminal

    return tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, disable=None if enable is None
                else not enable)
