"""Mosaic (TPU) grouped-matmul kernels: gmm and tgmm over scalar-prefetched group metadata.

gmm grid (tiles_n, V, tiles_k): visit v multiplies row tile tile[v] by the weights of group[v], summing
over k tiles in a float32 VMEM accumulator, and writes only its group's rows of the output tile. A visit
at a group boundary multiplies only the halves of the tile (`sub_rows`) that hold its group's rows, so a
boundary costs the MXU half a tile more instead of a whole one (MegaBlocks' whole-tile scheme: (G - 1) tm
extra rows, 16% at the DeepSeekMoE-16B shape; now 8%). The visits of one tile are consecutive, so the
output block stays in VMEM between them and is written back to HBM once. tgmm grid (tiles_k, tiles_n, V):
the visits of one group are consecutive, so its [tk, tn] gradient block accumulates over the group's row
tiles and is written once.
Fusions for the SwiGLU FFN (`activation.Fuse`; pallas_kernels.swiglu_ffn): gmm and tgmm can take the pair
(gate, up) as lhs and multiply silu(gate) * up, computed in VMEM; gmm can add a `base` [m, n] to its product,
or return (d gate, d up) of the activation from its product dh and the (gate, up) blocks of its rows.
Use through pallas_kernels.gmm / tgmm (pallas_kernels/grouped_matmul.py), which validate the shapes and choose the tiles.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.activation import NO_FUSE, Fuse, swiglu, swiglu_grad
from pallas_kernels.metadata import COMPUTE, FIRST, GroupMetadata, cdiv, out_struct


def sub_rows(tm: int) -> int:
    """Rows of the part of a row tile a gmm visit at a group boundary multiplies: half the tile (64 of the
    default 128) when that is a multiple of the 16-row bfloat16 memory tile, else the whole tile."""
    return tm // 2 if tm % 32 == 0 else tm


def _rows_in_group(offsets, g, tile, tm):
    rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)  # [tm, 1]
    return (rows >= offsets[g]) & (rows < offsets[g + 1])


def _mask_k(x, axis, kk, tk, k):
    """Zero the columns (axis 1) or rows (axis 0) of a k tile that lie past k (the partial last tile)."""
    idx = kk * tk + jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    return jnp.where(idx < k, x, jnp.zeros_like(x))


def _gmm_kernel(offsets, tiles, groups, flags, *refs, tm, ts, tk, k, transpose_rhs, fuse: Fuse):
    """refs: lhs (one, or gate and up under fuse.swiglu_in), rhs, fuse.n_extra [tm, tn] inputs (base, or gate
    and up), fuse.n_out outputs, the float32 accumulator. A visit multiplies the halves of its row tile (ts =
    tm / 2 rows each; the whole tile when ts = tm) that hold rows of its group, both as one matmul."""
    lhs_refs, rhs_ref = refs[:fuse.n_lhs], refs[fuse.n_lhs]
    extra = refs[fuse.n_lhs + 1:fuse.n_lhs + 1 + fuse.n_extra]
    out_refs, acc_ref = refs[fuse.n_lhs + 1 + fuse.n_extra:-1], refs[-1]
    v, kk = pl.program_id(1), pl.program_id(2)
    flag, last_k = flags[v], pl.num_programs(2) - 1

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def accumulate(mask: bool):
        dtype = lhs_refs[0].dtype
        dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))

        def rows(r):  # acc[r] += lhs[r] @ rhs for the rows r (a pl.ds) of the tile
            x = swiglu(lhs_refs[0][r], lhs_refs[1][r]).astype(dtype) if fuse.swiglu_in else lhs_refs[0][r]
            w = rhs_ref[...].astype(dtype)  # [tn, tk] or [tk, tn] (f32 rhs: cast here)
            if mask:
                x, w = _mask_k(x, 1, kk, tk, k), _mask_k(w, 1 if transpose_rhs else 0, kk, tk, k)
            acc_ref[r] += jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)

        if ts == tm:
            return rows(pl.ds(0, tm))
        lo = offsets[groups[v]] - tiles[v] * tm  # the group's rows [lo, hi) relative to the tile
        hi = offsets[groups[v] + 1] - tiles[v] * tm
        top, bottom = lo < ts, hi > ts  # the halves holding rows of the group (at least one does)
        pl.when(top & bottom)(lambda: rows(pl.ds(0, tm)))
        pl.when(top != bottom)(lambda: rows(pl.ds(pl.multiple_of(jnp.where(top, 0, ts), ts), ts)))

    compute = (flag & COMPUTE) != 0
    if k % tk:  # only the last k tile is partial: mask it there, not on every k step
        pl.when(compute & (kk < last_k))(lambda: accumulate(False))
        pl.when(compute & (kk == last_k))(lambda: accumulate(True))
    else:
        pl.when(compute)(lambda: accumulate(False))

    @pl.when((kk == last_k) & (flag != 0))
    def _():
        in_group = _rows_in_group(offsets, groups[v], tiles[v], tm) & compute
        acc = acc_ref[...]
        if fuse.swiglu_grad:
            values = swiglu_grad(acc, extra[0][...], extra[1][...])
        else:
            values = (acc + extra[0][...].astype(jnp.float32),) if fuse.base else (acc,)
        first = (flag & FIRST) != 0
        for out_ref, value in zip(out_refs, values):  # rows of no local group: zeros (base: base)
            init = extra[0][...].astype(out_ref.dtype) if fuse.base else jnp.zeros(out_ref.shape, out_ref.dtype)
            out_ref[...] = jnp.where(in_group, value.astype(out_ref.dtype), jnp.where(first, init, out_ref[...]))


def gmm_specs(tiling, transpose_rhs: bool, fuse: Fuse = NO_FUSE):
    """(lhs..., rhs, extra...) BlockSpecs and the output BlockSpecs of gmm's grid (tiles_n, V, tiles_k); index
    maps take (j, v, kk, offsets, tiles, groups, flags). A visit that computes nothing keeps k tile 0 (no
    fetch). The extra [m, n] inputs (fuse) are read in the output's blocks."""
    tm, tk, tn = tiling

    def kk_if(flags, v, kk):
        return jnp.where((flags[v] & COMPUTE) != 0, kk, 0)

    lhs_spec = pl.BlockSpec((tm, tk), lambda j, v, kk, off, t, g, f: (t[v], kk_if(f, v, kk)))
    if transpose_rhs:
        rhs_spec = pl.BlockSpec((None, tn, tk), lambda j, v, kk, off, t, g, f: (g[v], j, kk_if(f, v, kk)))
    else:
        rhs_spec = pl.BlockSpec((None, tk, tn), lambda j, v, kk, off, t, g, f: (g[v], kk_if(f, v, kk), j))
    out_spec = pl.BlockSpec((tm, tn), lambda j, v, kk, off, t, g, f: (t[v], j))
    return [lhs_spec] * fuse.n_lhs + [rhs_spec] + [out_spec] * fuse.n_extra, [out_spec] * fuse.n_out


