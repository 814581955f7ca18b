"""A training run's state on disk: orbax checkpoints (state, data position, config, meta), the workdir lock,
config.json and history.jsonl; and `load_checkpoint` for evaluating a trained model.

- One run per workdir: process 0 holds an exclusive lock on WORKDIR/lock for the whole run (the OS drops
  it when the process dies); a second run is refused naming the holder.
- A checkpoint is restored only with its own config (except RUN_CONTROL keys and allowed train.* changes),
  on the same corpus and number of processes, and only if every value is finite; otherwise the error says
  what differs and what to do, and nothing is changed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import socket
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from moejax import config as config_lib
from moejax import model as model_lib
from moejax.model_config import MoEConfig
from moejax.trainer import Trainer


class IncompatibleCheckpointError(ValueError):
    """The workdir holds a checkpoint of a different experiment config."""


class CorruptCheckpointError(ValueError):
    """The latest checkpoint in the workdir cannot be read."""


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir's lock."""


def manager(workdir: str, t: config_lib.TrainConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=t.keep_checkpoints, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def read(mngr, step, **args):
    """Items `args` of checkpoint `step`, or CorruptCheckpointError naming what to do."""
    try:
        return mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # orbax raises many types for missing or truncated files
        raise CorruptCheckpointError(
            f"checkpoint step {step} in {mngr.directory} cannot be read ({type(e).__name__}: {e}). Nothing was "
            f"changed. Move {os.path.join(str(mngr.directory), str(step))} aside to resume from the previous "
            f"checkpoint (saved steps: {list(mngr.all_steps())}), or use a new --workdir.") from e


def config_changes(saved: dict, current: dict, allow_changes, where: str) -> dict:
    """{key: [saved, now]} of the allowed differences between two config dicts; IncompatibleCheckpointError
    for any other difference (RUN_CONTROL keys may always change)."""
    diff = config_lib.incompatible(saved, current)
    refused = [d for d in diff if d.split(":")[0] not in allow_changes]
    if refused:
        raise IncompatibleCheckpointError(
            f"{where} is of a different config; refusing to resume or overwrite it. Use a new --workdir, the "
            f"saved config, or name deliberate train.* changes in --allow_changes (allow_changes=). Differences: "
            + "; ".join(refused))
    a, b = dict(config_lib.flatten(saved)), dict(config_lib.flatten(current))
    return {k: [a.get(k), b.get(k)] for k in sorted(allow_changes) if a.get(k) != b.get(k)}


def check_allow_changes(allow_changes, config_dict: dict) -> tuple[str, ...]:
    """The keys of allow_changes, each a train.* key of the config (ValueError naming it otherwise)."""
    keys = dict(config_lib.flatten(config_dict))
    for key in allow_changes:
        if not key.startswith("train.") or key not in keys:
            train_keys = sorted(k for k in keys if k.startswith("train."))
            raise ValueError(f"allow_changes: {key!r} is invalid; allowed: train.* keys of the config (a change "
                             f"of the model, data or seed makes a different experiment): {train_keys}")
    return tuple(allow_changes)


def restore(mngr, step, trainer, config_dict, train_iter, allow_changes=(), corpus=None):
    """Restore the state at `step` and train_iter's position, refusing a checkpoint of another config or corpus
    or with a non-finite value. -> (state, meta {'wall_s', 'corpus'}, allowed config changes {key: [old, new]})."""
    get = functools.partial(read, mngr, step)
    where = f"the checkpoint (step {step}) in {mngr.directory}"
    changes = config_changes(get(config=ocp.args.JsonRestore())["config"], config_dict, allow_changes, where)
    has_meta = os.path.isdir(os.path.join(str(mngr.directory), str(step), "meta"))  # older checkpoints: none
    meta = get(meta=ocp.args.JsonRestore())["meta"] if has_meta else {}
    if corpus is not None and meta.get("corpus") not in (None, corpus):
        raise IncompatibleCheckpointError(
            f"{where} was trained on another corpus: saved {meta['corpus']}, now {corpus}. The data changed since "
            f"(validation losses would not compare); resume on the same data, or use a new --workdir.")
    import glob
    import grain

    saved = glob.glob(os.path.join(str(mngr.directory), str(step), "data", "process_*-of-*.json"))
    n_saved = sorted({int(f.rsplit("-of-", 1)[1].split(".")[0]) for f in saved})
    if n_saved and jax.process_count() not in n_saved:  # grain saves one position per process
        raise IncompatibleCheckpointError(
            f"checkpoint step {step} in {mngr.directory} holds the data positions of {n_saved[0]} processes; "
            f"this run has {jax.process_count()}. Each process reads its own documents, so resume with "
            f"{n_saved[0]} processes (any mesh), or use a new --workdir.")
    state = get(state=ocp.args.StandardRestore(trainer.abstract_state()),
                 data=grain.checkpoint.CheckpointRestore(train_iter))["state"]
    if not trainer.is_finite(state):  # written before moejax checked states before saving
        raise CorruptCheckpointError(
            f"{where} holds NaN or inf values; nothing was changed. Move {os.path.join(str(mngr.directory), str(step))}"
            f" aside to resume from the previous checkpoint (saved steps: {list(mngr.all_steps())}), or use a new "
            f"--workdir.")
    return state, meta, changes


@dataclasses.dataclass
class Checkpoint:
    """A trained model loaded from a workdir (`load_checkpoint`), for evaluation and inspection."""

    run: config_lib.RunConfig
    trainer: Trainer  # of the (possibly changed) model, on one device
    state: dict  # {'params', 'rest'}
    tokenizer: Any
    step: int

    def model(self) -> model_lib.Transformer:
        return nnx.merge(self.trainer.graphdef, self.state["params"], self.state["rest"])

    def with_moe(self, **changes) -> "Checkpoint":
        """The same parameters in a model whose MoE layers have `changes` (MoEConfig fields); parameters the
        changed model lacks (e.g. the shared experts for n_shared=0) are dropped."""
        config_lib.check_keys(changes, [f.name for f in dataclasses.fields(MoEConfig)], "moe_changes")
        mc = self.trainer.model_config
        trainer = Trainer(dataclasses.replace(mc, moe=dataclasses.replace(mc.moe, **changes)), self.run.train,
                          self.run.seed)
        like = trainer.abstract_state()
        return Checkpoint(self.run, trainer, {k: _subset(self.state[k], like[k]) for k in ("params", "rest")},
                          self.tokenizer, self.step)

    def evaluate(self) -> dict:
        """Trainer.evaluate on the run's final validation batches (data.final_eval_steps)."""
        from moejax import data as data_lib

        return self.trainer.evaluate(self.state, data_lib.eval_batches(self.run.data, self.tokenizer, final=True),
                                     np.asarray(self.tokenizer.token_bytes, np.float32))


def load_checkpoint(workdir: str, *, step: int | None = None, moe_changes: dict | None = None) -> Checkpoint:
    """Checkpoint `step` (default: the latest) of a training workdir, with the config in workdir/config.json.

    moe_changes: MoEConfig fields to change in every MoE layer, for evaluation-time ablations of the trained
    model (DeepSeekMoE sec. 4.5): {'disable_top': r}, {'top_k': k}, or {'n_shared': 0, 'top_k': K + 1}
    (parameters the changed model lacks, such as the shared experts, are dropped).
    """
    from moejax import data as data_lib

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; allowed: a workdir written by moejax training "
                                f"(train_and_evaluate writes config.json and checkpoints/)")
    with open(path) as f:
        run = config_lib.to_typed(json.load(f))
    tokenizer = data_lib.get_tokenizer(run.data)
    trainer = Trainer(run.model_config(tokenizer.vocab_size), run.train, run.seed)
    mngr = manager(workdir, run.train)
    try:
        step = step if step is not None else mngr.latest_step()
        if step is None or step not in mngr.all_steps():
            raise FileNotFoundError(f"step={step!r} is not in {mngr.directory}; allowed: one of the saved steps "
                                    f"{list(mngr.all_steps())}")
        state = read(mngr, step, state=ocp.args.StandardRestore(trainer.abstract_state()))["state"]
    finally:
        mngr.close()
    ck = Checkpoint(run, trainer, {k: state[k] for k in ("params", "rest")}, tokenizer, step)
    return ck.with_moe(**moe_changes) if moe_changes else ck


