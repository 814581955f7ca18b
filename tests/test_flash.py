"""Pallas TPU flash attention (pallas_kernels.flash_attention) against moejax.attention.attend under the causal
mask, its declared costs against its index maps, its errors, and its Mosaic lowering for a TPU topology.

The kernels run on CPU interpreted: Pallas' discharge interpreter (interpret=True), and once in the TPU
interpret mode (`pltpu.InterpretParams`), whose uninitialised memory is NaN (a kernel that reads an
accumulator or a block before writing it fails) with its race detector on. Tolerances (tests/tolerances.py):
F32 for float32 inputs, BF16 for bfloat16 inputs against the float32 reference.
"""
from __future__ import annotations

import importlib.util
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from moejax.attention import attend, causal_mask
from pallas_kernels import flash_tpu
from pallas_kernels.flash import flash_attention
from tests.tolerances import BF16, F32


def arrays(B, S, G, n, hq, hv, dtype=jnp.float32, segments=False, seed=0):
    """q, k, v, an output cotangent and segment ids (three sorted documents per row, or None)."""
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, S, G, n, hq), dtype)
    k = jax.random.normal(ks[1], (B, S, G, hq), dtype)
    v = jax.random.normal(ks[2], (B, S, G, hv), dtype)
    ct = jax.random.normal(ks[3], (B, S, G * n, hv), jnp.float32)
    seg = jnp.sort(jax.random.randint(ks[4], (B, S), 0, 3), axis=1) if segments else None
    return q, k, v, ct, seg


def value_and_grads(fn, q, k, v, ct):
    """(out, (dq, dk, dv)) of sum(fn(q, k, v) * ct), in float32."""
    f = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * ct)
    return fn(q, k, v), jax.grad(f, (0, 1, 2))(q, k, v)


def reference(q, k, v, ct, seg, scale):
    f32 = lambda x: x.astype(jnp.float32)
    return value_and_grads(lambda q, k, v: attend(q, k, v, scale, causal_mask(q.shape[1], seg)),
                           f32(q), f32(k), f32(v), ct)


# (B, S, G, n, hq, hv, block, segments): N = S / block of 4, 2 and 1 blocks a side; grouped-query (n > 1),
# query/key width != value width (as MLA's 192 / 128), packed documents.
CASES = [(2, 64, 2, 2, 16, 8, 16, True), (1, 48, 1, 3, 24, 16, 24, False), (2, 32, 3, 1, 8, 8, 32, True)]


@pytest.mark.parametrize("B, S, G, n, hq, hv, t, segments", CASES)
def test_values_and_gradients_equal_attend(B, S, G, n, hq, hv, t, segments):
    """Outputs and the gradients of q, k and v equal `attend` under the causal mask (of the documents)."""
    q, k, v, ct, seg = arrays(B, S, G, n, hq, hv, segments=segments)
    scale = hq ** -0.5
    got = value_and_grads(lambda q, k, v: flash_attention(q, k, v, scale, seg, block=t, platform="interpret"),
                          q, k, v, ct)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(reference(q, k, v, ct, seg, scale))):
        np.testing.assert_allclose(g, w, **F32)


def test_tpu_interpret_mode_bfloat16():
    """The TPU interpret mode (NaN-initialised memory, race detection) on bfloat16 inputs: every block read
    is written first (2 blocks a side), and values and gradients match the float32 reference to bfloat16
    rounding."""
    q, k, v, ct, seg = arrays(1, 32, 2, 2, 16, 16, jnp.bfloat16, segments=True, seed=1)
    params = pltpu.InterpretParams(detect_races=True)
    got = value_and_grads(lambda q, k, v: flash_attention(q, k, v, 0.25, seg, block=16, platform="interpret",
                                                          interpret=params), q, k, v, ct)
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(got))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(reference(q, k, v, ct, seg, 0.25))):
        np.testing.assert_allclose(g.astype(jnp.float32), w, **BF16)


# --- declared cost ----------------------------------------------------------------------------------


def walk(in_specs, out_specs, grid, items, computes):
    """(bytes moved, computed steps) of a kernel's grid from its own BlockSpecs: in grid order, an operand's
    block is fetched (an output's written back) whenever its index differs from the previous step's (Pallas
    TPU pipelining); computes(idx) says whether the step multiplies."""
    specs = [*in_specs, *out_specs]
    prev = [None] * len(specs)
    moved = steps = 0
    for idx in itertools.product(*map(range, grid)):
        for s, spec in enumerate(specs):
            block = tuple(int(b) for b in spec.index_map(*idx))
            if block != prev[s]:
                moved += items[s] * int(np.prod([b for b in spec.block_shape if b is not None]))
                prev[s] = block
        steps += bool(computes(idx))
    return moved, steps


