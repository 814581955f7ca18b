"""Pallas grouped matmul (pallas_kernels.gmm / tgmm) against a per-group loop and jax.lax.ragged_dot, and the
fused grouped SwiGLU FFN (pallas_kernels.swiglu_ffn) against the loop's FFN.

- TPU (Mosaic) kernels run on CPU in the TPU interpret mode (`pltpu.InterpretParams`; explicitly: the default
  on CPU is Pallas' discharge interpreter outside shard_map), whose uninitialised
  memory is NaN (so a kernel that reads a block before writing it fails), with its race detector on and
  2 simulated cores; GPU (Triton) kernels run in Pallas interpret mode, and are lowered to Triton IR for
  CUDA (no GPU needed); on a machine with a GPU they also run on it.
- Mosaic kernels are compiled ahead of time for v5e, v5p and v6e topologies (libtpu, no TPU) inside
  shard_map at the DeepSeekMoE-16B and Mixtral-8x7B expert shapes (and swiglu_ffn at the 16B one): the
  lowering succeeds and fits VMEM.
Tolerances (tests/tolerances.py): F32 for float32 inputs, and for bfloat16 inputs with float32 output
(products of bfloat16 numbers are exact in float32); BF16 for bfloat16 outputs.
"""
from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

import pallas_kernels
from pallas_kernels import activation, grouped_matmul, metadata
from tests.tolerances import BF16, F32

TPU_INTERPRET = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
# (platform, interpret, tiling): tiles smaller than the shapes so that groups straddle tiles.
KERNELS = {"tpu": ("tpu", TPU_INTERPRET, (32, 128, 128)), "gpu": ("gpu", True, (32, 32, 64))}
# name: (m, k, n, group_sizes). Group sizes are not multiples of the row tile; k and n not of the k and n
# tiles; "padded": sum < m (the rows left are zeros); "over": sum > m (groups end at row m).
SHAPES = {
    "padded": (100, 200, 150, [30, 0, 17, 40, 5]),
    "full": (96, 64, 96, [0, 50, 0, 46]),
    "over": (64, 128, 64, [40, 40, 40]),
    "empty": (48, 64, 64, [0, 0, 0]),
}


def loop_gmm(lhs, rhs, sizes, offset=0, transpose=False):
    """The obvious reference: out[rows of group offset + i] = lhs[rows] @ rhs[i] (jnp, differentiable)."""
    m = lhs.shape[0]
    starts = np.minimum(np.concatenate([[0], np.cumsum(sizes)]), m)
    out = jnp.zeros((m, rhs.shape[1] if transpose else rhs.shape[2]), jnp.float32)
    for i in range(rhs.shape[0]):
        a, b = starts[offset + i], starts[offset + i + 1]
        w = rhs[i].T if transpose else rhs[i]
        out = out.at[a:b].set(jnp.dot(lhs[a:b], w, preferred_element_type=jnp.float32))
    return out


def loop_tgmm(lhs, grad, sizes, offset=0, n_local=None):
    m = lhs.shape[0]
    starts = np.minimum(np.concatenate([[0], np.cumsum(sizes)]), m)
    n_local = len(sizes) if n_local is None else n_local
    return jnp.stack([jnp.dot(lhs[starts[offset + i]:starts[offset + i + 1]].T,
                              grad[starts[offset + i]:starts[offset + i + 1]], preferred_element_type=jnp.float32)
                      for i in range(n_local)])


def arrays(m, k, n, G, dtype=jnp.float32, transpose=False, seed=0):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
    rhs = jnp.asarray(rng.normal(size=(G, n, k) if transpose else (G, k, n)) / np.sqrt(k), dtype)
    return lhs, rhs, jnp.asarray(rng.normal(size=(m, n)), jnp.float32)


def call_gmm(kernel, lhs, rhs, sizes, **kw):
    platform, interpret, tiling = KERNELS[kernel]
    return pallas_kernels.gmm(lhs, rhs, jnp.asarray(sizes, jnp.int32), platform=platform, interpret=interpret,
                              tiling=tiling, **kw)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("transpose", [False, True])
