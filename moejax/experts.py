"""Expert feed-forward networks: dense FFNs and grouped (per-expert) FFNs over a dispatch buffer.

Activations: 'swiglu' (Shazeer 2020: silu(x W_gate) * (x W_up) W_down, the default) and 'gelu'
(gelu(x W_up) W_down). Expert weights: w_up [E, d, f], w_gate [E, d, f] (swiglu only), w_down [E, f, d].

Grouped-matmul backends (`BACKENDS`) compute rows [M, d] x w[expert of row] for a dispatch `Layout`:
- 'einsum':     per-expert batched einsum over an [E, C, d] buffer; needs a per-expert layout
                (capacity or expert-choice dispatch).
- 'blocked':    MegaBlocks-style: rows in blocks of `layout.block`, each block multiplied by its
                expert's weights (gathered per block); works for every layout.
- 'ragged_dot': jax.lax.ragged_dot over rows sorted by expert; works for every layout. Its CPU (and
                default GPU) lowering multiplies every row by every expert, so it is slow there.
A later backend (Pallas kernels) registers itself with `register_backend`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

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


register_backend("einsum", _einsum)
register_backend("blocked", _blocked)
register_backend("ragged_dot", _ragged_dot)


def default_backend(per_expert: bool, platform: str | None = None) -> str:
    """Fastest correct backend per platform: 'einsum' for per-expert (capacity) layouts everywhere;
    for dropless, 'ragged_dot' on TPU (native grouped matmul in XLA:TPU), 'blocked' on CPU and GPU,
    where ragged_dot lowers to a dense masked product (measured: experiments/benchmarks/README.md)."""
    if per_expert:
        return "einsum"
    platform = platform or jax.default_backend()
    return "ragged_dot" if platform == "tpu" else "blocked"


def _hidden(x, w_up, w_gate, activation, matmul):
    if activation == "swiglu":
        return jax.nn.silu(matmul(x, w_gate)) * matmul(x, w_up)
    if activation == "gelu":
        return jax.nn.gelu(matmul(x, w_up))
    raise ValueError(f"activation={activation!r}; allowed: {ACTIVATIONS}")


def ffn(x: jax.Array, params: dict, activation: str = "swiglu") -> jax.Array:
    """Dense FFN. x: [..., d]; params w_up [d, f], w_gate [d, f] (swiglu), w_down [f, d]."""
    mm = lambda a, w: a @ w.astype(a.dtype)
    return mm(_hidden(x, params["w_up"], params.get("w_gate"), activation, mm), params["w_down"])


def grouped_ffn(
    rows: jax.Array, params: dict, layout: Layout, activation: str = "swiglu", backend: str = "einsum"
) -> jax.Array:
    """Per-expert FFN over a dispatch buffer. rows: [M, d] -> [M, d]; params hold [E, ., .] weights.
    Empty (zero) padding rows map to zero, as neither activation has a bias."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {tuple(BACKENDS)}")
    mm = lambda a, w: BACKENDS[backend](a, w, layout)
    return mm(_hidden(rows, params["w_up"], params.get("w_gate"), activation, mm), params["w_down"])
