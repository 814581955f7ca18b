"""The jitted training and evaluation steps of a decoder LM: `Trainer` (state init, sharded step, eval).

Loss = cross-entropy (mean over target tokens) + every routed layer's weighted balance and z losses
(MoEStats.loss). Optimiser: optax AdamW + clipping with the schedule of config.train (moejax.config).
The aux-loss-free bias (DeepSeek-V3 sec. 2.1.2) is updated after each optimiser step from that step's
expert load, outside the gradient. Routing randomness at step s uses fold_in(PRNGKey(seed), s).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import balance
from moejax import config as config_lib
from moejax import model as model_lib
from moejax import sharding
from moejax.model_config import check_placement


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
        self._abstract_init = jax.eval_shape(self._init)  # ShapeDtypeStructs of the state, unsharded
        self.state_sharding = sharding.state_shardings(self._abstract_init, self.mesh)
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
        return sharding.with_shardings(self._abstract_init, self.state_sharding)

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
