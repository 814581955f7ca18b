"""Causal flash attention on TPU (Mosaic): FlashAttention-2 (Dao 2023, arXiv:2307.08691), Algorithm 1 (forward,
online softmax) and Algorithm 2 (backward), with one square block size t for queries and keys.

Layout: q [B, H, S, hq], k [B, G, S, hq], v [B, G, S, hv]; query head h reads key/value head h // n (n = H / G,
grouped-query attention); segment ids [B, S] (packed documents: a query sees keys of its own segment only) or
none. Query s sees key u iff u <= s. With N = S / t blocks a side, only the N (N + 1) / 2 blocks on and below
the diagonal are computed, and only the diagonal ones are masked; index maps clamp the skipped blocks to the
last one used, so they fetch nothing (the Pallas TPU pipeline moves a block only when its index changes).

Kernels:
- forward, grid (B, H, N_q, N_k): o [B, H, S, hv] and the row logsumexp lse [B, H, 1, S] float32 (a row per
  head: lanes along the sequence);
- dkv, grid (B, G, N_k, n, N_q): dk, dv of a key block summed over its n query heads and the query blocks
  at or below the diagonal, in float32 VMEM accumulators;
- dq, grid (B, H, N_q, N_k): dq of a query block.
The backward kernels compute scores transposed (keys x queries) so that lse and delta = rowsum(do o), rows
of a [B, H, 1, S] array, broadcast along sublanes; dq contracts the transposed scores over keys. Every
kernel declares (pl.CostEstimate) the FLOPs, exps and bytes its grid moves: `forward_cost`, `dkv_cost`,
`dq_cost`; tests/test_flash.py counts the bytes again by walking the kernels' index maps.
Use through pallas_kernels.flash_attention (pallas_kernels/flash.py), which checks the shapes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.metadata import out_struct

NEG = -1e30  # score of a masked key: exp(NEG - m) is exactly 0 once a row has seen a visible key
LANES = 128  # query segment ids and the forward's running max and sum are kept broadcast over 128 lanes
F32 = jnp.float32
NT = (((1,), (1,)), ((), ()))  # a @ b^T
TN = (((0,), (0,)), ((), ()))  # a^T @ b


def _visible(rows, cols, diagonal: bool, seg_rows=None, seg_cols=None):
    """[rows, cols] bool of one forward block (queries x keys), or None when all is visible: on a diagonal
    block key col <= query row; with segments, seg_rows [rows, 1] == seg_cols [1, cols]."""
    vis = None
    if diagonal:
        r = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
        c = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
        vis = (c <= r)
    if seg_rows is not None:
        same = seg_rows == seg_cols  # [rows, 1] == [1, cols]
        vis = same if vis is None else vis & same
    return vis


def _unpack(refs, n_in: int, has_seg: bool):
    """(the n_in input refs, (query segments, key segments) or (None, None), the output and scratch refs)."""
    n_seg = 2 if has_seg else 0
    segs = tuple(refs[n_in:n_in + n_seg]) if has_seg else (None, None)
    return refs[:n_in], segs, refs[n_in + n_seg:]


# ----- forward ------------------------------------------------------------------------------------------


def _fwd_kernel(*refs, scale: float, t: int, has_seg: bool):
    (q_ref, k_ref, v_ref), (sq_ref, sk_ref), (o_ref, lse_ref, m_ref, l_ref, acc_ref) = _unpack(refs, 3, has_seg)
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, NEG, F32)
        l_ref[...] = jnp.zeros(l_ref.shape, F32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

    def step(diagonal: bool):
        s = jax.lax.dot_general(q_ref[...], k_ref[...], NT, preferred_element_type=F32) * scale  # [t, t]
        seg = (sq_ref[...][:, :1], sk_ref[...]) if has_seg else (None, None)  # [t, 1], [1, t]
        vis = _visible(t, t, diagonal, *seg)
        if vis is not None:
            s = jnp.where(vis, s, NEG)
        m_prev = m_ref[...]  # [t, LANES], equal lanes
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new[:, :1])  # rows whose keys were all masked so far carry junk that alpha = 0 clears
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_new
        pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=F32)  # [t, hv]
        acc_ref[...] = alpha[:, :1] * acc_ref[...] + pv

    pl.when(j < i)(lambda: step(False))
    pl.when(j == i)(lambda: step(True))

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / l[:, :1]).astype(o_ref.dtype)
        lse_ref[...] = jnp.transpose(m_ref[...] + jnp.log(l))[:1]  # [LANES, t] of equal rows -> [1, t]


def forward_specs(t: int, n: int, hq: int, hv: int, has_seg: bool):
    """(in_specs, out_specs) of the forward grid (b, h, i, j): q, k, v[, query segments [B, S, LANES], key
    segments [B, 1, S]] -> o, lse. Key blocks past the diagonal (j > i) keep block i: nothing moves."""
    def q(width):
        return pl.BlockSpec((None, None, t, width), lambda b, h, i, j: (b, h, i, 0))

    def kv(width):
        return pl.BlockSpec((None, None, t, width), lambda b, h, i, j: (b, h // n, jnp.minimum(j, i), 0))
    ins = [q(hq), kv(hq), kv(hv)]
    if has_seg:
        ins += [pl.BlockSpec((None, t, LANES), lambda b, h, i, j: (b, i, 0)),
                pl.BlockSpec((None, 1, t), lambda b, h, i, j: (b, 0, jnp.minimum(j, i)))]
    outs = [q(hv), pl.BlockSpec((None, None, 1, t), lambda b, h, i, j: (b, h, 0, i))]
    return ins, outs


def _tri(N: int) -> int:
    return N * (N + 1) // 2


def _clamped_walk(N: int) -> int:
    """Block fetches over a (i, j) walk of index min(j, i) (or (j, i) of max(i, j)) with N >= 2: i + 1 per row
    i, less the row-1 start that repeats row 0's block."""
    return _tri(N) - 1