def test_gmm_forward_and_gradients_match_the_loop(kernel, shape, transpose):
    m, k, n, sizes = SHAPES[shape]
    lhs, rhs, ct = arrays(m, k, n, len(sizes), transpose=transpose)

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w) * ct)

    ours = lambda x, w: call_gmm(kernel, x, w, sizes, transpose_rhs=transpose)
    ref = lambda x, w: loop_gmm(x, w, sizes, transpose=transpose)
    out = ours(lhs, rhs)
    np.testing.assert_allclose(out, ref(lhs, rhs), **F32)
    if sum(sizes) <= m and not transpose:
        np.testing.assert_allclose(out, jax.lax.ragged_dot(lhs, rhs, jnp.asarray(sizes, jnp.int32)), **F32)
    assert not np.any(np.asarray(out)[min(sum(sizes), m):]), "rows past the groups must be zero"
    got = jax.grad(loss(ours), (0, 1))(lhs, rhs)
    want = jax.grad(loss(ref), (0, 1))(lhs, rhs)
    for g, w, name in zip(got, want, ("d lhs", "d rhs")):
        np.testing.assert_allclose(g, w, **F32, err_msg=name)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_tgmm_and_its_gradients_match_the_loop(kernel):
    m, k, n, sizes = SHAPES["padded"]
    lhs, _, grad = arrays(m, k, n, len(sizes))
    platform, interpret, tiling = KERNELS[kernel]
    ours = lambda x, dy: pallas_kernels.tgmm(x, dy, jnp.asarray(sizes, jnp.int32), platform=platform,
                                             interpret=interpret, tiling=tiling)
    out = ours(lhs, grad)
    np.testing.assert_allclose(out, loop_tgmm(lhs, grad, sizes), **F32)
    assert not np.any(np.asarray(out[1])), "an empty group's block is zero"
    ct = jnp.asarray(np.random.default_rng(1).normal(size=out.shape), jnp.float32)
    got = jax.grad(lambda x, dy: jnp.sum(ours(x, dy) * ct), (0, 1))(lhs, grad)
    want = jax.grad(lambda x, dy: jnp.sum(loop_tgmm(x, dy, sizes) * ct), (0, 1))(lhs, grad)
    for g, w, name in zip(got, want, ("d lhs", "d grad")):
        np.testing.assert_allclose(g, w, **F32, err_msg=name)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_group_offset_multiplies_only_the_local_groups(kernel):
    """An expert-parallel shard: rhs holds groups 1..3 of 5; rows of groups 0 and 4 come out zero. The
    offset may be a traced value (jax.lax.axis_index inside shard_map)."""
    m, k, n, sizes = SHAPES["padded"]
    lhs, rhs, ct = arrays(m, k, n, 3)
    platform, interpret, tiling = KERNELS[kernel]
    gs = jnp.asarray(sizes, jnp.int32)

    @jax.jit
    def ours(x, w, offset):
        return pallas_kernels.gmm(x, w, gs, group_offset=offset, platform=platform, interpret=interpret,
                                  tiling=tiling)

    np.testing.assert_allclose(ours(lhs, rhs, 1), loop_gmm(lhs, rhs, sizes, offset=1), **F32)
    np.testing.assert_allclose(pallas_kernels.gmm(lhs, rhs, gs, group_offset=2, platform=platform,
                                                  interpret=interpret, tiling=tiling),
                               loop_gmm(lhs, rhs, sizes, offset=2), **F32)
    got = jax.grad(lambda w: jnp.sum(ours(lhs, w, 1) * ct))(rhs)
    np.testing.assert_allclose(got, loop_tgmm(lhs, ct, sizes, offset=1, n_local=3), **F32)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_bfloat16_inputs_accumulate_in_float32(kernel):
    m, k, n, sizes = SHAPES["padded"]
    lhs, rhs, _ = arrays(m, k, n, len(sizes), dtype=jnp.bfloat16)
    want = loop_gmm(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)
    out32 = call_gmm(kernel, lhs, rhs, sizes, preferred_element_type=jnp.float32)
    assert out32.dtype == jnp.float32
    np.testing.assert_allclose(out32, want, **F32)
    out16 = call_gmm(kernel, lhs, rhs, sizes)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(out16.astype(jnp.float32), want, **BF16)
    drhs = jax.grad(lambda w: jnp.sum(call_gmm(kernel, lhs, w, sizes).astype(jnp.float32)))(rhs)
    assert drhs.dtype == jnp.bfloat16
    want_d = loop_tgmm(lhs.astype(jnp.float32), jnp.ones((m, n), jnp.float32), sizes)
    np.testing.assert_allclose(drhs.astype(jnp.float32), want_d, **BF16)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_float32_weights_under_bfloat16_rows_equal_casting_them_first(kernel):
    """gmm(bf16 lhs, f32 rhs): the same output and input gradient as casting rhs to bf16 first (the TPU kernel
    casts each block in VMEM), and a float32 weight gradient (tgmm accumulates and writes float32), which
    equals the reference of the bf16 operands."""
    m, k, n, sizes = SHAPES["over"]
    lhs, rhs, ct = arrays(m, k, n, len(sizes), dtype=jnp.bfloat16)
    rhs32 = rhs.astype(jnp.float32) + 1e-4  # not bf16-representable: the cast must happen
    platform, interpret, tiling = KERNELS[kernel]
    interpret = pltpu.InterpretParams() if kernel == "tpu" else interpret  # races: test_tpu_interpreter_finds_no_races
    gmm = lambda x, w: pallas_kernels.gmm(x, w, jnp.asarray(sizes, jnp.int32), platform=platform,
                                          interpret=interpret, tiling=tiling)
    f = lambda x, w: jnp.sum(gmm(x, w).astype(jnp.float32) * ct)
    out = gmm(lhs, rhs32)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, gmm(lhs, rhs32.astype(jnp.bfloat16)))
    dx, dw = jax.grad(f, (0, 1))(lhs, rhs32)
    dx16, _ = jax.grad(f, (0, 1))(lhs, rhs32.astype(jnp.bfloat16))
    np.testing.assert_array_equal(dx, dx16)
    assert dw.dtype == jnp.float32
    np.testing.assert_allclose(dw, loop_tgmm(lhs.astype(jnp.float32), ct.astype(jnp.bfloat16).astype(jnp.float32),
                                             sizes), **F32)