@pytest.mark.parametrize("N", [1, 2, 4])
@pytest.mark.parametrize("G, n", [(2, 1), (1, 3), (2, 2)])
@pytest.mark.parametrize("has_seg", [False, True])
def test_declared_kernel_costs_match_their_index_maps(N, G, n, has_seg):
    """forward_cost, dkv_cost and dq_cost equal the bytes counted by walking each kernel's grid with its own
    index maps, and their FLOPs the computed (diagonal and below) steps times each step's matmuls."""
    B, t, hq, hv, item = 2, 128, 192, 128, 2
    H, S = G * n, N * t
    seg_items = (4, 4) if has_seg else ()
    args = (B, H, G, S, hq, hv, t, item, has_seg)
    kernels = [  # (specs, grid, input items, output items, computes, cost, FLOPs per step)
        (flash_tpu.forward_specs(t, n, hq, hv, has_seg), (B, H, N, N), (item,) * 3 + seg_items, (item, 4),
         lambda idx: idx[3] <= idx[2], flash_tpu.forward_cost(*args), 2 * t * t * (hq + hv)),
        (flash_tpu.dkv_specs(t, n, hq, hv, has_seg), (B, G, N, n, N), (item,) * 4 + (4, 4) + seg_items,
         (item, item), lambda idx: idx[4] >= idx[2], flash_tpu.dkv_cost(*args), 4 * t * t * (hq + hv)),
        (flash_tpu.dq_specs(t, n, hq, hv, has_seg), (B, H, N, N), (item,) * 4 + (4, 4) + seg_items, (item,),
         lambda idx: idx[3] <= idx[2], flash_tpu.dq_cost(*args), 2 * t * t * (2 * hq + hv)),
    ]
    for (ins, outs), grid, in_items, out_items, computes, cost, step_flops in kernels:
        moved, steps = walk(ins, outs, grid, in_items + out_items, computes)
        assert steps == B * H * N * (N + 1) // 2
        assert (moved, steps * step_flops) == (cost.bytes_accessed, cost.flops)


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (dict(k=jnp.zeros((1, 32, 2, 8))), "do not match q"),
    (dict(q=jnp.zeros((1, 32, 16))), "expected q [B, S, G, n, hq]"),
    (dict(segment_ids=jnp.zeros((1, 16), jnp.int32)), "segment_ids (1, 16)"),
    (dict(block=24), "block=24 does not divide the sequence length S=32"),
    (dict(platform="gpu"), "platform='gpu'"),
    (dict(platform="tpu", block=16), "block=16 with S=32"),
])
def test_bad_inputs_name_the_value(change, message):
    args = dict(q=jnp.zeros((1, 32, 2, 1, 16)), k=jnp.zeros((1, 32, 2, 16)), v=jnp.zeros((1, 32, 2, 8)),
                scale=0.25, segment_ids=None, block=None, platform="interpret")
    args.update(change)
    with pytest.raises(ValueError) as e:
        flash_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("scale"), **args)
    assert message in str(e.value)


# --- Mosaic lowering ------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="compiling for a TPU topology needs libtpu")
def test_compiles_for_tpu_with_declared_costs():
    """Forward + backward compile through Mosaic for one v5p chip (libtpu, no TPU), inside jax.shard_map as on
    a mesh, with documents (bfloat16, B 1, S 1024 in blocks of 512, 2 heads of 128, grouped 2 to 1); the
    compiled program's FLOPs are at least what the three kernels declare (XLA adds the delta reduction)."""
    from moejax import aot, sharding

    B, S, G, n, h, t = 1, 1024, 1, 2, 128, 512
    mesh = sharding.make_mesh(sharding.MeshConfig(), aot.topology_devices("v5p:2x2x1")[:1])
    shapes = [((B, S, G, n, h), jnp.bfloat16), ((B, S, G, h), jnp.bfloat16), ((B, S, G, h), jnp.bfloat16),
              ((B, S), jnp.int32)]

    def loss(q, k, v, seg):
        return jnp.sum(flash_attention(q, k, v, 0.1, seg, block=t).astype(jnp.float32))

    spec = jax.sharding.PartitionSpec()
    f = jax.shard_map(jax.grad(loss, (0, 1, 2)), mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec,) * 3)
    with sharding.use(mesh), jax.default_matmul_precision("default"):
        compiled = jax.jit(f).lower(*(jax.ShapeDtypeStruct(s, d) for s, d in shapes)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    args = (B, G * n, G, S, h, h, t, 2, True)
    declared = sum(c(*args).flops for c in (flash_tpu.forward_cost, flash_tpu.dkv_cost, flash_tpu.dq_cost))
    assert declared <= cost["flops"] <= 1.05 * declared