def _subset(full: nnx.State, like: nnx.State) -> nnx.State:
    """The entries of `full` at the paths of `like` (every one must be there)."""
    flat = dict(nnx.to_flat_state(full))
    return nnx.from_flat_state([(p, flat[p]) for p, _ in nnx.to_flat_state(like)])


def save(mngr, step, state, train_iter, config_dict, meta):
    import grain  # data: one file per process (process_I-of-N.json), as each process reads its own documents

    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=grain.checkpoint.CheckpointSave(train_iter),
                                            config=ocp.args.JsonSave(config_dict),
                                            meta=ocp.args.JsonSave(meta)), force=True)


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Hold an exclusive lock on workdir/lock (process 0 only: on multi-host the workdir is shared) for the
    with-block; WorkdirBusyError naming the holder (pid, host, start) if another run has it. The OS releases
    the lock when the holder exits or is killed, so a dead run never blocks its resume."""
    if jax.process_index() != 0:
        yield
        return
    path = os.path.join(workdir, "lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "a process that has not written its name"
            raise WorkdirBusyError(f"{os.path.abspath(workdir)} is in use by another run ({holder}); wait for it to "
                                   f"finish or stop it, or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_json_atomic(path: str, obj) -> None:
    """Write obj as JSON to path through a temporary file and a rename: readers see the old or the new file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def history(workdir: str, event: str, step: int, **info) -> None:
    """Append one line to workdir/history.jsonl: what happened to the run and when."""
    row = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "event": event, "step": step, "host": socket.gethostname(),
           "pid": os.getpid(), **info}
    with open(os.path.join(workdir, "history.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