def loop_swiglu(x, w_gate, w_up, w_down, sizes, offset=0):
    """The SwiGLU FFN of each local group's rows (jax.nn.silu, jnp matmuls); rows of other groups are 0."""
    gate, up = loop_gmm(x, w_gate, sizes, offset), loop_gmm(x, w_up, sizes, offset)
    return loop_gmm(jax.nn.silu(gate) * up, w_down, sizes, offset)


def swiglu_arrays(m, d, f, G, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    w = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[1]), jnp.float32)
    x = jnp.asarray(rng.normal(size=(m, d)), dtype)
    return x, w(G, d, f), w(G, d, f), w(G, f, d), jnp.asarray(rng.normal(size=(m, d)), jnp.float32)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("offset, tk", [(0, 256), (1, 128)])
def test_swiglu_ffn_and_its_gradients_match_the_loop(kernel, offset, tk):
    """The fused SwiGLU FFN (three kernels forward, six backward, the activation and the sum of the input
    gradients inside them) against silu(x W_gate) * (x W_up) W_down per group and its autodiff. offset 1:
    an expert-parallel shard holding groups 1..3 of 5 (rows of groups 0 and 4 come out zero). TPU tiles with
    tk 256 keep the whole f (150), so the down projection takes (gate, up) in its kernels; with tk 128 XLA
    computes the activation and the kernels read it (grouped_matmul._down_fused)."""
    m, d, f, sizes = SHAPES["padded"]
    G = 3 if offset else len(sizes)
    x, wg, wu, wd, ct = swiglu_arrays(m, d, f, G)
    platform, interpret, tiling = KERNELS[kernel]
    if kernel == "tpu":
        interpret, tiling = pltpu.InterpretParams(), (32, tk, 128)  # races: test_tpu_interpreter_finds_no_races
        o = grouped_matmul._Options(False, G, x.dtype, tiling, platform, interpret)
        assert grouped_matmul._down_fused(o, jnp.zeros((m, f)), wd) == (tk >= f)
    gs = jnp.asarray(sizes, jnp.int32)
    ours = lambda *a: pallas_kernels.swiglu_ffn(*a, gs, group_offset=offset, platform=platform,
                                                interpret=interpret, tiling=tiling)
    ref = lambda *a: loop_swiglu(*a, sizes, offset)
    np.testing.assert_allclose(ours(x, wg, wu, wd), ref(x, wg, wu, wd), **F32)
    got = jax.grad(lambda *a: jnp.sum(ours(*a) * ct), (0, 1, 2, 3))(x, wg, wu, wd)
    want = jax.grad(lambda *a: jnp.sum(ref(*a) * ct), (0, 1, 2, 3))(x, wg, wu, wd)
    for g, w, name in zip(got, want, ("d x", "d w_gate", "d w_up", "d w_down")):
        np.testing.assert_allclose(g, w, **F32, err_msg=name)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_swiglu_ffn_bfloat16_rows_with_float32_weights(kernel):
    """Training's dtypes: bf16 rows, f32 weights (cast in VMEM on TPU): bf16 output and input gradient near the
    float32 reference of the same operands, float32 weight gradients."""
    m, d, f, sizes = SHAPES["over"]
    x, wg, wu, wd, ct = swiglu_arrays(m, d, f, len(sizes), jnp.bfloat16)
    platform, interpret, tiling = KERNELS[kernel]
    interpret = pltpu.InterpretParams() if kernel == "tpu" else interpret
    gs = jnp.asarray(sizes, jnp.int32)
    ours = lambda *a: pallas_kernels.swiglu_ffn(*a, gs, platform=platform, interpret=interpret, tiling=tiling)
    x32, w16 = x.astype(jnp.float32), [w.astype(jnp.bfloat16).astype(jnp.float32) for w in (wg, wu, wd)]
    out = ours(x, wg, wu, wd)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), loop_swiglu(x32, *w16, sizes), **BF16)
    got = jax.grad(lambda *a: jnp.sum(ours(*a).astype(jnp.float32) * ct), (0, 1, 2, 3))(x, wg, wu, wd)
    want = jax.grad(lambda *a: jnp.sum(loop_swiglu(*a, sizes) * ct), (0, 1, 2, 3))(x32, *w16)
    assert [g.dtype for g in got] == [jnp.bfloat16] + [jnp.float32] * 3
    for g, w, name in zip(got, want, ("d x", "d w_gate", "d w_up", "d w_down")):
        # bf16 gate, up and hidden activations and a bf16 d x: errors relative to the gradient's largest entry,
        # within BF16's atol (measured at most 0.008 over 3 seeds, both kernels)
        scale = float(jnp.abs(w).max())
        np.testing.assert_allclose(g.astype(jnp.float32) / scale, w / scale, atol=BF16["atol"], rtol=0, err_msg=name)