def gmm_cost(m, k, n, n_local, tiling, in_item, out_item, rhs_item=None, fuse: Fuse = NO_FUSE) -> pl.CostEstimate:
    """What gmm's tiling makes the chip do when every one of its V = tiles_m + G_local - 1 visits computes
    (each group boundary inside a row tile: the worst case its static grid allows, and the usual one; and
    inside a half of it). Blocks move whole, and only when their index changes from the previous grid step
    (the Pallas TPU pipeline):
    - MXU: per (j, kk), each row tile's tm rows once, plus half a tile (ts = sub_rows(tm) rows) per group
      boundary (a boundary visit multiplies only the halves holding its group's rows):
      2 (tiles_m tm + (G_local - 1) ts) kp np FLOPs (kp, np: k and n rounded up to tiles), not 2 m k n;
    - lhs (each of fuse.n_lhs): with tiles_k = 1, a row tile is fetched once per j (its visits are
      consecutive); with tiles_k > 1 at every grid step;
    - rhs: with tiles_k = 1, a group's block once per j (its visits are consecutive); else at every step;
    - out (each of fuse.n_out) and the fuse.n_extra inputs like it: each [tm, tn] block moved once;
    - transcendentals: fuse.swiglu_in, one exp per lhs element multiplied; swiglu_grad, one per output
      element per visit.
    rhs_item: rhs's item size when it differs from lhs's (float32 weights read by a bfloat16 kernel); the
    extra inputs have in_item."""
    tm, tk, tn = tiling
    tiles_m, tiles_k, tiles_n = cdiv(m, tm), cdiv(k, tk), cdiv(n, tn)
    V = tiles_m + n_local - 1
    rows = tiles_m * tm + (n_local - 1) * sub_rows(tm)  # rows multiplied per (j, kk)
    lhs = tiles_n * (tiles_m if tiles_k == 1 else V * tiles_k) * tm * tk
    rhs = tiles_n * (n_local if tiles_k == 1 else V * tiles_k) * tk * tn
    out = tiles_n * tiles_m * tm * tn
    exps = ((tiles_n * tiles_k * rows * tk if fuse.swiglu_in else 0)
            + (V * tm * tiles_n * tn if fuse.swiglu_grad else 0))
    return pl.CostEstimate(flops=2 * rows * tiles_k * tk * tiles_n * tn, transcendentals=exps,
                           bytes_accessed=in_item * (fuse.n_lhs * lhs + fuse.n_extra * out)
                           + (rhs_item or in_item) * rhs + fuse.n_out * out_item * out)


