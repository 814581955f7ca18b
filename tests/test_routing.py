"""Routers (moejax/routing.py) against numpy and hand-built cases: scores, top-K gates, Switch,
GShard top-2, expert choice, group-limited routing, hash layers, the aux-loss-free bias and jitter."""
from types import SimpleNamespace

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import model_config
from moejax import routing as routing_lib
from tests.tolerances import F32

# The functions under test, jitted: one compile per shape instead of one per primitive keeps this fast.
routing = SimpleNamespace(
    SCORE_FNS=routing_lib.SCORE_FNS,
    GROUP_SCORES=routing_lib.GROUP_SCORES,
    scores=jax.jit(routing_lib.scores, static_argnames="score_fn"),
    jitter=jax.jit(routing_lib.jitter, static_argnames="eps"),
    group_limit_mask=jax.jit(routing_lib.group_limit_mask, static_argnames=("n_groups", "topk_groups", "group_score")),
    topk=jax.jit(routing_lib.topk, static_argnames=("k", "score_fn", "normalize", "scale", "n_groups", "topk_groups",
                                                    "group_score", "disable_top")),
    gshard_top2=jax.jit(routing_lib.gshard_top2, static_argnames="disable_top"),
    expert_choice=jax.jit(routing_lib.expert_choice, static_argnames="capacity"),
    hash_expert=jax.jit(routing_lib.hash_expert, static_argnames=("n_experts", "k", "salt")),
    hash_routing=jax.jit(routing_lib.hash_routing, static_argnames=("n_experts", "k", "salt")),
    update_bias=jax.jit(routing_lib.update_bias, static_argnames="rate"),
)


def _logits(T, E, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=(T, E)).astype(dtype)


def _np_scores(logits, score_fn):
    x = np.asarray(logits, np.float64)
    if score_fn == "softmax":
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-x))


# --- scores and top-K gates ------------------------------------------------------------------------


@pytest.mark.parametrize("score_fn", routing.SCORE_FNS)
def test_scores_float32_for_bf16_logits(score_fn):
    logits = jnp.asarray(_logits(6, 5), jnp.bfloat16)
    s = routing.scores(logits, score_fn)
    assert s.dtype == jnp.float32
    np.testing.assert_allclose(s, _np_scores(np.asarray(logits, np.float32), score_fn), **F32)
    r = routing.topk(logits, 2, score_fn=score_fn)
    for name in ("weights", "probs", "logits"):
        assert getattr(r, name).dtype == jnp.float32, name
    assert r.expert_ids.dtype == jnp.int32 and r.mask.dtype == jnp.bool_


def test_scores_rejects_unknown_score_fn():
    with pytest.raises(ValueError, match="relu"):
        routing.scores(jnp.zeros((2, 3)), "relu")


def test_softmax_and_sigmoid_scores_differ():
    logits = _logits(4, 6)
    soft, sig = routing.scores(logits, "softmax"), routing.scores(logits, "sigmoid")
    np.testing.assert_allclose(soft.sum(-1), 1.0, **F32)
    np.testing.assert_allclose(sig, 1.0 / (1.0 + np.exp(-logits.astype(np.float64))), **F32)
    assert not np.allclose(soft, sig)


@pytest.mark.parametrize("score_fn", routing.SCORE_FNS)
def test_topk_gates_equal_chosen_scores(score_fn):
    logits = _logits(10, 8, seed=1)
    r = routing.topk(logits, 3, score_fn=score_fn)
    s = _np_scores(logits, score_fn)
    ids = np.asarray(r.expert_ids)
    np.testing.assert_array_equal(np.sort(ids, -1), np.sort(np.argsort(-s, -1)[:, :3], -1))
    np.testing.assert_allclose(r.weights, np.take_along_axis(s, ids, -1), **F32)
    assert np.asarray(r.mask).all()
    np.testing.assert_allclose(r.logits, logits, **F32)


@pytest.mark.parametrize("score_fn", routing.SCORE_FNS)
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_topk_normalize_gates_sum_to_scale(score_fn, scale):
    logits = _logits(10, 8, seed=2)
    r = routing.topk(logits, 3, score_fn=score_fn, normalize=True, scale=scale)
    np.testing.assert_allclose(np.asarray(r.weights).sum(-1), scale, **F32)
    g = np.take_along_axis(_np_scores(logits, score_fn), np.asarray(r.expert_ids), -1)
    np.testing.assert_allclose(r.weights, scale * g / g.sum(-1, keepdims=True), **F32)


