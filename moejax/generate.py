"""Text generation with a key/value cache: greedy, temperature and nucleus (top-p, Holtzman et al. 2020)
sampling, batched over prompts of different lengths (left-padded; padding is masked out of attention and
positions start at each prompt's first token), jitted as one program (prefill, then a lax.scan over steps).

MoE layers run in evaluation mode with dropless dispatch (`inference_config`): routing is per token, so the
cached decode computes what the full forward pass computes (tests/test_generate.py checks it token by token).

Command line (a moejax workdir: trained, or imported by moejax.convert):
    python -m moejax.generate --workdir=W --prompt="def fib(n):" --max_new_tokens=64 [--temperature=0.8
        --top_p=0.95 --seed=0 --step=N]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import model as model_lib
from moejax.model_config import ModelConfig


def inference_config(c: ModelConfig) -> ModelConfig:
    """c with dropless dispatch in every MoE layer (capacity would drop tokens by a batch's competition) and
    no layer scan (decode indexes layers); ValueError for expert choice, whose routing reads later tokens."""
    if c.moe.router == "expert_choice":
        raise ValueError("MoEConfig.router='expert_choice' cannot generate: an expert's choice of tokens reads the "
                         "whole sequence, including tokens not generated yet; allowed: token-choice routers")
    moe = c.moe
    if moe.dispatch != "dropless" and moe.n_experts:
        moe = dataclasses.replace(moe, dispatch="dropless", backend="auto", batch_prioritized=False)
    return dataclasses.replace(c, moe=moe)


def sample(logits: jax.Array, key, temperature: float, top_p: float) -> jax.Array:
    """Next tokens [B] from logits [B, V]: argmax if temperature == 0, else from softmax(logits / temperature)
    restricted to the smallest set of tokens whose probability reaches top_p (always the most likely one)."""
    if temperature == 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, -1)
        probs = jax.nn.softmax(sorted_logits, -1)
        before = jnp.cumsum(probs, -1) - probs  # mass of the more likely tokens
        sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(key, logits, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p", "eos_id"))
def _generate(graphdef, state, tokens, real, key, *, max_new_tokens, temperature, top_p, eos_id):
    model = nnx.merge(graphdef, state)
    B, P = tokens.shape
    positions = jnp.maximum(jnp.cumsum(real, 1) - 1, 0).astype(jnp.int32)  # 0 at each prompt's first token
    cache = model.init_cache(B, P + max_new_tokens)
    logits, cache = model.decode(tokens, positions, cache, real)
    start = positions[:, -1] + 1

    def step(carry, i):
        cache, last_logits, done, key = carry
        key, sub = jax.random.split(key)
        nxt = sample(last_logits, sub, temperature, top_p)
        nxt = jnp.where(done, eos_id if eos_id >= 0 else 0, nxt)
        done = done | (nxt == eos_id)
        logits, cache = model.decode(nxt[:, None], (start + i)[:, None], cache)
        return (cache, logits[:, -1], done, key), (nxt, last_logits)

    carry = (cache, logits[:, -1], jnp.zeros((B,), bool), key)
    _, (new, step_logits) = jax.lax.scan(step, carry, jnp.arange(max_new_tokens))
    return new.T, step_logits.swapaxes(0, 1)  # [B, N], [B, N, V]


def generate(model: model_lib.Transformer, prompts: list, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, key=None, eos_id: int = -1):
    """Continue each prompt (a list of token ids) by max_new_tokens tokens -> (tokens [B, N] int32, logits
    [B, N, V] float32: the distribution each token was drawn from). After eos_id a row repeats eos_id.
    The model should have `inference_config` (moejax.checkpoint's models: use `for_inference`)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid; allowed: an integer >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature}, top_p={top_p} is invalid; allowed: temperature >= 0, "
                         f"0 < top_p <= 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts is invalid; allowed: a non-empty list of non-empty token lists")
    P = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), P), np.int32)
    real = np.zeros((len(prompts), P), bool)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at column P - 1
        tokens[i, P - len(p):], real[i, P - len(p):] = p, True
    graphdef, state = nnx.split(model)
    key = jax.random.PRNGKey(0) if key is None else key
    return _generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(real), key, max_new_tokens=max_new_tokens,
                     temperature=float(temperature), top_p=float(top_p), eos_id=int(eos_id))


def for_inference(ck) -> model_lib.Transformer:
    """The model of a moejax.checkpoint.Checkpoint with `inference_config` (same parameters)."""
    c = ck.trainer.model_config
    ic = inference_config(c)
    if ic == c:
        return ck.model()
    return ck.with_moe(**{f.name: getattr(ic.moe, f.name) for f in dataclasses.fields(ic.moe)
                          if getattr(ic.moe, f.name) != getattr(c.moe, f.name)}).model()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m moejax.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="a moejax workdir (trained, or imported by moejax.convert)")
    ap.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    a = ap.parse_args(argv)
    from moejax.checkpoint import load_checkpoint

    try:
        ck = load_checkpoint(a.workdir, step=a.step)
        model = for_inference(ck)
        prompts = [list(ck.tokenizer.encode(p)) for p in a.prompt]
        out, _ = generate(model, prompts, a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                          key=jax.random.PRNGKey(a.seed), eos_id=ck.tokenizer.eos_id)
    except (ValueError, FileNotFoundError) as e:
        ap.exit(2, f"moejax.generate: error: {e}\n")
    for p, row in zip(a.prompt, np.asarray(out)):
        row = list(row)
        if ck.tokenizer.eos_id in row:
            row = row[:row.index(ck.tokenizer.eos_id)]
        print(p + ck.tokenizer.decode(np.asarray(row, np.int32)))


if __name__ == "__main__":
    main()
