"""moejax.upcycle and config.train.init_from: what an upcycled model computes at step 0, as the module
docstring states it, and a run started from another run's parameters."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax import model as M
from moejax import model_config as mc
from moejax import train, upcycle
from moejax.checkpoint import load_checkpoint
from tests.test_train import corpus, tiny  # noqa: F401 (corpus is a fixture)
from tests.tolerances import F32

V, D, F = 64, 32, 64


def dense_model(**kw):
    c = M.ModelConfig(V, D, 3, 4, mc.dense(D, F), n_kv_heads=2, **kw)
    return c, M.Transformer(c, rngs=nnx.Rngs(1))


def upcycled(method, source_cfg, source, target_cfg):
    target = M.Transformer(target_cfg, rngs=nnx.Rngs(2))
    graphdef, params, rest = nnx.split(target, nnx.Param, ...)
    new = upcycle.upcycle(method, source_cfg, nnx.state(source, nnx.Param), target_cfg,
                          {"params": params, "rest": rest})
    return nnx.merge(graphdef, new["params"], new["rest"])


def tokens():
    return jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, V)


def test_sparse_upcycling_with_normalised_gates_is_the_dense_model():
    """Every expert a copy of the dense FFN: with gates that sum to 1 per token (Mixtral's top-2), the MoE
    model computes the dense model's logits; with Switch-like unnormalised top-1 gates it does not."""
    src_cfg, src = dense_model(first_k_dense=1)
    tgt_cfg = dataclasses.replace(src_cfg, moe=mc.mixtral(D, F, n_experts=4))
    moe = upcycled("sparse", src_cfg, src, tgt_cfg)
    np.testing.assert_allclose(moe(tokens())[0], src(tokens())[0], **F32)
    switch = dataclasses.replace(src_cfg, moe=mc.mixtral(D, F, n_experts=4, top_k=1, normalize=False))
    assert float(jnp.abs(upcycled("sparse", src_cfg, src, switch)(tokens())[0] - src(tokens())[0]).max()) > 1e-2


def test_fine_grained_upcycling_computes_shared_segments_plus_gated_routed_segments():
    """DeepSeekMoE m=4, 1 shared + 7 of 15 routed: each MoE layer computes seg_0(x) + sum_k g_k seg_s(i_k)(x)
    with seg_j the dense FFN's hidden units [16 j, 16 j + 16) and s(i) = 1 + i mod 3; the segments of the
    dense FFN sum to it (so a token whose picks were segments 1, 2, 3 with gate 1 would get the dense FFN)."""
    src_cfg, src = dense_model(first_k_dense=1)
    tgt_cfg = dataclasses.replace(src_cfg, moe=mc.deepseekmoe(D, F, n_experts=4, top_k=2, m=4, n_shared=1))
    moe = upcycled("fine_grained", src_cfg, src, tgt_cfg)
    x = jax.random.normal(jax.random.PRNGKey(3), (1, 10, D))
    w = {k: np.asarray(v[...]) for k, v in src.blocks[1].ffn.shared.items()}

    def seg(j, xt):  # xt [T, d]: segment j of the dense SwiGLU FFN
        u = slice(16 * j, 16 * j + 16)
        return (jax.nn.silu(xt @ w["w_gate"][:, u]) * (xt @ w["w_up"][:, u])) @ w["w_down"][u]

    xt = np.asarray(x[0])
    dense_out = np.asarray(src.blocks[1].ffn(x)[0][0])
    np.testing.assert_allclose(sum(seg(j, xt) for j in range(4)), dense_out, **F32)
    layer = moe.blocks[1].ffn
    r = layer.route(x)
    ref = seg(0, xt) + sum(np.asarray(r.weights)[:, k, None] * np.stack(
        [seg(upcycle.segment_of(tgt_cfg, int(i)), xt[t:t + 1])[0] for t, i in enumerate(np.asarray(r.expert_ids)[:, k])])
        for k in range(7))
    np.testing.assert_allclose(layer(x)[0][0], ref, **F32)
    assert np.array_equal(np.asarray(layer.router[...]), np.asarray(
        M.Transformer(tgt_cfg, rngs=nnx.Rngs(2)).blocks[1].ffn.router[...]))  # the router is this run's own


def test_upcycling_refuses_what_it_cannot_build():
    src_cfg, src = dense_model()
    cases = {
        "sparse": (mc.deepseekmoe(D, F, n_experts=4), "n_shared=0"),
        "fine_grained": (mc.deepseekmoe(D, 2 * F, n_experts=4), "d_ff = the dense FFN's width 64"),
        "bogus": (mc.mixtral(D, F, n_experts=4), "TrainConfig.upcycle='bogus'"),
    }
    for method, (moe_cfg, says) in cases.items():
        with pytest.raises(ValueError, match=says):
            upcycled(method, src_cfg, src, dataclasses.replace(src_cfg, moe=moe_cfg))
    with pytest.raises(ValueError, match="init_from has shape"):  # 'none' wants the same model
        upcycled("none", src_cfg, src, dataclasses.replace(src_cfg, n_kv_heads=4))
    with pytest.raises(ValueError, match="TrainConfig.upcycle='sparse'.*init_from"):
        config_lib.TrainConfig(upcycle="sparse")


def test_a_run_starts_from_an_upcycled_dense_run(corpus, tmp_path):  # noqa: F811
    """train.init_from + upcycle='sparse' at lr 1e-9: after one step the MoE run's final validation loss is
    the dense run's (same validation batches); a missing init_from is named."""
    dense_cfg = tiny(corpus, tmp_path, method="dense", steps=3, checkpoint_every=3)
    dense = train.train_and_evaluate(dense_cfg, str(tmp_path / "dense"), progress=False)
    moe_cfg = tiny(corpus, tmp_path, method="dense", steps=1, warmup_steps=0, lr=1e-9,
                   init_from=str(tmp_path / "dense"), upcycle="sparse")
    moe_cfg.model.moe.update(n_experts=4, top_k=2, n_shared=0, normalize=True)
    moe = train.train_and_evaluate(moe_cfg, str(tmp_path / "moe"), progress=False)
    assert moe["val_loss"] == pytest.approx(dense["val_loss"], abs=1e-4)
    ck = load_checkpoint(str(tmp_path / "moe"))
    assert ck.trainer.model_config.moe.n_experts == 4
    missing = tiny(corpus, tmp_path, method="dense", steps=1, warmup_steps=0, init_from=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="train.init_from"):
        train.train_and_evaluate(missing, str(tmp_path / "missing"), progress=False)
