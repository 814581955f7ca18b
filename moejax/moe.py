"""The MoE layer: an NNX module over the functional core, configured by a frozen, validated `MoEConfig`.

y = sum_{i <= Ks} FFN_i(x) + sum_{i routed} g_{i,t} FFN_i(x)   (DeepSeekMoE eq. 9-11)

Parameterisation (DeepSeekMoE sec. 3): `d_ff` is the width of a standard FFN; segmentation factor m
makes every expert d_ff / m wide. `n_experts` routed experts and `top_k` routed picks are counted
after segmentation. The Ks shared experts are computed together as one dense FFN of width Ks * d_ff / m.
Presets build the papers' settings, e.g. `deepseekmoe(d, d_ff, n_experts=16, top_k=2, m=4,
n_shared=1)` -> 63 routed experts of width d_ff / 4 with 7 picks, plus 1 shared.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax.sharding import PartitionSpec as P

from moejax import balance, dispatch, experts, routing, sharding

ROUTERS = ("topk", "gshard", "expert_choice", "hash")
DISPATCHES = ("capacity", "dropless")


def require_for(cls_name: str):
    """A check that raises ValueError("<cls_name>.<field>=<value> is invalid; allowed: <allowed>")."""

    def require(ok: bool, field: str, value: Any, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{cls_name}.{field}={value!r} is invalid; allowed: {allowed}")

    return require


_require = require_for("MoEConfig")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Everything the MoE layer needs; validated on construction (ValueError names field and value).

    Routed experts: `n_experts` (E, 0 for a dense FFN), `top_k` (K). Expert width f = d_ff // segmentation.
    Routing: `router` in ROUTERS; 'topk' uses `score_fn`, `normalize`, `routed_scale`, group limits
    (`n_groups`, `topk_groups`, `group_score`) and the aux-free bias (`aux_free_bias`,
    `bias_update_rate`). 'expert_choice' gives each expert C = S * top_k * capacity_factor / E tokens of each
    sequence. Dispatch: `dispatch` in DISPATCHES; 'capacity' uses `capacity_factor`, `batch_prioritized`, with
    capacity C = ceil(S K capacity_factor / E) per sequence of S tokens.
    Backend: 'auto' or a name in experts.BACKENDS; `block_size` rows per block of a dropless 'blocked'
    buffer, 0 = `dispatch.auto_block` (the largest power of two <= T K / E, at most 256).
    Losses (coefficients, >= 0): aux_loss_coef (a1), device_loss_coef (a2, over `n_devices` groups of
    experts; 0 = the devices of the mesh's expert axis), seq_aux_loss_coef (DeepSeek-V3), z_loss_coef (ST-MoE).
    `disable_top` r > 0 masks each token's r best routed experts before its K picks: an evaluation ablation
    of a trained model (DeepSeekMoE sec. 4.5, Fig. 4), 0 in training.
    Placement: `pad_experts_to` rounds the expert weights up to `n_slots` (e.g. DeepSeekMoE's 63 routed
    experts to 64 for an expert axis of 8); device j of D holds slots [j n_slots / D, (j + 1) n_slots / D).
    """

    d_model: int
    d_ff: int
    n_experts: int = 0
    top_k: int = 0
    n_shared: int = 0
    segmentation: int = 1
    activation: str = "swiglu"
    router: str = "topk"
    score_fn: str = "softmax"
    normalize: bool = False
    routed_scale: float = 1.0
    n_groups: int = 1
    topk_groups: int = 1
    group_score: str = "top2_sum"
    aux_free_bias: bool = False
    bias_update_rate: float = 1e-3
    jitter: float = 0.0
    hash_salt: int = 0
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    batch_prioritized: bool = False
    backend: str = "auto"
    block_size: int = 0
    aux_loss_coef: float = 0.0
    device_loss_coef: float = 0.0
    n_devices: int = 0
    pad_experts_to: int = 1
    seq_aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    disable_top: int = 0

    def __post_init__(self):
        _require(self.d_model >= 1, "d_model", self.d_model, "an integer >= 1")
        _require(self.segmentation >= 1, "segmentation", self.segmentation, "an integer >= 1")
        _require(self.d_ff >= 1 and self.d_ff % self.segmentation == 0, "d_ff", self.d_ff,
                 f"a positive multiple of segmentation={self.segmentation}")
        _require(self.n_experts >= 0, "n_experts", self.n_experts, "an integer >= 0 (0 = dense FFN)")
        _require(self.n_shared >= 0, "n_shared", self.n_shared, "an integer >= 0")
        if self.n_experts == 0:
            _require(self.top_k == 0, "top_k", self.top_k, "0 when n_experts=0 (dense)")
            _require(self.n_shared >= 1, "n_shared", self.n_shared, ">= 1 when n_experts=0 (dense)")
        else:
            _require(1 <= self.top_k <= self.n_experts, "top_k", self.top_k,
                     f"1 <= top_k <= n_experts={self.n_experts}")
        _require(self.activation in experts.ACTIVATIONS, "activation", self.activation, str(experts.ACTIVATIONS))
        _require(self.router in ROUTERS, "router", self.router, str(ROUTERS))
        _require(self.score_fn in routing.SCORE_FNS, "score_fn", self.score_fn, str(routing.SCORE_FNS))
        _require(self.group_score in routing.GROUP_SCORES, "group_score", self.group_score,
                 str(routing.GROUP_SCORES))
        _require(self.dispatch in DISPATCHES, "dispatch", self.dispatch, str(DISPATCHES))
        backends = ("auto",) + tuple(experts.BACKENDS)
        _require(self.backend in backends, "backend", self.backend, str(backends))
        _require(self.block_size >= 0, "block_size", self.block_size, "an integer >= 0 (0 = automatic)")
        if self.router == "gshard":
            _require(self.top_k == 2, "top_k", self.top_k, "2 for router='gshard'")
        if self.router == "expert_choice":
            _require(self.dispatch == "capacity", "dispatch", self.dispatch,
                     "'capacity' for router='expert_choice' (every expert takes exactly C tokens)")
        if self.dispatch == "capacity" or self.router == "expert_choice":
            _require(self.capacity_factor > 0, "capacity_factor", self.capacity_factor, "> 0 with capacity dispatch")
        if self.dispatch == "dropless":
            _require(self.backend != "einsum", "backend", self.backend,
                     "'auto', 'blocked', 'ragged_dot' or 'pallas' with dispatch='dropless' ('einsum' needs capacity)")
        _require(self.n_groups >= 1 and (self.n_experts or 1) % self.n_groups == 0, "n_groups", self.n_groups,
                 f"a divisor of n_experts={self.n_experts}")
        _require(1 <= self.topk_groups <= self.n_groups, "topk_groups", self.topk_groups,
                 f"1 <= topk_groups <= n_groups={self.n_groups}")
        if self.n_groups > 1:
            _require(self.router == "topk", "n_groups", self.n_groups, "1 unless router='topk'")
            kept = self.topk_groups * (self.n_experts // self.n_groups)
            _require(kept >= self.top_k, "topk_groups", self.topk_groups,
                     f"enough groups to hold top_k={self.top_k} experts (kept groups hold {kept})")
        if self.router != "topk":  # only the top-K router reads these; others fix them (see routing.py)
            _require(self.score_fn == "softmax", "score_fn", self.score_fn, "'softmax' unless router='topk'")
            _require(not self.normalize, "normalize", self.normalize, "False unless router='topk'")
            _require(self.routed_scale == 1.0, "routed_scale", self.routed_scale, "1.0 unless router='topk'")
        if self.router in ("expert_choice", "hash"):  # balanced by construction: no balance loss applies
            for name in ("aux_loss_coef", "device_loss_coef", "seq_aux_loss_coef"):
                _require(getattr(self, name) == 0, name, getattr(self, name), f"0 with router={self.router!r}")
        if self.router == "hash":  # no learned router: nothing to jitter or z-regularise
            _require(self.jitter == 0, "jitter", self.jitter, "0 with router='hash'")
            _require(self.z_loss_coef == 0, "z_loss_coef", self.z_loss_coef, "0 with router='hash'")
        if self.dispatch == "dropless":
            _require(not self.batch_prioritized, "batch_prioritized", self.batch_prioritized,
                     "False with dispatch='dropless' (nothing is dropped)")
        if self.aux_free_bias:
            _require(self.router == "topk", "aux_free_bias", self.aux_free_bias, "False unless router='topk'")
        _require(0 <= self.disable_top <= max(self.n_experts - self.top_k, 0), "disable_top", self.disable_top,
                 f"0 <= disable_top <= n_experts - top_k = {max(self.n_experts - self.top_k, 0)}")
        if self.disable_top:
            _require(self.router in ("topk", "gshard") and self.n_groups == 1, "disable_top", self.disable_top,
                     "0 unless router is 'topk' or 'gshard' without group-limited routing")
        _require(self.pad_experts_to >= 1, "pad_experts_to", self.pad_experts_to, "an integer >= 1")
        _require(self.n_devices == 0 or (self.n_devices >= 1 and (self.n_slots or 1) % self.n_devices == 0),
                 "n_devices", self.n_devices, f"0 (the mesh's expert axis) or a divisor of n_experts={self.n_experts}"
                 + (f" padded to {self.n_slots}" if self.n_slots != self.n_experts else ""))
        for name in ("aux_loss_coef", "device_loss_coef", "seq_aux_loss_coef", "z_loss_coef",
                     "bias_update_rate", "routed_scale"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        _require(0 <= self.jitter < 1, "jitter", self.jitter, "0 <= jitter < 1")
        _require(0 <= self.hash_salt < 2**32, "hash_salt", self.hash_salt, "an integer in [0, 2**32)")

    @property
    def n_slots(self) -> int:
        """Expert weight slots: n_experts rounded up to a multiple of pad_experts_to (extra slots are zero and
        never routed; they let an expert axis that does not divide n_experts split the weights)."""
        return -(-self.n_experts // self.pad_experts_to) * self.pad_experts_to

    @property
    def expert_width(self) -> int:
        """f: hidden width of one (fine-grained) expert."""
        return self.d_ff // self.segmentation


def dense(d_model: int, d_ff: int, **kw) -> MoEConfig:
    """A standard FFN (no routing): the 'Dense' baseline of DeepSeekMoE Table 1."""
    return MoEConfig(d_model, d_ff, **{"n_shared": 1, **kw})


def hash_layer(d_model: int, d_ff: int, n_experts: int = 16, top_k: int = 1, **kw) -> MoEConfig:
    """Hash layers (Roller et al. 2021): top-1 by a fixed hash of the token id; no learned router."""
    return MoEConfig(d_model, d_ff, n_experts, top_k, **{"router": "hash", **kw})


def switch(d_model: int, d_ff: int, n_experts: int = 16, **kw) -> MoEConfig:
    """Switch Transformer (Fedus et al. 2021): softmax top-1, gate p_i unnormalised, capacity 1.25,
    aux loss 0.01, multiplicative router jitter 0.01."""
    base = dict(dispatch="capacity", capacity_factor=1.25, aux_loss_coef=0.01, jitter=0.01)
    return MoEConfig(d_model, d_ff, n_experts, 1, **{**base, **kw})


def gshard(d_model: int, d_ff: int, n_experts: int = 16, **kw) -> MoEConfig:
    """GShard (Lepikhin et al. 2020): top-2 with normalised gates and the random second-expert policy,
    expert capacity 2T/E (capacity_factor 1 over T K / E), aux loss 0.01."""
    base = dict(router="gshard", dispatch="capacity", capacity_factor=1.0, aux_loss_coef=0.01)
    return MoEConfig(d_model, d_ff, n_experts, 2, **{**base, **kw})


def deepseekmoe(d_model: int, d_ff: int, n_experts: int = 16, top_k: int = 2, m: int = 4, n_shared: int = 1,
                **kw) -> MoEConfig:
    """DeepSeekMoE (Dai et al. 2024, sec. 3): from a GShard-like layer of N experts with K picks,
    segment each expert into m (width d_ff/m), isolate Ks of the mN as shared: mN - Ks routed experts
    with mK - Ks picks. Softmax gates without renormalisation, aux loss a1 = 0.01, dropless."""
    base = dict(segmentation=m, n_shared=n_shared, aux_loss_coef=0.01, dispatch="dropless")
    return MoEConfig(d_model, d_ff, m * n_experts - n_shared, m * top_k - n_shared, **{**base, **kw})


def deepseek_v3(d_model: int, d_ff: int, n_experts: int = 256, top_k: int = 8, n_shared: int = 1,
                n_groups: int = 8, topk_groups: int = 4, **kw) -> MoEConfig:
    """DeepSeek-V3 (2024, sec. 2.1): sigmoid scores normalised over the K picks, routed scale 2.5,
    node-limited routing (8 groups, keep 4), aux-loss-free bias (u = 0.001), sequence-wise loss 1e-4."""
    base = dict(n_shared=n_shared, score_fn="sigmoid", normalize=True, routed_scale=2.5, n_groups=n_groups,
                topk_groups=topk_groups, aux_free_bias=True, seq_aux_loss_coef=1e-4)
    return MoEConfig(d_model, d_ff, n_experts, top_k, **{**base, **kw})


def mixtral(d_model: int, d_ff: int, n_experts: int = 8, top_k: int = 2, **kw) -> MoEConfig:
    """Mixtral (Jiang et al. 2024): softmax top-2 renormalised over the picks, dropless."""
    return MoEConfig(d_model, d_ff, n_experts, top_k, **{"normalize": True, "aux_loss_coef": 0.01, **kw})


def olmoe(d_model: int, d_ff: int, n_experts: int = 64, top_k: int = 8, **kw) -> MoEConfig:
    """OLMoE (Muennighoff et al. 2024): 64 experts top-8, softmax gates not renormalised,
    aux loss 0.01, router z-loss 0.001, no shared expert, dropless."""
    return MoEConfig(d_model, d_ff, n_experts, top_k, **{"aux_loss_coef": 0.01, "z_loss_coef": 1e-3, **kw})


def expert_choice(d_model: int, d_ff: int, n_experts: int = 16, top_k: int = 2, **kw) -> MoEConfig:
    """Expert choice (Zhou et al. 2022): each expert takes its top C = S * top_k * capacity_factor / E
    tokens of each sequence (compute of top-K token choice at capacity 1)."""
    base = dict(router="expert_choice", dispatch="capacity", capacity_factor=1.0)
    return MoEConfig(d_model, d_ff, n_experts, top_k, **{**base, **kw})


PRESETS = {
    "dense": dense, "hash": hash_layer, "switch": switch, "gshard": gshard, "deepseekmoe": deepseekmoe,
    "deepseek_v3": deepseek_v3, "mixtral": mixtral, "olmoe": olmoe, "expert_choice": expert_choice,
}


def preset(name: str, d_model: int, d_ff: int, **kw) -> MoEConfig:
    """A named preset (see PRESETS) with keyword overrides."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r}; allowed: {tuple(PRESETS)}")
    return PRESETS[name](d_model, d_ff, **kw)


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


def check_placement(c: MoEConfig, n: int) -> None:
    """ValueError unless an expert axis of n devices can hold the layer: n divides the expert slots, and
    device-level losses and group-limited routing match the placement (device j of n holds slots
    [j n_slots / n, (j + 1) n_slots / n))."""
    if not c.n_experts or n == 1:
        return
    if c.n_slots % n:
        raise ValueError(f"MoEConfig.n_experts={c.n_experts} (padded to {c.n_slots} slots) is invalid for a mesh "
                         f"with expert={n}; allowed: a multiple of the expert axis size {n}, or set "
                         f"pad_experts_to={n} to add never-routed zero experts")
    if c.n_devices not in (0, n):
        raise ValueError(f"MoEConfig.n_devices={c.n_devices} is invalid for a mesh with expert={n}; allowed: "
                         f"0 (the mesh's expert axis) or {n}")
    if c.n_groups > 1 and c.n_groups % n and n % c.n_groups:
        raise ValueError(f"MoEConfig.n_groups={c.n_groups} is invalid for a mesh with expert={n}; allowed: a "
                         f"multiple or divisor of {n}, so that each routing group lies on whole devices")


@dataclasses.dataclass(frozen=True)
class _Parallel:
    """How the routed experts are split on the current mesh: D = `n` devices along mesh axis `expert`
    (None if D = 1), hidden units over `tensor` (None if unsplit)."""

    expert: str | None = None
    n: int = 1
    tensor: str | None = None

    def psum_tensor(self, y):
        return jax.lax.psum(y, self.tensor) if self.tensor else y


class MoE(nnx.Module):
    """MoE FFN layer. __call__(x [B, S, d], token_ids [B, S] (hash router), key (train randomness))
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
            self.shared = _ffn_params(c.d_model, c.n_shared * f, None, c.activation, rngs, param_dtype, init_std)
        if c.n_experts:
            if c.router != "hash":
                self.router = _param(rngs, (c.d_model, c.n_experts), 0, (), jnp.float32, init_std, ("embed", None))
            self.experts = _ffn_params(c.d_model, f, c.n_experts, c.activation, rngs, param_dtype, init_std,
                                       c.n_slots)
            if c.aux_free_bias:
                self.bias = RouterBias(jnp.zeros((c.n_experts,), jnp.float32))

    def update_bias(self, load: jax.Array) -> None:
        """Aux-loss-free bias step from this layer's `MoEStats.load` (call after the optimizer step)."""
        self.bias[...] = routing.update_bias(self.bias[...], load, self.config.bias_update_rate)

    def __call__(self, x: jax.Array, *, token_ids: jax.Array | None = None, key: jax.Array | None = None):
        c = self.config
        B, S, d = x.shape
        xt = x.reshape(B * S, d)  # [T, d]
        y = experts.ffn(xt, self.shared, c.activation) if c.n_shared else jnp.zeros_like(xt)
        if not c.n_experts:
            zero = jnp.zeros((), jnp.float32)
            return y.reshape(B, S, d), MoEStats(zero, zero, zero, zero, zero, jnp.zeros((0,)), zero, zero, zero)
        routed, stats = self._routed(x, token_ids, key)
        return y.reshape(B, S, d) + routed, stats

    def route(self, x: jax.Array, *, token_ids: jax.Array | None = None, key: jax.Array | None = None):
        """Where this layer sends x [B, S, d] (key None: eval mode): a `routing.Routing` over the T = B S
        tokens (token choice), or for expert choice a `routing.ExpertChoice` per sequence (token_ids,
        weights [B, E, C] indexing the sequence; probs, logits [B, S, E])."""
        c = self.config
        B, S, d = x.shape
        xt = x.reshape(B * S, d)
        k_jit, k_route = jax.random.split(key) if key is not None else (None, None)
        if c.router == "hash":
            if token_ids is None:
                raise ValueError("router='hash' needs token_ids [B, S] in MoE.__call__")
            return routing.hash_routing(token_ids.reshape(-1), c.n_experts, c.top_k, c.hash_salt)
        xr = routing.jitter(xt, k_jit, c.jitter) if (key is not None and c.jitter > 0) else xt
        logits = xr.astype(jnp.float32) @ self.router[...].astype(jnp.float32)  # [T, E]
        if c.router == "expert_choice":
            C = min(S, dispatch.capacity(S, c.top_k, c.n_experts, c.capacity_factor))
            return jax.vmap(routing.expert_choice, (0, None))(logits.reshape(B, S, -1), C)  # [B, E, C]
        if c.router == "gshard":
            return routing.gshard_top2(logits, k_route, c.disable_top)
        return routing.topk(logits, c.top_k, score_fn=c.score_fn, normalize=c.normalize, scale=c.routed_scale,
                            bias=self.bias[...] if c.aux_free_bias else None, n_groups=c.n_groups,
                            topk_groups=c.topk_groups, group_score=c.group_score, disable_top=c.disable_top)

    def _routed(self, x, token_ids, key):
        c = self.config
        B, S, d = x.shape
        r = self.route(x, token_ids=token_ids, key=key)
        if isinstance(r, routing.ExpertChoice):
            return self._expert_choice(x, r)
        per_seq = lambda a: a.reshape(B, S, *a.shape[1:])
        prio = jnp.max(r.weights, axis=-1) if c.batch_prioritized else jnp.zeros((B * S,), jnp.float32)
        out, dropped = self._sharded(self._token_choice, x, per_seq(r.expert_ids), per_seq(r.weights),
                                     per_seq(r.mask), per_seq(prio))
        return out, self._stats(r, B, dropped.sum() / jnp.maximum(r.mask.sum(), 1))

    def _sharded(self, fn, x, *per_seq):
        """fn(x [b, S, d], *per_seq [b, ...], params, par) -> (y [b, S, d], per-sequence [b]) on every device's
        sequences: inside a shard_map over the current mesh, or directly without one. params: the experts'
        weights by name; their shard_map specs follow their `axes` ('expert' and 'mlp' stay split)."""
        c = self.config
        params = {k: v[...] for k, v in self.experts.items()}
        mesh = sharding.current_mesh()
        if mesh is None:
            return fn(x, *per_seq, params, _Parallel())
        n = sharding.axis_size("expert", mesh)
        check_placement(c, n)
        f = c.expert_width
        tensor = [a for a in sharding.mesh_axes("mlp", mesh) if sharding.axis_size(a, mesh) > 1
                  and f % sharding.axis_size(a, mesh) == 0]
        par = _Parallel("expert" if n > 1 else None, n, tensor[0] if tensor else None)
        batch = sharding.spec(("batch",), mesh=mesh)
        split = {"expert": par.expert, "mlp": par.tensor}
        w_specs = {k: P(*(split.get(a) for a in v.get_metadata()["axes"][-v.ndim:])) for k, v in self.experts.items()}
        run = jax.shard_map(lambda *a: fn(*a, par), mesh=mesh, in_specs=(batch,) * (1 + len(per_seq)) + (w_specs,),
                            out_specs=(batch, batch))
        return run(x, *per_seq, params)

    def _token_choice(self, x, ids, w, mask, prio, params, par: _Parallel):
        """Local token-choice dispatch, expert FFNs, combine. x [b, S, d]; ids, w, mask [b, S, K]; prio [b, S]."""
        c = self.config
        b, S, d = x.shape
        E, K = c.n_slots, c.top_k
        if c.dispatch == "capacity":
            C = dispatch.capacity(S, K, c.n_experts, c.capacity_factor)
            plan_fn = lambda i, m, p: dispatch.capacity_plan(i, m, E, C, p if c.batch_prioritized else None)
            plan = jax.vmap(plan_fn)(ids, mask, prio)
            rows = jax.vmap(dispatch.dispatch)(x, plan).reshape(b, E, C, d)
            ys = self._per_expert_ffn(rows, params, par).reshape(b, E * C, d)
            out = jax.vmap(dispatch.combine)(ys, w, plan)
            return out, jax.vmap(dispatch.dropped_count)(plan, mask)
        T = b * S
        plan = dispatch.dropless_plan(ids.reshape(T, K), mask.reshape(T, K), E,
                                      1 if par.n > 1 else self._block(T * K, E))
        rows = dispatch.dispatch(x.reshape(T, d), plan)  # [M, d]
        if par.n > 1:
            ex = dispatch.exchange_plan(plan.layout.group_sizes, par.expert, par.n, rows.shape[0],
                                        self._block(par.n * T * K, E))
            a2a = dispatch.ragged_all_to_all_for(sharding.platform())
            recv = dispatch.exchange(rows, ex, a2a)
            ys = par.psum_tensor(experts.grouped_ffn(recv, params, ex.layout, c.activation, self._backend(False)))
            ys = dispatch.exchange_back(ys, ex, rows.shape[0], a2a)
        else:
            ys = par.psum_tensor(experts.grouped_ffn(rows, params, plan.layout, c.activation, self._backend(False)))
        out = dispatch.combine(ys, w.reshape(T, K), plan).reshape(b, S, d)
        return out, jnp.zeros((b,), jnp.int32)

    def _per_expert_ffn(self, rows, params, par: _Parallel):
        """Expert FFNs over per-sequence buffers rows [b, E, C, d] -> [b, E, C, d]. With D expert devices a
        fixed-size all_to_all brings each device the rows of its E / D experts from all D devices."""
        c = self.config
        if par.n > 1:
            rows = jax.lax.all_to_all(rows, par.expert, 1, 0, tiled=True)  # [D b, E/D, C, d]
        n, El, C, d = rows.shape
        layout = dispatch.expert_choice_layout(El, n * C)  # expert e owns rows [e n C, (e + 1) n C)
        ys = experts.grouped_ffn(rows.swapaxes(0, 1).reshape(El * n * C, d), params, layout, c.activation,
                                 self._backend(True))
        ys = par.psum_tensor(ys).reshape(El, n, C, d).swapaxes(0, 1)
        return jax.lax.all_to_all(ys, par.expert, 0, 1, tiled=True) if par.n > 1 else ys

    def _block(self, n_assignments: int, n_experts: int) -> int:
        """Rows per block of a dropless buffer: block_size (or automatic) for 'blocked', else 1 (no padding)."""
        c = self.config
        if self._backend(per_expert=False) != "blocked":
            return 1
        return c.block_size or dispatch.auto_block(n_assignments, n_experts)

    def _backend(self, per_expert: bool) -> str:
        b = self.config.backend
        return experts.default_backend(per_expert, sharding.platform()) if b == "auto" else b

    def _expert_choice(self, x, ec: routing.ExpertChoice):
        """Expert choice per sequence: each expert takes C = ceil(S K capacity_factor / E) of its tokens."""
        c = self.config
        B, S, _ = x.shape
        E, C = c.n_experts, ec.token_ids.shape[-1]
        pad = [(0, 0), (0, c.n_slots - E), (0, 0)]  # padding slots take token 0 with gate 0
        out, _ = self._sharded(self._expert_choice_local, x, jnp.pad(ec.token_ids, pad), jnp.pad(ec.weights, pad))
        chosen = jax.vmap(lambda t: jnp.zeros((S,), bool).at[t.reshape(-1)].set(True))(ec.token_ids)  # [B, S]
        unchosen = S - chosen.sum(-1)
        zero = jnp.zeros((), jnp.float32)
        load = jnp.full((E,), float(B * C), jnp.float32)
        zl = balance.z_loss(ec.logits.reshape(B * S, E))
        return out, MoEStats(c.z_loss_coef * zl, zero, zero, zero, c.z_loss_coef * zl, load,
                             balance.max_violation(load), unchosen.sum() / (B * S), balance.router_entropy(ec.probs))

    def _expert_choice_local(self, x, token_ids, gates, params, par: _Parallel):
        """x [b, S, d]; token_ids, gates [b, E, C] -> (y [b, S, d], zeros [b])."""
        b, S, d = x.shape
        _, E, C = token_ids.shape
        rows = jax.vmap(dispatch.dispatch_expert_choice)(x, token_ids).reshape(b, E, C, d)
        ys = self._per_expert_ffn(rows, params, par).reshape(b, E * C, d)
        out = jax.vmap(dispatch.combine_expert_choice, (0, 0, 0, None))(ys, gates, token_ids, S)
        return out, jnp.zeros((b,), jnp.int32)

    def _stats(self, r: routing.Routing, B: int, dropped: jax.Array) -> MoEStats:
        c = self.config
        T, E = r.probs.shape
        n_dev = c.n_devices or sharding.axis_size("expert")
        aux = c.aux_loss_coef * balance.expert_balance_loss(r.probs, r.expert_ids, r.mask) if c.aux_loss_coef else 0.0
        dev = (c.device_loss_coef * balance.device_balance_loss(r.probs, r.expert_ids, n_dev, r.mask, c.n_slots)
               if c.device_loss_coef else 0.0)
        seq = (c.seq_aux_loss_coef * balance.sequence_balance_loss(
            r.probs.reshape(B, T // B, E), r.expert_ids.reshape(B, T // B, -1), r.mask.reshape(B, T // B, -1))
            if c.seq_aux_loss_coef else 0.0)
        z = c.z_loss_coef * balance.z_loss(r.logits) if c.z_loss_coef else 0.0
        load = balance.expert_counts(r.expert_ids, E, r.mask)
        f32 = lambda v: jnp.asarray(v, jnp.float32)
        return MoEStats(f32(aux + dev + seq + z), f32(aux), f32(dev), f32(seq), f32(z), load,
                        balance.max_violation(load), f32(dropped), balance.router_entropy(r.probs))
