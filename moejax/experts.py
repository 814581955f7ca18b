"""Expert feed-forward networks: dense FFNs and grouped (per-expert) FFNs over a dispatch buffer.

Activations: 'swiglu' (Shazeer 2020: silu(x W_gate) * (x W_up) W_down, the default) and 'gelu'
(gelu(x W_up) W_down). Expert weights: w_gate (swiglu only) and w_up [E, d, f], w_down [E, f, d]; dense FFN
weights are the same without the leading E axis. Except on the Pallas backend, W_gate and W_up are multiplied
as one [d, 2 f] matrix (one wide matmul beat two narrow ones on CPU); the Pallas kernels take them one by one
(no concatenated copy of the weights in HBM), and take float32 weights under bfloat16 rows as they are unless
fsdp splits them (`_pallas_weight`).

Grouped-matmul backends (`BACKENDS`) compute rows [M, d] x w[expert of row] for a dispatch `Layout`:
- 'einsum':     per-expert batched einsum over an [E, C, d] buffer; needs a per-expert layout
                (capacity or expert-choice dispatch). Dropless, moejax.moe runs it on the capacity part of
                a `dispatch.dropless_capacity_plan` and the overflow in `overflow_ffn` (the CPU default).
- 'blocked':    MegaBlocks-style: rows in blocks of `layout.block`, each block multiplied by its
                expert's weights (gathered per block); works for every layout.
- 'ragged_dot': jax.lax.ragged_dot over rows sorted by expert; works for every layout. Its CPU (and
                default GPU) lowering multiplies every row by every expert, so it is slow there.
- 'pallas':     moejax's Pallas grouped matmul (pallas_kernels.gmm, MegaBlocks-style, with its tgmm
                weight gradient) over rows sorted by expert; works for every layout and skips the zero
                rows past sum(group_sizes) (an expert-parallel receive buffer's padding). Mosaic on TPU,
                Triton on GPU, chosen by the mesh devices' platform; interpreted on CPU (slow: tests only).
                The SwiGLU FFN runs as pallas_kernels.swiglu_ffn: the activation and its gradient inside
                the kernels (TPU), so the hidden activations and their gradient never reach HBM.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

import pallas_kernels
from moejax import sharding
from moejax.dispatch import Layout, Overflow

ACTIVATIONS = ("swiglu", "gelu")

GroupedMatmul = Callable[[jax.Array, jax.Array, Layout], jax.Array]
BACKENDS: dict[str, GroupedMatmul] = {}


def register_backend(name: str, fn: GroupedMatmul) -> None:
    """Register fn(rows [M, a], w [E, a, b], layout) -> [M, b] as an expert backend."""
    BACKENDS[name] = fn


def _einsum(rows, w, layout):
    if not layout.per_expert:
        raise ValueError("backend 'einsum' needs a per-expert (capacity) layout; use 'blocked' or 'ragged_dot'")
    E = w.shape[0]
    out = jnp.einsum("ecd,edf->ecf", rows.reshape(E, layout.block, -1), w.astype(rows.dtype))
    return out.reshape(rows.shape[0], -1)


def _blocked(rows, w, layout):
    G = layout.block_expert.shape[0]
    wb = w.astype(rows.dtype)[layout.block_expert]  # [G, a, b]
    out = jnp.einsum("gra,gab->grb", rows.reshape(G, layout.block, -1), wb)
    return out.reshape(rows.shape[0], -1)


def _ragged_dot(rows, w, layout):
    return jax.lax.ragged_dot(rows, w.astype(rows.dtype), layout.group_sizes)


def _pallas_weight(rows, w):
    """float32 weights under bfloat16 rows go to the kernels as they are (cast block by block in VMEM: no
    bfloat16 copy in HBM, float32 weight gradients), unless fsdp splits them: then they are cast first, so
    that their all-gather moves bfloat16 and the gathered copy kept for the backward pass is bfloat16."""
    if not (rows.dtype == jnp.bfloat16 and w.dtype == jnp.float32 and sharding.axis_size("fsdp") == 1):
        w = w.astype(rows.dtype)
    return w


def _pallas(rows, w, layout):
    return pallas_kernels.gmm(rows, _pallas_weight(rows, w), layout.group_sizes)


register_backend("einsum", _einsum)
register_backend("blocked", _blocked)
register_backend("ragged_dot", _ragged_dot)
register_backend("pallas", _pallas)


def default_backend(per_expert: bool, platform: str | None = None) -> str:
    """Fastest correct backend per platform: 'einsum' for per-expert (capacity) layouts everywhere;
    for dropless, 'pallas' on TPU (XLA:TPU's ragged_dot weight gradient compiles to 13.5x the useful
    FLOPs, the Pallas tgmm to ~1.16x), 'einsum' on CPU (the capacity part of a dropless buffer by batched
    einsum and the overflow by `overflow_ffn`: 0.68x and 0.74x the time of 'blocked', which computes
    every block of the worst-case padded buffer, at the moe_layer benchmark's shapes a and b) and 'blocked'
    on GPU (the Triton kernels have not been timed on a GPU yet); experiments/benchmarks/README.md."""
    if per_expert:
        return "einsum"
    platform = platform or jax.default_backend()
    return {"tpu": "pallas", "cpu": "einsum"}.get(platform, "blocked")


def n_in(activation: str) -> int:
    """Input projections per FFN: 2 (gate, up) for swiglu, 1 (up) for gelu."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}; allowed: {ACTIVATIONS}")
    return 2 if activation == "swiglu" else 1


def input_names(activation: str) -> tuple[str, ...]:
    """Names of the input projections' weights: ('w_gate', 'w_up') for swiglu, ('w_up',) for gelu."""
    return ("w_gate", "w_up")[2 - n_in(activation):]


