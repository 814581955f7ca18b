"""The MoE layer: an NNX module over the functional core, configured by a frozen, validated
`moejax.model_config.MoEConfig` (DeepSeekMoE eq. 9-11: shared experts plus gated routed experts).

Routing is looked up in the router registry (moejax.routers); the expert FFNs run through an expert backend
(moejax.experts.BACKENDS). The platform and the backends are decided once per call (`_Run`) and passed down.
Profiler scopes: moe/router, moe/dispatch, moe/experts, moe/combine, moe/balance_losses.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jax.sharding import PartitionSpec as P

from moejax import balance, dispatch, experts, routers, routing, sharding
from moejax.model_config import MoEConfig, check_placement

class RouterBias(nnx.Variable):
    """Aux-loss-free balancing bias [E]: layer state updated outside the gradient, never a Param."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoEStats:
    """Losses (already weighted) and load metrics of one MoE layer, float32 scalars unless noted.

    loss = aux + device + seq + z. load: [E] assignment counts chosen by the router (before drops).
    dropped: fraction of chosen assignments with no buffer row (expert choice: of tokens no expert took).
    """

    loss: jax.Array
    aux_loss: jax.Array
    device_loss: jax.Array
    seq_loss: jax.Array
    z_loss: jax.Array
    load: jax.Array
    max_vio: jax.Array
    dropped: jax.Array
    entropy: jax.Array

    @classmethod
    def zeros(cls, **values) -> "MoEStats":
        """Stats with every field 0 (load: [0]) but `values`: a dense layer's, or a router's with no balance loss."""
        zero = jnp.zeros((), jnp.float32)
        return cls(**{**{f.name: zero for f in dataclasses.fields(cls)}, "load": jnp.zeros((0,)), **values})


def initializer(std: float, in_axis, out_axis, batch_axis=()):
    """N(0, std) if std > 0, else truncated normal with variance 1 / fan_in (fan_in over in_axis)."""
    if std > 0:
        return jax.nn.initializers.normal(std)
    return jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                                out_axis=out_axis, batch_axis=batch_axis)


def _param(rngs, shape, fan_in_axis, batch_axis, dtype, std: float = 0.0, axes=()) -> nnx.Param:
    """`initializer` with fan_in = shape[fan_in_axis] (per expert: batch_axis are independent); `axes`
    names each dimension for moejax.sharding.RULES."""
    out_axis = tuple(i for i in range(len(shape)) if i != fan_in_axis and i not in batch_axis)
    return nnx.Param(initializer(std, fan_in_axis, out_axis, batch_axis)(rngs.params(), shape, dtype), axes=axes)


def _ffn_params(d_model, width, n, activation, rngs, param_dtype, std=0.0, slots=None) -> nnx.Dict:
    """FFN weights w_gate (swiglu only), w_up [(n,) d, f] and w_down [(n,) f, d]: n stacked experts, or dense
    if n is None. Separate [d, f] input weights, not one [d, 2, f]: XLA:TPU tiles a size-2 axis as (2, 128),
    which made the bf16 cast of the grouped FFN's weights about 3x dearer (experiments/benchmarks/README.md).
    Drawn as one [(n,) d, n_in, f] tensor and split, so the initial values do not depend on the layout.
    With slots > n, zero weights for slots n.. are appended (never routed; see MoEConfig.pad_experts_to)."""
    lead = () if n is None else (n,)
    batch = tuple(range(len(lead)))
    ax = ("expert",) if n is not None else ()
    w_in = _param(rngs, lead + (d_model, experts.n_in(activation), width), len(lead), batch, param_dtype, std)[...]
    w = dict(zip(experts.input_names(activation), (nnx.Param(w_in[..., i, :], axes=ax + ("embed", "mlp"))
                                                   for i in range(w_in.shape[-2]))))
    w["w_down"] = _param(rngs, lead + (width, d_model), len(lead), batch, param_dtype, std, ax + ("mlp", "embed"))
    if slots is not None and slots > n:
        pad = lambda v: nnx.Param(jnp.concatenate([v[...], jnp.zeros((slots - n,) + v.shape[1:], v.dtype)]),
                                  axes=v.get_metadata()["axes"])
        w = {k: pad(v) for k, v in w.items()}
    return nnx.Dict(**w)


