"""Group metadata for the grouped-matmul kernels: which row tile each grid step visits, for which group.

Rows [m] are sorted by group: group i (of the G in `group_sizes`) owns rows [start_i, start_i + size_i).
A kernel walks the row tiles of tm rows in order; a tile that straddles a group boundary is visited once
per group it holds (the MegaBlocks / megablox scheme, Gale et al. 2023), so the number of visits is at
most tiles_m + G_local - 1, a static bound the grid uses. Visits past the real ones repeat the last one
with no work (their block indices do not change, so no data moves).

Only the G_local groups [group_offset, group_offset + G_local) are "local" (an expert-parallel shard owns
their weights); rows of other groups, and rows past sum(group_sizes), are outputs of zero.
"""
from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp

COMPUTE = 1  # the visit multiplies its tile's rows of its group
FIRST = 2  # the visit is the first of its row tile (gmm: rows of no local group are written as zeros)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupMetadata:
    """offsets: [G_local + 1] int32 row where each local group starts (clipped to [0, m]); the last entry
    ends the last local group. tile, group, flags: [V] int32 per visit: row tile, local group, COMPUTE|FIRST.
    """

    offsets: jax.Array
    tile: jax.Array
    group: jax.Array
    flags: jax.Array

    @property
    def n_visits(self) -> int:
        return self.tile.shape[0]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def group_metadata(group_sizes: jax.Array, m: int, tm: int, n_local: int, group_offset=0, *,
                   visit_empty_groups: bool) -> GroupMetadata:
    """Visits of row tiles for a grouped matmul over m rows in tiles of tm.

    visit_empty_groups=False (gmm): every row tile is visited at least once (tiles holding no local rows
    get one visit without COMPUTE, which writes zeros). True (tgmm): every local group is visited at least
    once (an empty group gets a visit without COMPUTE, which writes its zero weight gradient).
    """
    tiles_m = cdiv(m, tm)
    n_visits = tiles_m + n_local - 1
    G = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    group_offset = jnp.clip(group_offset, 0, G - n_local)  # a traced offset: into range, as dynamic_slice would
    before = jnp.sum(jnp.where(jnp.arange(G) < group_offset, sizes, 0))
    local = jax.lax.dynamic_slice_in_dim(sizes, jnp.asarray(group_offset, jnp.int32), n_local)
    ends = jnp.clip(before + jnp.cumsum(local), 0, m)
    offsets = jnp.concatenate([jnp.clip(before, 0, m)[None], ends]).astype(jnp.int32)  # [G_local + 1]
    starts, nonempty = offsets[:-1], ends > offsets[:-1]
    first_tile = jnp.minimum(starts // tm, tiles_m - 1)
    count = jnp.where(nonempty, (ends - 1) // tm - first_tile + 1, 1 if visit_empty_groups else 0)
    seg_group = jnp.arange(n_local, dtype=jnp.int32)
    seg_flag = jnp.where(nonempty, COMPUTE, 0)
    if not visit_empty_groups:  # zero visits for the tiles before and after the local rows
        lo, hi = offsets[0], offsets[-1]
        any_rows = hi > lo
        pre = jnp.where(any_rows, lo // tm, tiles_m)
        post = jnp.where(any_rows, (hi + tm - 1) // tm, tiles_m)
        count = jnp.concatenate([pre[None], count, (tiles_m - post)[None]])
        first_tile = jnp.concatenate([jnp.zeros((1,), jnp.int32), first_tile, post[None]])
        seg_group = jnp.concatenate([jnp.zeros((1,), jnp.int32), seg_group, jnp.full((1,), n_local - 1)])
        seg_flag = jnp.concatenate([jnp.zeros((1,), jnp.int32), seg_flag, jnp.zeros((1,), jnp.int32)])
    cum = jnp.cumsum(count)  # [segments]
    v = jnp.arange(n_visits, dtype=jnp.int32)
    seg = jnp.minimum(jnp.searchsorted(cum, v, side="right"), count.shape[0] - 1)
    real = v < cum[-1]
    tile = (first_tile[seg] + v - (cum - count)[seg]).astype(jnp.int32)
    last = jnp.maximum(cum[-1] - 1, 0)
    tile = jnp.where(real, tile, tile[last])
    group = jnp.where(real, seg_group[seg], seg_group[seg[last]]).astype(jnp.int32)
    first = real & jnp.concatenate([jnp.ones((1,), bool), tile[1:] != tile[:-1]])
    flags = jnp.where(real, seg_flag[seg], 0) | jnp.where(first, FIRST, 0)
    return GroupMetadata(offsets=offsets, tile=tile, group=group, flags=flags.astype(jnp.int32))



def varying_axes(x) -> frozenset:
    """Mesh axes x varies over inside jax.shard_map (empty outside). JAX 0.10 keeps them in the type's
    `manual_axis_type`, earlier releases in `vma`."""
    t = jax.typeof(x)
    mat = getattr(t, "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(t, "vma", ()))


def vary_alike(*xs):
    """Make every operand vary over the union of their mesh axes (what jax does implicitly for its own
    ops), so a custom VJP's cotangents have their primals' types; the transpose of this cast is the psum
    that sums, e.g., a weight gradient over the data axes."""
    union = frozenset().union(*map(varying_axes, xs))
    cast = getattr(jax.lax, "pcast", None)
    out = []
    for x in xs:
        missing = tuple(sorted(union - varying_axes(x)))
        if missing:
            x = cast(x, missing, to="varying") if cast else jax.lax.pvary(x, missing)
        out.append(x)
    return out


def out_struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
    """The kernel output's ShapeDtypeStruct, varying over the mesh axes `like` varies over (inside
    jax.shard_map with check_vma the output type must say; operands are made alike by vary_alike)."""
    t = jax.typeof(like)
    params = inspect.signature(jax.ShapeDtypeStruct).parameters
    if "manual_axis_type" in params and getattr(t, "manual_axis_type", None) is not None:
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=t.manual_axis_type)
    if "vma" in params and getattr(t, "vma", None) is not None:
        return jax.ShapeDtypeStruct(shape, dtype, vma=t.vma)
    return jax.ShapeDtypeStruct(shape, dtype)
