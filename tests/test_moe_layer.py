"""The MoE layer against the slow loop reference (tests/reference.py): every router x dispatch x backend,
outputs and gradients (x, router, experts, shared), at tests/tolerances.py's stated tolerances."""
from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moejax import dispatch, experts, moe, routing
from moejax import model_config
from moejax.moe import MoE
from moejax.model_config import MoEConfig
from tests import reference as ref
from tests.tolerances import BF16, F32

B, S, D, DFF = 2, 8, 16, 32
T = B * S

# Routers: (preset or None, config kwargs, called with a key = train mode). Most share E=8 and the
# expert width f=32, so the eagerly compiled per-shape ops are reused across cases (keeps the file fast).
ROUTERS = {
    "topk_softmax": (None, dict(n_experts=8, top_k=2), False),
    "topk_sigmoid_norm_scale_bias_shared": (None, dict(
        n_experts=8, top_k=3, score_fn="sigmoid", normalize=True, routed_scale=2.5, aux_free_bias=True,
        n_shared=2, segmentation=2, d_ff=2 * DFF), False),
    "topk_group_top2sum_bias": (None, dict(
        n_experts=8, top_k=2, n_groups=4, topk_groups=2, score_fn="sigmoid", normalize=True,
        aux_free_bias=True), False),
    "topk_group_max": (None, dict(n_experts=8, top_k=3, n_groups=4, topk_groups=2, group_score="max"), False),
    "switch": ("switch", dict(n_experts=8), False),
    "switch_train": ("switch", dict(n_experts=8), True),
    "gshard": ("gshard", dict(n_experts=8), False),
    "gshard_train": ("gshard", dict(n_experts=8), True),
    "expert_choice": ("expert_choice", dict(n_experts=8, top_k=2), False),
    "hash_gelu_shared": ("hash", dict(n_experts=8, top_k=2, activation="gelu", n_shared=1), False),
}
# Dispatch modes (capacity is per sequence of S = 8 tokens). capacity_factor "drop": small enough that
# tokens are dropped (C = 2 <= S K / E for K = 2, 3; C = 1 = S K / E for K = 1, so any imbalance drops; for
# expert choice C = 1, so each sequence's E C = S picks cover all its tokens only if no two experts share
# one); "full": E / K, so C = S and nothing can drop.
DISPATCHES = {
    "cap_drop": dict(dispatch="capacity", capacity_factor="drop"),
    "cap_drop_prio": dict(dispatch="capacity", capacity_factor="drop", batch_prioritized=True),
    "cap_full": dict(dispatch="capacity", capacity_factor="full"),
    "dropless": dict(dispatch="dropless"),
}
# Backends: every registered one (experts.BACKENDS) that MoEConfig accepts with the dispatch mode.
# Capacity layouts have one block per expert (block_size unused). Dropless buffers get block_size=5,
# which divides none of T, T K, E ('blocked' pads each expert's rows to it; dropless 'einsum' cuts the
# overflow past C = T K / E rows per expert into blocks of it; test_dropless_property draws 1 and 2);
# 'blocked' also runs with 1 and 4 for the E=8, K=2 routers (shapes shared, so cheap), which include
# GShard's masked picks.
ALL_BLOCK_SIZES = ("topk_softmax", "topk_group_top2sum_bias", "gshard", "gshard_train")


def backends_for(router: str, dname: str) -> list:
    dropless = DISPATCHES[dname]["dispatch"] == "dropless"
    out = []
    for b in experts.BACKENDS:
        try:
            make_config(router, dname, backend=b)
        except ValueError:  # e.g. 'einsum' with dropless: rejected by MoEConfig, tested elsewhere
            continue
        if not dropless:
            out.append(dict(backend=b))
            continue
        sizes = (5, 1, 4) if b == "blocked" and router in ALL_BLOCK_SIZES else (5,)
        out += [dict(backend=b, block_size=s) for s in sizes]
    return out


def make_config(router: str, dname: str, **over) -> MoEConfig:
    name, rkw, _ = ROUTERS[router]
    kw = {"d_ff": DFF, **rkw, **DISPATCHES[dname], **over}
    d_ff = kw.pop("d_ff")
    cf = kw.get("capacity_factor")
    if cf in ("drop", "full"):
        kw["capacity_factor"] = 1.0  # set below, once top_k is known
    cfg = MoEConfig(D, d_ff, **kw) if name is None else model_config.preset(name, D, d_ff, **kw)
    if cf == "drop":
        drop_cf = 0.25 if router == "expert_choice" else 1.0 if cfg.top_k == 1 else 1.5 / cfg.top_k
        return dataclasses.replace(cfg, capacity_factor=drop_cf)
    if cf == "full":
        return dataclasses.replace(cfg, capacity_factor=cfg.n_experts / cfg.top_k)
    return cfg


