"""Routers: which experts each token goes to, and with what gate weight.

Pure jax functions on arrays. Router math (scores, top-k, bias) runs in float32 whatever the activation
dtype. Names: T tokens, E routed experts, K routed picks per token, C expert capacity.

Two result types:
- `Routing` (token choice): every token picks K experts; `expert_ids [T, K]`, `weights [T, K]`.
- `ExpertChoice` (Zhou et al. 2022): every expert picks C tokens; `token_ids [E, C]`, `weights [E, C]`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

SCORE_FNS = ("softmax", "sigmoid")
GROUP_SCORES = ("top2_sum", "max")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """Token-choice routing of T tokens to K of E experts.

    expert_ids: [T, K] int32, distinct per token.
    weights:    [T, K] float32 gate values that multiply the expert outputs (0 where `mask` is False).
    mask:       [T, K] bool, False for picks the router itself discards (GShard's random 2nd expert).
    probs:      [T, E] float32 router distribution used by the balance losses (rows sum to 1).
    logits:     [T, E] float32 raw router logits (for the z-loss); zeros for hash routing.
    """

    expert_ids: jax.Array
    weights: jax.Array
    mask: jax.Array
    probs: jax.Array
    logits: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertChoice:
    """Expert-choice routing: expert e processes tokens token_ids[e] with gates weights[e].

    token_ids: [E, C] int32; weights: [E, C] float32; probs, logits: [T, E] float32.
    """

    token_ids: jax.Array
    weights: jax.Array
    probs: jax.Array
    logits: jax.Array


def scores(logits: jax.Array, score_fn: str) -> jax.Array:
    """Router affinities s_{i,t} in float32: softmax over experts (GShard, DeepSeekMoE eq. 5) or an
    elementwise sigmoid (DeepSeek-V3 eq. 15)."""
    logits = logits.astype(jnp.float32)
    if score_fn == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    if score_fn == "sigmoid":
        return jax.nn.sigmoid(logits)
    raise ValueError(f"score_fn={score_fn!r}; allowed: {SCORE_FNS}")


def jitter(x: jax.Array, key: jax.Array, eps: float) -> jax.Array:
    """Switch Transformer's multiplicative jitter on router inputs: x * U(1 - eps, 1 + eps). Train only."""
    noise = jax.random.uniform(key, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
    return (x.astype(jnp.float32) * noise).astype(x.dtype)


def group_limit_mask(select: jax.Array, n_groups: int, topk_groups: int, group_score: str) -> jax.Array:
    """[T, E] bool mask of the experts inside each token's `topk_groups` best of `n_groups` groups.

    Experts are split into n_groups contiguous groups (devices). A group's score is the sum of its top-2
    expert scores (DeepSeek-V3 node-limited routing, group_score='top2_sum') or its best expert's score
    (DeepSeek-V2 device-limited routing, group_score='max').
    """
    T, E = select.shape
    grouped = select.reshape(T, n_groups, E // n_groups)  # [T, G, E/G]
    if group_score == "top2_sum":
        gscore = jax.lax.top_k(grouped, min(2, E // n_groups))[0].sum(-1)  # [T, G]
    elif group_score == "max":
        gscore = grouped.max(-1)
    else:
        raise ValueError(f"group_score={group_score!r}; allowed: {GROUP_SCORES}")
    _, keep = jax.lax.top_k(gscore, topk_groups)  # [T, topk_groups]
    return jnp.repeat(one_hot_any(keep, n_groups), E // n_groups, axis=1)  # [T, E]


def one_hot_any(ids: jax.Array, n: int) -> jax.Array:
    """[T, n] bool: True at the ids [T, k] of each row. A compare, not a scatter (XLA:TPU runs scatters
    element by element, and its cost model cannot price them)."""
    return jnp.any(ids[..., None] == jnp.arange(n), axis=-2)


def take_rows(values: jax.Array, ids: jax.Array) -> jax.Array:
    """values [T, E] at ids [T, K] -> [T, K], as take_along_axis, but as a one-hot select and sum, whose
    gradient is a select too: XLA:TPU compiles take_along_axis to an element-serial gather with a
    scatter-add gradient (issue 15: 12.4 GB, 5.6 ms at T 8192, E 64, K 6 on v5p). Bit-identical: each sum
    has one term that is not +0."""
    hit = ids[..., None] == jnp.arange(values.shape[-1])  # [T, K, E]
    return jnp.sum(jnp.where(hit, values[:, None, :], 0.0), axis=-1)


def topk(
    logits: jax.Array,
    k: int,
    *,
    score_fn: str = "softmax",
    normalize: bool = False,
    scale: float = 1.0,
    bias: jax.Array | None = None,
    n_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "top2_sum",
    disable_top: int = 0,
) -> Routing:
    """Token-choice top-K routing (GShard/Mixtral/DeepSeekMoE/DeepSeek-V3 family).

    logits: [T, E]. The gate of a chosen expert is its score s_{i,t} (DeepSeekMoE eq. 4-5); with
    normalize=True the K selected gates are divided by their sum (Mixtral softmax top-K; DeepSeek-V3
    eq. 13 for sigmoid scores), then all gates are multiplied by `scale` (V3's routed scaling factor).
    Switch top-1 is k=1, softmax, normalize=False: the output is p_i * E_i(x).

    bias: [E] auxiliary-loss-free balancing bias (DeepSeek-V3 eq. 16; Wang et al. 2024): added to the
    scores for *selection only*; gate values use the unbiased scores. No gradient flows into it.
    n_groups > 1: group-limited routing, see `group_limit_mask`.
    disable_top = r > 0: an evaluation ablation (DeepSeekMoE sec. 4.5, Fig. 4): each token's r best experts
    (by the selection scores) are masked out, and the K picks are the next best.
    """
    s = scores(logits, score_fn)  # [T, E] float32
    select = s if bias is None else s + jax.lax.stop_gradient(bias.astype(jnp.float32))
    if disable_top:
        _, top = jax.lax.top_k(select, disable_top)  # [T, r]
        select = jnp.where(one_hot_any(top, select.shape[-1]), -jnp.inf, select)
    if n_groups > 1:
        allowed = group_limit_mask(select, n_groups, topk_groups, group_score)
        select = jnp.where(allowed, select, -jnp.inf)
    _, expert_ids = jax.lax.top_k(select, k)  # [T, K]
    gates = take_rows(s, expert_ids)  # [T, K] unbiased scores
    if normalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    probs = s if score_fn == "softmax" else s / jnp.sum(s, axis=-1, keepdims=True)
    return Routing(
        expert_ids=expert_ids.astype(jnp.int32),
        weights=gates * scale,
        mask=jnp.ones(expert_ids.shape, bool),
        probs=probs,
        logits=logits.astype(jnp.float32),
    )


def gshard_top2(logits: jax.Array, key: jax.Array | None, disable_top: int = 0) -> Routing:
    """GShard top-2 gating (Lepikhin et al. 2020, Algorithm 1).

    Gates g1, g2 of the two best softmax experts are normalised to g/(g1+g2). In training (key given)
    the second expert is kept iff 2 * g2 > u, u ~ U(0, 1); at eval (key=None) both are kept. A dropped
    second pick has mask False and weight 0; g1 keeps its normalised value. disable_top: see `topk`.
    """
    r = topk(logits, 2, score_fn="softmax", normalize=True, disable_top=disable_top)
    if key is None:
        return r
    u = jax.random.uniform(key, (logits.shape[0],), jnp.float32)
    keep2 = 2.0 * r.weights[:, 1] > u
    mask = jnp.stack([jnp.ones_like(keep2), keep2], axis=-1)
    return dataclasses.replace(r, mask=mask, weights=jnp.where(mask, r.weights, 0.0))


def expert_choice(logits: jax.Array, capacity: int) -> ExpertChoice:
    """Expert-choice routing (Zhou et al. 2022, eq. 1): S = softmax(X W_g) over experts; each expert e
    takes the C tokens with the largest S[:, e], gates G = those scores. C = T * capacity_factor / E."""
    s = scores(logits, "softmax")  # [T, E]
    gates, token_ids = jax.lax.top_k(s.T, capacity)  # [E, C]
    return ExpertChoice(token_ids.astype(jnp.int32), gates, s, logits.astype(jnp.float32))


def hash_expert(token_ids: jax.Array, n_experts: int, k: int = 1, salt: int = 0) -> jax.Array:
    """Hash layer routing (Roller et al. 2021): a fixed map from vocabulary id to experts, no router.

    Ids are taken in aligned blocks of E consecutive ids; block j is cyclically shifted by a mixed hash
    of (j, salt), so the map looks random across blocks yet every aligned block of E ids covers each
    expert exactly once: balanced on uniformly distributed ids. The k-th pick is the next expert
    (mod E), so a token's K picks are distinct. token_ids: [T] -> [T, K] int32.
    """
    v = token_ids.astype(jnp.uint32)
    h = v // jnp.uint32(n_experts) + jnp.uint32(salt) * jnp.uint32(0x9E3779B9)
    h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)  # integer mixing (splitmix-style finaliser)
    h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
    h = h ^ (h >> 16)
    base = (v % jnp.uint32(n_experts) + h % jnp.uint32(n_experts)) % jnp.uint32(n_experts)
    picks = (base[:, None] + jnp.arange(k, dtype=jnp.uint32)) % jnp.uint32(n_experts)
    return picks.astype(jnp.int32)


def hash_routing(token_ids: jax.Array, n_experts: int, k: int = 1, salt: int = 0) -> Routing:
    """`hash_expert` as a Routing: gate weight 1 on each hashed expert, uniform probs, zero logits."""
    ids = hash_expert(token_ids, n_experts, k, salt)  # [T, K]
    T = token_ids.shape[0]
    return Routing(
        expert_ids=ids,
        weights=jnp.ones(ids.shape, jnp.float32),
        mask=jnp.ones(ids.shape, bool),
        probs=jnp.full((T, n_experts), 1.0 / n_experts, jnp.float32),
        logits=jnp.zeros((T, n_experts), jnp.float32),
    )


def update_bias(bias: jax.Array, load: jax.Array, rate: float = 1e-3) -> jax.Array:
    """Auxiliary-loss-free bias update (Wang et al. 2024, Alg. 1; DeepSeek-V3 sec. 2.1.2):
    b_i <- b_i + u * sign(mean(load) - load_i). Overloaded experts go down, underloaded up.
    Applied after the optimizer step, outside the gradient. bias, load: [E] (counts or fractions)."""
    load = load.astype(jnp.float32)
    return bias + rate * jnp.sign(jnp.mean(load) - load)