def test_swiglu_ffn_names_a_weight_of_the_wrong_shape():
    x, wg, wu, wd, _ = swiglu_arrays(64, 128, 96, 4)
    gs = jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match=r"swiglu_ffn: w_down has shape \(4, 128, 128\); expected \(4, 96, 128\)"):
        pallas_kernels.swiglu_ffn(x, wg, wu, jnp.zeros((4, 128, 128)), gs)
    with pytest.raises(ValueError, match=r"swiglu_ffn: contraction sizes differ"):
        pallas_kernels.swiglu_ffn(x[:, :64], wg, wu, wd, gs)


def test_default_platform_interprets_on_cpu_and_uses_default_tiles():
    """platform=None: default_platform(), on CPU the TPU kernels interpreted: by Pallas' discharge interpreter,
    and inside shard_map (where that one does not run) in the TPU interpret mode."""
    m, k, n, sizes = 600, 96, 80, [0, 250, 0, 200, 100]  # tm = 128: five row tiles, the last partial
    assert pallas_kernels.default_platform() == "interpret"
    assert grouped_matmul._default_interpret() is True
    inside = []
    mesh = jax.make_mesh((1,), ("x",), devices=jax.devices()[:1])
    jax.shard_map(lambda a: inside.append(grouped_matmul._default_interpret()) or a, mesh=mesh, in_specs=P(),
                  out_specs=P())(jnp.zeros(1))
    assert isinstance(inside[0], pltpu.InterpretParams)
    assert pallas_kernels.default_tiling("tpu", m, k, n, jnp.float32) == (128, 96, 80)
    lhs, rhs, _ = arrays(m, k, n, len(sizes))
    np.testing.assert_allclose(pallas_kernels.gmm(lhs, rhs, jnp.asarray(sizes, jnp.int32)),
                               loop_gmm(lhs, rhs, sizes), **F32)


