"""Dispatch tokens to expert buffers and combine expert outputs back, without one-hot tensors.

A token-choice assignment (t, k) -> expert e becomes one row of a buffer of M rows, sorted by expert so
that each expert owns a contiguous run of rows (`Layout`). Two plans fill that buffer:

- `capacity_plan` (GShard/Switch): every expert gets exactly C rows; assignments past C are dropped
  (first come by pick then token order, or batch-prioritised by gate weight, Riquelme et al. 2021).
  A dropped assignment contributes 0; the token still flows through the residual.
- `dropless_capacity_plan`: dropless as the capacity buffer of C = ceil(T K / E) rows per expert plus
  `Overflow` blocks for what capacity would drop (the 'einsum' backend's dropless path, the CPU default).
- `dropless_plan` (MegaBlocks-style): every assignment gets a row; each expert's rows are padded to a
  multiple of `block` so the buffer splits into G blocks owned by one expert each. Memory is
  O(T K d): no [T, E, C] tensor is built.

`dispatch` / `combine` move rows with gathers only, forward and backward (custom VJPs), because each
assignment owns at most one row: the transpose of a one-to-one gather is the inverse gather, which is
much cheaper than the scatter-add that plain autodiff would emit. On TPU a row gather from [N, d] reads the
whole memory tiles it touches (8-16 rows each), so rows are gathered from the [N, d/128, 128] "lane-row" form
(`_lane_rows`); the plans are built by sorts, and gathers of single indices are avoided where a sort does
(issue 15: the DeepSeekMoE-16B-like layer by the v5p cost model, 13.10 -> 11.12 ms;
experiments/benchmarks/README.md).
Expert parallelism (inside a shard_map over an expert axis of D devices, see moejax.moe): `exchange_plan`,
`exchange` and `exchange_back` send each expert's run of a sorted dropless buffer to the device holding the
expert and the outputs back, with `jax.lax.ragged_all_to_all` where XLA has it, else
`dense_ragged_all_to_all` (same result through a dense all_to_all).
Names: T tokens, K picks, E experts, C capacity, M buffer rows, G blocks, d width, D devices.
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


def _sort_pairs(key: jax.Array, value: jax.Array, n_keys: int, n_values: int) -> tuple[jax.Array, jax.Array]:
    """(key, value) pairs [N] int32 sorted by key, then value: (sorted keys, their values). key in [0, n_keys),
    value in [0, n_values). Where they fit, packed into one uint32 (key * 2^b + value, 2^b >= n_values) and
    sorted as one array: XLA:CPU sorts a single array of numbers with a native comparison, 4-5x faster than a
    multi-operand sort, which calls a compiled comparator per comparison (14336 pairs: 0.5 vs 2.3 ms);
    else one two-operand sort on both (the same order)."""
    bits = max(1, (n_values - 1).bit_length())
    if n_keys << bits > 2 ** 32:
        return jax.lax.sort((key, value), num_keys=2)
    packed = jax.lax.sort((key.astype(jnp.uint32) << bits) | value.astype(jnp.uint32))
    return (packed >> bits).astype(jnp.int32), (packed & (2 ** bits - 1)).astype(jnp.int32)


def _sorted_assignments(expert_ids, mask, n_experts, priority):
    """Assignments n = k*T + t sorted by (expert, priority order); masked ones last (expert id E).
    -> perm [N] (assignment at each sorted position), sorted_ids [N], counts [E].
    One sort gives both the order and the sorted ids (no gather: the XLA:TPU cost model charges a gather of
    N int32 from an [N] array ~0.2 GB at the DeepSeekMoE-16B shape, where the sort costs nearly nothing);
    without priority, (expert, n) packed into one key (`_sort_pairs`); priority [T] orders the tokens of each
    pick by decreasing priority (ties: token order). Counts by binary search of the sorted ids, not bincount
    (a scatter: element-serial on TPU)."""
    T, K = expert_ids.shape
    ids = jnp.where(mask, expert_ids, n_experts).T.reshape(-1).astype(jnp.int32)  # [N] k-major
    n = jnp.arange(T * K, dtype=jnp.int32)
    if priority is None:
        sorted_ids, perm = _sort_pairs(ids, n, n_experts + 1, T * K)
    else:  # by expert, then pick, then decreasing priority; stable: ties in token order
        sorted_ids, _, _, perm = jax.lax.sort((ids, n // T, jnp.tile(-priority, K), n), num_keys=3, is_stable=True)
    starts = jnp.searchsorted(sorted_ids, jnp.arange(n_experts + 1, dtype=jnp.int32), method="scan_unrolled")
    return perm, sorted_ids, jnp.diff(starts).astype(jnp.int32)  # counts [E]


def _rank(sorted_ids, counts):
    """Position of each sorted assignment within its expert's run. [N]"""
    start = jnp.concatenate([jnp.cumsum(counts) - counts, jnp.array([counts.sum()])])
    return jnp.arange(sorted_ids.shape[0]) - start[sorted_ids]


