"""Balance losses and load metrics (moejax/balance.py) on hand-computed cases, their minimum under
uniform routing, masking, and gradients. Expected numbers are worked out by hand (shown in comments)
or with plain numpy, never by calling the code under test."""
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import balance as balance_lib
from tests.tolerances import F32

# The functions under test, jitted: one compile per shape instead of one per primitive keeps this fast.
balance = SimpleNamespace(
    expert_counts=jax.jit(balance_lib.expert_counts, static_argnums=1),
    expert_balance_loss=jax.jit(balance_lib.expert_balance_loss),
    device_balance_loss=jax.jit(balance_lib.device_balance_loss, static_argnums=2),
    sequence_balance_loss=jax.jit(balance_lib.sequence_balance_loss),
    z_loss=jax.jit(balance_lib.z_loss),
    load_fraction=jax.jit(balance_lib.load_fraction),
    max_violation=jax.jit(balance_lib.max_violation),
    router_entropy=jax.jit(balance_lib.router_entropy),
)

# T=4 tokens, E=3 experts. Column means P = [1.5, 1.6, 0.9] / 4 = [0.375, 0.4, 0.225].
PROBS3 = np.array([[0.5, 0.3, 0.2], [0.6, 0.2, 0.2], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]], np.float32)


def test_expert_counts_hand():
    ids = np.array([[0, 1], [0, 2], [1, 2], [0, 1]], np.int32)
    mask = np.array([[1, 1], [1, 0], [1, 1], [1, 0]], bool)
    np.testing.assert_array_equal(balance.expert_counts(ids, 3), [3.0, 3.0, 2.0])
    np.testing.assert_array_equal(balance.expert_counts(ids, 3, mask), [3.0, 2.0, 1.0])
    assert balance.expert_counts(ids, 3).dtype == jnp.float32


def test_expert_balance_loss_top1_hand():
    # counts [2, 1, 1]; f = counts * E / (K T) = [1.5, 0.75, 0.75]
    # loss = 1.5 * 0.375 + 0.75 * 0.4 + 0.75 * 0.225 = 0.5625 + 0.3 + 0.16875 = 1.03125
    ids = np.array([[0], [0], [1], [2]], np.int32)
    loss = balance.expert_balance_loss(PROBS3, ids)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(loss, 1.03125, **F32)


def test_expert_balance_loss_top2_masked_hand():
    # unmasked counts [3, 2, 1]; f = counts * 3 / (2 * 4) = [1.125, 0.75, 0.375]
    # loss = 1.125 * 0.375 + 0.75 * 0.4 + 0.375 * 0.225 = 0.421875 + 0.3 + 0.084375 = 0.80625
    ids = np.array([[0, 1], [0, 2], [1, 2], [0, 1]], np.int32)
    mask = np.array([[1, 1], [1, 0], [1, 1], [1, 0]], bool)
    np.testing.assert_allclose(balance.expert_balance_loss(PROBS3, ids, mask), 0.80625, **F32)
    # without the mask every pick counts: counts [3, 3, 2], f = [1.125, 1.125, 0.75]
    # loss = 0.421875 + 0.45 + 0.16875 = 1.040625
    np.testing.assert_allclose(balance.expert_balance_loss(PROBS3, ids), 1.040625, **F32)


def test_masked_picks_do_not_count():
    ids = np.array([[0, 1], [0, 2], [1, 2], [0, 1]], np.int32)
    mask = np.array([[1, 1], [1, 0], [1, 1], [1, 0]], bool)
    other = ids.copy()
    other[~mask] = 0  # move the masked picks elsewhere: nothing may change
    for fn in (lambda i: balance.expert_balance_loss(PROBS3, i, mask),
               lambda i: balance.expert_counts(i, 3, mask)):
        np.testing.assert_array_equal(fn(ids), fn(other))
    probs4 = np.full((4, 4), 0.25, np.float32)
    ids4 = np.array([[0, 1], [2, 3], [1, 0], [3, 2]], np.int32)
    mask4 = np.array([[1, 1], [1, 0], [1, 1], [1, 0]], bool)
    moved = np.where(mask4, ids4, 0)
    np.testing.assert_array_equal(balance.device_balance_loss(probs4, ids4, 2, mask4),
                                  balance.device_balance_loss(probs4, moved, 2, mask4))
    np.testing.assert_array_equal(balance.sequence_balance_loss(probs4[None], ids4[None], mask4[None]),
                                  balance.sequence_balance_loss(probs4[None], moved[None], mask4[None]))
    # all picks masked: no load, zero loss
    np.testing.assert_array_equal(balance.expert_balance_loss(PROBS3, ids, np.zeros_like(mask)), 0.0)