def test_tpu_interpreter_finds_no_races():
    """The tests above ran the TPU kernels with the race detector on (2 cores); run fwd + bwd once more
    here so this test stands alone, then read the detector's verdict."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret

    m, k, n, sizes = SHAPES["padded"]
    lhs, rhs, ct = arrays(m, k, n, len(sizes))
    jax.grad(lambda x, w: jnp.sum(call_gmm("tpu", x, w, sizes) * ct), (0, 1))(lhs, rhs)
    assert tpu_interpret.races is not None and not tpu_interpret.races.races_found
    x, wg, wu, wd, ct = swiglu_arrays(m, k, n, len(sizes))  # the fused kernels (tk 256 >= f 150: all fusions)
    jax.grad(lambda *a: jnp.sum(pallas_kernels.swiglu_ffn(*a, jnp.asarray(sizes, jnp.int32), platform="tpu",
                                                          interpret=TPU_INTERPRET, tiling=(32, 256, 128)) * ct),
             (0, 1, 2, 3))(x, wg, wu, wd)
    assert tpu_interpret.races is not None, "the race detector did not run"
    assert not tpu_interpret.races.races_found


@pytest.mark.parametrize("op, m, k, n, dtype, want", [
    ("gmm", 49152, 2048, 2816, jnp.bfloat16, (128, 2048, 2816)),  # DeepSeekMoE-16B w_in: whole k and n
    ("tgmm", 49152, 2048, 2816, jnp.bfloat16, (128, 2048, 1408)),  # its weight gradient: n in 2 tiles
    ("gmm", 16384, 4096, 28672, jnp.bfloat16, (128, 4096, 1792)),  # Mixtral w_in: n in 16 tiles
    ("gmm", 16384, 14336, 4096, jnp.bfloat16, (128, 14336, 384)),  # Mixtral w_down: k whole, n in 11 tiles
    ("gmm", 128, 65536, 65536, jnp.float32, (128, 2048, 1664)),  # k too wide to keep whole: tk 2048
    ("gmm", 40, 64, 32, jnp.float32, (40, 64, 32)),  # small shapes: one tile
])
def test_default_tpu_tiling_per_operation(op, m, k, n, dtype, want):
    """The TPU rule (pallas_kernels.grouped_matmul docstring): tm 128, the whole k if the blocks fit
    DEFAULT_VMEM, then the widest equal n tiles (multiples of 128) that fit."""
    tiling = pallas_kernels.default_tiling("tpu", m, k, n, dtype, op)
    assert tiling == want
    from pallas_kernels import grouped_matmul
    assert grouped_matmul._vmem_bytes(tiling, 2 if dtype == jnp.bfloat16 else 4, 2 if dtype == jnp.bfloat16 else 4,
                                      op == "tgmm") <= grouped_matmul.DEFAULT_VMEM


def test_float32_rhs_blocks_count_double_in_vmem():
    """DeepSeekMoE-16B's w_gate under bf16 rows with float32 weights: the [2048, 1408] rhs block in float32
    takes what two bf16 blocks take, so n splits in 2 where a bf16 rhs keeps it whole."""
    assert pallas_kernels.default_tiling("tpu", 49152, 2048, 1408, jnp.bfloat16, "gmm") == (128, 2048, 1408)
    assert pallas_kernels.default_tiling("tpu", 49152, 2048, 2816, jnp.bfloat16, "gmm",
                                         rhs_dtype=jnp.float32) == (128, 2048, 1408)


def test_callable_tiling_reaches_the_backward_kernels():
    """tiling=callable(op, m, k, n) chooses the tiles of every kernel, the backward ones included."""
    m, k, n, sizes = SHAPES["padded"]
    lhs, rhs, ct = arrays(m, k, n, len(sizes))
    asked = []

    def tiling(op, m_, k_, n_):
        asked.append((op, m_, k_, n_))
        return (32, 128, 128)

    f = lambda x, w: jnp.sum(pallas_kernels.gmm(x, w, jnp.asarray(sizes, jnp.int32), tiling=tiling,
                                                interpret=TPU_INTERPRET) * ct)
    got = jax.grad(f, (0, 1))(lhs, rhs)
    want = jax.grad(lambda x, w: jnp.sum(loop_gmm(x, w, sizes) * ct), (0, 1))(lhs, rhs)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **F32)
    assert sorted(asked) == sorted([("gmm", m, k, n), ("gmm", m, n, k), ("tgmm", m, k, n)])


# --- declared cost ----------------------------------------------------------------------------------


def walk(in_specs, out_specs, grid, meta, v_axis, in_items, out_items, sub=None):
    """(bytes moved, MXU FLOPs) of a kernel's grid, counted from its own BlockSpecs: step by step in grid
    order, an operand's block is fetched (an output's written back) whenever its index differs from the
    previous step's (Pallas TPU pipelining), and each step whose visit has COMPUTE multiplies whole blocks,
    or with `sub` (gmm's half-tile rows, gmm_tpu.sub_rows) only the halves of its row tile that hold rows of
    its group (the rule of gmm_tpu._gmm_kernel)."""
    import itertools
    prefetch = tuple(np.asarray(a) for a in (meta.offsets, meta.tile, meta.group, meta.flags))
    offsets, tiles, groups, flags = prefetch
    specs = [*in_specs, *out_specs]
    items = [*in_items, *out_items]
    prev = [None] * len(specs)
    moved = flops = 0
    for idx in itertools.product(*map(range, grid)):
        for i, spec in enumerate(specs):
            block = tuple(int(b) for b in spec.index_map(*idx, *prefetch))
            if block != prev[i]:
                moved += items[i] * int(np.prod([b for b in spec.block_shape if b is not None]))
                prev[i] = block
        v = idx[v_axis]
        if flags[v] & metadata.COMPUTE:
            tm, tk = in_specs[0].block_shape
            rows = tm
            if sub is not None and sub < tm:
                lo, hi = offsets[groups[v]] - tiles[v] * tm, offsets[groups[v] + 1] - tiles[v] * tm
                rows = sub * sum(lo < (s + 1) * sub and hi > s * sub for s in range(tm // sub))
            flops += 2 * rows * tk * int([b for b in out_specs[0].block_shape if b is not None][-1])
    return moved, flops


FUSIONS = [activation.NO_FUSE, activation.Fuse(swiglu_in=True), activation.Fuse(base=True),
           activation.Fuse(swiglu_grad=True)]


@pytest.mark.parametrize("tiling", [(128, 256, 128), (128, 128, 128)])  # tiles_k = 1, tiles_k = 2
@pytest.mark.parametrize("transpose, rhs_item", [(False, 2), (True, 2), (False, 4)])  # 4: float32 weights
@pytest.mark.parametrize("fuse", FUSIONS, ids=["plain", "swiglu_in", "base", "swiglu_grad"])
def test_declared_kernel_costs_match_their_index_maps(tiling, transpose, rhs_item, fuse):
    """Each Mosaic kernel's CostEstimate (gmm_cost, tgmm_cost), with each fusion of the SwiGLU FFN, equals the
    bytes and FLOPs counted by walking its grid with its own index maps when every visit computes (every
    group boundary inside a row tile: the declared case), and bounds them for other group sizes (empty
    groups, padding rows)."""
    from pallas_kernels import gmm_tpu

    m, k, n = 1024, 256, 384
    tm, tk, tn = tiling
    grid_of = lambda V: ((-(-n // tn), V, -(-k // tk)), (-(-k // tk), -(-n // tn), V))
    for sizes, exact in (([200, 300, 260, 264], True), ([0, 330, 0, 400], False), ([90, 0, 500, 10], False)):
        gs = jnp.asarray(sizes, jnp.int32)
        G = len(sizes)
        gmm_grid, tgmm_grid = grid_of(-(-m // tm) + G - 1)
        cost = gmm_tpu.gmm_cost(m, k, n, G, tiling, 2, 4, rhs_item, fuse)
        meta = metadata.group_metadata(gs, m, tm, G, visit_empty_groups=False)
        in_items = (2,) * fuse.n_lhs + (rhs_item,) + (2,) * fuse.n_extra
        got = walk(*gmm_tpu.gmm_specs(tiling, transpose, fuse), gmm_grid, meta, 1, in_items, (4,) * fuse.n_out,
                   sub=gmm_tpu.sub_rows(tm))
        checks = [(got, cost)]
        if fuse in (activation.NO_FUSE, activation.Fuse(swiglu_in=True)):  # tgmm takes swiglu_in only
            tcost = gmm_tpu.tgmm_cost(m, k, n, G, tiling, 2, 4, fuse.swiglu_in)
            tmeta = metadata.group_metadata(gs, m, tm, G, visit_empty_groups=True)
            in_specs, out_spec = gmm_tpu.tgmm_specs(tiling, fuse.n_lhs)
            checks.append((walk(in_specs, [out_spec], tgmm_grid, tmeta, 2, (2,) * (fuse.n_lhs + 1), (4,)), tcost))
        for (moved, flops), c in checks:
            if exact:
                assert (moved, flops) == (c.bytes_accessed, c.flops)
            else:
                assert moved <= c.bytes_accessed and flops <= c.flops


def test_traced_group_offset_out_of_range_is_clipped():
    """A traced group_offset past G - G_local multiplies the last G_local groups (as dynamic_slice clips),
    never a mix of two groups' rows."""
    m, k, n, sizes = SHAPES["padded"]
    lhs, rhs, _ = arrays(m, k, n, 2)
    f = jax.jit(lambda off: call_gmm("tpu", lhs, rhs, sizes, group_offset=off))
    np.testing.assert_allclose(f(jnp.int32(7)), loop_gmm(lhs, rhs, sizes, offset=len(sizes) - 2), **F32)
    np.testing.assert_allclose(f(jnp.int32(-3)), loop_gmm(lhs, rhs, sizes, offset=0), **F32)


# --- metadata ---------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6), m=st.integers(1, 120),
       tm=st.sampled_from([8, 16, 32]), data=st.data())
