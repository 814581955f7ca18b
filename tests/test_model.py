"""Decoder LM (moejax/model.py): causality, packing, rotary positions, attention against a loop
reference, dense/MoE layer layout, bf16 compute, learning, and ModelConfig validation."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moejax import attention as A
from moejax import model as M
from moejax import model_config
from moejax import sharding
from tests.tolerances import F32

V, D, H = 64, 32, 4


def make(n_layers=3, first_k_dense=1, moe_every=1, **kw):
    mcfg = kw.pop("moe_cfg", model_config.deepseekmoe(D, 32, n_experts=4, top_k=2, m=2, n_shared=1))
    cfg = M.ModelConfig(V, D, n_layers, H, mcfg, first_k_dense=first_k_dense, moe_every=moe_every, max_len=64, **kw)
    return M.Transformer(cfg, rngs=nnx.Rngs(0))


def tokens(B=2, S=12, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, S), 0, V)


def test_shapes_dtypes_and_moe_layer_layout():
    m = make(n_layers=5, first_k_dense=1, moe_every=2)
    logits, stats = m(tokens())
    assert logits.shape == (2, 12, V) and logits.dtype == jnp.float32
    assert m.config.routed_layers == (1, 3)
    # deepseekmoe(N=4, K=2, m=2, Ks=1): m N - Ks = 7 routed experts with m K - Ks = 3 picks
    assert len(stats) == 2 and all(s.load.shape == (7,) for s in stats)
    assert m.blocks[0].ffn.config.n_experts == 0 and m.blocks[1].ffn.config.n_experts == 7
    with pytest.raises(ValueError, match="train=True.*needs key="):
        m(tokens(), train=True)


def test_dense_baseline_has_no_routed_layers():
    """moe = a dense FFN config: every layer is dense, so no stats, loads or routes are returned."""
    m = make(n_layers=3, moe_cfg=model_config.dense(D, 32))
    assert m.config.routed_layers == () and m.routes(tokens()) == []
    assert m(tokens(), key=jax.random.key(0), train=True)[1] == []


def test_routes_are_the_routing_the_forward_pass_uses():
    """Transformer.routes (the routing explorer's view) picks the experts whose counts the forward pass
    reports, layer by layer; dense layers are skipped."""
    m = make(n_layers=4, first_k_dense=1, moe_every=2)
    t = tokens()
    _, stats = m(t)
    routes = m.routes(t)
    assert len(routes) == len(stats) == 2
    for r, s in zip(routes, stats):
        assert r.expert_ids.shape == (t.size, 3)
        counts = np.bincount(np.asarray(r.expert_ids).ravel(), minlength=7)
        np.testing.assert_array_equal(counts, s.load)


@pytest.mark.parametrize("remat", [False, True, "attention"])
def test_scanned_layers_equal_the_unrolled_model(remat):
    """scan_layers: the same logits, stats, routes, gradients and aux-free bias updates as the unrolled
    model holding the same weights (each stacked slice copied into its layer); the dense first layer stays
    unrolled; stacked weights carry a leading unsplit axis in their `axes` metadata. 'attention': the
    scanned model recomputes only its attention sublayers (remat_ffn=False), the unrolled model nothing."""
    mcfg = model_config.deepseekmoe(D, 32, n_experts=4, top_k=2, m=2, n_shared=1, aux_free_bias=True)
    scanned = make(n_layers=4, first_k_dense=1, moe_cfg=mcfg, scan_layers=True, remat=bool(remat),
                   remat_ffn=remat != "attention")
    unrolled = make(n_layers=4, first_k_dense=1, moe_cfg=mcfg, remat=remat is True)
    assert len(scanned.blocks) == 1 and scanned.n_scanned == 3
    assert scanned.scanned.ffn.experts["w_up"].get_metadata()["axes"][0] is None
    assert scanned.scanned.ffn.bias[...].shape == (3, 7)
    nnx.update(scanned.scanned.ffn.bias, jnp.arange(21.0).reshape(3, 7) * 1e-3)  # distinct biases per layer
    nnx.update(unrolled.blocks[0], nnx.state(scanned.blocks[0]))
    for l in range(1, 4):
        nnx.update(unrolled.blocks[l], nnx.state(scanned.block(l)))
    t, key = tokens(), jax.random.key(3)
    # jitted: one compiled program per model, not op-by-op dispatch
    forward = nnx.jit(lambda model: model(t, key=key, train=True))
    (a, sa), (b, sb) = forward(scanned), forward(unrolled)
    np.testing.assert_allclose(a, b, **F32)
    assert len(sa) == len(sb) == 3
    for x, y in zip(sa, sb):
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **F32), x, y)
    routes = nnx.jit(lambda model: model.routes(t))
    for x, y in zip(routes(scanned), routes(unrolled)):
        np.testing.assert_array_equal(x.expert_ids, y.expert_ids)

    def loss(model):
        logits, stats = model(t, key=key, train=True)
        return jnp.mean(logits ** 2) + sum(s.loss for s in stats)

    grad = nnx.jit(nnx.grad(loss))
    gs, gu = grad(scanned), grad(unrolled)
    np.testing.assert_allclose(gs["blocks"][0]["attn"]["wkv"][...], gu["blocks"][0]["attn"]["wkv"][...], **F32)
    for l in range(3):
        for path in (("attn", "wo"), ("ffn", "router")):
            np.testing.assert_allclose(gs["scanned"][path[0]][path[1]][...][l],
                                       gu["blocks"][l + 1][path[0]][path[1]][...], **F32)
        np.testing.assert_allclose(gs["scanned"]["ffn"]["experts"]["w_gate"][...][l],
                                   gu["blocks"][l + 1]["ffn"]["experts"]["w_gate"][...], **F32)
    loads = [s.load for s in sb]
    scanned.update_biases(loads)
    unrolled.update_biases(loads)
    for l in range(3):
        np.testing.assert_allclose(scanned.scanned.ffn.bias[...][l], unrolled.blocks[l + 1].ffn.bias[...], **F32)


def _remat_bodies(jaxpr) -> list[set]:
    """The primitives inside each jax.checkpoint (remat) of a jaxpr, nested ones included. Sub-jaxprs are found
    by their attributes (a Jaxpr has eqns, a ClosedJaxpr a jaxpr): jax moves these classes between versions."""
    def subs(eqn):
        for v in eqn.params.values():
            for x in v if isinstance(v, (list, tuple)) else [v]:
                x = getattr(x, "jaxpr", x)
                if hasattr(x, "eqns"):
                    yield x

    def names(j, out):
        for e in j.eqns:
            out.add(e.primitive.name)
            for sub in subs(e):
                names(sub, out)
        return out

    def walk(j, found):
        for e in j.eqns:
            if e.primitive.name in ("checkpoint", "remat2"):
                found.append(set().union(*(names(sub, set()) for sub in subs(e))))
            for sub in subs(e):
                walk(sub, found)
        return found
    return walk(jaxpr, [])


def test_remat_ffn_false_recomputes_only_the_attention():
    """remat with remat_ffn=False: one jax.checkpoint per block (the unrolled dense first block's, the
    scanned MoE blocks') holding the attention (dot_general) but not the MoE layer's routing (top_k);
    remat_ffn=True: the MoE blocks' holds the routing too. Values: the test above."""
    t = tokens()
    for remat_ffn in (True, False):
        graphdef, params = nnx.split(make(n_layers=3, first_k_dense=1, remat=True, remat_ffn=remat_ffn,
                                          scan_layers=True))

        def loss(p):
            logits, stats = nnx.merge(graphdef, p)(t)
            return jnp.mean(logits ** 2) + sum(s.loss for s in stats)

        bodies = _remat_bodies(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
        assert len(bodies) == 2 and all("dot_general" in b for b in bodies)
        assert sum("top_k" in b for b in bodies) == (1 if remat_ffn else 0), bodies


def test_scan_layers_needs_alike_layers():
    with pytest.raises(ValueError, match="scan_layers.*moe_every=2"):
        make(n_layers=4, moe_every=2, scan_layers=True)


def test_causal_future_tokens_do_not_change_past_logits():
    m = make()  # dropless dispatch: tokens do not compete for capacity
    t = tokens()
    t2 = t.at[:, 7:].set((t[:, 7:] + 5) % V)
    a, _ = m(t)
    b, _ = m(t2)
    np.testing.assert_allclose(a[:, :7], b[:, :7], **F32)
    assert not np.allclose(a[:, 7:], b[:, 7:])


def test_packed_documents_match_separate_runs():
    m = make()
    t = tokens(B=1, S=10)
    seg = jnp.array([[1] * 4 + [2] * 6])
    pos = jnp.array([list(range(4)) + list(range(6))])
    # jitted: one compiled program per length (op-by-op dispatch compiled every op for each of 3 shapes: 10 s)
    forward = nnx.jit(lambda model, t, positions=None, segment_ids=None: model(t, positions, segment_ids))
    packed, _ = forward(m, t, pos, seg)
    first, _ = forward(m, t[:, :4])
    second, _ = forward(m, t[:, 4:])
    np.testing.assert_allclose(packed[:, :4], first, **F32)
    np.testing.assert_allclose(packed[:, 4:], second, **F32)


def test_query_blocks_and_flash_kernel_give_the_same_values_and_gradients():
    """attention_chunk (moejax.attention.attend): causal attention by blocks of queries, each over the keys up
    to its last, equals one block in values and in the gradients w.r.t. x and every weight, for multi-head
    and latent attention, with packed documents (segment ids) and blocks that do not divide S (3, 3, 3, 1);
    so does attention_kernel='flash' (the Pallas kernels interpreted: tests/test_flash.py tests them at
    several blocks), alone and inside the shard_map it runs in on a mesh (batch over data=2)."""
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 10, D))
    pos = jnp.array([list(range(10)), list(range(3)) + list(range(7))])
    seg = jnp.array([[1] * 10, [1] * 3 + [2] * 7])
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2), jax.devices()[:2])
    for kw in (dict(n_kv_heads=2), dict(attention="mla", kv_lora_rank=12, rope_head_dim=4, head_dim=6)):
        def value_and_grads(chunk, kernel="xla", mesh=None):
            cfg = M.ModelConfig(V, D, 1, H, model_config.dense(D, 32), attention_chunk=chunk,
                                attention_kernel=kernel, **kw)
            graphdef, params = nnx.split(A.make(cfg, nnx.Rngs(3)))
            loss = lambda p, x: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x, pos, seg)))
            with sharding.use(mesh) if mesh else contextlib.nullcontext():
                return jax.jit(jax.value_and_grad(loss, (0, 1)))(params, x)
        want = value_and_grads(0)
        for got in (value_and_grads(3), value_and_grads(0, "flash"), value_and_grads(0, "flash", mesh)):
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32), got, want)