def make_model(cfg: MoEConfig, seed: int = 0) -> MoE:
    """The layer with numpy-drawn weights N(0, 1 / fan_in) (the same for every backend and dispatch of a
    router), skipping the library's jitted initialisers, which would compile for every new shape.
    fan_in is f for w_down [(E,) f, d] and d for every other weight (router, input projections)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if len(s.shape) < 2:  # the aux-free bias
            return jnp.zeros(s.shape, s.dtype)
        fan_in = s.shape[-2] if "w_down" in jax.tree_util.keystr(path) else cfg.d_model
        return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)

    m = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))
    if cfg.aux_free_bias:  # a nonzero bias that changes some selections
        m.bias[...] = jnp.asarray(0.3 * rng.standard_normal(cfg.n_experts), jnp.float32)
    return m


def inputs(seed: int = 1, dtype=jnp.float32):
    kx, kc, kt = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (B, S, D), jnp.float32).astype(dtype)
    cot = jax.random.normal(kc, (B, S, D), jnp.float32)
    token_ids = jax.random.randint(kt, (B, S), 0, 50)
    return x, cot, token_ids


TRAIN_KEY = jax.random.key(3)


def capture_route_inputs(model, x, token_ids, key, monkeypatch):
    """Run the layer once, recording what its random train-time policies decided (so the reference
    can use them): GShard's second-expert mask and the Switch jitter noise."""
    seen = {}
    gshard_top2, jitter = routing.gshard_top2, routing.jitter

    def spy_gshard(logits, k, disable_top=0):
        r = gshard_top2(logits, k, disable_top)
        seen["mask"] = r.mask
        return r

    def spy_jitter(xx, k, eps):
        seen["noise"] = jax.random.uniform(k, xx.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
        return jitter(xx, k, eps)

    monkeypatch.setattr(routing, "gshard_top2", spy_gshard)
    monkeypatch.setattr(routing, "jitter", spy_jitter)
    graphdef, state = nnx.split(model)

    def run(state):  # jitted: op by op, this one forward pass compiled ~100 small programs (2.7 s a case)
        nnx.merge(graphdef, state)(x, token_ids=token_ids, key=key, train=True)
        return dict(seen)

    decided = jax.jit(run)(state)
    monkeypatch.undo()
    return decided


def moe_value_and_grads(model, x, cot, **call):
    """Output, stats, and gradients of sum(y * cot) w.r.t. x and every nnx.Param (as a plain dict), jitted
    as training runs it (op by op, a case compiled about 450 small programs)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, x):
        y, stats = nnx.merge(graphdef, params, rest)(x, **call)
        return jnp.sum(y.astype(jnp.float32) * cot), (y, stats)

    (_, (y, stats)), (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, stats, nnx.to_pure_dict(gp), gx


def ref_value_and_grads(p, x, cot, cfg, dec, noise=None):
    bias = {k: v for k, v in p.items() if k == "bias"}
    params = {k: v for k, v in p.items() if k != "bias"}

    def loss(params, x):
        y = ref.forward({**params, **bias}, x, cfg, dec, noise=noise)
        return jnp.sum(y * cot), y

    (_, y), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, gp, gx


def assert_trees_close(actual, expected, tol, what=""):
    pa, ta = jax.tree_util.tree_flatten_with_path(actual)
    pe, te = jax.tree_util.tree_flatten_with_path(expected)
    assert ta == te, f"{what}: tree structures differ: {ta} vs {te}"
    for (path, a), (_, e) in zip(pa, pe):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), **tol,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


def check_stats(router, dname, cfg, dec, mask, stats):
    """The case exercises what it claims (drops happen exactly when they should) and the layer's
    dropped fraction and load agree with the reference's decisions."""
    if router == "expert_choice":
        chosen = {t for toks in dec.ec_tokens for t in toks}
        np.testing.assert_allclose(stats.dropped, 1 - len(chosen) / T, **F32)
        assert (len(chosen) < T) == (dname == "cap_drop"), "expert choice should drop tokens iff cap_drop"
        return
    expected_drop = dec.dropped_fraction(mask)
    np.testing.assert_allclose(stats.dropped, expected_drop, **F32, err_msg="dropped fraction")
    assert (expected_drop > 0) == dname.startswith("cap_drop"), f"dropped {expected_drop} in {dname}"
    load = np.zeros(cfg.n_experts)
    for t in range(T):
        for k, e in enumerate(dec.picks[t]):
            load[e] += mask[t, k]
    np.testing.assert_array_equal(stats.load, load, err_msg="load")


def _combos():
    for r in ROUTERS:
        for dname, dkw in DISPATCHES.items():
            if r == "expert_choice" and (dname == "dropless" or dkw.get("batch_prioritized")):
                continue  # expert choice is capacity-only (rejected by MoEConfig, tested elsewhere)
            yield pytest.param(r, dname, id=f"{r}-{dname}")


@pytest.mark.parametrize("router,dname", list(_combos()))
def test_layer_matches_reference(router, dname, monkeypatch):
    """Every backend of this router x dispatch against one reference run (the reference does not
    depend on the backend); all backends are checked and their failures reported together."""
    x, cot, token_ids = inputs()
    key = TRAIN_KEY if ROUTERS[router][2] else None
    backends = backends_for(router, dname)
    cfg = make_config(router, dname, **backends[0])
    model = make_model(cfg)
    seen = capture_route_inputs(model, x, token_ids, key, monkeypatch) if key is not None else {}
    if router == "gshard_train":
        assert not np.asarray(seen["mask"]).all(), "the train key should drop some second picks"
    p = ref.params_of(model)
    dec = ref.decide(p, x, cfg, token_ids=token_ids, mask=seen.get("mask"), noise=seen.get("noise"))
    y_ref, gp_ref, gx_ref = ref_value_and_grads(p, x, cot, cfg, dec, seen.get("noise"))
    mask = np.asarray(seen.get("mask", np.ones((T, cfg.top_k), bool)))

    failures = []
    for bkw in backends:
        cfg = make_config(router, dname, **bkw)
        model = make_model(cfg)
        try:
            assert_trees_close(ref.params_of(model), p, dict(rtol=0, atol=0), "same init for every backend: ")
            y, stats, gp, gx = moe_value_and_grads(model, x, cot, token_ids=token_ids, key=key, train=key is not None)
            assert_trees_close(y, y_ref, F32, "output")
            assert_trees_close(gx, gx_ref, F32, "grad x")
            assert_trees_close(gp, gp_ref, F32, "grad params ")
            check_stats(router, dname, cfg, dec, mask, stats)
        except AssertionError as e:
            failures.append(f"--- {router} x {dname} x {bkw}:\n{e}")
    assert not failures, "\n".join(failures)


def test_reference_cases_are_meaningful():
    """The aux-free bias and group limits of the topk cases change decisions; the cases would not
    test them otherwise."""
    x, _, _ = inputs()
    for router in ("topk_sigmoid_norm_scale_bias_shared", "topk_group_top2sum_bias"):
        cfg = make_config(router, "dropless")
        p = ref.params_of(make_model(cfg))
        with_bias = ref.decide(p, x, cfg).picks
        without = ref.decide({**p, "bias": jnp.zeros_like(p["bias"])}, x, cfg).picks
        assert with_bias != without, router
    for router in ("topk_group_top2sum_bias", "topk_group_max"):
        cfg = make_config(router, "dropless")
        p = ref.params_of(make_model(cfg))
        limited = ref.decide(p, x, cfg).picks
        free = ref.decide(p, x, MoEConfig(**{**cfg.__dict__, "n_groups": 1, "topk_groups": 1})).picks
        assert limited != free, router


def test_auto_backend_default_block_size_matches_reference():
    cfg = make_config("topk_softmax", "dropless")  # backend='auto', block_size=0: dispatch.auto_block
    model = make_model(cfg)
    x, cot, _ = inputs()
    p = ref.params_of(model)
    dec = ref.decide(p, x, cfg)
    y_ref, gp_ref, gx_ref = ref_value_and_grads(p, x, cot, cfg, dec)
    y, _, gp, gx = moe_value_and_grads(model, x, cot)
    assert_trees_close((y, gx, gp), (y_ref, gx_ref, gp_ref), F32, "auto ")


@pytest.mark.parametrize("n,E,want", [(32768, 64, 256), (8192, 8, 256), (2048, 8, 256), (2047, 8, 128),
                                     (300, 8, 32), (7, 8, 1), (0, 8, 1)])
def test_auto_block_is_largest_power_of_two_up_to_mean_load(n, E, want):
    assert dispatch.auto_block(n, E) == want


@pytest.mark.parametrize("name,kw", [
    ("deepseek_v3", dict(n_experts=8, top_k=2, n_shared=1, n_groups=4, topk_groups=2)),
    ("deepseekmoe", dict(n_experts=4, top_k=1, m=2, n_shared=1, disable_top=2)),  # 7 routed, top-1, top 2 off
    ("gshard", dict(n_experts=8, dispatch="dropless", disable_top=3)),
])
def test_paper_presets_match_reference(name, kw):
    cfg = model_config.preset(name, D, DFF, **kw)
    model = make_model(cfg)
    x, cot, _ = inputs()
    p = ref.params_of(model)
    y_ref, gp_ref, gx_ref = ref_value_and_grads(p, x, cot, cfg, ref.decide(p, x, cfg))
    y, _, gp, gx = moe_value_and_grads(model, x, cot)
    assert_trees_close((y, gx, gp), (y_ref, gx_ref, gp_ref), F32, f"{name} ")


@pytest.mark.parametrize("router", ["topk_softmax", "gshard", "hash_gelu_shared"])
def test_dropless_equals_capacity_when_capacity_covers_max_load(router):
    x, _, token_ids = inputs()
    y_dropless, s_dropless = make_model(make_config(router, "dropless"))(x, token_ids=token_ids)
    y_cap, s_cap = make_model(make_config(router, "cap_full", backend="einsum"))(x, token_ids=token_ids)
    assert float(s_cap.dropped) == 0.0
    np.testing.assert_allclose(y_dropless, y_cap, **F32)


# ----- capacity_plan on hand-built routings ---------------------------------------------------------

_jit_capacity_plan = jax.jit(dispatch.capacity_plan, static_argnums=(2, 3))  # one compile, not one per op

HAND_IDS = jnp.array([[0, 1], [0, 2], [1, 0], [0, 1], [2, 1]], jnp.int32)  # [T=5, K=2], E=3
HAND_MASK = jnp.array([[1, 1], [1, 1], [1, 1], [1, 1], [1, 0]], bool)  # (t=4, k=1) masked by the router
HAND_C = 2  # M = E C = 6 rows; slot 6 = dropped/masked


def test_dropless_capacity_plan_by_hand():
    """T 6, K 2, E 3, C 2, overflow blocks of 2: expert 0 gets 7 assignments (5 past C: blocks of 2, 2, 1),
    expert 1 gets 3 (1 past C), expert 2 gets 1; one pick is masked. The capacity part is capacity_plan's."""
    ids = jnp.array([[0, 1], [0, 1], [0, 2], [0, 0], [1, 0], [0, 1]], jnp.int32)
    mask = jnp.ones((6, 2), bool).at[5, 1].set(False)
    plan, over = dispatch.dropless_capacity_plan(ids, mask, 3, 2, 2)
    cap = dispatch.capacity_plan(ids, mask, 3, 2)
    for a, b in zip(jax.tree.leaves(plan), jax.tree.leaves(cap)):
        np.testing.assert_array_equal(a, b)
    assert int(over.n_blocks) == 4 and over.block_expert.shape == (dispatch.overflow_blocks(12, 3, 2, 2),)
    # expert 0's assignments k T + t in sorted order: 0, 1, 2, 3, 5, 9, 10 (first picks, then second picks)
    blocks = []
    for i in range(int(over.n_blocks)):
        e, tok, k, valid = (np.asarray(a) for a in over.rows(jnp.int32(i), 6))
        blocks.append((int(e), [(int(t), int(kk)) for t, kk, v in zip(tok, k, valid) if v]))
    # (token, pick) past C: expert 0's are (2, 0) (3, 0) (5, 0) (3, 1) (4, 1), expert 1's (1, 1)
    assert blocks == [(0, [(2, 0), (3, 0)]), (0, [(5, 0), (3, 1)]), (0, [(4, 1)]), (1, [(1, 1)])]


@pytest.mark.parametrize("N,E,C,block", [(12, 3, 2, 2), (12, 4, 1, 3), (10, 4, 2, 1), (12, 3, 5, 4), (9, 2, 1, 4)])
def test_overflow_blocks_is_the_most_any_load_needs(N, E, C, block):
    """`overflow_blocks` (the static size of the overflow block table) against every load of at most N
    assignments on E experts: never fewer blocks than a load needs, and no more than the worst load needs."""
    loads = np.array([c for c in itertools.product(range(N + 1), repeat=E) if sum(c) <= N])  # [n_loads, E]
    need = (-(-np.maximum(loads - C, 0) // block)).sum(1)
    assert dispatch.overflow_blocks(N, E, C, block) == max(1, need.max())


def test_dropless_einsum_overflow_loop_matches_reference():
    """Routing pushed onto experts 0 and 1 (bias +10 on sigmoid scores in (0, 1)): nearly all of the T K = 32
    assignments are past C = 4, in 2 experts' runs of overflow blocks of 3; values and gradients (x, router, every
    expert weight) equal the loop reference in float32 (swiglu, gelu); with bfloat16 activations the values do
    (gradients accumulate bfloat16 products, as in every backend: test_bf16_activations_route_in_f32)."""
    for activation, dtype, tol in (("swiglu", jnp.float32, F32), ("gelu", jnp.float32, F32),
                                   ("swiglu", jnp.bfloat16, BF16)):
        cfg = MoEConfig(D, DFF, 8, 2, score_fn="sigmoid", aux_free_bias=True, backend="einsum", block_size=3,
                        activation=activation)
        model = make_model(cfg)
        model.bias[...] = jnp.zeros(8).at[:2].set(10.0)
        x, cot, _ = inputs(dtype=dtype)
        p = ref.params_of(model)
        dec = ref.decide(p, x.astype(jnp.float32), cfg)
        assert all(sorted(pk) == [0, 1] for pk in dec.picks)
        y_ref, gp_ref, gx_ref = ref_value_and_grads(p, x.astype(jnp.float32), cot, cfg, dec)
        y, stats, gp, gx = moe_value_and_grads(model, x, cot)
        assert float(stats.dropped) == 0.0 and list(np.asarray(stats.load)[:2]) == [T, T]
        assert y.dtype == dtype and gx.dtype == dtype
        got, want = ((y, gx, gp), (y_ref, gx_ref, gp_ref)) if dtype == jnp.float32 else (y, y_ref)
        assert_trees_close(got, want, tol, f"{activation} {dtype.__name__} ")


@pytest.mark.parametrize("n_keys,n_values", [(5, 40), (1, 1), (2 ** 26, 64), (2 ** 26 + 1, 64), (2 ** 20, 2 ** 13)])
def test_sort_pairs_orders_by_key_then_value(n_keys, n_values):
    """`dispatch._sort_pairs` gives the (key, value) order of np.lexsort, with the largest key and value present:
    packed into one uint32 where key * 2^b + value fits in 32 bits (the first three cases; the third fills all 32),
    a two-operand sort where it does not (the last two)."""
    rng = np.random.default_rng(n_keys)
    key = rng.integers(0, min(n_keys, 6), 300).astype(np.int64) * (n_keys // min(n_keys, 6))
    value = rng.integers(0, n_values, 300)
    key[:2], value[:2] = n_keys - 1, (n_values - 1, 0)
    key, value = key.astype(np.int32), value.astype(np.int32)
    order = np.lexsort((value, key))
    got = jax.jit(dispatch._sort_pairs, static_argnums=(2, 3))(jnp.asarray(key), jnp.asarray(value), n_keys, n_values)
    np.testing.assert_array_equal(got[0], key[order])
    np.testing.assert_array_equal(got[1], value[order])


def test_capacity_plan_first_come_by_hand():
    # k=0 in token order: t0->e0 r0, t1->e0 r1, t2->e1 r0, t3->e0 DROP, t4->e2 r0
    # k=1 in token order: t0->e1 r1, t1->e2 r1, t2->e0 DROP, t3->e1 DROP, t4 masked
    plan = _jit_capacity_plan(HAND_IDS, HAND_MASK, 3, HAND_C)
    np.testing.assert_array_equal(plan.slot, [[0, 1, 2, 6, 4], [3, 5, 6, 6, 6]])
    np.testing.assert_array_equal(plan.row_token, [0, 1, 2, 0, 4, 1])
    np.testing.assert_array_equal(plan.row_k, [0, 0, 0, 1, 0, 1])
    np.testing.assert_array_equal(plan.layout.group_sizes, [2, 2, 2])
    assert float(dispatch.dropped_fraction(plan, HAND_MASK)) == pytest.approx(3 / 9)


def test_capacity_plan_batch_prioritized_by_hand():
    prio = jnp.array([0.1, 0.5, 0.3, 0.9, 0.2])  # order t3, t1, t2, t4, t0
    # k=0: t3->e0 r0, t1->e0 r1, t2->e1 r0, t4->e2 r0, t0->e0 DROP
    # k=1: t3->e1 r1, t1->e2 r1, t2->e0 DROP, t4 masked, t0->e1 DROP
    plan = _jit_capacity_plan(HAND_IDS, HAND_MASK, 3, HAND_C, prio)
    np.testing.assert_array_equal(plan.slot, [[6, 1, 2, 0, 4], [6, 5, 6, 3, 6]])
    np.testing.assert_array_equal(plan.row_token, [3, 1, 2, 3, 4, 1])
    np.testing.assert_array_equal(plan.row_k, [0, 0, 0, 1, 0, 1])
    assert float(dispatch.dropped_fraction(plan, HAND_MASK)) == pytest.approx(3 / 9)


def test_capacity_plan_priority_ties_keep_token_order():
    ids, mask = jnp.zeros((3, 1), jnp.int32), jnp.ones((3, 1), bool)
    plan = _jit_capacity_plan(ids, mask, 1, 1, jnp.array([0.2, 0.7, 0.7]))
    np.testing.assert_array_equal(plan.slot, [[1, 0, 1]])  # t1 before t2 (stable), t0 last
    plan = _jit_capacity_plan(ids, mask, 1, 1, jnp.ones(3))
    np.testing.assert_array_equal(plan.slot, [[0, 1, 1]])
    assert float(dispatch.dropped_fraction(plan, mask)) == pytest.approx(2 / 3)


def test_dispatch_combine_hand_case():
    """out[t] = sum of kept picks' weight * rows[slot]; dropped picks add 0 (by hand)."""
    plan = _jit_capacity_plan(HAND_IDS, HAND_MASK, 3, HAND_C)
    x = jnp.arange(5 * 2, dtype=jnp.float32).reshape(5, 2) + 1.0
    rows = dispatch.dispatch(x, plan)
    np.testing.assert_array_equal(rows, x[jnp.array([0, 1, 2, 0, 4, 1])])
    w = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0]])
    out = dispatch.combine(rows * 10.0, w, plan)
    expected = 10.0 * jnp.stack([3.0 * x[0], 7.0 * x[1], 5.0 * x[2], 0.0 * x[3], 9.0 * x[4]])
    np.testing.assert_allclose(out, expected, **F32)


@pytest.mark.parametrize("d", [256, 40])  # rows gathered in the [N, d/128, 128] lane-row form; [N, 1, d]
@pytest.mark.parametrize("plan_kind", ["dropless1", "dropless2", "capacity_prio"])
def test_dispatch_combine_values_and_gradients_equal_plain_indexing(d, plan_kind):
    """dispatch and combine (gathers from the lane-row form, sort-built dropless plans, custom VJPs) equal plain
    indexing and its autodiff, values and gradients, with masked and dropped picks."""
    T, K, E = 24, 3, 5
    rng = np.random.default_rng(d)
    ids = jnp.asarray(rng.integers(0, E, (T, K)), jnp.int32)
    mask = jnp.asarray(rng.random((T, K)) < 0.8)
    if plan_kind == "capacity_prio":
        plan = dispatch.capacity_plan(ids, mask, E, 4, jnp.asarray(rng.integers(0, 3, T), jnp.float32))
    else:
        plan = dispatch.dropless_plan(ids, mask, E, int(plan_kind[-1]))
    M = plan.row_token.shape[0]
    x, w = jnp.asarray(rng.normal(size=(T, d)), jnp.float32), jnp.asarray(rng.random((T, K)), jnp.float32)

    def plain_dispatch(x):
        return jnp.where((plan.row_token < T)[:, None], x[jnp.minimum(plan.row_token, T - 1)], 0.0)

    def plain_combine(y, w):
        kept = (plan.slot < M).T  # [T, K]
        picks = y[jnp.minimum(plan.slot, M - 1)]  # [K, T, d]
        return jnp.sum(jnp.where(kept.T[..., None], picks * w.T[..., None], 0.0), axis=0)

    np.testing.assert_array_equal(dispatch.dispatch(x, plan), plain_dispatch(x))
    y = jnp.sin(plain_dispatch(x)) + 0.5
    np.testing.assert_allclose(dispatch.combine(y, w, plan), plain_combine(y, w), **F32)
    loss = lambda d_, c_: lambda x, w: jnp.sum(jnp.cos(c_(jnp.sin(d_(x)) + 0.5, w)))
    got = jax.grad(loss(lambda x: dispatch.dispatch(x, plan), lambda y, w: dispatch.combine(y, w, plan)), (0, 1))(x, w)
    want = jax.grad(loss(plain_dispatch, plain_combine), (0, 1))(x, w)
    for g, h in zip(got, want):
        np.testing.assert_allclose(g, h, **F32)


def _loop_capacity_slots(ids, mask, E, C, prio):
    """capacity_plan's slot [K, T] by the reference's explicit loop."""
    T, K = ids.shape
    order = list(range(T)) if prio is None else sorted(range(T), key=lambda t: -prio[t])
    fill, slot = [0] * E, np.full((K, T), E * C)
    for k in range(K):
        for t in order:
            e = ids[t, k]
            if mask[t, k] and fill[e] < C:
                slot[k, t] = e * C + fill[e]
                fill[e] += 1
    return slot


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(st.data())
def test_capacity_plan_property(data):
    T = data.draw(st.integers(1, 12), "T")
    E = data.draw(st.integers(1, 6), "E")
    K = data.draw(st.integers(1, E), "K")
    C = data.draw(st.integers(1, T * K), "C")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), "seed"))
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32)
    mask = rng.random((T, K)) < 0.8
    prio = rng.integers(0, 3, T).astype(np.float32) if data.draw(st.booleans(), "prio") else None
    plan = _jit_capacity_plan(jnp.asarray(ids), jnp.asarray(mask), E, C, None if prio is None else jnp.asarray(prio))
    expected = _loop_capacity_slots(ids, mask, E, C, prio)
    np.testing.assert_array_equal(plan.slot, expected)
    dropped = ((expected == E * C) & mask.T).sum() / max(mask.sum(), 1)
    np.testing.assert_allclose(dispatch.dropped_fraction(plan, jnp.asarray(mask)), dropped, **F32)