@pytest.mark.parametrize("normalize", [False, True])
def test_routed_scale_multiplies_gates(normalize):
    logits = _logits(7, 6, seed=3)
    base = routing.topk(logits, 2, score_fn="sigmoid", normalize=normalize)
    scaled = routing.topk(logits, 2, score_fn="sigmoid", normalize=normalize, scale=2.5)
    np.testing.assert_array_equal(base.expert_ids, scaled.expert_ids)
    np.testing.assert_allclose(scaled.weights, 2.5 * np.asarray(base.weights), **F32)


def test_sigmoid_probs_rows_sum_to_one():
    logits = _logits(9, 6, seed=4)
    r = routing.topk(logits, 2, score_fn="sigmoid")
    s = _np_scores(logits, "sigmoid")
    np.testing.assert_allclose(np.asarray(r.probs).sum(-1), 1.0, **F32)
    np.testing.assert_allclose(r.probs, s / s.sum(-1, keepdims=True), **F32)


def test_softmax_probs_are_the_scores():
    logits = _logits(9, 6, seed=5)
    r = routing.topk(logits, 2)
    np.testing.assert_allclose(r.probs, _np_scores(logits, "softmax"), **F32)


def test_switch_top1_weight_is_softmax_prob_of_argmax():
    logits = _logits(12, 8, seed=6)
    r = routing.topk(logits, 1, score_fn="softmax", normalize=False)
    p = _np_scores(logits, "softmax")
    assert r.expert_ids.shape == (12, 1)
    np.testing.assert_array_equal(np.asarray(r.expert_ids)[:, 0], p.argmax(-1))
    np.testing.assert_allclose(np.asarray(r.weights)[:, 0], p.max(-1), **F32)
    assert (np.asarray(r.weights) < 1.0).all()  # unnormalised: p_i, not 1


# --- GShard top-2 ------------------------------------------------------------------------------------


def test_gshard_top2_eval_keeps_both_normalised():
    logits = _logits(16, 8, seed=7)
    r = routing.gshard_top2(logits, None)
    p = _np_scores(logits, "softmax")
    top2 = np.argsort(-p, -1)[:, :2]
    np.testing.assert_array_equal(r.expert_ids, top2)
    g = np.take_along_axis(p, top2, -1)
    np.testing.assert_allclose(r.weights, g / g.sum(-1, keepdims=True), **F32)
    assert np.asarray(r.mask).all()


def test_gshard_top2_random_second_expert_policy():
    T = 256
    logits = _logits(T, 8, seed=8)
    key = jax.random.key(42)
    r = routing.gshard_top2(logits, key)
    p = _np_scores(logits, "softmax")
    top2 = np.argsort(-p, -1)[:, :2]
    g = np.take_along_axis(p, top2, -1)
    gn = g / g.sum(-1, keepdims=True)  # [T, 2] normalised g1, g2
    u = np.asarray(jax.random.uniform(key, (T,)))
    w_eval = np.asarray(routing.gshard_top2(logits, None).weights)
    keep2 = 2.0 * w_eval[:, 1] > u  # the policy on the router's own float32 gates: exact
    assert keep2.any() and not keep2.all(), "test needs both kept and dropped second picks"
    mask = np.asarray(r.mask)
    np.testing.assert_array_equal(mask[:, 0], True)
    np.testing.assert_array_equal(mask[:, 1], keep2)
    np.testing.assert_array_equal(r.expert_ids, top2)
    w = np.asarray(r.weights)
    np.testing.assert_allclose(w[:, 0], gn[:, 0], **F32)  # g1 stays g1 / (g1 + g2) even when 2nd dropped
    np.testing.assert_array_equal(w[~keep2, 1], 0.0)
    np.testing.assert_allclose(w[keep2, 1], gn[keep2, 1], **F32)
    # Same key, same decisions; another key, other decisions.
    np.testing.assert_array_equal(routing.gshard_top2(logits, key).mask, mask)
    assert (np.asarray(routing.gshard_top2(logits, jax.random.key(43)).mask) != mask).any()