def test_metadata_visits_every_tile_and_group(sizes, m, tm, data):
    """gmm: every row tile once or more, in order, and every (tile, local group) pair that shares a row
    exactly once with COMPUTE; tgmm: every local group at least once; both within the static bound."""
    n_local = data.draw(st.integers(1, len(sizes)))
    offset = data.draw(st.integers(0, len(sizes) - n_local))
    starts = np.minimum(np.concatenate([[0], np.cumsum(sizes)]), m)[offset:offset + n_local + 1]
    tiles_m = -(-m // tm)
    pairs = {(t, i) for i in range(n_local) for t in range(tiles_m)
             if max(starts[i], t * tm) < min(starts[i + 1], (t + 1) * tm)}
    for empty in (False, True):
        meta = metadata.group_metadata(jnp.asarray(sizes, jnp.int32), m, tm, n_local, offset,
                                       visit_empty_groups=empty)
        tile, group, flags = map(np.asarray, (meta.tile, meta.group, meta.flags))
        assert meta.n_visits == tiles_m + n_local - 1
        np.testing.assert_array_equal(meta.offsets, starts)
        computed = [(t, g) for t, g, f in zip(tile, group, flags) if f & metadata.COMPUTE]
        assert sorted(computed) == sorted(pairs) and len(set(computed)) == len(computed)
        assert np.all(np.diff(tile) >= 0) and np.all(tile < tiles_m)
        if empty:
            assert set(range(n_local)) <= set(group.tolist())
            assert np.all(np.diff(group) >= 0), "tgmm: the visits of a group are consecutive"
        else:
            first = flags & metadata.FIRST
            assert sorted(tile[first > 0].tolist()) == list(range(tiles_m)), "each tile has one first visit"


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,kw,match", [
    (((64, 128), (4, 128, 64), (4,)), dict(), None),
    (((64, 128), (4, 128, 64), (4,)), dict(tiling=(512, 512, 1024)), None),  # clipped to the shapes
    (((64, 128, 1), (4, 128, 64), (4,)), dict(), r"lhs \[m, k\].*\(64, 128, 1\)"),
    (((64, 128), (4, 96, 64), (4,)), dict(), r"contraction sizes differ.*k=128.*96"),
    (((64, 128), (4, 128, 64), (3,)), dict(), r"4 local groups with group_sizes of length 3"),
    (((64, 128), (4, 128, 64), (4,)), dict(group_offset=1), r"group_offset=1.*allowed 0..0"),
    (((64, 128), (4, 128, 64), (4,)), dict(tiling=(20, 128, 64)), r"tm=20.*multiple of 8"),
    (((64, 128), (4, 128, 64), (4,)), dict(tiling=(64, 96, 64)), r"tk=96 with that dimension 128.*multiple of 128"),
    (((64, 128), (4, 128, 64), (4,)), dict(platform="cuda"), r"platform='cuda'; allowed"),
    (((64, 128), (4, 128, 64), (4,)), dict(platform="gpu", tiling=(32, 48, 64)), r"powers of two"),
])
def test_bad_shapes_and_tiles_name_the_problem(args, kw, match):
    lhs, rhs, gs = jnp.zeros(args[0]), jnp.zeros(args[1]), jnp.zeros(args[2], jnp.int32)
    kw = dict(platform="tpu", interpret=True) | kw
    if match is None:
        assert pallas_kernels.gmm(lhs, rhs, gs, **kw).shape == (64, 64)
        return
    with pytest.raises(ValueError, match=match):
        pallas_kernels.gmm(lhs, rhs, gs, **kw)