# ----- bf16 activations ----------------------------------------------------------------------------

def _eqns(jaxpr):
    """All equations of a jaxpr, nested ones (pjit, custom_vjp, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for j in (v if isinstance(v, (tuple, list)) else (v,)):
                j = getattr(j, "jaxpr", j)  # ClosedJaxpr -> Jaxpr
                if hasattr(j, "eqns"):
                    yield from _eqns(j)


@pytest.mark.parametrize("router,dname,backend", [
    ("topk_sigmoid_norm_scale_bias_shared", "dropless", "blocked"),
    ("topk_sigmoid_norm_scale_bias_shared", "dropless", "einsum"),
    ("topk_softmax", "cap_drop", "einsum"),
    ("gshard", "dropless", "ragged_dot"),
    ("expert_choice", "cap_drop", "einsum"),
])
def test_bf16_activations_route_in_f32(router, dname, backend):
    cfg = make_config(router, dname, backend=backend)
    model = make_model(cfg)
    x, _, token_ids = inputs(dtype=jnp.bfloat16)
    y, stats = model(x, token_ids=token_ids)
    assert y.dtype == jnp.bfloat16
    assert stats.entropy.dtype == jnp.float32 and stats.loss.dtype == jnp.float32

    jaxpr = jax.make_jaxpr(lambda x: model(x, token_ids=token_ids)[0])(x).jaxpr
    top_k = [e for e in _eqns(jaxpr) if e.primitive.name == "top_k"]
    assert top_k and all(e.invars[0].aval.dtype == jnp.float32 for e in top_k), top_k
    for name in ("logistic", "exp"):  # sigmoid / softmax
        for e in _eqns(jaxpr):
            if e.primitive.name == name and e.outvars[0].aval.shape[-1:] == (cfg.n_experts,):
                assert e.outvars[0].aval.dtype == jnp.float32, e

    # Reference in f32 on the same (bf16-rounded) inputs.
    p = ref.params_of(model)
    xf = x.astype(jnp.float32)
    y_ref = ref.moe(p, xf, cfg, token_ids=token_ids)
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, **BF16)


def test_router_probs_f32_for_bf16_logits():
    logits = jax.random.normal(jax.random.key(0), (T, 4)).astype(jnp.bfloat16)
    r = routing.topk(logits, 2, score_fn="sigmoid", normalize=True)
    assert r.weights.dtype == r.probs.dtype == r.logits.dtype == jnp.float32


# ----- aux-loss-free bias state -----------------------------------------------------------------

def test_router_bias_is_state_not_param():
    cfg = make_config("topk_sigmoid_norm_scale_bias_shared", "dropless")
    model = MoE(cfg, rngs=nnx.Rngs(0))  # the library's own construction
    np.testing.assert_array_equal(model.bias[...], np.zeros(cfg.n_experts))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert "bias" not in params and "router" in params
    bias_state = nnx.to_pure_dict(nnx.state(model, moe.RouterBias))
    assert set(bias_state) == {"bias"}
    assert not isinstance(model.bias, nnx.Param)


def test_update_bias_sign():
    cfg = make_config("topk_sigmoid_norm_scale_bias_shared", "dropless", bias_update_rate=0.01)
    model = make_model(cfg)
    before = np.asarray(model.bias[...])
    load = jnp.array([10.0, 0.0, 3.0, 3.0, 3.0, 3.0, 3.0, 7.0])  # mean 4
    model.update_bias(load)
    after = np.asarray(model.bias[...])
    np.testing.assert_allclose(after - before, 0.01 * np.array([-1, 1, 1, 1, 1, 1, 1, -1]), **F32)
    # With the layer's own load, the overloaded expert's bias goes down.
    x, _, _ = inputs()
    _, stats = model(x)
    before = np.asarray(model.bias[...])
    model.update_bias(stats.load)
    delta = np.asarray(model.bias[...]) - before
    top = int(np.argmax(stats.load))
    assert delta[top] < 0
    assert np.all(np.sign(delta) == -np.sign(np.asarray(stats.load) - np.mean(np.asarray(stats.load))))


# ----- property: dropless forward matches the reference over shapes -------------------------------

@st.composite
def dropless_cases(draw):
    """(B, S, E, K, n_dead, score_fn, (backend, block_size), seed); n_dead experts are forced to get
    no token; K ranges up to E."""
    E = draw(st.sampled_from([1, 2, 3, 4, 6]))
    K = draw(st.integers(1, E))
    return (draw(st.integers(1, 2)), draw(st.integers(1, 5)), E, K, draw(st.integers(0, E - K)),
            draw(st.sampled_from(["softmax", "sigmoid"])),
            draw(st.sampled_from([("blocked", 1), ("blocked", 3), ("ragged_dot", 1), ("einsum", 1), ("einsum", 2)])),
            draw(st.integers(0, 1000)))


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(dropless_cases())
@example((2, 5, 6, 2, 3, "softmax", ("blocked", 3), 7))  # half the experts get no token
@example((1, 3, 4, 4, 0, "sigmoid", ("ragged_dot", 1), 1))  # K == E
def test_dropless_property(case):
    b, s, E, K, n_dead, score_fn, (backend, block_size), seed = case
    cfg = MoEConfig(8, 16, E, K, score_fn=score_fn, aux_free_bias=True, normalize=score_fn == "sigmoid",
                    backend=backend, block_size=block_size)
    model = make_model(cfg, seed)
    dead = np.random.default_rng(seed).permutation(E)[:n_dead]
    model.bias[...] = jnp.zeros(E).at[dead].set(-10.0)  # scores are in (0, 1): never selected
    x = jax.random.normal(jax.random.key(seed), (b, s, 8))
    graphdef, state = nnx.split(model)
    y, stats = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)  # one compile per example
    np.testing.assert_allclose(y, ref.moe(ref.params_of(model), x, cfg), **F32)
    np.testing.assert_array_equal(np.asarray(stats.load)[dead], 0)
    assert float(stats.load.sum()) == b * s * K


def test_gated_shared_expert_of_any_width():
    """Qwen2-MoE's shared expert: width shared_d_ff (not a multiple of the routed experts' width), output
    scaled by sigmoid(x . w_g): the layer adds exactly that to its routed output; metrics count it."""
    from moejax import metrics

    cfg = model_config.deepseekmoe(D, DFF, n_experts=4, top_k=2, m=2, n_shared=1, shared_d_ff=24, shared_gate=True)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    assert layer.shared["w_up"].shape == (D, 24) and layer.shared_gate.shape == (D, 1)
    x = jax.random.normal(jax.random.PRNGKey(1), (B, S, D))
    xt = x.reshape(T, D)
    want = jax.nn.sigmoid(xt @ layer.shared_gate[...]) * experts.ffn(xt, layer.shared, cfg.activation)
    y, _ = layer(x)
    layer.shared["w_down"][...] = jnp.zeros_like(layer.shared["w_down"][...])
    routed, _ = layer(x)
    np.testing.assert_allclose((y - routed).reshape(T, D), want, **F32)
    assert float(jnp.abs(want).max()) > 0.01
    m = model_config.ModelConfig(vocab_size=8, d_model=D, n_layers=1, n_heads=2, moe=cfg)
    f, K = DFF // 2, 2 * 2 - 1
    assert metrics.active_params(m)["ffn"] == 3 * D * 24 + D + 3 * D * f * K
    with pytest.raises(ValueError, match=r"MoEConfig\.shared_gate=True.*allowed: False with n_shared=0"):
        model_config.MoEConfig(D, DFF, n_experts=4, top_k=2, shared_gate=True)
    with pytest.raises(ValueError, match=r"MoEConfig\.shared_d_ff=24.*allowed: 0 with n_shared=0"):
        model_config.MoEConfig(D, DFF, n_experts=4, top_k=2, shared_d_ff=24)


def test_pallas_backend_casts_float32_weights_first_only_under_fsdp(monkeypatch):
    """bf16 rows with f32 weights: the weights reach pallas_kernels.gmm (gelu) and swiglu_ffn (swiglu) in f32
    (cast in the kernel) without fsdp, and in bf16 when fsdp splits them (the all-gather then moves bf16)."""
    from moejax import sharding

    seen = []
    monkeypatch.setattr(experts.pallas_kernels, "gmm",
                        lambda rows, w, sizes: seen.append(w.dtype) or jnp.zeros((rows.shape[0], w.shape[2]), rows.dtype))
    monkeypatch.setattr(experts.pallas_kernels, "swiglu_ffn",
                        lambda rows, *ws_sizes: seen.append(tuple(w.dtype for w in ws_sizes[:3])) or rows)
    layout = dataclasses.make_dataclass("L", ["group_sizes"])(jnp.zeros((4,), jnp.int32))
    rows, w = jnp.zeros((8, 16), jnp.bfloat16), jnp.zeros((4, 16, 32), jnp.float32)
    params = {"w_gate": w, "w_up": w, "w_down": jnp.zeros((4, 32, 16), jnp.float32)}
    ffn = lambda rows: experts.grouped_ffn(rows, params, layout, "swiglu", "pallas")
    experts._pallas(rows, w, layout)
    ffn(rows)
    experts._pallas(rows.astype(jnp.float32), w.astype(jnp.bfloat16), layout)
    with sharding.use(sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2), jax.devices()[:2])):
        experts._pallas(rows, w, layout)
        ffn(rows)
    f32, bf16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
    assert seen == [f32, (f32,) * 3, f32, bf16, (bf16,) * 3]