def test_rope_depends_only_on_relative_position():
    q, k = jax.random.normal(jax.random.PRNGKey(1), (2, 1, 1, 1, 8))
    inv = 10000.0 ** (-jnp.arange(4) / 4)
    def score(pq, pk):
        return jnp.sum(A.rope(q, jnp.array([[pq]]), inv) * A.rope(k, jnp.array([[pk]]), inv))
    np.testing.assert_allclose(score(3, 1), score(10, 8), **F32)
    np.testing.assert_allclose(score(0, 0), jnp.sum(q * k), **F32)


def attention(config_kw=None, seed=3):
    cfg = M.ModelConfig(V, D, 1, H, model_config.dense(D, 32), **(config_kw or {}))
    return A.Attention(cfg, rngs=nnx.Rngs(seed)), cfg


def loop_attention(attn, cfg, x, pos):
    """Causal attention of x [S, d] token by token, head by head: query head j reads key/value head
    j // (H / H_kv) (Hugging Face's repeat_kv order); numpy except for the norms and rotary embedding."""
    H, G, h = cfg.n_heads, cfg.kv_heads, cfg.head_width
    wq, wkv, wo = (np.asarray(w[...]) for w in (attn.wq, attn.wkv, attn.wo))
    q = np.einsum("sd,dhk->shk", x, wq)
    k, v = (np.einsum("sd,dhk->shk", x, wkv[:, i]) for i in (0, 1))
    if cfg.qkv_bias:
        q, k, v = q + np.asarray(attn.bq[...]), k + np.asarray(attn.bkv[0]), v + np.asarray(attn.bkv[1])
    if cfg.qk_norm == "head":
        q, k = np.asarray(attn.q_norm(q)), np.asarray(attn.k_norm(k))
    elif cfg.qk_norm == "full":
        q = np.asarray(attn.q_norm(q.reshape(len(x), -1))).reshape(q.shape)
        k = np.asarray(attn.k_norm(k.reshape(len(x), -1))).reshape(k.shape)
    q, k = (np.asarray(A.rope(jnp.asarray(a)[None], pos, *A.rope_frequencies(cfg, h)))[0] for a in (q, k))
    out = np.zeros((len(x), H, h))
    for s in range(len(x)):
        for j in range(H):
            g = j // (H // G)
            sc = np.array([q[s, j] @ k[t, g] / np.sqrt(h) for t in range(s + 1)])
            p = np.exp(sc - sc.max()) / np.exp(sc - sc.max()).sum()
            out[s, j] = sum(p[t] * v[t, g] for t in range(s + 1))
    return np.einsum("shk,hkd->sd", out, wo)