def test_device_balance_loss_hand():
    # E=4 experts on D=2 devices ({0,1}, {2,3}), T=4, K=1.
    probs = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.25] * 4, [0.7, 0.1, 0.1, 0.1]], np.float32)
    ids = np.array([[0], [0], [1], [3]], np.int32)
    # P = [1.45, 0.85, 0.85, 0.85] / 4 = [0.3625, 0.2125, 0.2125, 0.2125]; counts [2, 1, 0, 1];
    # f = counts * 4 / 4 = [2, 1, 0, 1]; f'_d = mean over device = [1.5, 0.5]; P'_d = sum = [0.575, 0.425]
    # loss = 1.5 * 0.575 + 0.5 * 0.425 = 0.8625 + 0.2125 = 1.075
    np.testing.assert_allclose(balance.device_balance_loss(probs, ids, 2), 1.075, **F32)
    # expert-level on the same data: 2 * 0.3625 + 1 * 0.2125 + 0 + 1 * 0.2125 = 1.15
    np.testing.assert_allclose(balance.expert_balance_loss(probs, ids), 1.15, **F32)
    # one device holding all experts: f' = mean f = 1, P' = 1 -> 1 whatever the routing
    np.testing.assert_allclose(balance.device_balance_loss(probs, ids, 1), 1.0, **F32)
    # one expert per device: the expert-level loss
    np.testing.assert_allclose(balance.device_balance_loss(probs, ids, 4), 1.15, **F32)


def test_sequence_balance_loss_hand():
    # B=2 sequences of S=2 tokens, E=2, K=1.
    probs = np.array([[[0.8, 0.2], [0.6, 0.4]], [[0.5, 0.5], [0.3, 0.7]]], np.float32)
    ids = np.array([[[0], [0]], [[0], [1]]], np.int32)
    # seq 0: counts [2, 0], f = [2, 0], P = [0.7, 0.3] -> 1.4
    # seq 1: counts [1, 1], f = [1, 1], P = [0.4, 0.6] -> 1.0; mean = 1.2
    np.testing.assert_allclose(balance.sequence_balance_loss(probs, ids), 1.2, **F32)
    # differs from the batch-level loss: counts [3, 1], f = [1.5, 0.5], P = [0.55, 0.45] -> 1.05
    np.testing.assert_allclose(balance.expert_balance_loss(probs.reshape(4, 2), ids.reshape(4, 1)), 1.05, **F32)
    # masking the second token of seq 0: counts [1, 0], f = [1, 0] -> 0.7; mean (0.7 + 1.0) / 2 = 0.85
    mask = np.array([[[True], [False]], [[True], [True]]])
    np.testing.assert_allclose(balance.sequence_balance_loss(probs, ids, mask), 0.85, **F32)


def test_z_loss_hand():
    logits = np.array([[0.0, 0.0], [1.0, 2.0], [-3.0, 5.0]], np.float32)
    lse = [math.log(2.0), math.log(math.e + math.e ** 2), math.log(math.exp(-3.0) + math.exp(5.0))]
    expected = sum(v * v for v in lse) / 3  # (0.480453 + 5.351180 + 25.000671) / 3
    np.testing.assert_allclose(balance.z_loss(logits), expected, **F32)
    out = balance.z_loss(jnp.asarray(logits, jnp.bfloat16))  # all of these logits are exact in bf16
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, **F32)
    np.testing.assert_allclose(balance.z_loss(np.zeros((5, 8), np.float32)), math.log(8.0) ** 2, **F32)