# --- expert choice -----------------------------------------------------------------------------------


@pytest.mark.parametrize("T,E,C", [(12, 4, 5), (8, 3, 8), (6, 6, 1)])
def test_expert_choice_top_c_distinct_tokens(T, E, C):
    logits = _logits(T, E, seed=9)
    ec = routing.expert_choice(logits, C)
    s = _np_scores(logits, "softmax")
    ids = np.asarray(ec.token_ids)
    assert ids.shape == (E, C) and ec.token_ids.dtype == jnp.int32
    for e in range(E):
        assert len(set(ids[e].tolist())) == C
        assert set(ids[e].tolist()) == set(np.argsort(-s[:, e])[:C].tolist())
    np.testing.assert_allclose(ec.weights, s[ids, np.arange(E)[:, None]], **F32)
    np.testing.assert_allclose(ec.probs, s, **F32)


# --- group-limited routing -----------------------------------------------------------------------------

# 4 groups of 2 experts. top2_sum: g1 (1.2) > g0 (0.91) > g2 (0.75) > g3 (0.2).
# max: g0 (0.9) > g2 (0.7) > g1 (0.6) > g3 (0.1). Keeping 2 groups differs between the two.
_GROUPED = np.array([[0.9, 0.01, 0.6, 0.6, 0.7, 0.05, 0.1, 0.1]], np.float32)


@pytest.mark.parametrize("group_score,groups,picks", [("top2_sum", [0, 1], {0, 2, 3}), ("max", [0, 2], {0, 4, 5})])
def test_group_limit_hand_built(group_score, groups, picks):
    mask = np.asarray(routing.group_limit_mask(jnp.asarray(_GROUPED), 4, 2, group_score))
    expected = np.zeros((1, 8), bool)
    for g in groups:
        expected[0, 2 * g:2 * g + 2] = True
    np.testing.assert_array_equal(mask, expected)
    # Through topk: sigmoid(logit(p)) == p, so the scores are _GROUPED. Unlimited top-3 is {0, 4, 2|3}.
    logits = np.log(_GROUPED / (1 - _GROUPED))
    r = routing.topk(logits, 3, score_fn="sigmoid", n_groups=4, topk_groups=2, group_score=group_score)
    assert set(np.asarray(r.expert_ids)[0].tolist()) == picks
    np.testing.assert_allclose(r.weights, _GROUPED[0, np.asarray(r.expert_ids)[0]][None], **F32)


def test_group_limit_rejects_unknown_group_score():
    with pytest.raises(ValueError, match="median"):
        routing.group_limit_mask(jnp.zeros((2, 4)), 2, 1, "median")