def _inverse_slots(perm, dest, n_rows):
    """slot [N]: dest of assignment n, i.e. dest o perm^-1 (perm [N] a permutation, dest [N] in [0, n_rows]),
    by one sort keyed on perm (`_sort_pairs`; a gather at argsort(perm) costs a sort and a gather)."""
    return _sort_pairs(perm, dest.astype(jnp.int32), perm.shape[0], n_rows + 1)[1]


def _rows_are_sorted(layout: Layout) -> bool:
    """Row r of the buffer holds sorted assignment r (rows from 0, no padding): dropless plans of block 1."""
    return layout.block == 1 and not layout.per_expert


def _plan(perm, dest, counts, layout, n_rows, T, K):
    """The Plan of sorted assignments perm [N] placed at rows dest [N] (n_rows: dropped), each expert's run
    starting at its layout run start. Gathers and sorts only, no scatter (XLA:TPU runs scatters element by
    element): row r of expert e at offset c holds sorted assignment cstart[e] + c if c < counts[e]
    (no gather where the rows are the sorted assignments themselves), and slot = dest o perm^-1."""
    N = T * K
    E = counts.shape[0]
    r = jnp.arange(n_rows)
    if _rows_are_sorted(layout):  # the first sum(counts) rows full
        row_asg = jnp.where(r < counts.sum(), perm, N)
    else:
        ends = jnp.cumsum(layout.group_sizes)  # [E] end of each expert's run of rows
        e = jnp.searchsorted(ends, r, side="right")  # [M] expert of each row (E past the last run)
        ec = jnp.minimum(e, E - 1)
        offset = r - (ends - layout.group_sizes)[ec]
        full = (e < E) & (offset < counts[ec])
        src = jnp.where(full, (jnp.cumsum(counts) - counts)[ec] + offset, 0)
        row_asg = jnp.where(full, perm[src], N)  # [M] assignment of each row, N if empty
    empty = row_asg == N
    return Plan(
        layout=layout,
        slot=_inverse_slots(perm, dest, n_rows).reshape(K, T),
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
    return _capacity_plan(*_sorted_assignments(expert_ids, mask, n_experts, priority), capacity, T, K)


def _capacity_plan(perm, sorted_ids, counts, capacity, T, K) -> Plan:
    E = counts.shape[0]
    rank = _rank(sorted_ids, counts)
    keep = (sorted_ids < E) & (rank < capacity)
    M = E * capacity
    dest = jnp.where(keep, sorted_ids * capacity + rank, M)
    layout = Layout(
        group_sizes=jnp.full((E,), capacity, jnp.int32),
        block_expert=jnp.arange(E, dtype=jnp.int32),
        block=capacity,
        per_expert=True,
    )
    return _plan(perm, dest, counts, layout, M, T, K)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Overflow:
    """The assignments past their expert's C rows in a `dropless_capacity_plan`, as blocks of up to `block`
    consecutive sorted assignments of one expert; blocks [0, n_blocks) are used, the rest are empty.

    assignment: [N] int32 assignment k T + t at each sorted position (N = T K, sorted by expert).
    block_expert, block_start (a sorted position), block_len: [G] int32. n_blocks: int32 scalar.
    """

    assignment: jax.Array
    block_expert: jax.Array
    block_start: jax.Array
    block_len: jax.Array
    n_blocks: jax.Array
    block: int = dataclasses.field(metadata=dict(static=True))

    def rows(self, i: jax.Array, n_tokens: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Block i -> (expert, token [block], pick [block], valid [block]); rows past block_len are not valid
        (their token and pick are of some other assignment: mask them)."""
        pos = self.block_start[i] + jnp.arange(self.block)
        asg = self.assignment[jnp.minimum(pos, self.assignment.shape[0] - 1)]
        return self.block_expert[i], asg % n_tokens, asg // n_tokens, jnp.arange(self.block) < self.block_len[i]


def overflow_blocks(n_assignments: int, n_experts: int, capacity: int, block: int) -> int:
    """G: the most blocks sum_e ceil(max(count_e - C, 0) / block) can need over all loads summing to at most N.
    With m experts over capacity the overflow is at most N - m C rows in at most (N - m C + m (block - 1)) / block
    blocks, linear in m, so the larger of m = 1 and m = E (at least 1: no empty arrays)."""
    N, C, E, b = n_assignments, capacity, n_experts, block
    return max(1, (N - C + b - 1) // b, (N - E * C + E * (b - 1)) // b)


def dropless_capacity_plan(
    expert_ids: jax.Array, mask: jax.Array, n_experts: int, capacity: int, block: int
) -> tuple[Plan, Overflow]:
    """Dropless dispatch as an [E, C] capacity buffer plus the overflow: each expert's first C assignments get
    its C rows exactly as `capacity_plan` places them (for a per-expert batched matmul); the assignments it
    would drop instead form `Overflow` blocks of up to `block` (for a loop over the used blocks only:
    `moejax.experts.overflow_ffn`). Every unmasked assignment is computed once. expert_ids, mask: [T, K]."""
    T, K = expert_ids.shape
    perm, sorted_ids, counts = _sorted_assignments(expert_ids, mask, n_experts, None)
    plan = _capacity_plan(perm, sorted_ids, counts, capacity, T, K)
    over = jnp.maximum(counts - capacity, 0)  # [E] assignments past capacity
    n = (over + block - 1) // block  # [E] blocks per expert
    ends = jnp.cumsum(n)
    j = jnp.arange(overflow_blocks(T * K, n_experts, capacity, block))
    e = jnp.minimum(jnp.searchsorted(ends, j, side="right"), n_experts - 1)  # [G] (E - 1 past the used ones)
    local = j - (ends - n)[e]  # block index within its expert's overflow
    start = (jnp.cumsum(counts) - counts)[e] + capacity + local * block
    length = jnp.clip(over[e] - local * block, 0, block)
    return plan, Overflow(perm, e.astype(jnp.int32), start.astype(jnp.int32), length.astype(jnp.int32),
                          ends[-1].astype(jnp.int32), block)


def padded_layout(counts: jax.Array, n_rows: int, block: int) -> tuple[jax.Array, Layout]:
    """Experts' runs of counts [E] rows, each padded to a multiple of `block`, packed from row 0 of a buffer
    of n_rows rows (a multiple of block). -> (start [E] of each expert's run, Layout of the buffer)."""
    E = counts.shape[0]
    padded = (counts + block - 1) // block * block  # [E]
    start = jnp.cumsum(padded) - padded
    block_expert = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(n_rows // block) * block, side="right")
    layout = Layout(
        group_sizes=padded.astype(jnp.int32),
        block_expert=jnp.minimum(block_expert, E - 1).astype(jnp.int32),
        block=block,
        per_expert=False,
    )
    return start.astype(jnp.int32), layout


def dropless_plan(expert_ids: jax.Array, mask: jax.Array, n_experts: int, block: int = 1) -> Plan:
    """Dropless dispatch: every unmasked assignment gets a row, experts' runs padded to `block` rows.

    With block=1 rows are exactly the sorted assignments (for ragged grouped matmuls). The buffer has
    G = floor((T K + E (block - 1)) / block) blocks, the most that sum_e ceil(count_e / block) can be.
    """
    T, K = expert_ids.shape
    perm, sorted_ids, counts = _sorted_assignments(expert_ids, mask, n_experts, None)
    M = (T * K + n_experts * (block - 1)) // block * block
    start, layout = padded_layout(counts, M, block)
    if block == 1:  # sorted assignment i goes to row i: no per-expert offsets to look up
        dest = jnp.where(sorted_ids < n_experts, jnp.arange(M), M)
    else:
        dest = jnp.where(sorted_ids < n_experts,
                         start[jnp.minimum(sorted_ids, n_experts - 1)] + _rank(sorted_ids, counts), M)
    return _plan(perm, dest, counts, layout, M, T, K)


def auto_block(n_assignments: int, n_experts: int, max_block: int = 256) -> int:
    """Dropless block size: the largest power of two <= the mean load T K / E, at most `max_block`.

    Larger blocks mean fewer per-block weight gathers but up to E (block - 1) padding rows; on the
    2-core CPU benchmark (T K / E >= 512) 256 beat 128 and 64 (experiments/benchmarks/README.md)."""
    mean_load = max(1, n_assignments // n_experts)
    return min(max_block, 1 << (mean_load.bit_length() - 1))


def dropped_count(plan: Plan, mask: jax.Array) -> jax.Array:
    """Number of the router's (unmasked) token-expert assignments that got no buffer row. mask: [T, K]."""
    M = plan.row_token.shape[0]
    return jnp.sum((plan.slot == M) & mask.T)


def dropped_fraction(plan: Plan, mask: jax.Array) -> jax.Array:
    """Fraction of the router's (unmasked) token-expert assignments that got no buffer row."""
    return dropped_count(plan, mask) / jnp.maximum(mask.sum(), 1)


LANES = 128  # TPU vector lanes: the minor tile of an array in TPU memory is [8 or 16 rows, 128 lanes]


def _lane_rows(x: jax.Array) -> jax.Array:
    """x [N, d] as [N, d / 128, 128] when d is a multiple of 128 (else [N, 1, d]): the same values, but in TPU
    memory each row of the 3-D form is whole tiles of its own, whereas in [N, d] a tile holds 8 or 16 rows.
    A gather of rows from [N, d] reads the whole tiles it touches: the XLA:TPU cost model charges 8-10x the
    rows' bytes (issue 15: 1.95 GB for the 0.2 GB dispatch gather at the DeepSeekMoE-16B shape); from the 3-D
    form it charges 0.47 GB, and 0.87 GB with the relayout back to [R, d]. A reshape on CPU and GPU."""
    N, d = x.shape
    return x.reshape(N, d // LANES, LANES) if d % LANES == 0 else x.reshape(N, 1, d)


def _take(x, idx):
    """Rows x[idx] ([N, ...] at [R] -> [R, ...]); rows past N (empty ones) are 0."""
    return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


def _take_rows(x: jax.Array, idx: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """x [N, d] at rows idx [R] -> [R, d] (0 where idx = N), gathered from the lane-row form (`_lane_rows`);
    scale [R]: each row times it in float32, before the relayout back to [R, d] (so that no float32 copy of the
    rows is written)."""
    rows = _take(_lane_rows(x), idx)  # [R, d / 128, 128]
    if scale is not None:
        rows = (rows.astype(jnp.float32) * scale[:, None, None]).astype(x.dtype)
    return rows.reshape(idx.shape[0], x.shape[1])


def _gather_sum(y: jax.Array, slot: jax.Array, w: jax.Array | None = None) -> jax.Array:
    """sum_k w[k, t] * y[slot[k, t]] in float32 ([T, d]), as K gathers from y's lane-row form (`_lane_rows`)
    fused into the sum (never a [K, T, d] tensor; one [K T] gather and then the sum measured slower)."""
    y3 = _lane_rows(y)  # [M, d / 128, 128]
    out = 0.0
    for k in range(slot.shape[0]):  # K is small and static
        yk = _take(y3, slot[k]).astype(jnp.float32)
        out = out + (yk if w is None else yk * w[k][:, None, None])
    return out.reshape(slot.shape[1], y.shape[1])


@jax.custom_vjp
def dispatch(x: jax.Array, plan: Plan) -> jax.Array:
    """Buffer rows [M, d]: row r holds x[row_token[r]] (0 for empty rows). x: [T, d]."""
    return _take_rows(x, plan.row_token)


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
    w_kt = weights.T.reshape(-1).astype(jnp.float32)  # [K T]: weight of assignment k T + t
    if _rows_are_sorted(plan.layout):  # row r's gate: the r-th by slot
        row_w = jnp.where(plan.row_token < T, jax.lax.sort((plan.slot.reshape(-1), w_kt), num_keys=1)[1], 0.0)
    else:
        flat = jnp.concatenate([w_kt, jnp.zeros((1,), jnp.float32)])
        row_w = flat[jnp.where(plan.row_token < T, plan.row_k * T + plan.row_token, T * K)]  # [M]
    dy = _take_rows(g, plan.row_token, row_w).astype(y.dtype)
    y3, g32 = _lane_rows(y), _lane_rows(g).astype(jnp.float32)  # [M | T, d / 128, 128]
    dw = jnp.stack([jnp.sum((_take(y3, plan.slot[k]).astype(jnp.float32) * g32).reshape(T, -1), -1)
                    for k in range(K)], 1)  # summed as [T, d]: the same order as x . g
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


# ----- expert parallelism: rows to the devices that hold their experts, and back -------------------------
# Inside a shard_map over the expert axis of D devices, device j holds experts [j E/D, (j + 1) E/D) (the
# contiguous placement of a P('expert') split of the leading E axis). Capacity buffers [b, E, C, d] move
# with a fixed-size all_to_all (moejax.moe). Dropless buffers are ragged: each device's rows are sorted by
# expert (dropless_plan with block=1), and `Exchange` says where every expert's slice goes.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Exchange:
    """Where the rows of a dropless expert-parallel exchange go, on one device of the expert axis.

    send_start, counts: [E] this device's run of rows for expert e (start, size) in its sorted buffer.
    dest_start: [E] where that run lands in the buffer of the device holding e.
    recv_start, recv_counts: [D, E/D] where (start, size) the run from device j for local expert s lands here.
    back_start: [D, E/D] start of local expert s's run in device j's sorted buffer (for the way back).
    layout: the received buffer, runs grouped by local expert (sources in device order), padded to blocks.
    """

    send_start: jax.Array
    counts: jax.Array
    dest_start: jax.Array
    recv_start: jax.Array
    recv_counts: jax.Array
    back_start: jax.Array
    layout: Layout
    axis: str = dataclasses.field(metadata=dict(static=True))


def exchange_plan(counts: jax.Array, axis: str, n_devices: int, n_send: int, block: int = 1) -> Exchange:
    """The exchange of a sorted buffer of n_send rows with counts [E] rows per expert (call inside a
    shard_map over `axis`, size n_devices). The received buffer holds D n_send + E/D (block - 1) rows,
    rounded up to `block`: every row of every device could be for this device's experts (dropless)."""
    E, D = counts.shape[0], n_devices
    El = E // D
    all_counts = jax.lax.all_gather(counts, axis)  # [D, E]: rows device j sends to expert e
    me = jax.lax.axis_index(axis)
    starts = jnp.cumsum(all_counts, 1) - all_counts  # [D, E] expert runs in each device's sorted buffer
    before = jnp.cumsum(all_counts, 0) - all_counts  # [D, E] rows devices < j send to expert e
    totals = all_counts.sum(0)  # [E] rows each expert receives
    padded = ((totals + block - 1) // block * block).reshape(D, El)
    expert_start = (jnp.cumsum(padded, 1) - padded).reshape(E)  # [E] run start in its owner's buffer
    n_recv = -(-(D * n_send + El * (block - 1)) // block) * block
    local = lambda a: jax.lax.dynamic_slice_in_dim(a, me * El, El, axis=a.ndim - 1)
    recv_counts = local(all_counts)  # [D, El]
    start, layout = padded_layout(recv_counts.sum(0), n_recv, block)
    return Exchange(
        send_start=starts[me],
        counts=counts,
        dest_start=expert_start + before[me],
        recv_start=(start[None, :] + local(before)).astype(jnp.int32),
        recv_counts=recv_counts,
        back_start=local(starts),
        layout=layout,
        axis=axis,
    )


def exchange(rows: jax.Array, ex: Exchange, ragged_all_to_all) -> jax.Array:
    """Sorted rows [n_send, d] -> rows of this device's experts [n_recv, d], grouped by local expert."""
    # zeros_like keeps rows' type inside shard_map: varying over the mesh axes, as the collective's result is
    out = jnp.zeros_like(rows, shape=(ex.layout.block_expert.shape[0] * ex.layout.block, rows.shape[1]))
    return ragged_all_to_all(rows, out, ex.send_start, ex.counts, ex.dest_start, ex.recv_counts.reshape(-1),
                             axis_name=ex.axis)


def exchange_back(ys: jax.Array, ex: Exchange, n_send: int, ragged_all_to_all) -> jax.Array:
    """The inverse of `exchange`: expert outputs [n_recv, d] back to their senders' sorted rows [n_send, d]."""
    out = jnp.zeros_like(ys, shape=(n_send, ys.shape[1]))
    return ragged_all_to_all(ys, out, ex.recv_start.reshape(-1), ex.recv_counts.reshape(-1),
                             ex.back_start.reshape(-1), ex.counts, axis_name=ex.axis)


def dense_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                            axis_name: str):
    """jax.lax.ragged_all_to_all's result through a dense all_to_all, for platforms without the ragged
    collective (XLA:CPU). Every device sends each peer a padded chunk of min(operand rows, output rows) rows
    (the most one peer can be sent), so it moves up to D times the bytes; same arguments and result
    (recv_sizes unused)."""
    del recv_sizes
    D = jax.lax.psum(1, axis_name)
    L = min(operand.shape[0], output.shape[0])
    sizes = send_sizes.reshape(D, -1)  # [D, slices per device]
    pos = jnp.cumsum(sizes, 1) - sizes  # slice start inside its peer's chunk
    r = jnp.arange(L)

    def locate(ends, r):  # slice of each chunk row (n_slices if past the last)
        return jnp.searchsorted(ends, r, side="right")

    sl = jax.vmap(locate, (0, None))(jnp.cumsum(sizes, 1), r)  # [D, L]
    n = sizes.shape[1]
    slc = jnp.minimum(sl, n - 1)
    src = jnp.take_along_axis(input_offsets.reshape(D, n), slc, 1) + r - jnp.take_along_axis(pos, slc, 1)
    chunks = _take(operand, jnp.where(sl < n, src, operand.shape[0]).reshape(-1)).reshape(D, L, -1)  # [D, L, d]
    a2a = lambda a: jax.lax.all_to_all(a, axis_name, 0, 0, tiled=True)
    recv, r_sizes, r_pos, r_out = a2a(chunks), a2a(sizes), a2a(pos), a2a(output_offsets.reshape(D, n))
    sl = jax.vmap(locate, (0, None))(jnp.cumsum(r_sizes, 1), r)  # [D, L] slice of each received row
    slc = jnp.minimum(sl, n - 1)
    dest = jnp.take_along_axis(r_out, slc, 1) + r - jnp.take_along_axis(r_pos, slc, 1)
    dest = jnp.where(sl < n, dest, output.shape[0]).reshape(-1)
    return output.at[dest].set(recv.reshape(D * L, -1), mode="drop")


RAGGED_PLATFORMS = ("tpu", "gpu")  # platforms whose XLA lowers ragged-all-to-all


def ragged_all_to_all_for(platform: str):
    """jax.lax.ragged_all_to_all on platforms that have it, else `dense_ragged_all_to_all`."""
    return jax.lax.ragged_all_to_all if platform in RAGGED_PLATFORMS else dense_ragged_all_to_all
