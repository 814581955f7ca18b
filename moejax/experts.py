"""Expert feed-forward networks: dense FFNs and grouped (per-expert) FFNs over a dispatch buffer.

Activations: 'swiglu' (Shazeer 2020: silu(x W_gate) * (x W_up) W_down, the default) and 'gelu'
(gelu(x W_up) W_down). Expert weights: w_in [E, d, n, f] holding W_gate, W_up (n = 2, swiglu) or W_up
(n = 1, gelu), multiplied as one [d, n f] matrix (one wide matmul beats two narrow ones); w_down [E, f, d].
Dense FFN weights are the same without the leading E axis.

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
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

import pallas_kernels
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


def _pallas(rows, w, layout):
    return pallas_kernels.gmm(rows, w.astype(rows.dtype), layout.group_sizes)


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


def _act(h: jax.Array, activation: str) -> jax.Array:
    """[..., n f] input projections -> [..., f] hidden activations."""
    if activation == "swiglu":
        gate, up = jnp.split(h, 2, axis=-1)
        return jax.nn.silu(gate) * up
    return jax.nn.gelu(h)


def ffn(x: jax.Array, params: dict, activation: str = "swiglu") -> jax.Array:
    """Dense FFN. x: [..., d]; params w_in [d, n, f], w_down [f, d]."""
    w_in = params["w_in"].reshape(params["w_in"].shape[0], -1).astype(x.dtype)  # [d, n f]
    return _act(x @ w_in, activation) @ params["w_down"].astype(x.dtype)


def grouped_ffn(
    rows: jax.Array, params: dict, layout: Layout, activation: str = "swiglu", backend: str = "einsum"
) -> jax.Array:
    """Per-expert FFN over a dispatch buffer. rows: [M, d] -> [M, d]; params w_in [E, d, n, f],
    w_down [E, f, d]. Empty (zero) padding rows map to zero, as neither activation has a bias."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {tuple(BACKENDS)}")
    mm = BACKENDS[backend]
    w_in = params["w_in"].reshape(*params["w_in"].shape[:2], -1)  # [E, d, n f]
    return mm(_act(mm(rows, w_in, layout), activation), params["w_down"], layout)
