"""Pallas GPU (Triton) grouped-matmul kernels: gmm and tgmm.

gmm grid (V, tiles_n): program (v, j) loads the rows of row tile tile[v] that belong to group[v] (masked
loads, so a tile shared by two groups reads each row once), loops over k tiles accumulating in float32,
and stores those rows of output tile (tile[v], j) with a masked store. Programs of one tile write disjoint
rows, so they run in parallel; rows of no local group are written as zeros by the tile's first visit.
tgmm grid (G_local, tiles_k, tiles_n): program (g, a, b) loops over the rows of group g in steps of tm
(starting at the group's first row, not at a tile boundary) and writes the [tk, tn] block of its gradient.
Use through pallas_kernels.gmm / tgmm (pallas_kernels/grouped_matmul.py), which validate the shapes and choose the tiles.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.metadata import COMPUTE, FIRST, GroupMetadata, cdiv, out_struct


def _dot(a, b, trans_a=False, trans_b=False):
    exact = a.dtype == jnp.float32  # float32 inputs multiply in full float32 (no TF32)
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, allow_tf32=not exact)


def _gmm_kernel(offsets, tiles, groups, flags, lhs_ref, rhs_ref, out_ref, *, m, k, n, tm, tk, tn,
                transpose_rhs):
    v, j = pl.program_id(0), pl.program_id(1)
    g, flag = groups[v], flags[v]
    rows = tiles[v] * tm + jnp.arange(tm)  # [tm]
    cols = j * tn + jnp.arange(tn)  # [tn]
    compute = (flag & COMPUTE) != 0
    in_group = compute & (rows >= offsets[g]) & (rows < offsets[g + 1])

    def body(kk, acc):
        ks = kk * tk + jnp.arange(tk)
        x = plgpu.load(lhs_ref.at[pl.ds(tiles[v] * tm, tm), pl.ds(kk * tk, tk)],
                       mask=in_group[:, None] & (ks < k)[None, :], other=0.0)  # [tm, tk]
        if transpose_rhs:
            w = plgpu.load(rhs_ref.at[g, pl.ds(j * tn, tn), pl.ds(kk * tk, tk)],
                           mask=(cols < n)[:, None] & (ks < k)[None, :], other=0.0)  # [tn, tk]
        else:
            w = plgpu.load(rhs_ref.at[g, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)],
                           mask=(ks < k)[:, None] & (cols < n)[None, :], other=0.0)  # [tk, tn]
        return acc + _dot(x, w, trans_b=transpose_rhs)

    acc = jax.lax.fori_loop(0, jnp.where(compute, cdiv(k, tk), 0), body, jnp.zeros((tm, tn), jnp.float32))
    no_local_group = (rows < offsets[0]) | (rows >= offsets[offsets.shape[0] - 1])
    write = in_group | (((flag & FIRST) != 0) & no_local_group)
    plgpu.store(out_ref.at[pl.ds(tiles[v] * tm, tm), pl.ds(j * tn, tn)],
                jnp.where(in_group[:, None], acc, 0.0).astype(out_ref.dtype),
                mask=(write & (rows < m))[:, None] & (cols < n)[None, :])


def gmm(lhs, rhs, meta: GroupMetadata, tiling, *, transpose_rhs: bool, out_dtype, num_warps: int,
        num_stages: int, interpret=False) -> jax.Array:
    """lhs [m, k] x rhs [G_local, k, n] (or [G_local, n, k] transposed) -> [m, n]; see pallas_kernels.grouped_matmul."""
    (m, k), n = lhs.shape, rhs.shape[1 if transpose_rhs else 2]
    tm, tk, tn = tiling
    kernel = functools.partial(_gmm_kernel, m=m, k=k, n=n, tm=tm, tk=tk, tn=tn, transpose_rhs=transpose_rhs)
    call = pl.pallas_call(
        kernel,
        out_shape=out_struct((m, n), out_dtype, lhs),
        grid=(meta.n_visits, cdiv(n, tn)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="moejax_gmm_gpu",
    )
    return call(meta.offsets, meta.tile, meta.group, meta.flags, lhs, rhs)


def _tgmm_kernel(offsets, lhs_ref, grad_ref, out_ref, *, k, n, tm, tk, tn):
    g, a, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = offsets[g], offsets[g + 1]
    ks, ns = a * tk + jnp.arange(tk), b * tn + jnp.arange(tn)

    def body(i, acc):
        rows = start + i * tm + jnp.arange(tm)
        x = plgpu.load(lhs_ref.at[pl.ds(start + i * tm, tm), pl.ds(a * tk, tk)],
                       mask=(rows < end)[:, None] & (ks < k)[None, :], other=0.0)  # [tm, tk]
        dy = plgpu.load(grad_ref.at[pl.ds(start + i * tm, tm), pl.ds(b * tn, tn)],
                        mask=(rows < end)[:, None] & (ns < n)[None, :], other=0.0)  # [tm, tn]
        return acc + _dot(x, dy, trans_a=True)

    acc = jax.lax.fori_loop(0, (end - start + tm - 1) // tm, body, jnp.zeros((tk, tn), jnp.float32))
    plgpu.store(out_ref.at[g, pl.ds(a * tk, tk), pl.ds(b * tn, tn)], acc.astype(out_ref.dtype),
                mask=(ks < k)[:, None] & (ns < n)[None, :])


def tgmm(lhs, grad, meta: GroupMetadata, tiling, *, n_local: int, out_dtype, num_warps: int, num_stages: int,
         interpret=False) -> jax.Array:
    """lhs [m, k], grad [m, n] -> [G_local, k, n] (per group lhs_g^T grad_g); see pallas_kernels.grouped_matmul."""
    (m, k), n = lhs.shape, grad.shape[1]
    tm, tk, tn = tiling
    call = pl.pallas_call(
        functools.partial(_tgmm_kernel, k=k, n=n, tm=tm, tk=tk, tn=tn),
        out_shape=out_struct((n_local, k, n), out_dtype, lhs),
        grid=(n_local, cdiv(k, tk), cdiv(n, tn)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="moejax_tgmm_gpu",
    )
    return call(meta.offsets, lhs, grad)
