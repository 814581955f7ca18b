"""Load-balance losses and load metrics, all float32 and returned explicitly (no hidden state).

Losses are returned without their coefficient (a1, a2, ...); the MoE layer multiplies. Under perfectly
uniform routing the expert-, device- and sequence-level losses all equal 1, their minimum for a fixed
uniform router distribution. Names: T tokens, E routed experts, K routed picks, D devices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def expert_counts(expert_ids: jax.Array, n_experts: int, mask: jax.Array | None = None) -> jax.Array:
    """Number of (token, pick) assignments per expert. expert_ids: [..., K] -> [E] float32."""
    onehot = jax.nn.one_hot(expert_ids, n_experts, dtype=jnp.float32)  # [..., K, E]
    if mask is not None:
        onehot = onehot * mask[..., None]
    return onehot.reshape(-1, n_experts).sum(0)


def expert_balance_loss(probs: jax.Array, expert_ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Expert-level balance loss, DeepSeekMoE eq. 12-13: sum_i f_i P_i with
    f_i = E / (K T) * count_i and P_i = (1/T) sum_t s_{i,t}. Switch's alpha * N * sum f_i P_i (Fedus et
    al. eq. 4) is the same quantity with K = 1. probs: [T, E]; expert_ids, mask: [T, K]."""
    T, E = probs.shape
    K = expert_ids.shape[-1]
    f = expert_counts(expert_ids, E, mask) * (E / (K * T))  # [E]
    P = probs.astype(jnp.float32).mean(0)  # [E]
    return jnp.sum(jax.lax.stop_gradient(f) * P)


def device_balance_loss(
    probs: jax.Array, expert_ids: jax.Array, n_devices: int, mask: jax.Array | None = None, n_slots: int | None = None
) -> jax.Array:
    """Device-level balance loss, DeepSeekMoE eq. 14-15: expert slots are placed on D devices in contiguous
    groups of n_slots / D (n_slots >= E: moejax.model_config.MoEConfig.pad_experts_to; default E), so device d holds
    the experts E_d = [d n_slots / D, (d + 1) n_slots / D) that exist; f'_d = mean of f_i over E_d,
    P'_d = sum of P_i over E_d; loss = sum_d f'_d P'_d."""
    T, E = probs.shape
    K = expert_ids.shape[-1]
    f = expert_counts(expert_ids, E, mask) * (E / (K * T))
    P = probs.astype(jnp.float32).mean(0)
    on = jnp.arange(E)[None, :] // ((n_slots or E) // n_devices) == jnp.arange(n_devices)[:, None]  # [D, E]
    f_dev = jnp.sum(jnp.where(on, f, 0.0), -1) / jnp.maximum(on.sum(-1), 1)  # sums, not scatters (TPU)
    P_dev = jnp.sum(jnp.where(on, P, 0.0), -1)  # [D]
    return jnp.sum(jax.lax.stop_gradient(f_dev) * P_dev)


def sequence_balance_loss(probs: jax.Array, expert_ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Sequence-wise balance loss, DeepSeek-V3 eq. 17-20: the expert-level loss computed inside each
    sequence, then averaged over the batch. probs: [B, S, E] (normalised scores); expert_ids: [B, S, K]."""
    if mask is None:
        mask = jnp.ones(expert_ids.shape, bool)
    return jax.vmap(expert_balance_loss)(probs, expert_ids, mask).mean()


def z_loss(logits: jax.Array) -> jax.Array:
    """Router z-loss, ST-MoE eq. 5: (1/T) sum_t logsumexp(logits_t)^2. logits: [T, E]."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def load_fraction(counts: jax.Array) -> jax.Array:
    """Per-expert share of assignments, [E] summing to 1 (all zeros if nothing was routed)."""
    return counts / jnp.maximum(counts.sum(), 1.0)


def max_violation(counts: jax.Array) -> jax.Array:
    """MaxVio (Wang et al. 2024, eq. 7): (max_i load_i - mean load) / mean load. 0 when balanced."""
    mean = jnp.mean(counts)
    return (jnp.max(counts) - mean) / jnp.maximum(mean, 1e-9)


def router_entropy(probs: jax.Array) -> jax.Array:
    """Mean over tokens of the entropy (nats) of the router distribution. probs: [..., E]."""
    p = probs.astype(jnp.float32)
    return -jnp.mean(jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1))