def test_bad_dtypes_and_group_sizes():
    lhs, rhs = jnp.zeros((64, 128), jnp.float32), jnp.zeros((4, 128, 64), jnp.float32)
    gs = jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match=r"lhs float32 and rhs bfloat16 must have one dtype"):
        pallas_kernels.gmm(lhs, rhs.astype(jnp.bfloat16), gs)
    with pytest.raises(ValueError, match=r"float16 .*must have one dtype among float32, bfloat16"):
        pallas_kernels.gmm(lhs.astype(jnp.float16), rhs.astype(jnp.float16), gs)
    with pytest.raises(ValueError, match=r"group_sizes must be a 1-D int32 array; got float32\[4\]"):
        pallas_kernels.gmm(lhs, rhs, gs.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"tgmm: expected lhs \[m, k\] and grad \[m, n\] with one m"):
        pallas_kernels.tgmm(lhs, jnp.zeros((32, 64), jnp.float32), gs)
    with pytest.raises(ValueError, match=r"tiling=\(2048, 2048, 4096\) needs .* MiB of VMEM .* at most 48 MiB"):
        pallas_kernels.gmm(jnp.zeros((2048, 2048)), jnp.zeros((2, 2048, 4096)), gs[:2], tiling=(2048, 2048, 4096),
                           platform="tpu")


# --- GPU: Triton lowering everywhere, runs on a GPU --------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_kernels_lower_to_triton_for_cuda(dtype):
    """Forward and both gradients (gmm transposed, tgmm) lower to Triton custom calls for CUDA, on a machine
    without a GPU: the target GPU is named by an abstract mesh (jax >= 0.12 asks for one; an H100 here)."""
    m, k, n, sizes = 512, 256, 384, [100, 0, 300, 50]
    gs = jnp.asarray(sizes, jnp.int32)
    f = jax.jit(jax.value_and_grad(lambda x, w: pallas_kernels.gmm(x, w, gs, platform="gpu")
                                   .astype(jnp.float32).sum(), (0, 1)))
    args = (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((4, k, n), dtype))
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3


@pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()), reason="no GPU on this machine")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_kernels_run_on_the_gpu(dtype):
    m, k, n, sizes = 1000, 512, 768, [300, 0, 17, 600, 40]
    lhs, rhs, ct = arrays(m, k, n, len(sizes), dtype=dtype)
    gs = jnp.asarray(sizes, jnp.int32)
    tol = F32 if dtype == jnp.float32 else BF16
    with jax.default_matmul_precision("highest"):
        out = pallas_kernels.gmm(lhs, rhs, gs, preferred_element_type=jnp.float32)
        np.testing.assert_allclose(out, loop_gmm(lhs, rhs, sizes), **tol)
        got = jax.grad(lambda w: jnp.sum(pallas_kernels.gmm(lhs, w, gs).astype(jnp.float32) * ct))(rhs)
        want = loop_tgmm(lhs.astype(jnp.float32), ct, sizes)
        np.testing.assert_allclose(got.astype(jnp.float32), want, **tol)


# --- TPU: Mosaic compiled ahead of time -------------------------------------------------------------

