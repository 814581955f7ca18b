"""Mosaic (TPU) grouped-matmul kernels: gmm and tgmm over scalar-prefetched group metadata.

gmm grid (tiles_n, V, tiles_k): visit v multiplies row tile tile[v] by the weights of group[v], summing
over k tiles in a float32 VMEM accumulator, and writes only its group's rows of the output tile. The
visits of one tile are consecutive, so the output block stays in VMEM between them and is written back
to HBM once. tgmm grid (tiles_k, tiles_n, V): the visits of one group are consecutive, so its [tk, tn]
gradient block accumulates over the group's row tiles and is written once.
Use through pallas_kernels.gmm / tgmm (pallas_kernels/grouped_matmul.py), which validate the shapes and choose the tiles.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.metadata import COMPUTE, FIRST, GroupMetadata, cdiv, out_struct


def _rows_in_group(offsets, g, tile, tm):
    rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)  # [tm, 1]
    return (rows >= offsets[g]) & (rows < offsets[g + 1])


def _mask_k(x, axis, kk, tk, k):
    """Zero the columns (axis 1) or rows (axis 0) of a k tile that lie past k (the partial last tile)."""
    idx = kk * tk + jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    return jnp.where(idx < k, x, jnp.zeros_like(x))


def _gmm_kernel(offsets, tiles, groups, flags, lhs_ref, rhs_ref, out_ref, acc_ref, *, tm, tk, k, transpose_rhs):
    v, kk = pl.program_id(1), pl.program_id(2)
    flag, last_k = flags[v], pl.num_programs(2) - 1

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def accumulate(mask: bool):
        x, w = lhs_ref[...], rhs_ref[...].astype(lhs_ref.dtype)  # [tm, tk]; [tn, tk] or [tk, tn] (f32 rhs: cast here)
        if mask:
            x, w = _mask_k(x, 1, kk, tk, k), _mask_k(w, 1 if transpose_rhs else 0, kk, tk, k)
        dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))
        acc_ref[...] += jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)

    compute = (flag & COMPUTE) != 0
    if k % tk:  # only the last k tile is partial: mask it there, not on every k step
        pl.when(compute & (kk < last_k))(lambda: accumulate(False))
        pl.when(compute & (kk == last_k))(lambda: accumulate(True))
    else:
        pl.when(compute)(lambda: accumulate(False))

    @pl.when((kk == last_k) & (flag != 0))
    def _():
        in_group = _rows_in_group(offsets, groups[v], tiles[v], tm) & compute
        base = jnp.where((flag & FIRST) != 0, jnp.zeros(out_ref.shape, out_ref.dtype), out_ref[...])
        out_ref[...] = jnp.where(in_group, acc_ref[...].astype(out_ref.dtype), base)


def gmm_specs(tiling, transpose_rhs: bool):
    """(lhs, rhs) BlockSpecs and the output BlockSpec of gmm's grid (tiles_n, V, tiles_k); index maps take
    (j, v, kk, offsets, tiles, groups, flags). A visit that computes nothing keeps k tile 0 (no fetch)."""
    tm, tk, tn = tiling

    def kk_if(flags, v, kk):
        return jnp.where((flags[v] & COMPUTE) != 0, kk, 0)

    lhs_spec = pl.BlockSpec((tm, tk), lambda j, v, kk, off, t, g, f: (t[v], kk_if(f, v, kk)))
    if transpose_rhs:
        rhs_spec = pl.BlockSpec((None, tn, tk), lambda j, v, kk, off, t, g, f: (g[v], j, kk_if(f, v, kk)))
    else:
        rhs_spec = pl.BlockSpec((None, tk, tn), lambda j, v, kk, off, t, g, f: (g[v], kk_if(f, v, kk), j))
    out_spec = pl.BlockSpec((tm, tn), lambda j, v, kk, off, t, g, f: (t[v], j))
    return [lhs_spec, rhs_spec], out_spec


def gmm_cost(m, k, n, n_local, tiling, in_item, out_item, rhs_item=None) -> pl.CostEstimate:
    """What gmm's tiling makes the chip do when every one of its V = tiles_m + G_local - 1 visits computes
    (each group boundary inside a tile: the worst case its static grid allows, and the usual one). Blocks
    move whole, and only when their index changes from the previous grid step (the Pallas TPU pipeline):
    - MXU: every visit multiplies a whole [tm, tk] x [tk, tn] block per (j, kk): 2 V tm kp np FLOPs
      (kp, np: k and n rounded up to tiles), not 2 m k n;
    - lhs: with tiles_k = 1, a row tile is fetched once per j (its visits are consecutive); with
      tiles_k > 1 at every grid step;
    - rhs: with tiles_k = 1, a group's block once per j (its visits are consecutive); else at every step;
    - out: each [tm, tn] block written once.
    rhs_item: rhs's item size when it differs from lhs's (float32 weights read by a bfloat16 kernel)."""
    tm, tk, tn = tiling
    tiles_m, tiles_k, tiles_n = cdiv(m, tm), cdiv(k, tk), cdiv(n, tn)
    V = tiles_m + n_local - 1
    lhs = tiles_n * (tiles_m if tiles_k == 1 else V * tiles_k) * tm * tk
    rhs = tiles_n * (n_local if tiles_k == 1 else V * tiles_k) * tk * tn
    out = tiles_n * tiles_m * tm * tn
    return pl.CostEstimate(flops=2 * V * tm * tiles_k * tk * tiles_n * tn, transcendentals=0,
                           bytes_accessed=in_item * lhs + (rhs_item or in_item) * rhs + out_item * out)


def gmm(lhs, rhs, meta: GroupMetadata, tiling, *, transpose_rhs: bool, out_dtype, vmem_limit: int,
        interpret=False) -> jax.Array:
    """lhs [m, k] x rhs [G_local, k, n] (or [G_local, n, k] transposed) -> [m, n]; see pallas_kernels.grouped_matmul."""
    (m, k), n = lhs.shape, rhs.shape[1 if transpose_rhs else 2]
    tm, tk, tn = tiling
    grid = (cdiv(n, tn), meta.n_visits, cdiv(k, tk))
    in_specs, out_spec = gmm_specs(tiling, transpose_rhs)
    kernel = functools.partial(_gmm_kernel, tm=tm, tk=tk, k=k, transpose_rhs=transpose_rhs)
    call = pl.pallas_call(
        kernel,
        out_shape=out_struct((m, n), out_dtype, lhs),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=grid, in_specs=in_specs, out_specs=out_spec,
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary"),
                                             vmem_limit_bytes=vmem_limit),
        cost_estimate=gmm_cost(m, k, n, rhs.shape[0], tiling, jnp.dtype(lhs.dtype).itemsize,
                               jnp.dtype(out_dtype).itemsize, jnp.dtype(rhs.dtype).itemsize),
        interpret=interpret,
        name="moejax_gmm",
    )
    return call(meta.offsets, meta.tile, meta.group, meta.flags, lhs, rhs)


def _tgmm_kernel(offsets, tiles, groups, flags, lhs_ref, grad_ref, out_ref, acc_ref, *, tm):
    v, n_visits = pl.program_id(2), pl.num_programs(2)
    g = groups[v]
    first = (v == 0) | (g != groups[jnp.maximum(v - 1, 0)])
    last = (v == n_visits - 1) | (g != groups[jnp.minimum(v + 1, n_visits - 1)])

    @pl.when(first)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((flags[v] & COMPUTE) != 0)
    def _():
        in_group = _rows_in_group(offsets, g, tiles[v], tm)  # [tm, 1]
        x = jnp.where(in_group, lhs_ref[...], jnp.zeros((), lhs_ref.dtype))  # [tm, tk]
        dy = jnp.where(in_group, grad_ref[...], jnp.zeros((), grad_ref.dtype))  # [tm, tn]
        acc_ref[...] += jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    @pl.when(last)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm_specs(tiling):
    """(lhs, grad) BlockSpecs and the output BlockSpec of tgmm's grid (tiles_k, tiles_n, V); index maps take
    (a, b, v, offsets, tiles, groups, flags). A visit that computes nothing keeps the previous row tile."""
    tm, tk, tn = tiling

    def tile_if(tiles, flags, v):
        return jnp.where((flags[v] & COMPUTE) != 0, tiles[v], tiles[jnp.maximum(v - 1, 0)])

    lhs_spec = pl.BlockSpec((tm, tk), lambda a, b, v, off, t, g, f: (tile_if(t, f, v), a))
    grad_spec = pl.BlockSpec((tm, tn), lambda a, b, v, off, t, g, f: (tile_if(t, f, v), b))
    out_spec = pl.BlockSpec((None, tk, tn), lambda a, b, v, off, t, g, f: (g[v], a, b))
    return [lhs_spec, grad_spec], out_spec


def tgmm_cost(m, k, n, n_local, tiling, in_item, out_item) -> pl.CostEstimate:
    """tgmm's tiling when all V = tiles_m + G_local - 1 visits compute (see gmm_cost): per output block
    (a, b) the walk fetches each row tile of lhs and grad once (a tile's visits are consecutive), the MXU
    multiplies whole [tk, tm] x [tm, tn] blocks on every visit, and each group's [tk, tn] block is
    written once."""
    tm, tk, tn = tiling
    tiles_m, tiles_k, tiles_n = cdiv(m, tm), cdiv(k, tk), cdiv(n, tn)
    V = tiles_m + n_local - 1
    blocks = tiles_k * tiles_n
    return pl.CostEstimate(flops=2 * V * tm * blocks * tk * tn, transcendentals=0,
                           bytes_accessed=in_item * blocks * tiles_m * tm * (tk + tn)
                           + out_item * blocks * n_local * tk * tn)


def tgmm(lhs, grad, meta: GroupMetadata, tiling, *, n_local: int, out_dtype, vmem_limit: int,
         interpret=False) -> jax.Array:
    """lhs [m, k], grad [m, n] -> [G_local, k, n] (per group lhs_g^T grad_g); see pallas_kernels.grouped_matmul."""
    (m, k), n = lhs.shape, grad.shape[1]
    tm, tk, tn = tiling
    grid = (cdiv(k, tk), cdiv(n, tn), meta.n_visits)
    in_specs, out_spec = tgmm_specs(tiling)
    call = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm),
        out_shape=out_struct((n_local, k, n), out_dtype, lhs),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=grid, in_specs=in_specs, out_specs=out_spec,
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                             vmem_limit_bytes=vmem_limit),
        cost_estimate=tgmm_cost(m, k, n, n_local, tiling, jnp.dtype(lhs.dtype).itemsize,
                                jnp.dtype(out_dtype).itemsize),
        interpret=interpret,
        name="moejax_tgmm",
    )
    return call(meta.offsets, meta.tile, meta.group, meta.flags, lhs, grad)
