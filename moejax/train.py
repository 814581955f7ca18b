"""Train and evaluate a decoder LM from an experiment config: `train_and_evaluate(config, workdir)`.

Loss = cross-entropy (mean over target tokens) + every MoE layer's weighted balance and z losses
(MoEStats.loss). Optimiser: optax AdamW + clipping with the schedule of config.train (moejax.config).
The aux-loss-free bias (DeepSeek-V3 sec. 2.1.2) is updated after each optimiser step from that step's
expert load, outside the gradient. Routing randomness at step s uses fold_in(PRNGKey(seed), s), so a run
resumed from a checkpoint (parameters, optimiser state, router biases, data iterator state) computes the
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

import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os
import signal
import socket
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import balance
from moejax import config as config_lib
from moejax import metrics as metrics_lib
from moejax import model as model_lib
from moejax.model_config import MoEConfig, check_placement
from moejax import sharding


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; no checkpoint after the last finite step was written."""


class IncompatibleCheckpointError(ValueError):
    """The workdir holds a checkpoint of a different experiment config."""


class CorruptCheckpointError(ValueError):
    """The latest checkpoint in the workdir cannot be read."""


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir's lock."""


def lr_schedule(t: config_lib.TrainConfig) -> optax.Schedule:
    """Linear warmup 0 -> lr over warmup_steps, then the schedule of TrainConfig.schedule."""
    warm = optax.linear_schedule(0.0, t.lr, max(t.warmup_steps, 1))
    if t.schedule == "cosine":
        after = optax.cosine_decay_schedule(t.lr, max(t.steps - t.warmup_steps, 1), t.min_lr_ratio)
    elif t.schedule == "deepseekmoe":
        after = optax.piecewise_constant_schedule(
            t.lr, {int(a * t.steps) - t.warmup_steps: t.decay_factor for a in t.decay_at})
    else:
        after = optax.constant_schedule(t.lr)
    return optax.join_schedules([warm, after], [t.warmup_steps])


def optimizer(t: config_lib.TrainConfig) -> optax.GradientTransformation:
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(lr_schedule(t), t.b1, t.b2, t.eps, weight_decay=t.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(t.clip_norm), adamw) if t.clip_norm else adamw