def _np_kept_groups(select, n_groups, topk_groups, group_score):
    T, E = select.shape
    grouped = select.reshape(T, n_groups, E // n_groups)
    if group_score == "top2_sum":
        gscore = -np.sort(-grouped, -1)[..., :2].sum(-1)
    else:
        gscore = grouped.max(-1)
    return np.argsort(-gscore, -1, kind="stable")[:, :topk_groups]


@pytest.mark.parametrize("score_fn", routing.SCORE_FNS)
@pytest.mark.parametrize("group_score", routing.GROUP_SCORES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_group_limited_picks_stay_in_kept_groups(score_fn, group_score, with_bias):
    T, E, G, kg, K = 32, 16, 4, 2, 4
    logits = _logits(T, E, seed=10)
    bias = np.random.default_rng(11).normal(size=E).astype(np.float32) * 0.3 if with_bias else None
    r = routing.topk(logits, K, score_fn=score_fn, bias=bias, n_groups=G, topk_groups=kg, group_score=group_score)
    s = _np_scores(logits, score_fn)
    select = s + (bias if with_bias else 0.0)
    kept = _np_kept_groups(select, G, kg, group_score)  # [T, kg]
    ids = np.asarray(r.expert_ids)
    group_of_pick = ids // (E // G)
    for t in range(T):
        assert set(group_of_pick[t].tolist()) <= set(kept[t].tolist()), t
        # the picks are the top-K of the selection scores inside the kept groups
        allowed = np.concatenate([np.arange(g * E // G, (g + 1) * E // G) for g in kept[t]])
        best = allowed[np.argsort(-select[t, allowed])[:K]]
        assert set(ids[t].tolist()) == set(best.tolist()), t
    np.testing.assert_allclose(r.weights, np.take_along_axis(s, ids, -1), **F32)
    # Group limits actually bind on this data (otherwise the test proves nothing).
    free = routing.topk(logits, K, score_fn=score_fn, bias=bias)
    assert (np.sort(np.asarray(free.expert_ids), -1) != np.sort(ids, -1)).any()


# --- hash layers ----------------------------------------------------------------------------------------


def test_hash_deterministic_across_calls():
    ids = jnp.asarray(np.random.default_rng(12).integers(0, 1000, size=64), jnp.int32)
    a = routing.hash_expert(ids, 8, 2, salt=3)
    b = routing.hash_expert(ids, 8, 2, salt=3)
    c = routing_lib.hash_expert(ids, 8, 2, 3)  # eager, not jitted
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    # the same id always goes to the same experts, wherever it sits in the batch
    a = np.asarray(a)
    for v in np.unique(np.asarray(ids)):
        rows = a[np.asarray(ids) == v]
        assert (rows == rows[0]).all()


@pytest.mark.parametrize("E,K,V", [(8, 1, 64), (8, 3, 256), (5, 2, 100), (16, 16, 32)])
def test_hash_balanced_distinct_in_range(E, K, V):
    picks = np.asarray(routing.hash_expert(jnp.arange(V, dtype=jnp.int32), E, K))
    assert picks.shape == (V, K) and picks.dtype == np.int32
    assert picks.min() >= 0 and picks.max() < E
    assert all(len(set(row.tolist())) == K for row in picks)
    np.testing.assert_array_equal(np.bincount(picks.reshape(-1), minlength=E), np.full(E, K * V // E))


def test_hash_salt_changes_map_and_not_mod_e():
    E, V = 8, 512
    v = jnp.arange(V, dtype=jnp.int32)
    m0 = np.asarray(routing.hash_expert(v, E, 1, salt=0))[:, 0]
    m1 = np.asarray(routing.hash_expert(v, E, 1, salt=1))[:, 0]
    assert (m0 != m1).mean() > 0.5
    for m in (m0, m1):
        # not v mod E, nor any fixed shift of it
        shifts = {int(x) for x in (m - np.arange(V)) % E}
        assert len(shifts) > 1
    # the whole uint32 salt range is usable
    top = np.asarray(routing.hash_expert(v, E, 1, salt=2**32 - 1))[:, 0]
    np.testing.assert_array_equal(np.bincount(top, minlength=E), np.full(E, V // E))


def test_hash_routing_weights_and_probs():
    ids = jnp.arange(10, dtype=jnp.int32)
    r = routing.hash_routing(ids, 4, 2, salt=1)
    np.testing.assert_array_equal(r.expert_ids, routing.hash_expert(ids, 4, 2, 1))
    np.testing.assert_array_equal(r.weights, 1.0)
    assert np.asarray(r.mask).all()
    np.testing.assert_allclose(r.probs, 0.25, **F32)
    np.testing.assert_array_equal(r.logits, 0.0)


# --- aux-loss-free bias -----------------------------------------------------------------------------------


@pytest.mark.parametrize("score_fn,normalize", [("sigmoid", True), ("sigmoid", False), ("softmax", False)])
def test_bias_changes_selection_not_gates(score_fn, normalize):
    T, E, K = 16, 8, 2
    logits = _logits(T, E, seed=13)
    bias = np.zeros(E, np.float32)
    bias[5] = 10.0  # expert 5 gets picked by every token
    plain = routing.topk(logits, K, score_fn=score_fn, normalize=normalize)
    biased = routing.topk(logits, K, score_fn=score_fn, normalize=normalize, bias=bias)
    ids = np.asarray(biased.expert_ids)
    assert (ids == 5).any(-1).all()
    assert (np.sort(ids, -1) != np.sort(np.asarray(plain.expert_ids), -1)).any()
    s = _np_scores(logits, score_fn)
    g = np.take_along_axis(s, ids, -1)  # unbiased scores of the biased picks
    if normalize:
        g = g / g.sum(-1, keepdims=True)
    np.testing.assert_allclose(biased.weights, g, **F32)
    np.testing.assert_allclose(biased.probs, plain.probs, **F32)
    # (token, expert) pairs picked by both runs carry the same gate when not renormalised over picks
    if not normalize:
        pw, bw = np.asarray(plain.weights), np.asarray(biased.weights)
        pids = np.asarray(plain.expert_ids)
        for t in range(T):
            for k in range(K):
                hit = np.nonzero(ids[t] == pids[t, k])[0]
                if hit.size:
                    np.testing.assert_allclose(bw[t, hit[0]], pw[t, k], **F32)


@pytest.mark.parametrize("r", [1, 3])
def test_disable_top_picks_next_best(r):
    """DeepSeekMoE Fig. 4 ablation: each token's r best experts are skipped; the picks are ranks r .. r+K-1
    and keep their scores as gates; GShard renormalises over its two remaining picks."""
    T, E, K = 12, 8, 2
    logits = _logits(T, E, seed=21)
    s = _np_scores(logits, "softmax")
    rank = np.argsort(-s, -1)
    got = routing.topk(logits, K, disable_top=r)
    np.testing.assert_array_equal(np.sort(got.expert_ids, -1), np.sort(rank[:, r:r + K], -1))
    np.testing.assert_allclose(got.weights, np.take_along_axis(s, np.asarray(got.expert_ids), -1), **F32)
    g = routing.gshard_top2(logits, None, disable_top=r)
    np.testing.assert_array_equal(g.expert_ids, got.expert_ids)
    np.testing.assert_allclose(np.asarray(g.weights).sum(-1), 1.0, **F32)


def test_disable_top_validated():
    with pytest.raises(ValueError, match="disable_top=15.*n_experts - top_k = 14"):
        model_config.gshard(8, 16, n_experts=16, disable_top=15)
    with pytest.raises(ValueError, match=r"disable_top=1.*0 with router='hash' \(only routers \('topk', 'gshard'\)"):
        model_config.hash_layer(8, 16, disable_top=1)


def test_no_gradient_into_bias():
    logits = _logits(8, 6, seed=14)
    bias = jnp.asarray(np.random.default_rng(15).normal(size=6).astype(np.float32))

    def f(logits, bias):
        r = routing.topk(logits, 2, score_fn="sigmoid", normalize=True, bias=bias)
        return jnp.sum(r.weights * jnp.arange(1.0, 3.0)) + jnp.sum(r.probs[:, 0])

    g_logits, g_bias = jax.grad(f, argnums=(0, 1))(jnp.asarray(logits), bias)
    np.testing.assert_array_equal(g_bias, 0.0)
    assert np.abs(np.asarray(g_logits)).sum() > 0


def test_update_bias_sign_and_rate():
    bias = jnp.asarray([0.1, 0.1, -0.2, 0.0], jnp.float32)
    load = jnp.asarray([5.0, 1.0, 2.0, 0.0])  # mean 2: over, under, exactly mean, under
    rate = 0.01
    new = np.asarray(routing.update_bias(bias, load, rate))
    expected = np.array([0.1 - rate, 0.1 + rate, -0.2, 0.0 + rate], np.float32)
    np.testing.assert_allclose(new, expected, **F32)
    assert new[2] == np.float32(-0.2)  # exactly-mean expert untouched
    # integer counts and fractions give the same step
    np.testing.assert_allclose(routing.update_bias(bias, load / load.sum(), rate), expected, **F32)
    np.testing.assert_allclose(routing.update_bias(bias, load.astype(jnp.int32), rate), expected, **F32)


# --- jitter -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.01, 0.3])
def test_jitter_within_multiplicative_band(eps):
    x = np.random.default_rng(16).normal(size=(64, 16)).astype(np.float32)
    y = np.asarray(routing.jitter(jnp.asarray(x), jax.random.key(0), eps))
    assert y.dtype == np.float32
    a = x * np.float32(1.0 - eps)
    b = x * np.float32(1.0 + eps)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    assert ((y >= lo) & (y <= hi)).all()
    assert (y != x).mean() > 0.9  # it does perturb
    assert (np.sign(y) == np.sign(x)).all()


def test_jitter_zero_eps_is_identity_and_keeps_dtype():
    x = jnp.asarray(_logits(4, 8, seed=17), jnp.bfloat16)
    assert routing.jitter(x, jax.random.key(1), 0.1).dtype == jnp.bfloat16
    np.testing.assert_array_equal(routing.jitter(x.astype(jnp.float32), jax.random.key(1), 0.0), x.astype(jnp.float32))


# --- properties ---------------------------------------------------------------------------------------------


@st.composite
def _tek(draw):
    E = draw(st.integers(1, 9))
    K = draw(st.one_of(st.just(E), st.integers(1, E)))
    T = draw(st.integers(1, 7))
    return T, E, K


@hypothesis.settings(max_examples=20, deadline=None, derandomize=True)
@hypothesis.given(tek=_tek(), score_fn=st.sampled_from(routing.SCORE_FNS), normalize=st.booleans(),
                  seed=st.integers(0, 2**16))
def test_topk_properties(tek, score_fn, normalize, seed):
    T, E, K = tek
    logits = _logits(T, E, seed=seed) * 3
    r = routing.topk(logits, k=K, score_fn=score_fn, normalize=normalize)
    ids = np.asarray(r.expert_ids)
    assert ids.shape == (T, K) and r.weights.shape == (T, K) and r.probs.shape == (T, E)
    assert ids.min() >= 0 and ids.max() < E
    assert all(len(set(row.tolist())) == K for row in ids)
    s = _np_scores(logits, score_fn)
    chosen = np.take_along_axis(s, ids, -1)
    if K < E:  # the picks are a top-K set
        unchosen_max = np.where(np.eye(E, dtype=bool)[ids].any(1), -np.inf, s).max(-1)
        assert (chosen.min(-1) >= unchosen_max).all()
    expected = chosen / chosen.sum(-1, keepdims=True) if normalize else chosen
    np.testing.assert_allclose(r.weights, expected, **F32)
    np.testing.assert_allclose(np.asarray(r.probs).sum(-1), 1.0, **F32)


@hypothesis.settings(max_examples=10, deadline=None, derandomize=True)
@hypothesis.given(tek=_tek(), seed=st.integers(0, 2**16))
def test_hash_properties(tek, seed):
    T, E, K = tek
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, 10_000, size=T), jnp.int32)
    picks = np.asarray(routing.hash_expert(ids, E, K, seed))
    assert picks.shape == (T, K) and picks.min() >= 0 and picks.max() < E
    assert all(len(set(row.tolist())) == K for row in picks)


def test_readme_router_example_is_one_function_and_one_registration(monkeypatch):
    """The README's "Adding a router" example, run as written: the new router is used by the layer, its
    options are checked by MoEConfig, its gradient reaches the router weight, and FLOP counts include it."""
    import os
    import re

    from flax import nnx

    from moejax import balance, metrics, routers
    from moejax.model import ModelConfig

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme[readme.index("### Adding a router"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.setattr(routers, "_REGISTRY", dict(routers._REGISTRY))  # the registration stays in this test
    env = {}
    exec(compile(code, "README.md", "exec"), env)
    assert "sinkhorn" in routers.names()
    y, stats = env["y"], env["stats"]
    assert y.shape == (2, 32, 64) and stats.load.shape == (8,) and float(stats.load.sum()) == 2 * 32 * 2
    # Sinkhorn balancing spreads the 128 assignments far more evenly than the same router's plain top-2
    layer, cfg = env["layer"], env["layer"].config
    x = jax.random.normal(jax.random.key(0), (2, 32, 64))
    plain = routing_lib.topk(jnp.einsum("bsd,de->bse", x, layer.router[...]).reshape(64, 8), 2)
    plain_vio = float(balance.max_violation(balance.expert_counts(plain.expert_ids, 8)))
    assert float(stats.max_vio) < plain_vio, (float(stats.max_vio), plain_vio)
    with pytest.raises(ValueError, match=r"score_fn='sigmoid'.*router='sinkhorn'"):
        model_config.MoEConfig(64, 256, 8, 2, router="sinkhorn", score_fn="sigmoid")
    with pytest.raises(ValueError, match="already registered"):
        routers.register("sinkhorn", routers.Router(env["sinkhorn"]))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    g = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x)[0] ** 2))(params)
    assert float(jnp.abs(g["router"][...]).sum()) > 0
    mc = ModelConfig(vocab_size=16, d_model=64, n_layers=1, n_heads=2, moe=cfg)
    assert metrics.active_params(mc)["router"] == 64 * 8