def _act(proj: list[jax.Array], activation: str) -> jax.Array:
    """Input projections [..., f] (gate then up for swiglu; up for gelu) -> [..., f] hidden activations."""
    if activation == "swiglu":
        gate, up = proj
        return jax.nn.silu(gate) * up
    return jax.nn.gelu(proj[0])


def _w_in(params: dict, activation: str) -> jax.Array:
    """The input projections as one [..., d, n f] weight (gate then up)."""
    ws = [params[k] for k in input_names(activation)]
    return ws[0] if len(ws) == 1 else jnp.concatenate(ws, axis=-1)


def ffn(x: jax.Array, params: dict, activation: str = "swiglu") -> jax.Array:
    """Dense FFN. x: [..., d]; params w_gate (swiglu), w_up [d, f], w_down [f, d]."""
    h = x @ _w_in(params, activation).astype(x.dtype)  # [..., n f]
    return _act(jnp.split(h, n_in(activation), axis=-1), activation) @ params["w_down"].astype(x.dtype)


def grouped_ffn(
    rows: jax.Array, params: dict, layout: Layout, activation: str = "swiglu", backend: str = "einsum"
) -> jax.Array:
    """Per-expert FFN over a dispatch buffer. rows: [M, d] -> [M, d]; params w_gate (swiglu), w_up [E, d, f],
    w_down [E, f, d]. Empty (zero) padding rows map to zero, as neither activation has a bias."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {tuple(BACKENDS)}")
    mm = BACKENDS[backend]
    if backend == "pallas" and activation == "swiglu":  # fused kernels: the activation never reaches HBM
        w = [_pallas_weight(rows, params[k]) for k in ("w_gate", "w_up", "w_down")]
        return pallas_kernels.swiglu_ffn(rows, *w, layout.group_sizes)
    if backend == "pallas":  # one grouped matmul per input weight: no [E, d, 2 f] copy of the weights
        proj = [mm(rows, params[k], layout) for k in input_names(activation)]
    else:  # one wide matmul
        proj = jnp.split(mm(rows, _w_in(params, activation), layout), n_in(activation), axis=-1)
    return mm(_act(proj, activation), params["w_down"], layout)


def _expert(params: dict, e: jax.Array) -> dict:
    return {k: jax.lax.dynamic_index_in_dim(v, e, 0, keepdims=False) for k, v in params.items()}


def _overflow_block(x, gates, params, over: Overflow, i):
    """Block i of the overflow: (expert, tokens [b], picks [b], valid [b], gates [b], rows [b, d], weights)."""
    e, tok, k, valid = over.rows(i, x.shape[0])
    rows = jnp.where(valid[:, None], x[tok], 0)
    return e, tok, k, valid, jnp.where(valid, gates[tok, k], 0), rows, _expert(params, e)


def overflow_ffn(x: jax.Array, gates: jax.Array, params: dict, over: Overflow, activation: str) -> jax.Array:
    """sum over the overflow assignments (t, k) -> e of gates[t, k] * FFN_e(x[t]), as float32 [T, d].

    The part of a dropless layer that the capacity buffer of `dispatch.dropless_capacity_plan` leaves out,
    computed block by block in a loop over the `over.n_blocks` used blocks only (one FFN of `over.block` rows
    per step, its outputs added into the tokens' rows), so that its cost follows the actual overflow, not the
    worst case; the backward pass runs the same loop, recomputing each block's FFN. For CPU and GPU (the adds
    are scatters, element-serial on TPU). x [T, d]; gates [T, K]; params: expert weights [E, ...]. Inside a
    shard_map the weights are cast to vary like x first (their per-device gradients are summed on the way back)."""
    return _overflow_ffn(x, gates, sharding.vary_like(params, x), over, activation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _overflow_ffn(x, gates, params, over, activation):
    return _overflow_fwd(x, gates, params, over, activation)[0]


def _overflow_fwd(x, gates, params, over, activation):
    def body(i, out):
        _, tok, _, _, g, rows, w = _overflow_block(x, gates, params, over, i)
        return out.at[tok].add(g[:, None] * ffn(rows, w, activation).astype(jnp.float32))

    out = jax.lax.fori_loop(0, over.n_blocks, body, sharding.vary_like(jnp.zeros(x.shape, jnp.float32), x))
    return out, (x, gates, params, over)


def _overflow_bwd(activation, res, ct):  # ct [T, d] float32
    x, gates, params, over = res

    def body(i, carry):
        dx, dg, dw = carry
        e, tok, k, valid, g, rows, w = _overflow_block(x, gates, params, over, i)
        y, vjp = jax.vjp(lambda r, w: ffn(r, w, activation), rows, w)
        ct_rows = ct[tok]  # [b, d]
        d_rows, d_w = vjp((g[:, None] * ct_rows).astype(y.dtype))
        dx = dx.at[tok].add(jnp.where(valid[:, None], d_rows.astype(jnp.float32), 0))
        dg = dg.at[tok, k].add(jnp.where(valid, jnp.sum(ct_rows * y.astype(jnp.float32), -1), 0))
        dw = {n: jax.lax.dynamic_update_index_in_dim(v, jax.lax.dynamic_index_in_dim(v, e, 0, False) + d_w[n], e, 0)
              for n, v in dw.items()}
        return dx, dg, dw

    zeros = sharding.vary_like((jnp.zeros(x.shape, jnp.float32), jnp.zeros(gates.shape, jnp.float32),
                                jax.tree.map(jnp.zeros_like, params)), x)
    dx, dg, dw = jax.lax.fori_loop(0, over.n_blocks, body, zeros)
    return dx.astype(x.dtype), dg.astype(gates.dtype), dw, None


_overflow_ffn.defvjp(_overflow_fwd, _overflow_bwd)
