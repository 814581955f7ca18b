"""Grouped matrix multiplication for Mixture-of-Experts layers (MegaBlocks, Gale et al. 2023, section 5).

Rows [m, k] sorted by group (expert); group i owns `group_sizes[i]` consecutive rows, and each group's
rows are multiplied by that group's weights:

    gmm(lhs [m, k], rhs [G, k, n], group_sizes [G]) -> [m, n]     out[r] = lhs[r] @ rhs[group of r]
    tgmm(lhs [m, k], grad [m, n], group_sizes [G]) -> [G, k, n]   out[i] = lhs[rows of i]^T @ grad[rows of i]

tgmm is gmm's weight gradient; both carry a custom VJP built from the pair, so any order of derivative
works. `swiglu_ffn(rows, w_gate, w_up, w_down, group_sizes)` is the grouped SwiGLU FFN on fused kernels
(`activation.Fuse`): the down projection and its weight gradient multiply silu(gate) * up computed in VMEM
(when their tiles keep the whole f; else XLA computes it), the down projection's input gradient comes out as
(d gate, d up), and the second input-gradient matmul adds the first; first derivatives only. By the v5p
estimate the DeepSeekMoE-16B-like layer's grouped FFN went 8.48 -> 7.87 ms (experiments/benchmarks/README.md).
Options:
- transpose_rhs: rhs is [G, n, k] and out[r] = lhs[r] @ rhs[i]^T (gmm's input gradient uses it).
- group_offset (static or traced int): rhs holds only the G_local = rhs.shape[0] groups
  [group_offset, group_offset + G_local) of the G in group_sizes (an expert-parallel shard's experts). A
  static offset out of 0..G - G_local is an error; a traced one is clipped into that range.
- Rows of other groups and rows past sum(group_sizes) come out as zeros (gmm), and are ignored (tgmm);
  groups are clipped at row m, so sizes summing to more than m simply end there.
- float32 or bfloat16 inputs (lhs and rhs alike), float32 accumulation; the output has
  preferred_element_type (default: lhs's dtype). gmm also takes bfloat16 lhs with float32 rhs (weights kept
  in float32, as training keeps them): the TPU kernel reads the float32 blocks and casts them to bfloat16 in
  VMEM, so no bfloat16 copy of the weights is written to HBM and read back, and the weight gradient (tgmm)
  comes out in float32 directly; the GPU kernel casts rhs first. The values are those of casting rhs to
  bfloat16 first.

Implementations, by `platform` (default: `default_platform()`, from the devices of the current mesh, so
that ahead-of-time compilation for a TPU topology from a CPU host picks the TPU kernel):
- 'tpu': Mosaic kernels, pallas_kernels/gmm_tpu.py;  'gpu': Pallas Triton kernels, pallas_kernels/gmm_gpu.py;
- 'interpret' (CPU): the TPU kernels interpreted, by Pallas' discharge interpreter (`interpret=True`), inside
  jax.shard_map in the TPU interpret mode (`pltpu.InterpretParams()`); slow, for tests and small runs.
`interpret=` (True or a pltpu.InterpretParams) runs the chosen kernels interpreted.

Tiles (tm, tk, tn) default to `default_tiling(platform, m, k, n, dtype, op)`, per operation (op 'gmm' or
'tgmm', the backward kernels included):
- TPU: tm = min(m, 128) (a row tile holding a group boundary is visited once per group; gmm multiplies the
  halves of it that hold the group's rows, (G - 1) tm / 2 extra rows, 8% at the DeepSeekMoE-16B shape;
  tgmm, whose rows are the contraction, the whole tile, (G - 1) tm, 16%; 66% with tm 512); tk = k, the
  whole contraction, when the blocks fit DEFAULT_VMEM (32 MiB), so that a group's weight block is fetched
  once per n tile and no k tile is partial (else tk = 2048, 1024, ... and only the last k tile is masked);
  then the widest n tiles of equal size (multiples of 128) that fit. Blocks are double-buffered in VMEM: 2 (tm tk + tk tn) input
  bytes + 2 output blocks + a float32 accumulator ([tm, tn] gmm, [tk, tn] tgmm). Examples (bfloat16):

  | shape (m, k, n)                          | op   | tiles (tm, tk, tn) |
  |------------------------------------------|------|--------------------|
  | [d, 2f] of DeepSeekMoE-16B (49152, 2048, 2816) | gmm | (128, 2048, 2816) |
  | the same                                 | tgmm | (128, 2048, 1408)  |
  | [d, 2f] of Mixtral (16384, 4096, 28672)  | gmm  | (128, 4096, 1792)  |
  | Mixtral w_down (16384, 14336, 4096)      | gmm  | (128, 14336, 384)  |

- GPU: tm = tn = 128, tk = 64 (32 for float32), 4 warps, 3 pipeline stages (not tuned on a GPU yet).
`tiling=` overrides: a (tm, tk, tn) for the forward kernel (backward kernels keep their defaults), or a
callable (op, m, k, n) -> (tm, tk, tn) for every kernel. On TPU a tiling is clipped to the shapes (a tile
larger than its dimension covers it whole). Each Mosaic kernel declares (pl.CostEstimate) the FLOPs and
bytes its tiling moves (gmm_tpu.gmm_cost, tgmm_cost; tests/test_gmm.py counts them from the index maps),
so the XLA:TPU cost model prices the kernels honestly.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import gmm_gpu, gmm_tpu
from pallas_kernels.activation import NO_FUSE, Fuse, swiglu, swiglu_grad
from pallas_kernels.metadata import cdiv, group_metadata, vary_alike

DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
PLATFORMS = ("tpu", "gpu", "interpret")
VMEM_BUDGET = 48 * 2**20  # bytes of VMEM a kernel may ask for (v7x has 64 MiB per core; older chips more)
DEFAULT_VMEM = 32 * 2**20  # what the default tiles may take of it
TPU_TM = 128  # default row tile: a boundary tile is visited once per group it holds (see the docstring)


@dataclasses.dataclass(frozen=True)
class _Options:
    transpose_rhs: bool
    n_local: int  # G_local: groups whose weights rhs holds (tgmm: groups of the output)
    out_dtype: Any
    tiling: Any  # (tm, tk, tn), a callable (op, m, k, n) -> tiles, or None (default_tiling)
    platform: str | None
    interpret: Any


def default_tiling(platform: str, m: int, k: int, n: int, dtype, op: str = "gmm",
                   out_dtype=None, rhs_dtype=None, fuse: Fuse = NO_FUSE) -> tuple[int, int, int]:
    """(tm, tk, tn) by the rule in the module docstring, for op 'gmm' or 'tgmm' of shapes (m, k, n); dtype:
    lhs's (and the other input's unless rhs_dtype says otherwise); fuse: the kernel's fusions (their blocks
    count in VMEM)."""
    if platform == "gpu":
        return 128, 32 if jnp.dtype(dtype) == jnp.float32 else 64, 128
    in_bytes = jnp.dtype(dtype).itemsize
    out_bytes = jnp.dtype(out_dtype or dtype).itemsize
    rhs_bytes = jnp.dtype(rhs_dtype or dtype).itemsize
    tm = min(m, TPU_TM)
    for tk in [k] + [t for t in (2048, 1024, 512, 256, 128) if t < k]:  # whole k first: no re-fetch, no mask
        for split in range(1, cdiv(n, 128) + 1):  # then the widest n tiles of equal size (multiples of 128)
            tn = n if split == 1 else min(n, cdiv(cdiv(n, split), 128) * 128)
            if _vmem_bytes((tm, tk, tn), in_bytes, out_bytes, op == "tgmm", rhs_bytes, fuse) <= DEFAULT_VMEM:
                return tm, tk, tn
    return tm, min(k, 128), min(n, 128)


def _vmem_bytes(tiling, in_bytes, out_bytes, tgmm: bool, rhs_bytes=None, fuse: Fuse = NO_FUSE) -> int:
    """Double-buffered input and output blocks and the float32 accumulator; rhs_bytes: the second input's
    item size when it differs (gmm's float32 rhs under bfloat16 lhs); fuse: a second lhs block and its
    float32 activation (swiglu_in), [tm, tn] inputs (base, or gate and up) and a second output."""
    tm, tk, tn = tiling
    acc = tk * tn if tgmm else tm * tn
    out = (tk * tn if tgmm else tm * tn) * fuse.n_out
    second = (rhs_bytes or in_bytes) * (tm * tn if tgmm else tk * tn)
    extra = in_bytes * tm * tn * fuse.n_extra
    act = 4 * tm * tk if fuse.swiglu_in else 0
    return 2 * (in_bytes * tm * tk * fuse.n_lhs + second + extra + out_bytes * out) + 4 * acc + act


def _check_tiling(name, platform, tiling, dims, dtype, out_dtype, tgmm, rhs_dtype=None, fuse: Fuse = NO_FUSE):
    """Mosaic blocks: each tile a multiple of the TPU tile (8 or 16 rows, 128 lanes) or the whole
    dimension, and the blocks fit VMEM_BUDGET. Triton blocks: powers of two, at least 16."""
    if len(tiling) != 3 or not all(isinstance(t, int) and t > 0 for t in tiling):
        raise ValueError(f"{name}: tiling={tiling!r} must be three positive ints (tm, tk, tn)")
    if platform == "gpu":
        if not all(t >= 16 and t & (t - 1) == 0 for t in tiling):
            raise ValueError(f"{name}: tiling={tiling} for the GPU kernel must be powers of two >= 16")
        return
    sub = 16 if jnp.dtype(dtype) == jnp.bfloat16 else 8
    for t, d, align, what in zip(tiling, dims, (sub, 128, 128), ("tm", "tk", "tn")):
        if t < d and t % align:
            raise ValueError(f"{name}: {what}={t} with that dimension {d}: a TPU tile must be a multiple of "
                             f"{align}, or cover the whole dimension (tiling={tiling})")
    need = _vmem_bytes(tiling, jnp.dtype(dtype).itemsize, jnp.dtype(out_dtype).itemsize, tgmm,
                       jnp.dtype(rhs_dtype or dtype).itemsize, fuse)
    if need > VMEM_BUDGET:
        raise ValueError(f"{name}: tiling={tiling} needs {need / 2**20:.1f} MiB of VMEM for shapes (m, k, n)="
                         f"{dims}; at most {VMEM_BUDGET // 2**20} MiB is allowed: use smaller tiles")


def _check(name, lhs, rhs, group_sizes, group_offset, rhs_k_axis):
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"{name}: expected lhs [m, k] and rhs [G, k, n] (or [G, n, k] with transpose_rhs); "
                         f"got lhs {lhs.shape}, rhs {rhs.shape}")
    if not ((lhs.dtype == rhs.dtype and jnp.dtype(lhs.dtype) in DTYPES) or _mixed(lhs.dtype, rhs.dtype)):
        raise ValueError(f"{name}: lhs {lhs.dtype} and rhs {rhs.dtype} must have one dtype among float32, "
                         f"bfloat16, or be bfloat16 lhs with float32 rhs (cast first)")
    if lhs.shape[1] != rhs.shape[rhs_k_axis]:
        raise ValueError(f"{name}: contraction sizes differ: lhs {lhs.shape} has k={lhs.shape[1]}, rhs "
                         f"{rhs.shape} has {rhs.shape[rhs_k_axis]} on axis {rhs_k_axis}")
    _check_groups(name, group_sizes, group_offset, rhs.shape[0], lhs.shape[0])


def _mixed(lhs_dtype, rhs_dtype) -> bool:
    """bfloat16 lhs with float32 rhs: rhs blocks are cast to bfloat16 in the kernel."""
    return jnp.dtype(lhs_dtype) == jnp.bfloat16 and jnp.dtype(rhs_dtype) == jnp.float32


def _check_groups(name, group_sizes, group_offset, n_local, m):
    if group_sizes.ndim != 1 or group_sizes.dtype != jnp.int32:
        raise ValueError(f"{name}: group_sizes must be a 1-D int32 array; got {group_sizes.dtype}"
                         f"{list(group_sizes.shape)}")
    G = group_sizes.shape[0]
    if n_local < 1 or n_local > G:
        raise ValueError(f"{name}: {n_local} local groups with group_sizes of length {G}: need 1 <= G_local <= G")
    if isinstance(group_offset, int) and not 0 <= group_offset <= G - n_local:
        raise ValueError(f"{name}: group_offset={group_offset} with {n_local} local groups of {G}: "
                         f"allowed 0..{G - n_local}")
    if m < 1:
        raise ValueError(f"{name}: lhs has m={m} rows; need at least 1")


def _resolve(platform):
    if platform not in (None,) + PLATFORMS:
        raise ValueError(f"platform={platform!r}; allowed: None (default_platform()), {PLATFORMS}")
    return platform


def _vmem_limit(need: int) -> int:
    return min(VMEM_BUDGET, max(32 * 2**20, 2 * need))


def default_platform() -> str:
    """'tpu' or 'gpu' by the devices of the current mesh (jax.set_mesh or inside jax.shard_map; ahead of
    time for a TPU topology these are its TPU devices), else by jax.default_backend(); 'interpret' on CPU."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
    name = device.platform if device is not None else jax.default_backend()
    return {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(name, "interpret")


def _default_interpret():
    """How 'interpret' runs the TPU kernels: Pallas' discharge interpreter (interpret=True: the kernel becomes
    a loop of plain XLA ops; a layer's forward + backward at T 16 traced, compiled and ran in 2.2 s) except
    inside jax.shard_map, where that interpreter does not run and the TPU interpret mode does
    (pltpu.InterpretParams(), which simulates each grid step through host callbacks: 5.0 s for that layer)."""
    return pltpu.InterpretParams() if jax.sharding.get_abstract_mesh().manual_axes else True


def _setup(o: _Options, platform: str, name: str, dims, dtype, tgmm: bool, rhs_dtype, fuse: Fuse = NO_FUSE):
    """(kernel platform, interpret, tiling) for one call, the tiling checked."""
    kernel_platform = "tpu" if platform == "interpret" else platform
    interpret = o.interpret or (_default_interpret() if platform == "interpret" else False)
    op = "tgmm" if tgmm else "gmm"
    if kernel_platform == "gpu":
        rhs_dtype, fuse = dtype, NO_FUSE  # the GPU kernel gets rhs cast to lhs's dtype, and no fusions
    if o.tiling is None:
        tiling = default_tiling(kernel_platform, *dims, dtype, op, o.out_dtype, rhs_dtype, fuse)
    else:
        asked = tuple(o.tiling(op, *dims)) if callable(o.tiling) else o.tiling
        _check_tiling(name, kernel_platform, asked, dims, dtype, o.out_dtype, tgmm, rhs_dtype, fuse)
        tiling = asked if kernel_platform == "gpu" else tuple(min(t, d) for t, d in zip(asked, dims))
    _check_tiling(name, kernel_platform, tiling, dims, dtype, o.out_dtype, tgmm, rhs_dtype, fuse)
    return kernel_platform, interpret, tiling


def _impl(o: _Options, tgmm: bool, x, y, group_sizes, group_offset, fuse: Fuse = NO_FUSE, extra=()):
    """gmm(lhs=x, rhs=y) or tgmm(lhs=x, grad=y) with the kernels of o.platform (default_platform()), with the
    fusions `fuse` (x: the pair (gate, up) under fuse.swiglu_in; extra: base, or (gate, up)). The Mosaic
    kernels fuse them; around the Triton kernels they are computed by XLA."""
    x0 = x[0] if fuse.swiglu_in else x
    n = y.shape[1] if tgmm or o.transpose_rhs else y.shape[2]
    dims = (x0.shape[0], x0.shape[1], n)  # (m, k, n)
    kp, interpret, tiling = _setup(o, o.platform or default_platform(), "tgmm" if tgmm else "gmm", dims, x0.dtype,
                                   tgmm, y.dtype, fuse)
    meta = group_metadata(group_sizes, dims[0], tiling[0], o.n_local, group_offset, visit_empty_groups=tgmm)
    if kp == "gpu":
        kw = dict(num_warps=4, num_stages=3, interpret=interpret)
        if fuse.swiglu_in:
            x = swiglu(*x).astype(x0.dtype)
        if tgmm:
            return gmm_gpu.tgmm(x, y, meta, tiling, n_local=o.n_local, out_dtype=o.out_dtype, **kw)
        out_dtype = jnp.float32 if fuse.base or fuse.swiglu_grad else o.out_dtype
        out = gmm_gpu.gmm(x, y.astype(x0.dtype), meta, tiling, transpose_rhs=o.transpose_rhs, out_dtype=out_dtype,
                          **kw)
        if fuse.swiglu_grad:
            return tuple(v.astype(o.out_dtype) for v in swiglu_grad(out, *extra))
        return (out + extra[0].astype(jnp.float32)).astype(o.out_dtype) if fuse.base else out
    need = _vmem_bytes(tiling, x0.dtype.itemsize, jnp.dtype(o.out_dtype).itemsize, tgmm, y.dtype.itemsize, fuse)
    kw = dict(vmem_limit=_vmem_limit(need), interpret=interpret)
    if tgmm:
        return gmm_tpu.tgmm(x, y, meta, tiling, n_local=o.n_local, out_dtype=o.out_dtype, swiglu_in=fuse.swiglu_in,
                            **kw)
    return gmm_tpu.gmm(x, y, meta, tiling, transpose_rhs=o.transpose_rhs, out_dtype=o.out_dtype, fuse=fuse,
                       extra=extra, **kw)


def _no_grad(x):
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _grouped(o: _Options, tgmm: bool, x, y, group_sizes, group_offset):
    return _impl(o, tgmm, x, y, group_sizes, group_offset)


def _grouped_fwd(o, tgmm, x, y, group_sizes, group_offset):
    return _grouped(o, tgmm, x, y, group_sizes, group_offset), (x, y, group_sizes, group_offset)


def _grouped_bwd(o, tgmm, res, dout):
    """gmm, out_r = x_r y_g (y_g^T if transposed): d x = gmm(dout, y) transposed the other way,
    d y = tgmm(x, dout) (tgmm(dout, x) if transposed). tgmm, out_g = x_g^T y_g: d x = gmm(y, dout^T),
    d y = gmm(x, dout). Backward kernels use the default tiles for their shapes, or a callable tiling's."""
    x, y, group_sizes, group_offset = res
    back = o if callable(o.tiling) else dataclasses.replace(o, tiling=None)
    dout = dout.astype(x.dtype)
    ops = lambda transpose, out_dtype: dataclasses.replace(back, transpose_rhs=transpose, out_dtype=out_dtype)
    if tgmm:
        dx = _grouped(ops(True, x.dtype), False, y.astype(x.dtype), dout, group_sizes, group_offset)
        dy = _grouped(ops(False, y.dtype), False, x, dout, group_sizes, group_offset)
    else:
        dx = _grouped(ops(not o.transpose_rhs, x.dtype), False, dout, y, group_sizes, group_offset)
        a, b = (dout, x) if o.transpose_rhs else (x, dout)
        dy = _grouped(ops(False, y.dtype), True, a, b, group_sizes, group_offset)
    return dx, dy, _no_grad(group_sizes), _no_grad(group_offset)


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False,
        group_offset: int | jax.Array = 0, preferred_element_type=None, tiling: Any = None,
        platform: str | None = None, interpret: Any = False) -> jax.Array:
    """Grouped matmul lhs [m, k] x rhs [G_local, k, n] (or [G_local, n, k], transpose_rhs) -> [m, n].

    group_sizes: [G] int32, G >= G_local; rows of group i are consecutive, in group order. See the module
    docstring for group_offset, zero rows, dtypes, platform, interpret and tiling.
    """
    _check("gmm", lhs, rhs, group_sizes, group_offset, 2 if transpose_rhs else 1)
    o = _Options(transpose_rhs, rhs.shape[0], jnp.dtype(preferred_element_type or lhs.dtype), tiling,
                 _resolve(platform), interpret)
    return _grouped(o, False, *vary_alike(lhs, rhs, group_sizes, jnp.asarray(group_offset, jnp.int32)))


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, num_groups: int | None = None,
         group_offset: int | jax.Array = 0, preferred_element_type=None, tiling: Any = None,
         platform: str | None = None, interpret: Any = False) -> jax.Array:
    """Per-group lhs_i^T grad_i: lhs [m, k], grad [m, n] -> [G_local, k, n] (G_local = num_groups, default
    G = len(group_sizes)); gmm's weight gradient. An empty group's block is zero."""
    n_local = group_sizes.shape[0] if num_groups is None else num_groups
    if lhs.ndim != 2 or grad.ndim != 2 or lhs.shape[0] != grad.shape[0]:
        raise ValueError(f"tgmm: expected lhs [m, k] and grad [m, n] with one m; got {lhs.shape}, {grad.shape}")
    if lhs.dtype != grad.dtype or jnp.dtype(lhs.dtype) not in DTYPES:
        raise ValueError(f"tgmm: lhs {lhs.dtype} and grad {grad.dtype} must have one dtype among float32, bfloat16")
    _check_groups("tgmm", group_sizes, group_offset, n_local, lhs.shape[0])
    o = _Options(False, n_local, jnp.dtype(preferred_element_type or lhs.dtype), tiling, _resolve(platform),
                 interpret)
    return _grouped(o, True, *vary_alike(lhs, grad, group_sizes, jnp.asarray(group_offset, jnp.int32)))