@dataclasses.dataclass
class Trainer:
    """The model's graph, the optimiser, and jitted train / eval steps over a state pytree
    {'params': nnx.State of Params, 'rest': other state (router biases), 'opt': optimiser state}, placed
    on `mesh` (default: one device) by moejax.sharding: parameters and optimiser moments by their logical
    axes, batches split over the batch axes. Steps run with the mesh current (sharding.use)."""

    model_config: model_lib.ModelConfig
    train: config_lib.TrainConfig
    seed: int
    mesh: jax.sharding.Mesh | None = None

    def __post_init__(self):
        self.mesh = self.mesh if self.mesh is not None else sharding.single_device_mesh()
        abstract = nnx.eval_shape(lambda: model_lib.Transformer(self.model_config, rngs=nnx.Rngs(0)))
        self.graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
        self.tx = optimizer(self.train)
        check_placement(self.model_config.moe, sharding.axis_size("expert", self.mesh))
        self.state_sharding = sharding.state_shardings(jax.eval_shape(self._init), self.mesh)
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self._jit_init = jax.jit(self._init, out_shardings=self.state_sharding)
        self._jit_train_step = jax.jit(
            self._train_step, in_shardings=(self.state_sharding, self.batch_sharding, self.replicated),
            out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)
        model_sharding = {k: self.state_sharding[k] for k in ("params", "rest")}
        self._jit_eval_step = jax.jit(self._eval_step, in_shardings=(model_sharding, self.batch_sharding),
                                      out_shardings=self.replicated)
        self._jit_finite = jax.jit(_all_finite, out_shardings=self.replicated)

    def _init(self) -> dict:
        model = model_lib.Transformer(self.model_config, rngs=nnx.Rngs(params=self.seed))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return {"params": params, "rest": rest, "opt": self.tx.init(params)}

    def init(self) -> dict:
        """The initial state, created sharded on the mesh."""
        with sharding.use(self.mesh):
            return self._jit_init()

    def abstract_state(self) -> dict:
        """ShapeDtypeStructs of the state, with their shardings (for restoring and ahead-of-time lowering)."""
        return sharding.with_shardings(jax.eval_shape(self._init), self.state_sharding)

    def abstract_batch(self, batch_size: int, seq_len: int) -> dict:
        """ShapeDtypeStructs of a global training batch [batch_size, seq_len], split over the batch axes."""
        shape = lambda dt: jax.ShapeDtypeStruct((batch_size, seq_len), dt, sharding=self.batch_sharding)
        return {"inputs": shape(jnp.int32), "targets": shape(jnp.int32), "segment_ids": shape(jnp.int32),
                "positions": shape(jnp.int32), "weights": shape(jnp.float32)}

    def train_step(self, state, batch, step):
        """(state, global batch, step) -> (new state, metrics); the input state is donated."""
        with sharding.use(self.mesh):
            return self._jit_train_step(state, batch, step)

    def eval_step(self, state, batch):
        with sharding.use(self.mesh):
            return self._jit_eval_step(state, batch)

    def is_finite(self, state) -> bool:
        """Whether every floating-point value of the state (parameters, optimiser moments, biases) is finite."""
        with sharding.use(self.mesh):
            return bool(self._jit_finite(state))

    def lower_train_step(self, batch_size: int, seq_len: int):
        """jax.stages.Lowered of one training step on abstract inputs (moejax.aot compiles it for a TPU)."""
        with sharding.use(self.mesh):
            step = jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated)
            return self._jit_train_step.lower(self.abstract_state(), self.abstract_batch(batch_size, seq_len), step)

    def _forward(self, params, rest, batch, key, train: bool):
        model = nnx.merge(self.graphdef, params, rest)
        logits, stats = model(batch["inputs"], batch["positions"], batch["segment_ids"], key=key, train=train)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B, S]
        return nll, stats

    def _loss(self, params, rest, batch, key, n_targets):
        """sum(nll * w) / n_targets (n_targets over the whole step) + mean layer losses / micro-batches."""
        nll, stats = self._forward(params, rest, batch, key, True)
        ce = jnp.sum(nll * batch["weights"]) / n_targets
        aux = sum((s.loss for s in stats), jnp.zeros(())) / self.train.grad_accum
        return ce + aux, (ce, stats)

    def grads(self, params, rest, batch, step):
        """Gradient of the step's loss on a global batch [B, S], summed over grad_accum micro-batches of
        B / grad_accum rows (micro-batch a holds rows a, a + A, a + 2A, ...; cross-entropy normalised by the
        whole batch's targets). -> (grads, ce [A], stats)."""
        A = self.train.grad_accum
        # micro-batch a = rows a, a + A, ...: each device keeps its own rows (B / A per shard)
        micro = jax.tree.map(lambda x: sharding.constrain(
            x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1), (None, "batch", "length")), batch)
        n_targets = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(self.seed), step), A)
        grad_fn = jax.grad(self._loss, has_aux=True)

        def accumulate(grads, xs):
            mb, key = xs
            g, (ce, stats) = grad_fn(params, rest, mb, key, n_targets)
            return jax.tree.map(jnp.add, grads, g), (ce, stats)

        grads, (ce, stats) = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), (micro, keys))
        return grads, ce, stats

    def _train_step(self, state, batch, step):
        """One optimiser update, then the aux-free bias update from the step's load. -> (state, metrics)."""
        grads, ce, stats = self.grads(state["params"], state["rest"], batch, step)
        updates, opt = self.tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        load = [s.load.sum(0) for s in stats]  # per routed layer [E], summed over micro-batches
        model = nnx.merge(self.graphdef, params, state["rest"])
        model.update_biases(load)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        layer_loss = lambda name: sum((getattr(s, name).mean() for s in stats), jnp.zeros(()))
        out = {"loss": jnp.sum(ce) + layer_loss("loss"), "ce_loss": jnp.sum(ce), "lr": lr_schedule(self.train)(step),
               "grad_norm": optax.tree.norm(grads)}
        out.update({name: layer_loss(name) for name in ("aux_loss", "device_loss", "seq_loss", "z_loss")})
        if stats:  # per routed layer load metrics
            out["load"] = jnp.stack(load) / jnp.maximum(jnp.stack(load).sum(-1, keepdims=True), 1)  # [L, E]
            out["max_vio"] = jnp.stack([balance.max_violation(x) for x in load])  # [L]
            out["dropped"] = jnp.stack([s.dropped.mean() for s in stats])
            out["entropy"] = jnp.stack([s.entropy.mean() for s in stats])
        return {"params": params, "rest": rest, "opt": opt}, out

    def _eval_step(self, state, batch):
        """Sums over the batch: nll of weighted targets, their count, their UTF-8 bytes; and the expert
        load counts [L, E] of the MoE layers with routed experts (L = 0 without)."""
        nll, stats = self._forward(state["params"], state["rest"], batch, None, False)
        w = batch["weights"]
        load = jnp.stack([s.load for s in stats]) if stats else jnp.zeros((0, 0))
        return jnp.sum(nll * w), jnp.sum(w), jnp.sum(batch["token_bytes"] * w), load

    def evaluate(self, state, batches, token_bytes: np.ndarray) -> dict:
        """Validation loss in nats per token and bits per UTF-8 byte over `batches` (this process's rows), and
        `val_tokens`, the number of targets it averages over.
        With routed experts also, per MoE layer: `val_load` [L, E] (each expert's share of the assignments
        over all batches), `val_max_vio` [L] (MaxVio of that load, Wang et al. 2024 eq. 7: MaxVio_global)
        and `val_max_vio_batch` [L] (MaxVio of each batch's load, averaged over batches)."""
        model = {"params": state["params"], "rest": state["rest"]}
        nll = n = n_bytes = 0.0
        loads = []
        for b in batches:
            s = self.eval_step(model, sharding.global_batch({**b, "token_bytes": token_bytes[b["targets"]]},
                                                            self.mesh))
            nll, n, n_bytes = nll + float(s[0]), n + float(s[1]), n_bytes + float(s[2])
            loads.append(np.asarray(s[3]))
        out = {"val_loss": nll / max(n, 1), "val_bpb": nll / math.log(2) / max(n_bytes, 1), "val_tokens": int(n)}
        if loads and loads[0].size:
            total = np.sum(loads, 0)  # [L, E]
            vio = lambda c: np.asarray(jax.vmap(balance.max_violation)(c))  # [L]
            out.update(val_load=total / np.maximum(total.sum(-1, keepdims=True), 1), val_max_vio=vio(total),
                       val_max_vio_batch=np.mean([vio(c) for c in loads], 0))
        return out