@pytest.mark.parametrize("config_kw", [{}, dict(n_kv_heads=2, attention_chunk=4), dict(n_kv_heads=1, head_dim=6),
                                       dict(n_kv_heads=2, qk_norm="head", qkv_bias=True, attention_chunk=2),
                                       dict(qk_norm="full", head_dim=16)],
                         ids=["mha", "gqa_chunk4", "mqa_head_dim", "gqa_head_norm_bias_chunk2", "full_norm_head_dim"])
def test_attention_matches_loop_reference(config_kw):
    """Multi-head, grouped-query (2 and 1 key/value heads), a head width other than d / H, per-head and
    whole query/key norms, q/k/v biases: each against the loop reference. Norm scales and biases are drawn
    away from their initial 1 and 0 so that the test sees them. Two cases take the queries in blocks
    (attention_chunk 4 of S 6: blocks of 4 and 2 queries; 2: three blocks)."""
    attn, cfg = attention(config_kw)
    assert attn.wq.shape == (D, H, cfg.head_width) and attn.wkv.shape == (D, 2, cfg.kv_heads, cfg.head_width)
    keys = iter(jax.random.split(jax.random.PRNGKey(9), 4))
    for name in ("bq", "bkv"):
        if hasattr(attn, name):
            w = getattr(attn, name)
            w[...] = 0.5 * jax.random.normal(next(keys), w.shape)
    for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
        if norm is not None:
            norm.scale[...] = 1 + 0.5 * jax.random.normal(next(keys), norm.scale.shape)
    x = jax.random.normal(jax.random.PRNGKey(4), (1, 6, D))
    pos = jnp.arange(6)[None]
    np.testing.assert_allclose(attn(x, pos)[0], loop_attention(attn, cfg, np.asarray(x[0]), pos), **F32)