def swiglu_ffn(rows: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, group_sizes: jax.Array, *,
               group_offset: int | jax.Array = 0, tiling: Any = None, platform: str | None = None,
               interpret: Any = False) -> jax.Array:
    """Grouped SwiGLU FFN (Shazeer 2020): out[r] = (silu(x_r W_gate[i]) * (x_r W_up[i])) W_down[i] for the
    rows r of group i, with fused kernels (`activation.Fuse`): the down projection multiplies silu(gate) * up
    from the gate and up blocks (the hidden activations are never written), its input gradient returns
    (d gate, d up) directly, and the two input-gradient matmuls of rows sum in one kernel's output. Against
    gmm + XLA's activation this drops the activation's passes over the [m, f] arrays (forward and backward)
    and the sum of two [m, d] outputs.
    rows [m, d]; w_gate, w_up [G_local, d, f]; w_down [G_local, f, d]; dtypes, groups and options as in `gmm`
    (a tiling tuple applies to the three forward kernels). Differentiable once: a custom VJP, three kernels
    forward and six backward."""
    G_local, d, f = w_gate.shape
    for name, w, shape, d_axis in (("w_gate", w_gate, (G_local, d, f), 1), ("w_up", w_up, (G_local, d, f), 1),
                                   ("w_down", w_down, (G_local, f, d), 2)):
        _check("swiglu_ffn", rows, w, group_sizes, group_offset, d_axis)
        if w.shape != shape:
            raise ValueError(f"swiglu_ffn: {name} has shape {w.shape}; expected {shape} (from w_gate {w_gate.shape})")
    o = _Options(False, G_local, jnp.dtype(rows.dtype), tiling, _resolve(platform), interpret)
    return _swiglu(o, *vary_alike(rows, w_gate, w_up, w_down, group_sizes, jnp.asarray(group_offset, jnp.int32)))


