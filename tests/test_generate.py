"""moejax.generate: cached decoding equals the full forward pass token by token (multi-head, grouped-query and
latent attention; MoE routers; scanned layers; left-padded batches), sampling follows its definition, and the
command line generates from a workdir."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import generate as G
from moejax import model as M
from moejax import model_config as mc

V, D = 64, 32
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=4, mscale=1.0, mscale_all_dim=0.8)
CONFIGS = {
    "gqa_qknorm_deepseekmoe": dict(moe=mc.deepseekmoe(D, 64, n_experts=4), n_kv_heads=2, qk_norm="head",
                                   qkv_bias=True, first_k_dense=1),
    "mla_deepseek_v3_yarn": dict(moe=mc.deepseek_v3(D, 32, n_experts=8, top_k=2, n_groups=4, topk_groups=2),
                                 attention="mla", kv_lora_rank=12, rope_head_dim=4, q_lora_rank=10, v_head_dim=6,
                                 rope_scaling=YARN),
    "gshard_capacity_scanned": dict(moe=mc.gshard(D, 64, n_experts=4), scan_layers=True, tie_embeddings=False),
    "hash": dict(moe=mc.hash_layer(D, 64, n_experts=4)),
}


def model(name: str, seed: int = 0) -> M.Transformer:
    c = G.inference_config(M.ModelConfig(V, D, 2, 4, **CONFIGS[name]))
    return M.Transformer(c, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_equals_the_full_forward_pass(name):
    """Greedy continuation of a batch of prompts of lengths 5 and 2 (the shorter one left-padded): the logits
    each token was chosen from equal the full forward pass over prompt + tokens so far, at every step, and
    each token is their argmax. The padded row equals the same prompt decoded alone (checked for one model).
    Two layers: the first dense (DeepSeekMoE) or MoE, the second MoE."""
    m = model(name)
    prompts = [[3, 14, 15, 9, 26], [5, 35]]
    new, step_logits = G.generate(m, prompts, 6)
    assert new.shape == (2, 6) and step_logits.shape == (2, 6, V)
    np.testing.assert_array_equal(new, jnp.argmax(step_logits, -1))
    full = jax.jit(lambda t: m(t)[0])
    for b, p in enumerate(prompts):
        seq = jnp.asarray([p + list(np.asarray(new[b]))])
        ref = full(seq)[0, len(p) - 1:-1]  # the prediction after each prefix
        np.testing.assert_allclose(step_logits[b], ref, atol=2e-5, rtol=1e-5)
    if name == "mla_deepseek_v3_yarn":  # one model suffices: padding is masked the same way for all
        alone, alone_logits = G.generate(m, prompts[1:], 6)
        np.testing.assert_array_equal(alone[0], new[1])
        np.testing.assert_allclose(alone_logits[0], step_logits[1], atol=2e-5, rtol=1e-5)


def test_sampling_follows_temperature_and_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    draw = jax.jit(jax.vmap(lambda k, t, p: G.sample(logits, k, t, p)[0], (0, None, None)), static_argnums=(1, 2))
    freq = lambda t, p: np.bincount(np.asarray(draw(keys, t, p)), minlength=4) / len(keys)
    np.testing.assert_allclose(freq(1.0, 1.0), [0.5, 0.3, 0.15, 0.05], atol=0.015)  # >= 4.2 sd at n = 20000 (sd <= 0.0035); fixed keys
    np.testing.assert_allclose(freq(1.0, 0.7), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)  # nucleus: 0.5 + 0.3
    np.testing.assert_allclose(freq(1.0, 0.4), [1, 0, 0, 0])  # the most likely token is always kept
    p2 = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    np.testing.assert_allclose(freq(0.5, 1.0), p2 / p2.sum(), atol=0.015)  # temperature 1/2 squares p
    assert int(G.sample(logits, keys[0], 0.0, 1.0)[0]) == 0


def test_rows_stop_at_eos_and_bad_arguments_are_refused():
    m = model("hash")
    greedy, _ = G.generate(m, [[1, 2, 3]], 8)
    eos = int(greedy[0, 2])
    out, _ = G.generate(m, [[1, 2, 3]], 8, eos_id=eos)
    first = list(np.asarray(out[0])).index(eos)
    assert first <= 2 and set(np.asarray(out[0, first:]).tolist()) == {eos}
    for kw, says in ((dict(max_new_tokens=0), "max_new_tokens=0"), (dict(top_p=0.0), "top_p=0.0"),
                     (dict(temperature=-1.0), "temperature=-1.0")):
        with pytest.raises(ValueError, match=says):
            G.generate(m, [[1]], **{"max_new_tokens": 2, **kw})
    with pytest.raises(ValueError, match="expert_choice"):
        G.inference_config(M.ModelConfig(V, D, 1, 4, mc.expert_choice(D, 64, n_experts=4)))


def test_command_line_generates_from_a_workdir(tmp_path, capsys):
    """A workdir written by moejax.convert.save_model (a random byte-level model) continues two prompts."""
    from moejax import convert

    c = mc.ModelConfig(384, D, 2, 4, mc.mixtral(D, 64, n_experts=4), tie_embeddings=False)
    experiment, trainer = convert.model_workdir_config(c, "byte")
    state = trainer.init()
    convert.save_model(str(tmp_path), experiment, trainer, {k: state[k] for k in ("params", "rest")},
                       {"note": "random weights"})
    G.main(["--workdir", str(tmp_path), "--prompt", "def f(", "--prompt", "x", "--max_new_tokens", "5",
            "--temperature", "0.7", "--top_p", "0.9"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and lines[0].startswith("def f(")
    with pytest.raises(SystemExit) as e:
        G.main(["--workdir", str(tmp_path / "none"), "--prompt", "x"])
    assert e.value.code == 2 and "config.json is missing" in capsys.readouterr().err