@dataclasses.dataclass(frozen=True)
class _Run:
    """How one call runs, decided once at its start: the platform, the expert backends (`backend` for dropless
    buffers, `per_expert` for capacity / expert-choice buffers), and the split of the routed experts on the
    current mesh: D = `n` devices along mesh axis `expert` (None if D = 1), hidden units over `tensor`."""

    platform: str
    backend: str
    per_expert: str
    expert: str | None = None
    n: int = 1
    tensor: str | None = None

    def psum_tensor(self, y):
        return jax.lax.psum(y, self.tensor) if self.tensor else y


class MoE(nnx.Module):
    """MoE FFN layer. __call__(x [B, S, d], token_ids [B, S] (hash router), key (train randomness), train)
    -> (y [B, S, d], MoEStats). Router math in float32; expert matmuls in x's dtype.
    Weights start N(0, init_std) if init_std > 0 (DeepSeekMoE sec. 4.1.2 uses 0.006), else fan-in scaled.

    Routing runs on all tokens (sharded like x under a mesh); balance losses use the whole batch. Capacity
    and expert choice work per sequence (C = ceil(S K capacity_factor / E), GShard's groups with one
    sequence per group), so no result depends on how the batch is split. Under a mesh (moejax.sharding.use)
    the expert FFNs run inside a shard_map: every device dispatches its own sequences; with an expert axis
    of D > 1 devices (each holding E / D experts) rows travel there and back by all_to_all (capacity,
    expert choice) or a ragged exchange (dropless; moejax.dispatch.exchange); with a tensor axis the expert
    hidden units are split and the outputs summed.
    """

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, init_std: float = 0.0):
        c = self.config = config
        f = c.expert_width
        if c.n_shared:
            self.shared = _ffn_params(c.d_model, c.shared_width, None, c.activation, rngs, param_dtype, init_std)
            if c.shared_gate:
                self.shared_gate = _param(rngs, (c.d_model, 1), 0, (), jnp.float32, init_std, ("embed", None))
        if c.n_experts:
            if routers.get(c.router).learned:
                self.router = _param(rngs, (c.d_model, c.n_experts), 0, (), jnp.float32, init_std, ("embed", None))
            self.experts = _ffn_params(c.d_model, f, c.n_experts, c.activation, rngs, param_dtype, init_std,
                                       c.n_slots)
            if c.aux_free_bias:
                self.bias = RouterBias(jnp.zeros((c.n_experts,), jnp.float32))

    def update_bias(self, load: jax.Array) -> None:
        """Aux-loss-free bias step from this layer's `MoEStats.load` (call after the optimizer step)."""
        self.bias[...] = routing.update_bias(self.bias[...], load, self.config.bias_update_rate)

    def __call__(self, x: jax.Array, *, token_ids: jax.Array | None = None, key: jax.Array | None = None,
                 train: bool = False):
        c = self.config
        B, S, d = x.shape
        xt = x.reshape(B * S, d)  # [T, d]
        with jax.named_scope("moe/shared_experts"):
            y = experts.ffn(xt, self.shared, c.activation) if c.n_shared else jnp.zeros_like(xt)
            if c.shared_gate:  # Qwen2-MoE: sigmoid(x . w_g) * shared(x), the gate in float32
                gate = jax.nn.sigmoid(jnp.dot(xt.astype(jnp.float32), self.shared_gate[...]))  # [T, 1]
                y = (gate * y.astype(jnp.float32)).astype(y.dtype)
        if not c.n_experts:
            return y.reshape(B, S, d), MoEStats.zeros()
        r = self.route(x, token_ids=token_ids, key=key, train=train)
        routed, stats = self._expert_choice(x, r) if isinstance(r, routing.ExpertChoice) else self._token_choice(x, r)
        return y.reshape(B, S, d) + routed, stats

    def route(self, x: jax.Array, *, token_ids: jax.Array | None = None, key: jax.Array | None = None,
              train: bool = False):
        """Where this layer sends x [B, S, d]: the registered router's `routing.Routing` over the T = B S tokens
        (token choice), or for expert choice a `routing.ExpertChoice` per sequence (token_ids, weights
        [B, E, C] indexing the sequence; probs, logits [B, S, E]). train=True needs a key if the router draws
        randomness (jitter > 0, or a router with needs_key)."""
        c = self.config
        router = routers.get(c.router)
        if train and key is None and (c.jitter > 0 or router.needs_key):
            raise ValueError(f"MoE(router={c.router!r}, jitter={c.jitter}) with train=True needs key=")
        k_jit, k_route = jax.random.split(key) if train and key is not None else (None, None)
        with jax.named_scope("moe/router"):
            logits = None
            if router.learned:
                B, S, d = x.shape
                xt = x.reshape(B * S, d)  # [T, d]
                xr = routing.jitter(xt, k_jit, c.jitter) if train and c.jitter > 0 else xt
                logits = (xr.astype(jnp.float32) @ self.router[...].astype(jnp.float32)).reshape(B, S, -1)  # [B, S, E]
            bias = self.bias[...] if c.aux_free_bias else None
            return router.route(routers.RouterInputs(logits, token_ids, k_route, bias, train), c)

    def _token_choice(self, x, r: routing.Routing):
        c = self.config
        B, S, d = x.shape
        per_seq = lambda a: a.reshape(B, S, *a.shape[1:])
        prio = jnp.max(r.weights, axis=-1) if c.batch_prioritized else jnp.zeros((B * S,), jnp.float32)
        out, dropped = self._sharded(self._token_choice_local, x, per_seq(r.expert_ids), per_seq(r.weights),
                                     per_seq(r.mask), per_seq(prio))
        return out, self._stats(r, B, dropped.sum() / jnp.maximum(r.mask.sum(), 1))

    def _setup(self, mesh) -> _Run:
        """The platform, backends and expert split of this call (mesh: the current mesh or None)."""
        c = self.config
        platform = sharding.platform(mesh)
        pick = lambda per_expert: (experts.default_backend(per_expert, platform) if c.backend == "auto"
                                   else c.backend)
        run = _Run(platform, pick(False), pick(True))
        if mesh is None:
            return run
        n = sharding.axis_size("expert", mesh)
        check_placement(c, n)
        f = c.expert_width
        tensor = [a for a in sharding.mesh_axes("mlp", mesh) if sharding.axis_size(a, mesh) > 1
                  and f % sharding.axis_size(a, mesh) == 0]
        run = dataclasses.replace(run, expert="expert" if n > 1 else None, n=n, tensor=tensor[0] if tensor else None)
        if run.backend == "einsum" and (run.expert or run.tensor):  # dropless einsum: no expert or tensor split
            if c.backend != "auto":
                raise ValueError(f"MoEConfig.backend='einsum' with dispatch={c.dispatch!r} on a mesh with expert axis "
                                 f"size {n} and tensor axis {run.tensor!r}; allowed: 'einsum' without expert or "
                                 "tensor split, or 'auto', 'blocked', 'ragged_dot', 'pallas'")
            run = dataclasses.replace(run, backend="blocked")
        return run

    def _sharded(self, fn, x, *per_seq):
        """fn(x [b, S, d], *per_seq [b, ...], params, run) -> (y [b, S, d], per-sequence [b]) on every device's
        sequences: inside a shard_map over the current mesh, or directly without one. params: the experts'
        weights by name; their shard_map specs follow their `axes` ('expert' and 'mlp' stay split)."""
        params = {k: v[...] for k, v in self.experts.items()}
        mesh = sharding.current_mesh()
        run = self._setup(mesh)
        if mesh is None:
            return fn(x, *per_seq, params, run)
        batch = sharding.spec(("batch",), mesh=mesh)
        split = {"expert": run.expert, "mlp": run.tensor}
        w_specs = {k: P(*(split.get(a) for a in v.get_metadata()["axes"][-v.ndim:])) for k, v in self.experts.items()}
        local = jax.shard_map(lambda *a: fn(*a, run), mesh=mesh, in_specs=(batch,) * (1 + len(per_seq)) + (w_specs,),
                              out_specs=(batch, batch))
        return local(x, *per_seq, params)

    def _token_choice_local(self, x, ids, w, mask, prio, params, run: _Run):
        """Local token-choice dispatch, expert FFNs, combine. x [b, S, d]; ids, w, mask [b, S, K]; prio [b, S]."""
        c = self.config
        b, S, d = x.shape
        E, K = c.n_slots, c.top_k
        if c.dispatch == "capacity":
            C = dispatch.capacity(S, K, c.n_experts, c.capacity_factor)
            with jax.named_scope("moe/dispatch"):
                plan_fn = lambda i, m, p: dispatch.capacity_plan(i, m, E, C, p if c.batch_prioritized else None)
                plan = jax.vmap(plan_fn)(ids, mask, prio)
                rows = jax.vmap(dispatch.dispatch)(x, plan).reshape(b, E, C, d)
            ys = self._per_expert_ffn(rows, params, run).reshape(b, E * C, d)
            with jax.named_scope("moe/combine"):
                out = jax.vmap(dispatch.combine)(ys, w, plan)
            return out, jax.vmap(dispatch.dropped_count)(plan, mask)
        T = b * S
        if run.backend == "einsum":  # the capacity part by batched einsum, the overflow in a loop (CPU default)
            return self._dropless_einsum(x.reshape(T, d), ids.reshape(T, K), w.reshape(T, K), mask.reshape(T, K),
                                         params).reshape(b, S, d), jnp.zeros((b,), jnp.int32)
        block = lambda n_assignments: (c.block_size or dispatch.auto_block(n_assignments, E)
                                       if run.backend == "blocked" else 1)  # rows per buffer block
        with jax.named_scope("moe/dispatch"):
            plan = dispatch.dropless_plan(ids.reshape(T, K), mask.reshape(T, K), E, 1 if run.n > 1 else block(T * K))
            rows = dispatch.dispatch(x.reshape(T, d), plan)  # [M, d]
            layout = plan.layout
            if run.n > 1:
                ex = dispatch.exchange_plan(plan.layout.group_sizes, run.expert, run.n, rows.shape[0],
                                            block(run.n * T * K))
                a2a = dispatch.ragged_all_to_all_for(run.platform)
                sent, rows, layout = rows, dispatch.exchange(rows, ex, a2a), ex.layout
        with jax.named_scope("moe/experts"):
            ys = run.psum_tensor(experts.grouped_ffn(rows, params, layout, c.activation, run.backend))
        with jax.named_scope("moe/combine"):
            if run.n > 1:
                ys = dispatch.exchange_back(ys, ex, sent.shape[0], a2a)
            out = dispatch.combine(ys, w.reshape(T, K), plan).reshape(b, S, d)
        return out, jnp.zeros((b,), jnp.int32)

    def _dropless_einsum(self, x, ids, w, mask, params):
        """Dropless without padding blocks: x [T, d]; ids, w, mask [T, K] -> [T, d]. Each expert's first
        C = ceil(T K / E) assignments run as one batched einsum over an [E, C, d] buffer, the rest (none when
        loads are balanced) in `experts.overflow_ffn`'s loop over the used overflow blocks."""
        c = self.config
        (T, d), E, K = x.shape, c.n_slots, c.top_k
        C = dispatch.capacity(T, K, c.n_experts, 1.0)
        with jax.named_scope("moe/dispatch"):
            plan, over = dispatch.dropless_capacity_plan(ids, mask, E, C,
                                                         c.block_size or dispatch.auto_block(T * K, E, 64))
            rows = dispatch.dispatch(x, plan)  # [E C, d]
        with jax.named_scope("moe/experts"):
            ys = experts.grouped_ffn(rows, params, plan.layout, c.activation, "einsum")
            extra = experts.overflow_ffn(x, w, params, over, c.activation)  # [T, d] float32
        with jax.named_scope("moe/combine"):
            return (dispatch.combine(ys, w, plan).astype(jnp.float32) + extra).astype(x.dtype)

    def _per_expert_ffn(self, rows, params, run: _Run):
        """Expert FFNs over per-sequence buffers rows [b, E, C, d] -> [b, E, C, d]. With D expert devices a
        fixed-size all_to_all brings each device the rows of its E / D experts from all D devices."""
        c = self.config
        if run.n > 1:
            with jax.named_scope("moe/dispatch"):
                rows = jax.lax.all_to_all(rows, run.expert, 1, 0, tiled=True)  # [D b, E/D, C, d]
        n, El, C, d = rows.shape
        layout = dispatch.expert_choice_layout(El, n * C)  # expert e owns rows [e n C, (e + 1) n C)
        with jax.named_scope("moe/experts"):
            ys = experts.grouped_ffn(rows.swapaxes(0, 1).reshape(El * n * C, d), params, layout, c.activation,
                                     run.per_expert)
            ys = run.psum_tensor(ys).reshape(El, n, C, d).swapaxes(0, 1)
        if run.n > 1:
            with jax.named_scope("moe/combine"):
                ys = jax.lax.all_to_all(ys, run.expert, 0, 1, tiled=True)
        return ys

    def _expert_choice(self, x, ec: routing.ExpertChoice):
        """Expert choice per sequence: each expert takes C = ceil(S K capacity_factor / E) of its tokens."""
        c = self.config
        B, S, _ = x.shape
        E, C = c.n_experts, ec.token_ids.shape[-1]
        pad = [(0, 0), (0, c.n_slots - E), (0, 0)]  # padding slots take token 0 with gate 0
        out, _ = self._sharded(self._expert_choice_local, x, jnp.pad(ec.token_ids, pad), jnp.pad(ec.weights, pad))
        with jax.named_scope("moe/balance_losses"):
            chosen = jax.vmap(lambda t: jnp.zeros((S,), bool).at[t.reshape(-1)].set(True))(ec.token_ids)  # [B, S]
            load = jnp.full((E,), float(B * C), jnp.float32)
            z = c.z_loss_coef * balance.z_loss(ec.logits.reshape(B * S, E))
            return out, MoEStats.zeros(loss=z, z_loss=z, load=load, max_vio=balance.max_violation(load),
                                       dropped=(S - chosen.sum(-1)).sum() / (B * S),
                                       entropy=balance.router_entropy(ec.probs))

    def _expert_choice_local(self, x, token_ids, gates, params, run: _Run):
        """x [b, S, d]; token_ids, gates [b, E, C] -> (y [b, S, d], zeros [b])."""
        b, S, d = x.shape
        _, E, C = token_ids.shape
        with jax.named_scope("moe/dispatch"):
            rows = jax.vmap(dispatch.dispatch_expert_choice)(x, token_ids).reshape(b, E, C, d)
        ys = self._per_expert_ffn(rows, params, run).reshape(b, E * C, d)
        with jax.named_scope("moe/combine"):
            out = jax.vmap(dispatch.combine_expert_choice, (0, 0, 0, None))(ys, gates, token_ids, S)
        return out, jnp.zeros((b,), jnp.int32)

    def _stats(self, r: routing.Routing, B: int, dropped: jax.Array) -> MoEStats:
        c = self.config
        T, E = r.probs.shape
        n_dev = c.n_devices or sharding.axis_size("expert")
        f32 = lambda v: jnp.asarray(v, jnp.float32)
        with jax.named_scope("moe/balance_losses"):
            aux = c.aux_loss_coef * balance.expert_balance_loss(r.probs, r.expert_ids, r.mask) if c.aux_loss_coef else 0.0
            dev = (c.device_loss_coef * balance.device_balance_loss(r.probs, r.expert_ids, n_dev, r.mask, c.n_slots)
                   if c.device_loss_coef else 0.0)
            seq = (c.seq_aux_loss_coef * balance.sequence_balance_loss(
                r.probs.reshape(B, T // B, E), r.expert_ids.reshape(B, T // B, -1), r.mask.reshape(B, T // B, -1))
                if c.seq_aux_loss_coef else 0.0)
            z = c.z_loss_coef * balance.z_loss(r.logits) if c.z_loss_coef else 0.0
            load = balance.expert_counts(r.expert_ids, E, r.mask)
            return MoEStats(loss=f32(aux + dev + seq + z), aux_loss=f32(aux), device_loss=f32(dev), seq_loss=f32(seq),
                            z_loss=f32(z), load=load, max_vio=balance.max_violation(load), dropped=f32(dropped),
                            entropy=balance.router_entropy(r.probs))