SWIGLU_IN, BASE, SWIGLU_GRAD = Fuse(swiglu_in=True), Fuse(base=True), Fuse(swiglu_grad=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _swiglu(o: _Options, x, w_gate, w_up, w_down, group_sizes, group_offset):
    return _swiglu_fwd(o, x, w_gate, w_up, w_down, group_sizes, group_offset)[0]


def _down_fused(o: _Options, gate, w_down) -> bool:
    """Whether the down projection takes silu(gate) * up in its kernels: when its fused tiles keep the whole
    contraction (tk = f). Otherwise the lhs blocks would be re-fetched, now twice (gate and up), at every k step
    (Mixtral's f 14336: 57.9 -> 62.6 ms by the v5p estimate), so XLA computes h and the kernels read it."""
    m, f = gate.shape
    platform = o.platform or default_platform()
    if platform == "gpu":
        return False
    return _setup(o, platform, "gmm", (m, f, w_down.shape[2]), gate.dtype, False, w_down.dtype, SWIGLU_IN)[2][1] >= f


def _swiglu_fwd(o, x, w_gate, w_up, w_down, group_sizes, group_offset):
    gate = _impl(o, False, x, w_gate, group_sizes, group_offset)  # [m, f]
    up = _impl(o, False, x, w_up, group_sizes, group_offset)
    if _down_fused(o, gate, w_down):
        h, y = None, _impl(o, False, (gate, up), w_down, group_sizes, group_offset, SWIGLU_IN)  # [m, d]
    else:
        h = swiglu(gate, up).astype(x.dtype)
        y = _impl(o, False, h, w_down, group_sizes, group_offset)
    return y, (x, w_gate, w_up, w_down, gate, up, h, group_sizes, group_offset)


def _swiglu_bwd(o, res, dy):
    """dh = dy W_down^T turned into (d gate, d up) in the same kernel; d W_down = tgmm(silu(gate) * up, dy);
    dx = d gate W_gate^T + d up W_up^T (the second matmul adds the first); d W_gate, d W_up by tgmm."""
    x, w_gate, w_up, w_down, gate, up, h, gs, off = res
    back = o if callable(o.tiling) else dataclasses.replace(o, tiling=None)
    op = lambda transpose, out_dtype: dataclasses.replace(back, transpose_rhs=transpose, out_dtype=out_dtype)
    dy = dy.astype(x.dtype)
    d_gate, d_up = _impl(op(True, x.dtype), False, dy, w_down, gs, off, SWIGLU_GRAD, (gate, up))  # [m, f] each
    if h is None:
        dw_down = _impl(op(False, w_down.dtype), True, (gate, up), dy, gs, off, SWIGLU_IN)
    else:
        dw_down = _impl(op(False, w_down.dtype), True, h, dy, gs, off)
    dx_gate = _impl(op(True, x.dtype), False, d_gate, w_gate, gs, off)
    dx = _impl(op(True, x.dtype), False, d_up, w_up, gs, off, BASE, (dx_gate,))
    dw_gate = _impl(op(False, w_gate.dtype), True, x, d_gate, gs, off)
    dw_up = _impl(op(False, w_up.dtype), True, x, d_up, gs, off)
    return dx, dw_gate, dw_up, dw_down, _no_grad(gs), _no_grad(off)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