def rms(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * np.asarray(scale[...])


@pytest.mark.parametrize("q_lora_rank", [0, 10], ids=["q_from_x", "q_latent"])
def test_latent_attention_matches_loop_reference(q_lora_rank):
    """MLA (DeepSeek-V2 eq. 9-19) token by token, head by head in numpy: latent c_kv and rotary key k_R from
    x, per-head keys/values from c_kv, queries from x or from their own latent, scores over [nope; rope]
    channels scaled by (h + r)^-1/2 times YaRN's mscale^2."""
    yarn = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=4, mscale=1.0, mscale_all_dim=0.8)
    cfg = M.ModelConfig(V, D, 1, H, model_config.dense(D, 32), attention="mla", kv_lora_rank=12, rope_head_dim=4,
                        v_head_dim=6, head_dim=5, q_lora_rank=q_lora_rank, rope_scaling=yarn,
                        attention_chunk=3 if q_lora_rank else 0)  # query blocks of 3, 3 and 1
    attn = A.make(cfg, nnx.Rngs(2))
    for norm in [attn.kv_norm] + ([attn.q_norm] if q_lora_rank else []):
        norm.scale[...] = 1 + 0.5 * jax.random.normal(jax.random.PRNGKey(7), norm.scale.shape)
    S, h, r = 7, 5, 4
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (S, D)))
    w = {p[0]: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(attn, nnx.Param)) if len(p) == 1}
    q = (np.einsum("sc,chk->shk", rms(x @ w["wq_a"], attn.q_norm.scale), w["wq_b"]) if q_lora_rank
         else np.einsum("sd,dhk->shk", x, w["wq"]))
    ckv = x @ w["wkv_a"]
    kv = np.einsum("sc,chk->shk", rms(ckv[:, :12], attn.kv_norm.scale), w["wkv_b"])
    inv, factor = A.rope_frequencies(cfg, r)

    def rot(v, s):  # v [..., r] at position s, pairs (i, i + r/2)
        c, si = factor * np.cos(s * inv), factor * np.sin(s * inv)
        return np.concatenate([v[..., :2] * c - v[..., 2:] * si, v[..., 2:] * c + v[..., :2] * si], -1)

    scale = (h + r) ** -0.5 * (0.1 * 0.8 * np.log(4.0) + 1) ** 2
    out = np.zeros((S, H, 6))
    for s in range(S):
        for j in range(H):
            qs = np.concatenate([q[s, j, :h], rot(q[s, j, h:], s)])
            sc = np.array([qs @ np.concatenate([kv[t, j, :h], rot(ckv[t, 12:], t)]) * scale for t in range(s + 1)])
            p = np.exp(sc - sc.max()) / np.exp(sc - sc.max()).sum()
            out[s, j] = sum(p[t] * kv[t, j, h:] for t in range(s + 1))
    ref = np.einsum("shk,hkd->sd", out, w["wo"])
    np.testing.assert_allclose(attn(jnp.asarray(x)[None], jnp.arange(S)[None])[0], ref, **F32)