def gmm(lhs, rhs, meta: GroupMetadata, tiling, *, transpose_rhs: bool, out_dtype, vmem_limit: int,
        interpret=False, fuse: Fuse = NO_FUSE, extra=()):
    """lhs [m, k] x rhs [G_local, k, n] (or [G_local, n, k] transposed) -> [m, n]; see pallas_kernels.grouped_matmul.
    fuse.swiglu_in: lhs is (gate, up); extra: base, or (gate, up) [m, n] (fuse.swiglu_grad: returns a pair)."""
    lhs = tuple(lhs) if fuse.swiglu_in else (lhs,)
    (m, k), n = lhs[0].shape, rhs.shape[1 if transpose_rhs else 2]
    tm, tk, tn = tiling
    grid = (cdiv(n, tn), meta.n_visits, cdiv(k, tk))
    in_specs, out_specs = gmm_specs(tiling, transpose_rhs, fuse)
    kernel = functools.partial(_gmm_kernel, tm=tm, ts=sub_rows(tm), tk=tk, k=k, transpose_rhs=transpose_rhs,
                               fuse=fuse)
    out_shape = [out_struct((m, n), out_dtype, lhs[0])] * fuse.n_out
    call = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=grid, in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary"),
                                             vmem_limit_bytes=vmem_limit),
        cost_estimate=gmm_cost(m, k, n, rhs.shape[0], tiling, jnp.dtype(lhs[0].dtype).itemsize,
                               jnp.dtype(out_dtype).itemsize, jnp.dtype(rhs.dtype).itemsize, fuse),
        interpret=interpret,
        name="moejax_gmm",
    )
    outs = call(meta.offsets, meta.tile, meta.group, meta.flags, *lhs, rhs, *extra)
    return tuple(outs) if fuse.n_out > 1 else outs[0]