def forward_cost(B, H, G, S, hq, hv, t, item, has_seg: bool) -> pl.CostEstimate:
    """What the forward grid does: N (N + 1) / 2 computed blocks per (b, h) of 2 t^2 (hq + hv) FLOPs and t^2
    exps; q read and o, lse written once per (b, h, i); k and v blocks fetched once per computed block, less
    the clamped repeats (`_clamped_walk`; with N = 1 one block per (b, g)); segment ids likewise."""
    N = S // t
    blocks = B * H * _tri(N)
    kv = B * (H * _clamped_walk(N) if N > 1 else G)
    seg = 0
    if has_seg:
        seg = 4 * B * ((H * N * t * LANES if N > 1 else t * LANES) + (H * _clamped_walk(N) * t if N > 1 else t))
    return pl.CostEstimate(flops=2 * blocks * t * t * (hq + hv), transcendentals=blocks * t * t + B * H * S,
                           bytes_accessed=item * (B * H * S * (hq + hv) + kv * t * (hq + hv)) + 4 * B * H * S + seg)


def forward(q, k, v, seg_col, seg_row, *, scale: float, t: int, interpret=False):
    """(o [B, H, S, hv], lse [B, H, 1, S] float32); seg_col [B, S, LANES] and seg_row [B, 1, S] int32 or None."""
    B, H, S, hq = q.shape
    G, hv = k.shape[1], v.shape[-1]
    has_seg = seg_col is not None
    ins, outs = forward_specs(t, H // G, hq, hv, has_seg)
    call = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, t=t, has_seg=has_seg),
        out_shape=[out_struct((B, H, S, hv), q.dtype, q), out_struct((B, H, 1, S), F32, q)],
        grid=(B, H, S // t, S // t), in_specs=ins, out_specs=outs,
        scratch_shapes=[pltpu.VMEM((t, LANES), F32), pltpu.VMEM((t, LANES), F32), pltpu.VMEM((t, hv), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=forward_cost(B, H, G, S, hq, hv, t, jnp.dtype(q.dtype).itemsize, has_seg),
        interpret=interpret, name="moejax_flash_fwd")
    segs = (seg_col, seg_row) if has_seg else ()
    return call(q, k, v, *segs)


# ----- backward -----------------------------------------------------------------------------------------


def _scores_t(q, k, v, do, lse, delta, scale, diagonal, seg_keys, seg_queries):
    """(p^T, ds^T) [keys, queries] of one block: p = exp(s - lse), ds = p (do v^T - delta) (Algorithm 2)."""
    s = jax.lax.dot_general(k, q, NT, preferred_element_type=F32) * scale  # [t keys, t queries]
    vis = _visible(s.shape[0], s.shape[1], False, seg_keys, seg_queries)  # segments only: causal below
    if diagonal:  # key row u sees query column s iff u <= s
        r = jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
        c = jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        vis = (r <= c) if vis is None else vis & (r <= c)
    if vis is not None:
        s = jnp.where(vis, s, NEG)
    p = jnp.exp(s - lse)  # [t, t] - [1, t]: masked scores give exactly 0
    dp = jax.lax.dot_general(v, do, NT, preferred_element_type=F32)  # [t keys, t queries]
    return p, p * (dp - delta)


def _dkv_kernel(*refs, scale: float, has_seg: bool):
    ins, (sq_ref, sk_ref), (dk_ref, dv_ref, dk_acc, dv_acc) = _unpack(refs, 6, has_seg)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    j, r, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((r == 0) & (i == 0))
    def _():
        dk_acc[...] = jnp.zeros(dk_acc.shape, F32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, F32)

    def step(diagonal: bool):
        q, do = q_ref[...], do_ref[...]
        seg = (sk_ref[...][:, :1], sq_ref[...]) if has_seg else (None, None)
        p, ds = _scores_t(q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...], scale, diagonal, *seg)
        dv_acc[...] += jnp.dot(p.astype(do.dtype), do, preferred_element_type=F32)  # [t, hv]
        dk_acc[...] += jnp.dot(ds.astype(q.dtype), q, preferred_element_type=F32)  # [t, hq]

    pl.when(i > j)(lambda: step(False))
    pl.when(i == j)(lambda: step(True))

    @pl.when((r == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def dkv_specs(t: int, n: int, hq: int, hv: int, has_seg: bool):
    """(in_specs, out_specs) of the dkv grid (b, g, j, r, i): q, k, v, do, lse, delta[, query segments
    [B, 1, S], key segments [B, S, LANES]] -> dk, dv. Query blocks above the diagonal (i < j) keep block j."""
    def q(width):
        return pl.BlockSpec((None, None, t, width), lambda b, g, j, r, i: (b, g * n + r, jnp.maximum(i, j), 0))

    def kv(width):
        return pl.BlockSpec((None, None, t, width), lambda b, g, j, r, i: (b, g, j, 0))
    row = pl.BlockSpec((None, None, 1, t), lambda b, g, j, r, i: (b, g * n + r, 0, jnp.maximum(i, j)))
    ins = [q(hq), kv(hq), kv(hv), q(hv), row, row]
    if has_seg:
        ins += [pl.BlockSpec((None, 1, t), lambda b, g, j, r, i: (b, 0, jnp.maximum(i, j))),
                pl.BlockSpec((None, t, LANES), lambda b, g, j, r, i: (b, j, 0))]
    return ins, [kv(hq), kv(hv)]


def dkv_cost(B, H, G, S, hq, hv, t, item, has_seg: bool) -> pl.CostEstimate:
    """The dkv grid: n N (N + 1) / 2 computed blocks per (b, g), each 4 matmuls (s^T, dv, dp^T, dk: 2 t^2 (2 hq +
    2 hv) FLOPs) and t^2 exps; k, v read and dk, dv written once per (b, g, j); the query side (q, do, lse,
    delta) fetched once per computed block, less the clamped repeat at the start of a key block that a single
    head (n = 1) gets from the previous key block's last query block; segment ids likewise."""
    N, n = S // t, H // G
    blocks = B * G * n * _tri(N)
    qside = B * G * (n * _tri(N) - (1 if n == 1 and N > 1 else 0))
    seg = 0
    if has_seg:
        seg = 4 * B * ((G * n * _tri(N) - G * n + (1 if N == 1 else 0)) * t + (G * N if N > 1 else 1) * t * LANES)
    return pl.CostEstimate(flops=2 * blocks * t * t * 2 * (hq + hv), transcendentals=blocks * t * t,
                           bytes_accessed=item * (qside * t * (hq + hv) + 2 * B * G * S * (hq + hv))
                           + 4 * 2 * qside * t + seg)


def _dq_kernel(*refs, scale: float, has_seg: bool):
    ins, (sq_ref, sk_ref), (dq_ref, dq_acc) = _unpack(refs, 6, has_seg)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        dq_acc[...] = jnp.zeros(dq_acc.shape, F32)

    def step(diagonal: bool):
        k = k_ref[...]
        seg = (sk_ref[...][:, :1], sq_ref[...]) if has_seg else (None, None)
        _, ds = _scores_t(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], scale, diagonal,
                          *seg)
        dq_acc[...] += jax.lax.dot_general(ds.astype(k.dtype), k, TN, preferred_element_type=F32)  # [t, hq]

    pl.when(j < i)(lambda: step(False))
    pl.when(j == i)(lambda: step(True))

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        dq_ref[...] = (dq_acc[...] * scale).astype(dq_ref.dtype)


def dq_specs(t: int, n: int, hq: int, hv: int, has_seg: bool):
    """(in_specs, out_specs) of the dq grid (b, h, i, j): q, k, v, do, lse, delta[, query segments [B, 1, S],
    key segments [B, S, LANES]] -> dq. Key blocks past the diagonal keep block i."""
    def q(width):
        return pl.BlockSpec((None, None, t, width), lambda b, h, i, j: (b, h, i, 0))

    def kv(width):
        return pl.BlockSpec((None, None, t, width), lambda b, h, i, j: (b, h // n, jnp.minimum(j, i), 0))
    row = pl.BlockSpec((None, None, 1, t), lambda b, h, i, j: (b, h, 0, i))
    ins = [q(hq), kv(hq), kv(hv), q(hv), row, row]
    if has_seg:
        ins += [pl.BlockSpec((None, 1, t), lambda b, h, i, j: (b, 0, i)),
                pl.BlockSpec((None, t, LANES), lambda b, h, i, j: (b, jnp.minimum(j, i), 0))]
    return ins, [q(hq)]


def dq_cost(B, H, G, S, hq, hv, t, item, has_seg: bool) -> pl.CostEstimate:
    """The dq grid: N (N + 1) / 2 computed blocks per (b, h), each 3 matmuls (s^T, dp^T, dq: 2 t^2 (2 hq + hv)
    FLOPs) and t^2 exps; q, do, lse, delta read and dq written once per (b, h, i); k and v as the forward."""
    N = S // t
    blocks = B * H * _tri(N)
    kv = B * (H * _clamped_walk(N) if N > 1 else G)
    seg = 0
    if has_seg:
        seg = 4 * B * ((H * N * t if N > 1 else t) + (H * _clamped_walk(N) if N > 1 else 1) * t * LANES)
    return pl.CostEstimate(flops=2 * blocks * t * t * (2 * hq + hv), transcendentals=blocks * t * t,
                           bytes_accessed=item * (B * H * S * (2 * hq + hv) + kv * t * (hq + hv)) + 4 * 2 * B * H * S
                           + seg)


def backward(q, k, v, o, lse, do, seg_col, seg_row, *, scale: float, t: int, interpret=False):
    """(dq, dk, dv) of `forward` (shapes and dtypes of q, k, v), from the output o, lse and do."""
    B, H, S, hq = q.shape
    G, hv = k.shape[1], v.shape[-1]
    n, N, has_seg = H // G, S // t, seg_col is not None
    item = jnp.dtype(q.dtype).itemsize
    delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1)[:, :, None, :]  # [B, H, 1, S]
    segs = (seg_row, seg_col) if has_seg else ()
    ins, outs = dkv_specs(t, n, hq, hv, has_seg)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, has_seg=has_seg),
        out_shape=[out_struct(k.shape, k.dtype, k), out_struct(v.shape, v.dtype, v)],
        grid=(B, G, N, n, N), in_specs=ins, out_specs=outs,
        scratch_shapes=[pltpu.VMEM((t, hq), F32), pltpu.VMEM((t, hv), F32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        cost_estimate=dkv_cost(B, H, G, S, hq, hv, t, item, has_seg),
        interpret=interpret, name="moejax_flash_dkv")(q, k, v, do, lse, delta, *segs)
    ins, outs = dq_specs(t, n, hq, hv, has_seg)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, has_seg=has_seg),
        out_shape=out_struct(q.shape, q.dtype, q),
        grid=(B, H, N, N), in_specs=ins, out_specs=outs[0],
        scratch_shapes=[pltpu.VMEM((t, hq), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=dq_cost(B, H, G, S, hq, hv, t, item, has_seg),
        interpret=interpret, name="moejax_flash_dq")(q, k, v, do, lse, delta, *segs)
    return dq, dk, dv