def test_load_fraction_and_max_violation_hand():
    counts = jnp.asarray([4.0, 2.0, 2.0, 0.0])
    np.testing.assert_allclose(balance.load_fraction(counts), [0.5, 0.25, 0.25, 0.0], **F32)
    np.testing.assert_allclose(balance.max_violation(counts), 1.0, **F32)  # (4 - 2) / 2
    np.testing.assert_allclose(balance.max_violation(jnp.asarray([5.0, 1.0, 0.0])), 1.5, **F32)  # mean 2: (5 - 2) / 2
    np.testing.assert_array_equal(balance.load_fraction(jnp.zeros(4)), 0.0)
    np.testing.assert_array_equal(balance.max_violation(jnp.full((4,), 3.0)), 0.0)
    # MaxVio is scale-free: counts and fractions agree
    np.testing.assert_allclose(balance.max_violation(balance.load_fraction(counts)), 1.0, **F32)


def test_router_entropy_hand():
    probs = np.array([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25] * 4], np.float32)
    # entropies: log 2, 0, log 4 -> mean (log 2 + 2 log 2) / 3 = log 2
    np.testing.assert_allclose(balance.router_entropy(probs), math.log(2.0), **F32)
    # batched [B, S, E] input: mean over all tokens
    np.testing.assert_allclose(balance.router_entropy(probs.reshape(1, 3, 4)), math.log(2.0), **F32)
    assert np.isfinite(np.asarray(jax.grad(lambda p: balance.router_entropy(p))(jnp.asarray(probs)))).all()


# --- the minimum under uniform routing -------------------------------------------------------------------


def _balanced(T=8, E=4, K=2):
    """Uniform probs; token t picks experts t, t+1 (mod E): every expert gets exactly T K / E picks."""
    probs = np.full((T, E), 1.0 / E, np.float32)
    ids = (np.arange(T)[:, None] + np.arange(K)[None]) % E
    return probs, ids.astype(np.int32)


def test_uniform_routing_is_the_minimum_one():
    T, E, K = 8, 4, 2
    probs, ids = _balanced(T, E, K)
    counts = balance.expert_counts(ids, E)
    np.testing.assert_array_equal(counts, np.full(E, T * K / E))
    np.testing.assert_allclose(balance.expert_balance_loss(probs, ids), 1.0, **F32)
    np.testing.assert_allclose(balance.device_balance_loss(probs, ids, 2), 1.0, **F32)
    # two sequences of 4 tokens, each balanced on its own (every expert twice per sequence)
    np.testing.assert_allclose(balance.sequence_balance_loss(probs.reshape(2, 4, E), ids.reshape(2, 4, K)), 1.0,
                               **F32)
    np.testing.assert_allclose(balance.router_entropy(probs), math.log(E), **F32)
    np.testing.assert_allclose(balance.max_violation(counts), 0.0, **F32)
    np.testing.assert_allclose(balance.load_fraction(counts), 1.0 / E, **F32)


