"""Expert feed-forward networks: dense FFNs and grouped (per-expert) FFNs over a dispatch buffer.

Activations: 'swiglu' (Shazeer 2020: silu(x W_gate) * (x W_up) W_down, the default) and 'gelu'
(gelu(x W_up) W_down). Expert weights: w_gate (swiglu only) and w_up [E, d, f], w_down [E, f, d]; dense FFN
weights are the same without the leading E axis. Except on the Pallas backend, W_gate and W_up are multiplied
as one [d, 2 f] matrix (one wide matmul beat two narrow ones on CPU); the Pallas kernels take them one by one
(no concatenated copy of the weights in HBM), and take float32 weights under bfloat16 rows as they are unless
fsdp splits them (`_pallas_weight`).

Grouped-matmul backends (`BACKENDS`) compute rows [M, d] x w[expert of row] for a dispatch `Layout`:
- 'einsum':     per-expert batched einsum over an [E, C, d] buffer; needs a per-expert layout
                (capacity or expert-choice dispatch).
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

from typing import Callable

import jax
import jax.numpy as jnp

import pallas_kernels
from moejax import sharding
from moejax.dispatch import Layout

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
    FLOPs, the Pallas tgmm to ~1.16x; experiments/benchmarks/README.md), 'blocked' on CPU (where Pallas
    only interprets and ragged_dot multiplies every row by every expert) and on GPU (the Triton kernels
    have not been timed on a GPU yet)."""
    if per_expert:
        return "einsum"
    platform = platform or jax.default_backend()
    return "pallas" if platform == "tpu" else "blocked"


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
