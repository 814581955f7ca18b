"""Dispatch tokens to expert buffers and combine expert outputs back, without one-hot tensors.

A token-choice assignment (t, k) -> expert e becomes one row of a buffer of M rows, sorted by expert so
that each expert owns a contiguous run of rows (`Layout`). Two plans fill that buffer:

- `capacity_plan` (GShard/Switch): every expert gets exactly C rows; assignments past C are dropped
  (first come by pick then token order, or batch-prioritised by gate weight, Riquelme et al. 2021).
  A dropped assignment contributes 0; the token still flows through the residual.
- `dropless_plan` (MegaBlocks-style): every assignment gets a row; each expert's rows are padded to a
  multiple of `block` so the buffer splits into G blocks owned by one expert each. Memory is
  O(T K d): no [T, E, C] tensor is built.

`dispatch` / `combine` move rows with gathers only, forward and backward (custom VJPs), because each
assignment owns at most one row: the transpose of a one-to-one gather is the inverse gather, which is
much cheaper than the scatter-add that plain autodiff would emit.
Names: T tokens, K picks, E experts, C capacity, M buffer rows, G blocks, d width.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Layout:
    """How buffer rows map to experts: M = G * block rows; block g belongs to expert block_expert[g].

    group_sizes: [E] int32 rows per expert (padding included), for grouped-matmul backends.
    block_expert: [G] int32 (rows past sum(group_sizes) are zero padding, given expert E-1).
    block: rows per block (static). per_expert: True iff G == E and block g is expert g (static).
    """

    group_sizes: jax.Array
    block_expert: jax.Array
    block: int = dataclasses.field(metadata=dict(static=True))
    per_expert: bool = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Plan:
    """Where every token-choice assignment goes.

    slot: [K, T] int32 buffer row of assignment (t, k); M if dropped or masked.
    row_token: [M] int32 token of each row; T for empty rows. row_k: [M] int32 its pick; K if empty.
    """

    layout: Layout
    slot: jax.Array
    row_token: jax.Array
    row_k: jax.Array


def capacity(n_tokens: int, k: int, n_experts: int, capacity_factor: float) -> int:
    """Expert capacity C = ceil(T * K * capacity_factor / E) (GShard; Switch eq. 3), at least 1."""
    return max(1, math.ceil(n_tokens * k * capacity_factor / n_experts))


def _sorted_assignments(expert_ids, mask, n_experts, priority):
    """Assignments n = k*T + t sorted by (expert, priority order); masked ones last (expert id E)."""
    T, K = expert_ids.shape
    ids = jnp.where(mask, expert_ids, n_experts).T.reshape(-1)  # [N] k-major
    order = jnp.arange(T) if priority is None else jnp.argsort(-priority, stable=True)
    by_priority = (jnp.arange(K)[:, None] * T + order[None, :]).reshape(-1)  # [N]
    perm = by_priority[jnp.argsort(ids[by_priority], stable=True)].astype(jnp.int32)
    counts = jnp.bincount(ids, length=n_experts + 1)[:n_experts]  # [E]
    sorted_ids = ids[perm]
    start = jnp.concatenate([jnp.cumsum(counts) - counts, jnp.array([counts.sum()])])
    rank = jnp.arange(T * K) - start[sorted_ids]  # position of each sorted assignment in its expert
    return perm, sorted_ids, rank, counts


def _plan(perm, dest, n_rows, T, K, layout):
    N = T * K
    row_asg = jnp.full((n_rows,), N, jnp.int32).at[dest].set(perm, mode="drop")
    slot = jnp.full((N,), n_rows, jnp.int32).at[perm].set(dest.astype(jnp.int32), unique_indices=True)
    empty = row_asg == N
    return Plan(
        layout=layout,
        slot=slot.reshape(K, T),
        row_token=jnp.where(empty, T, row_asg % T).astype(jnp.int32),
        row_k=jnp.where(empty, K, row_asg // T).astype(jnp.int32),
    )


def capacity_plan(
    expert_ids: jax.Array,
    mask: jax.Array,
    n_experts: int,
    capacity: int,
    priority: jax.Array | None = None,
) -> Plan:
    """GShard/Switch capacity dispatch into an [E, C] buffer. expert_ids, mask: [T, K].

    Priority: all first picks before all second picks (GShard Algorithm 1), then token order (first
    come), or with `priority` [T] given, tokens by decreasing priority (batch-prioritised routing uses
    each token's top gate). An assignment whose rank in its expert is >= C is dropped.
    """
    T, K = expert_ids.shape
    perm, sorted_ids, rank, _ = _sorted_assignments(expert_ids, mask, n_experts, priority)
    keep = (sorted_ids < n_experts) & (rank < capacity)
    M = n_experts * capacity
    dest = jnp.where(keep, sorted_ids * capacity + rank, M)
    layout = Layout(
        group_sizes=jnp.full((n_experts,), capacity, jnp.int32),
        block_expert=jnp.arange(n_experts, dtype=jnp.int32),
        block=capacity,
        per_expert=True,
    )
    return _plan(perm, dest, M, T, K, layout)


def dropless_plan(expert_ids: jax.Array, mask: jax.Array, n_experts: int, block: int = 1) -> Plan:
    """Dropless dispatch: every unmasked assignment gets a row, experts' runs padded to `block` rows.

    With block=1 rows are exactly the sorted assignments (for ragged grouped matmuls). The buffer has
    G = floor((T K + E (block - 1)) / block) blocks, the most that sum_e ceil(count_e / block) can be.
    """
    T, K = expert_ids.shape
    perm, sorted_ids, rank, counts = _sorted_assignments(expert_ids, mask, n_experts, None)
    padded = (counts + block - 1) // block * block  # [E]
    pstart = jnp.concatenate([jnp.cumsum(padded) - padded, jnp.array([padded.sum()])])
    G = (T * K + n_experts * (block - 1)) // block
    M = G * block
    dest = jnp.where(sorted_ids < n_experts, pstart[sorted_ids] + rank, M)
    block_expert = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(G) * block, side="right")
    layout = Layout(
        group_sizes=padded.astype(jnp.int32),
        block_expert=jnp.minimum(block_expert, n_experts - 1).astype(jnp.int32),
        block=block,
        per_expert=False,
    )
    return _plan(perm, dest, M, T, K, layout)


def auto_block(n_assignments: int, n_experts: int, max_block: int = 256) -> int:
    """Dropless block size: the largest power of two <= the mean load T K / E, at most `max_block`.

    Larger blocks mean fewer per-block weight gathers but up to E (block - 1) padding rows; on the
    2-core CPU benchmark (T K / E >= 512) 256 beat 128 and 64 (experiments/benchmarks/README.md)."""
    mean_load = max(1, n_assignments // n_experts)
    return min(max_block, 1 << (mean_load.bit_length() - 1))


def dropped_fraction(plan: Plan, mask: jax.Array) -> jax.Array:
    """Fraction of the router's (unmasked) token-expert assignments that got no buffer row."""
    M = plan.row_token.shape[0]
    dropped = (plan.slot == M) & mask.T
    return dropped.sum() / jnp.maximum(mask.sum(), 1)


def _take(x, idx):
    return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


def _gather_sum(y: jax.Array, slot: jax.Array, w: jax.Array | None = None) -> jax.Array:
    """sum_k w[k, t] * y[slot[k, t]] in float32, as K fused gathers (never a [K, T, d] tensor)."""
    out = 0.0
    for k in range(slot.shape[0]):  # K is small and static
        yk = _take(y, slot[k]).astype(jnp.float32)
        out = out + (yk if w is None else yk * w[k][:, None])
    return out


@jax.custom_vjp
def dispatch(x: jax.Array, plan: Plan) -> jax.Array:
    """Buffer rows [M, d]: row r holds x[row_token[r]] (0 for empty rows). x: [T, d]."""
    return _take(x, plan.row_token)


def _dispatch_fwd(x, plan):
    return dispatch(x, plan), plan


def _dispatch_bwd(plan, g):  # dx[t] = sum_k g[slot[k, t]]
    return _gather_sum(g, plan.slot).astype(g.dtype), None


dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def combine(y: jax.Array, weights: jax.Array, plan: Plan) -> jax.Array:
    """out[t] = sum_k weights[t, k] * y[slot[k, t]] (dropped picks add 0). y: [M, d] -> [T, d].

    Gate weights multiply expert outputs, so the router gets gradients (GShard eq. 1; DeepSeekMoE eq. 3).
    """
    return _gather_sum(y, plan.slot, weights.T.astype(jnp.float32)).astype(y.dtype)


def _combine_fwd(y, weights, plan):
    return combine(y, weights, plan), (y, weights, plan)


def _combine_bwd(res, g):
    y, weights, plan = res
    T, K = weights.shape
    flat = jnp.concatenate([weights.T.reshape(-1).astype(jnp.float32), jnp.zeros((1,), jnp.float32)])
    row_w = flat[jnp.where(plan.row_token < T, plan.row_k * T + plan.row_token, T * K)]  # [M]
    dy = (_take(g, plan.row_token).astype(jnp.float32) * row_w[:, None]).astype(y.dtype)
    g32 = g.astype(jnp.float32)
    dw = jnp.stack([jnp.sum(_take(y, plan.slot[k]).astype(jnp.float32) * g32, -1) for k in range(K)], 1)
    return dy, dw.astype(weights.dtype), None


combine.defvjp(_combine_fwd, _combine_bwd)


def expert_choice_layout(n_experts: int, capacity: int) -> Layout:
    """Buffer layout of expert-choice routing: expert e owns rows [e C, (e + 1) C)."""
    return Layout(
        group_sizes=jnp.full((n_experts,), capacity, jnp.int32),
        block_expert=jnp.arange(n_experts, dtype=jnp.int32),
        block=capacity,
        per_expert=True,
    )


def dispatch_expert_choice(x: jax.Array, token_ids: jax.Array) -> jax.Array:
    """Rows [E C, d] = x[token_ids] for expert-choice routing (a token may fill 0..E rows)."""
    return x[token_ids.reshape(-1)]


def combine_expert_choice(y: jax.Array, weights: jax.Array, token_ids: jax.Array, n_tokens: int) -> jax.Array:
    """out[t] = sum over rows r with token t of weights[r] * y[r] (Zhou et al. 2022, eq. 2). y: [E C, d]."""
    w = weights.reshape(-1, 1).astype(jnp.float32)
    out = jax.ops.segment_sum(y.astype(jnp.float32) * w, token_ids.reshape(-1), n_tokens)
    return out.astype(y.dtype)