def test_grouped_query_attention_is_multi_head_with_shared_key_value_heads():
    """GQA with H_kv heads computes what multi-head attention computes when each key/value head's weights
    are repeated for its H / H_kv query heads."""
    gqa, _ = attention(dict(n_kv_heads=2))
    mha, _ = attention()
    mha.wq[...], mha.wo[...] = gqa.wq[...], gqa.wo[...]
    mha.wkv[...] = jnp.repeat(gqa.wkv[...], H // 2, axis=2)
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 7, D))
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    np.testing.assert_allclose(gqa(x, pos), mha(x, pos), **F32)


def test_attention_weights_are_the_active_attention_parameters():
    """moejax.metrics counts exactly the q, k, v and output weights (FLOPs and MFU build on it)."""
    from moejax import metrics

    mla = dict(attention="mla", kv_lora_rank=12, rope_head_dim=4, v_head_dim=6)
    for kw in ({}, dict(n_kv_heads=1, head_dim=6, qk_norm="head"), mla, dict(mla, q_lora_rank=10, head_dim=5)):
        cfg = M.ModelConfig(V, D, 1, H, model_config.dense(D, 32), **kw)
        attn = A.make(cfg, nnx.Rngs(0))
        weights = [p for path, p in nnx.to_flat_state(nnx.state(attn, nnx.Param)) if path[0].startswith("w")]
        assert metrics.active_params(cfg)["attention"] == sum(w.size for w in weights) > 0


def test_bf16_compute_keeps_f32_params_and_logits():
    m = make(dtype="bfloat16")
    logits, stats = m(tokens())
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
    f32 = make()
    ref, _ = f32(tokens())
    assert float(jnp.mean(jnp.abs(logits - ref))) < 0.05 * float(jnp.mean(jnp.abs(ref)))


def test_untied_embeddings_and_hash_router_get_token_ids():
    m = make(tie_embeddings=False, moe_cfg=model_config.hash_layer(D, 32, n_experts=4))
    logits, stats = m(tokens())
    assert logits.shape == (2, 12, V) and m.unembed[...].shape == (D, V)
    assert float(stats[0].load.sum()) == 2 * 12


@pytest.mark.parametrize("tie", [True, False])
def test_init_std_sets_every_weight_and_starts_at_uniform_loss(tie):
    """init_std > 0: every weight (not norm scales) ~ N(0, init_std) (DeepSeekMoE sec. 4.1.2); logits start
    near 0, so the loss starts at ln V (with fan-in init and tied N(0, 1) embeddings it starts far above)."""
    m = make(init_std=0.02, tie_embeddings=tie)
    for path, p in nnx.to_flat_state(nnx.state(m, nnx.Param)):
        if "scale" not in path:
            assert abs(float(jnp.std(p[...])) / 0.02 - 1) < 0.25 and abs(float(jnp.mean(p[...]))) < 0.01, path
    toks = tokens(B=4, S=32)
    loss = optax.softmax_cross_entropy_with_integer_labels(m(toks)[0][:, :-1], toks[:, 1:]).mean()
    assert abs(float(loss) - np.log(V)) < 0.05
    fan_in = make(tie_embeddings=tie)
    loss0 = optax.softmax_cross_entropy_with_integer_labels(fan_in(toks)[0][:, :-1], toks[:, 1:]).mean()
    assert float(loss0) > np.log(V) + 0.1