# (name, tokens x top-k rows per expert shard, k, n, experts, expert-parallel devices): the two expert
# matmuls (w_in [E, d, 2f], w_down [E, f, d]) of DeepSeekMoE-16B (d 2048, f 1408, 64 experts, top-6; 16K
# tokens, experts split over the 4 devices) and Mixtral-8x7B (d 4096, f 14336, 8 experts, top-2; 16K tokens).
AOT_SHAPES = [  # name, m, k, n, E, D, weight dtype (float32: as training keeps them, cast in the kernel)
    ("deepseekmoe16b_w_gate", 16384 * 6 // 4, 2048, 1408, 64, 4, jnp.float32),
    ("deepseekmoe16b_w_down", 16384 * 6 // 4, 1408, 2048, 64, 4, jnp.float32),
    ("mixtral_w_in", 16384 * 2, 4096, 2 * 14336, 8, 1, jnp.bfloat16),
    ("mixtral_w_down", 16384 * 2, 14336, 4096, 8, 1, jnp.bfloat16),
]


def declared_flops(m, k, n, n_local, dtype=jnp.bfloat16, w_dtype=None):
    """FLOPs the three kernels of a gmm's forward + backward declare at their default tiles: gmm
    (m, k, n), its input gradient gmm (m, n, k) and its weight gradient tgmm (m, k, n)."""
    from pallas_kernels import gmm_tpu

    def one(op, k_, n_, cost):
        rhs, out = (w_dtype, None) if op == "gmm" else (None, w_dtype)  # tgmm writes the weights' dtype
        return cost(m, k_, n_, n_local, pallas_kernels.default_tiling("tpu", m, k_, n_, dtype, op, out, rhs),
                    2, 2).flops
    return (one("gmm", k, n, gmm_tpu.gmm_cost) + one("gmm", n, k, gmm_tpu.gmm_cost)
            + one("tgmm", k, n, gmm_tpu.tgmm_cost))


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (the test extra)")
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def test_mosaic_kernels_compile_for_tpu_topologies(topology):
    """Forward + both gradients inside shard_map over 4 chips, bf16 rows, at the expert shapes and weight
    dtypes above (each device multiplies its E / D experts: group_offset = axis_index * E / D). Mosaic fails
    to compile a kernel that overflows VMEM; cost_analysis counts the FLOPs the kernels declare (a bit
    over 3 matmuls of 2 m k n: the extra rows at group boundaries)."""
    from moejax import aot

    devices = aot.topology_devices(topology)
    assert len(devices) == 4
    mesh = jax.sharding.Mesh(np.array(devices), ("expert",))
    for name, m, k, n, E, D, w_dtype in AOT_SHAPES:
        def step(x, w, gs):
            offset = jax.lax.axis_index("expert") * (E // D) if D > 1 else 0
            f = lambda x, w: pallas_kernels.gmm(x, w, gs, group_offset=offset).astype(jnp.float32).sum()
            return jax.value_and_grad(f, (0, 1))(x, w)

        w_spec = P("expert") if D > 1 else P()
        run = jax.shard_map(step, mesh=mesh, in_specs=(P(), w_spec, P()), out_specs=(P(), (P(), w_spec)),
                            check_vma=False)
        args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((E, k, n), w_dtype),
                jax.ShapeDtypeStruct((E,), jnp.int32))
        with jax.default_matmul_precision("default"):
            compiled = jax.jit(run).trace(*args).lower().compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        assert cost["flops"] == pytest.approx(declared_flops(m, k, n, E // D, w_dtype=w_dtype), rel=0.01), name
        assert 1.0 < cost["flops"] / (3 * 2 * m * k * n) < 1.25, name  # extra rows at group boundaries
    # the fused SwiGLU FFN at DeepSeekMoE-16B's expert shape (its kernels with fusions must fit VMEM too)
    m, d, f, E, D = 16384 * 6 // 4, 2048, 1408, 64, 4

    def ffn_step(x, wg, wu, wd, gs):
        offset = jax.lax.axis_index("expert") * (E // D)
        loss = lambda *a: pallas_kernels.swiglu_ffn(*a, gs, group_offset=offset).astype(jnp.float32).sum()
        return jax.value_and_grad(loss, (0, 1, 2, 3))(x, wg, wu, wd)

    run = jax.shard_map(ffn_step, mesh=mesh, in_specs=(P(),) + (P("expert"),) * 3 + (P(),),
                        out_specs=(P(), (P(),) + (P("expert"),) * 3), check_vma=False)
    w = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    with jax.default_matmul_precision("default"):
        compiled = jax.jit(run).trace(jax.ShapeDtypeStruct((m, d), jnp.bfloat16), w(E, d, f), w(E, d, f),
                                      w(E, f, d), jax.ShapeDtypeStruct((E,), jnp.int32)).lower().compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert 1.0 < cost["flops"] / (9 * 2 * m * d * f) < 1.25  # nine kernels, extra rows at group boundaries