def _tgmm_kernel(offsets, tiles, groups, flags, *refs, tm, swiglu_in: bool):
    """refs: lhs (one, or gate and up: the kernel takes silu(gate) * up), grad, out, the float32 accumulator."""
    *lhs_refs, grad_ref, out_ref, acc_ref = refs
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
        dtype = lhs_refs[0].dtype
        x = swiglu(lhs_refs[0][...], lhs_refs[1][...]).astype(dtype) if swiglu_in else lhs_refs[0][...]
        x = jnp.where(in_group, x, jnp.zeros((), dtype))  # [tm, tk]
        dy = jnp.where(in_group, grad_ref[...], jnp.zeros((), grad_ref.dtype))  # [tm, tn]
        acc_ref[...] += jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    @pl.when(last)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm_specs(tiling, n_lhs: int = 1):
    """(lhs..., grad) BlockSpecs and the output BlockSpec of tgmm's grid (tiles_k, tiles_n, V); index maps take
    (a, b, v, offsets, tiles, groups, flags). A visit that computes nothing keeps the previous row tile."""
    tm, tk, tn = tiling

    def tile_if(tiles, flags, v):
        return jnp.where((flags[v] & COMPUTE) != 0, tiles[v], tiles[jnp.maximum(v - 1, 0)])

    lhs_spec = pl.BlockSpec((tm, tk), lambda a, b, v, off, t, g, f: (tile_if(t, f, v), a))
    grad_spec = pl.BlockSpec((tm, tn), lambda a, b, v, off, t, g, f: (tile_if(t, f, v), b))
    out_spec = pl.BlockSpec((None, tk, tn), lambda a, b, v, off, t, g, f: (g[v], a, b))
    return [lhs_spec] * n_lhs + [grad_spec], out_spec


def tgmm_cost(m, k, n, n_local, tiling, in_item, out_item, swiglu_in: bool = False) -> pl.CostEstimate:
    """tgmm's tiling when all V = tiles_m + G_local - 1 visits compute (see gmm_cost): per output block
    (a, b) the walk fetches each row tile of lhs (both gate and up under swiglu_in, with one exp per element
    per visit) and grad once (a tile's visits are consecutive), the MXU multiplies whole [tk, tm] x [tm, tn]
    blocks on every visit, and each group's [tk, tn] block is written once."""
    tm, tk, tn = tiling
    tiles_m, tiles_k, tiles_n = cdiv(m, tm), cdiv(k, tk), cdiv(n, tn)
    V = tiles_m + n_local - 1
    blocks = tiles_k * tiles_n
    n_lhs = 2 if swiglu_in else 1
    return pl.CostEstimate(flops=2 * V * tm * blocks * tk * tn,
                           transcendentals=V * tm * blocks * tk if swiglu_in else 0,
                           bytes_accessed=in_item * blocks * tiles_m * tm * (n_lhs * tk + tn)
                           + out_item * blocks * n_local * tk * tn)


def tgmm(lhs, grad, meta: GroupMetadata, tiling, *, n_local: int, out_dtype, vmem_limit: int,
         interpret=False, swiglu_in: bool = False) -> jax.Array:
    """lhs [m, k] (or the pair (gate, up) under swiglu_in), grad [m, n] -> [G_local, k, n] (per group
    lhs_g^T grad_g); see pallas_kernels.grouped_matmul."""
    lhs = tuple(lhs) if swiglu_in else (lhs,)
    (m, k), n = lhs[0].shape, grad.shape[1]
    tm, tk, tn = tiling
    grid = (cdiv(k, tk), cdiv(n, tn), meta.n_visits)
    in_specs, out_spec = tgmm_specs(tiling, len(lhs))
    call = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm, swiglu_in=swiglu_in),
        out_shape=out_struct((n_local, k, n), out_dtype, lhs[0]),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=grid, in_specs=in_specs, out_specs=out_spec,
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                             vmem_limit_bytes=vmem_limit),
        cost_estimate=tgmm_cost(m, k, n, n_local, tiling, jnp.dtype(lhs[0].dtype).itemsize,
                                jnp.dtype(out_dtype).itemsize, swiglu_in),
        interpret=interpret,
        name="moejax_tgmm",
    )
    return call(meta.offsets, meta.tile, meta.group, meta.flags, *lhs, grad)