def test_a_few_adam_steps_lower_the_loss():
    m = make(n_layers=2)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    t = tokens(B=4, S=16, seed=5)
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(params):
            logits, stats = nnx.merge(graphdef, params, rest)(t[:, :-1])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:]).mean()
            return ce + sum(s.loss for s in stats), ce
        (_, ce), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, ce

    losses = []
    for _ in range(8):
        params, opt_state, ce = step(params, opt_state)
        losses.append(float(ce))
    assert losses[-1] < losses[0] - 0.5, losses


BASE = dict(vocab_size=V, d_model=D, n_layers=2, n_heads=H)
INVALID = {
    "vocab_size_zero": (dict(vocab_size=0), "vocab_size", "0"),
    "n_layers_zero": (dict(n_layers=0), "n_layers", "0"),
    "n_heads_not_dividing": (dict(n_heads=5), "n_heads", "5"),
    "odd_head_width": (dict(n_heads=32), "n_heads", "32"),
    "moe_width_mismatch": (dict(moe=model_config.switch(16, 32)), r"moe\.d_model", "16"),
    "first_k_dense_too_large": (dict(first_k_dense=3), "first_k_dense", "3"),
    "moe_every_zero": (dict(moe_every=0), "moe_every", "0"),
    "dense_d_ff_negative": (dict(dense_d_ff=-1), "dense_d_ff", "-1"),
    "rope_base_zero": (dict(rope_base=0.0), "rope_base", "0.0"),
    "unknown_dtype": (dict(dtype="float16"), "dtype", "'float16'"),
    "init_std_negative": (dict(init_std=-0.1), "init_std", "-0.1"),
    "kv_heads_not_dividing": (dict(n_kv_heads=3), "n_kv_heads", "3"),
    "kv_heads_negative": (dict(n_kv_heads=-1), "n_kv_heads", "-1"),
    "odd_head_dim": (dict(head_dim=7), "head_dim", "7"),
    "unknown_qk_norm": (dict(qk_norm="layer"), "qk_norm", "'layer'"),
    "norm_eps_zero": (dict(norm_eps=0.0), "norm_eps", "0.0"),
    "remat_not_bool": (dict(remat="attention"), "remat", "'attention'"),
    "attention_chunk_negative": (dict(attention_chunk=-1), "attention_chunk", "-1"),
    "unknown_attention_kernel": (dict(attention_kernel="splash"), "attention_kernel", "'splash'"),
    "unknown_attention": (dict(attention="mqa"), "attention", "'mqa'"),
    "mla_without_latent": (dict(attention="mla", rope_head_dim=4), "kv_lora_rank", "0"),
    "mla_odd_rope_width": (dict(attention="mla", kv_lora_rank=8, rope_head_dim=3), "rope_head_dim", "3"),
    "mla_with_kv_heads": (dict(attention="mla", kv_lora_rank=8, rope_head_dim=4, n_kv_heads=2), "n_kv_heads", "2"),
    "latent_rank_without_mla": (dict(kv_lora_rank=8), "kv_lora_rank", "8"),
    "unknown_rope_type": (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling",
                          r"\(\('factor', 2.0\), \('rope_type', 'dynamic'\)\)"),
    "yarn_without_original_length": (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling",
                                     r"\(\('factor', 4.0\), \('rope_type', 'yarn'\)\)"),
    "rope_key_of_another_type": (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "beta_fast": 32}),
                                 "rope_scaling", r"\(\('beta_fast'"),
}


@pytest.mark.parametrize("overrides,field,value", list(INVALID.values()), ids=list(INVALID))
def test_invalid_model_config_names_field_and_value(overrides, field, value):
    kw = {**BASE, "moe": model_config.switch(D, 32), **overrides}
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}={value}.*allowed"):
        M.ModelConfig(**kw)