def _all_finite(tree) -> jax.Array:
    """[] bool: no NaN or inf in any floating-point leaf of tree."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


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


def _checkpoint_manager(workdir: str, t: config_lib.TrainConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=t.keep_checkpoints, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def _read(mngr, step, **args):
    """Items `args` of checkpoint `step`, or CorruptCheckpointError naming what to do."""
    try:
        return mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # orbax raises many types for missing or truncated files
        raise CorruptCheckpointError(
            f"checkpoint step {step} in {mngr.directory} cannot be read ({type(e).__name__}: {e}). Nothing was "
            f"changed. Move {os.path.join(str(mngr.directory), str(step))} aside to resume from the previous "
            f"checkpoint (saved steps: {list(mngr.all_steps())}), or use a new --workdir.") from e


def _changes(saved: dict, current: dict, allow_changes, where: str) -> dict:
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


def _restore(mngr, step, trainer, config_dict, train_iter, allow_changes=(), corpus=None):
    """Restore the state at `step` and train_iter's position, refusing a checkpoint of another config or corpus
    or with a non-finite value. -> (state, meta {'wall_s', 'corpus'}, allowed config changes {key: [old, new]})."""
    read = functools.partial(_read, mngr, step)
    where = f"the checkpoint (step {step}) in {mngr.directory}"
    changes = _changes(read(config=ocp.args.JsonRestore())["config"], config_dict, allow_changes, where)
    has_meta = os.path.isdir(os.path.join(str(mngr.directory), str(step), "meta"))  # older checkpoints: none
    meta = read(meta=ocp.args.JsonRestore())["meta"] if has_meta else {}
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
    state = read(state=ocp.args.StandardRestore(trainer.abstract_state()),
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
    mngr = _checkpoint_manager(workdir, run.train)
    try:
        step = step if step is not None else mngr.latest_step()
        if step is None or step not in mngr.all_steps():
            raise FileNotFoundError(f"step={step!r} is not in {mngr.directory}; allowed: one of the saved steps "
                                    f"{list(mngr.all_steps())}")
        state = _read(mngr, step, state=ocp.args.StandardRestore(trainer.abstract_state()))["state"]
    finally:
        mngr.close()
    ck = Checkpoint(run, trainer, {k: state[k] for k in ("params", "rest")}, tokenizer, step)
    return ck.with_moe(**moe_changes) if moe_changes else ck


def _subset(full: nnx.State, like: nnx.State) -> nnx.State:
    """The entries of `full` at the paths of `like` (every one must be there)."""
    flat = dict(nnx.to_flat_state(full))
    return nnx.from_flat_state([(p, flat[p]) for p, _ in nnx.to_flat_state(like)])


def _save(mngr, step, state, train_iter, config_dict, meta):
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


def _write_json_atomic(path: str, obj) -> None:
    """Write obj as JSON to path through a temporary file and a rename: readers see the old or the new file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _history(workdir: str, event: str, step: int, **info) -> None:
    """Append one line to workdir/history.jsonl: what happened to the run and when."""
    row = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "event": event, "step": step, "host": socket.gethostname(),
           "pid": os.getpid(), **info}
    with open(os.path.join(workdir, "history.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


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
    allow_changes = check_allow_changes(allow_changes, config_dict)
    chief = jax.process_index() == 0  # writes metrics, config.json, history and the progress bar
    os.makedirs(workdir, exist_ok=True)
    with workdir_lock(workdir):
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
    eval_set = data_lib.eval_batches(run.data, tokenizer)
    final_set = data_lib.eval_batches(run.data, tokenizer, final=True) if run.data.final_eval_steps else eval_set
    token_bytes = np.asarray(tokenizer.token_bytes, np.float32)
    corpus = data_lib.corpus_identity(run.data)

    mngr = _checkpoint_manager(workdir, t)
    step = mngr.latest_step() or 0
    config_path = os.path.join(workdir, "config.json")
    if step:
        state, meta, changes = _restore(mngr, step, trainer, config_dict, train_iter, allow_changes, corpus)
        _log(f"resumed from step {step} in {mngr.directory}")
    else:  # no checkpoint yet: a config.json left by an earlier start must be of this config
        changes, meta = {}, {}
        if os.path.isfile(config_path):
            with open(config_path) as f:
                saved = json.load(f)
            changes = _changes(saved, config_dict, allow_changes, f"{config_path} (no checkpoint yet)")
        state = trainer.init()
    prior_wall = float(meta.get("wall_s", 0.0))
    if chief:
        _write_json_atomic(config_path, config_dict)
        metrics_lib.truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), step)  # rows of lost steps
        _history(workdir, "resume" if step else "start", step, corpus=corpus, **({"changes": changes} if changes else {}))

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
                    _save(mngr, step, state, train_iter, config_dict,
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
            _history(workdir, "stop", step, reason=stop, wall_s=round(time.time() - start, 1))
    wall = prior_wall + time.time() - start
    summary.update(steps=step, tokens=step * tokens_per_step, wall_s=wall)
    val = f"{summary['val_loss']:.4f} nats/token ({summary['val_bpb']:.4f} bits/byte)" if "val_loss" in summary \
        else "not evaluated"
    stopped = f"stopped by {summary['interrupted']} (checkpoint saved), " if summary["interrupted"] else ""
    _log(f"{stopped}{step} steps, {step * tokens_per_step:,} tokens, final val loss {val}, {wall:.0f} s wall"
         + (f", mesh {dict(mesh.shape)}" if mesh.size > 1 else ""))
    return summary


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