def test_imbalanced_routing_costs_more_than_one():
    # A collapsed router: every token puts 0.7 on expert 0 (0.1 elsewhere) and picks its argmax.
    T, E = 8, 4
    probs = np.tile(np.array([0.7, 0.1, 0.1, 0.1], np.float32), (T, 1))
    ids = np.zeros((T, 1), np.int32)
    # f = [4, 0, 0, 0], P = [0.7, ...] -> 2.8; devices {0,1},{2,3}: f' = [2, 0], P' = [0.8, 0.2] -> 1.6
    np.testing.assert_allclose(balance.expert_balance_loss(probs, ids), 2.8, **F32)
    np.testing.assert_allclose(balance.device_balance_loss(probs, ids, 2), 1.6, **F32)
    np.testing.assert_allclose(balance.sequence_balance_loss(probs.reshape(2, 4, E), ids.reshape(2, 4, 1)), 2.8,
                               **F32)
    counts = balance.expert_counts(ids, E)
    np.testing.assert_allclose(balance.max_violation(counts), 3.0, **F32)  # (8 - 2) / 2
    assert float(balance.router_entropy(probs)) < math.log(E)
    # A milder imbalance is still above the minimum of 1.
    probs2, ids2 = _balanced(8, 4, 1)
    probs2 = np.where(np.eye(4, dtype=bool)[ids2[:, 0]], 0.4, 0.2).astype(np.float32)
    ids2 = ids2.copy()
    ids2[0, 0] = ids2[1, 0] = 2  # experts 0, 1 lose a token each to expert 2 ...
    probs2[0] = probs2[1] = [0.2, 0.2, 0.4, 0.2]  # ... consistently with the router
    # counts [1, 1, 4, 2] -> f = counts * 4 / 8 = [0.5, 0.5, 2, 1]; P = [1.8, 1.8, 2.4, 2.0] / 8
    # loss = 0.5 * 0.225 * 2 + 2 * 0.3 + 1 * 0.25 = 1.075
    np.testing.assert_allclose(balance.expert_balance_loss(probs2, ids2), 1.075, **F32)


# --- gradients ---------------------------------------------------------------------------------------------


def test_expert_balance_loss_gradient_through_probs_only():
    ids = np.array([[0, 1], [0, 2], [1, 2], [0, 1]], np.int32)
    mask = np.array([[1, 1], [1, 0], [1, 1], [1, 0]], bool)
    T, E, K = 4, 3, 2
    g = jax.grad(balance.expert_balance_loss)(jnp.asarray(PROBS3), ids, mask)
    # d/dprobs[t, i] of sum_i f_i mean_t probs[t, i] = f_i / T with f constant: [1.125, 0.75, 0.375] / 4
    f = np.array([3.0, 2.0, 1.0]) * E / (K * T)
    np.testing.assert_allclose(g, np.broadcast_to(f / T, (T, E)), **F32)
    # through a softmax router: the gradient of sum_i f_i P_i with f frozen
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(T, E)).astype(np.float32))
    g_logits = jax.grad(lambda z: balance.expert_balance_loss(jax.nn.softmax(z), ids, mask))(logits)
    p = np.asarray(jax.nn.softmax(logits), np.float64)
    v = f / T  # dL/dp[t, i]
    expected = p * (v[None] - (p * v[None]).sum(-1, keepdims=True))  # softmax Jacobian-vector product
    np.testing.assert_allclose(g_logits, expected, **F32)


def test_device_and_sequence_loss_gradients():
    probs = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.25] * 4, [0.7, 0.1, 0.1, 0.1]], np.float32)
    ids = np.array([[0], [0], [1], [3]], np.int32)
    g = jax.grad(balance.device_balance_loss)(jnp.asarray(probs), ids, 2)
    # d/dprobs[t, i] = f'_{device(i)} / T with f' = [1.5, 0.5]
    np.testing.assert_allclose(g, np.broadcast_to([1.5 / 4, 1.5 / 4, 0.5 / 4, 0.5 / 4], (4, 4)), **F32)
    gs = jax.grad(balance.sequence_balance_loss)(jnp.asarray(probs.reshape(2, 2, 4)), ids.reshape(2, 2, 1))
    # seq 0 counts [2,0,0,0] -> f = [4,0,0,0]; seq 1 counts [0,1,0,1] -> f = [0,2,0,2]; d = f / S / B
    expected = np.array([[[1.0, 0, 0, 0]] * 2, [[0, 0.5, 0, 0.5]] * 2])
    np.testing.assert_allclose(gs, expected, **F32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_losses_are_float32(dtype):
    probs, ids = _balanced()
    p = jnp.asarray(probs, dtype)
    for out in (balance.expert_balance_loss(p, ids), balance.device_balance_loss(p, ids, 2),
                balance.sequence_balance_loss(p.reshape(2, 4, 4), ids.reshape(2, 4, 2)),
                balance.z_loss(jnp.log(p)), balance.router_entropy(p)):
        assert out.dtype == jnp.float32 and out.shape == ()
