"""Slow, obvious reference MoE layer: Python loops over tokens and their experts. This is the spec that
moejax.moe.MoE is tested against (tests/test_moe_layer.py). Small shapes only.

    y_t = FFN_shared(x_t) + sum over kept picks (t, e) of g_{t,e} * FFN_e(x_t)

Routing decisions (which experts a token picks, which picks survive the capacity limit) are piecewise
constant in the inputs, so `decide` makes them once on concrete numbers; `forward` then recomputes
gate values and FFNs with jax.numpy on single vectors, so jax.grad flows into x and every weight.

Parameters are a plain dict (see `params_of`): router [d, E], experts {w_gate (swiglu only), w_up [E, d, f],
w_down [E, f, d]}, shared {w_gate, w_up [d, Ks f], w_down [Ks f, d]}, bias [E].
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import dispatch, routing


def params_of(model) -> dict:
    """The MoE layer's nnx.Params as a plain nested dict of arrays, plus the aux-free bias if any."""
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if getattr(model, "bias", None) is not None:
        p["bias"] = model.bias[...]
    return p


@dataclasses.dataclass(frozen=True)
class Decision:
    """picks[t][k]: expert of pick k of token t (token choice, best first); kept[t][k]: the pick is
    computed (not masked by the router, not dropped by capacity); ec_tokens[e]: tokens expert e takes
    (expert choice)."""

    picks: list | None = None
    kept: list | None = None
    ec_tokens: list | None = None

    def dropped_fraction(self, mask) -> float:
        n = sum(bool(m) for row in mask for m in row)
        n_kept = sum(bool(k) for row in self.kept for k in row)
        return (n - n_kept) / max(n, 1)


# jax.jit below only makes the many tiny eager ops cheaper; the math is what is written.
@functools.partial(jax.jit, static_argnames="activation")
def ffn(x, w, activation):
    """One FFN on one vector x [d]: swiglu silu(x W_gate) * (x W_up) W_down, or gelu(x W_up) W_down."""
    up = x @ w["w_up"]
    h = jax.nn.silu(x @ w["w_gate"]) * up if activation == "swiglu" else jax.nn.gelu(up)
    return h @ w["w_down"]


@functools.partial(jax.jit, static_argnames="activation")
def expert_ffn(x, w, e, activation):
    """FFN of routed expert e (weights w[name][e]) on one vector x [d]."""
    return ffn(x, {name: v[e] for name, v in w.items()}, activation)


@functools.partial(jax.jit, static_argnames="score_fn")
def _scores(router, x_t, score_fn, noise_t=None):
    x_t = x_t.astype(jnp.float32)
    if noise_t is not None:  # Switch jitter: the router sees x * U(1 - eps, 1 + eps)
        x_t = x_t * noise_t
    logits = x_t @ router.astype(jnp.float32)  # [E]
    if score_fn == "sigmoid":
        return jax.nn.sigmoid(logits)
    return jnp.exp(logits - logits.max()) / jnp.sum(jnp.exp(logits - logits.max()))


def token_scores(p, x_t, cfg, noise_t=None):
    """Router scores s_t [E] in float32 of one token: softmax (or sigmoid) of x_t W_router."""
    sigmoid = cfg.router == "topk" and cfg.score_fn == "sigmoid"
    return _scores(p["router"], x_t, "sigmoid" if sigmoid else "softmax", noise_t)


def gates(s_t, picks_t, cfg):
    """Gate values [K] of one token's picks: the scores, normalised over all K picks for GShard (or
    normalize=True; a pick GShard later masks still counts here), times routed_scale for 'topk';
    1 for hash."""
    if cfg.router == "hash":
        return [1.0 for _ in picks_t]
    g = [s_t[e] for e in picks_t]
    if cfg.router == "gshard" or cfg.normalize:
        total = sum(g)
        g = [gi / total for gi in g]
    if cfg.router == "topk":
        g = [gi * cfg.routed_scale for gi in g]
    return g


def _best(values, n, allowed=None):
    """Indices of the n largest values (ties: lower index first), restricted to `allowed`."""
    idx = [i for i in range(len(values)) if allowed is None or i in allowed]
    return sorted(idx, key=lambda i: -values[i])[:n]


def _topk_picks(s, bias, cfg):
    """Token-choice picks of one token: top-K of s + bias, within its best groups if n_groups > 1, never one of
    its disable_top best experts."""
    sel = [float(v) for v in s] if bias is None else [float(v) + float(b) for v, b in zip(s, bias)]
    E, G = cfg.n_experts, cfg.n_groups
    allowed = None
    if cfg.disable_top:
        return _best(sel, cfg.top_k, set(range(E)) - set(_best(sel, cfg.disable_top)))
    if G > 1:
        size = E // G
        groups = [sel[g * size:(g + 1) * size] for g in range(G)]
        if cfg.group_score == "top2_sum":
            gscore = [sum(sorted(v, reverse=True)[:2]) for v in groups]
        else:
            gscore = [max(v) for v in groups]
        allowed = {g * size + i for g in _best(gscore, cfg.topk_groups) for i in range(size)}
    return _best(sel, cfg.top_k, allowed)


def decide(p, x, cfg, *, token_ids=None, mask=None, noise=None) -> Decision:
    """Routing and capacity decisions on concrete values. x [B, S, d]; token_ids [B, S] (hash);
    mask [T, K] (GShard's random second-expert policy, taken as given); noise [T, d] (jitter)."""
    T = x.shape[0] * x.shape[1]
    xt = jnp.asarray(x).reshape(T, -1)
    E, K = cfg.n_experts, cfg.top_k
    if cfg.router != "hash":
        s = [np.asarray(token_scores(p, xt[t], cfg, None if noise is None else noise[t])) for t in range(T)]

    B, S = x.shape[0], x.shape[1]
    if cfg.router == "expert_choice":  # in each sequence, each expert takes its C best tokens (ties: lower index)
        C = min(S, dispatch.capacity(S, K, E, cfg.capacity_factor))
        return Decision(ec_tokens=[[b * S + i for b in range(B) for i in _best([s[b * S + j][e] for j in range(S)], C)]
                                   for e in range(E)])

    if cfg.router == "hash":
        ids = np.asarray(routing.hash_expert(jnp.asarray(token_ids).reshape(-1), E, K, cfg.hash_salt))
        picks = [[int(e) for e in ids[t]] for t in range(T)]
    elif cfg.router == "gshard":
        picks = [_topk_picks(s[t], None, cfg) for t in range(T)]
    else:
        picks = [_topk_picks(s[t], p.get("bias") if cfg.aux_free_bias else None, cfg) for t in range(T)]
    mask = [[True] * K for _ in range(T)] if mask is None else [[bool(m) for m in row] for row in np.asarray(mask)]

    if cfg.dispatch == "dropless":
        return Decision(picks=picks, kept=mask)

    # Capacity, in each sequence separately: all first picks before all second picks; within a pick,
    # tokens in order (first come) or by decreasing top gate (batch-prioritised, stable). Each expert
    # keeps its first C = ceil(S K capacity_factor / E) arrivals of the sequence.
    C = dispatch.capacity(S, K, E, cfg.capacity_factor)
    kept = [[False] * K for _ in range(T)]
    for b in range(B):
        order = list(range(b * S, (b + 1) * S))
        if cfg.batch_prioritized:  # priority: the token's largest gate among its unmasked picks
            top = {t: max([float(g) for g, m in zip(gates(s[t] if cfg.router != "hash" else None, picks[t], cfg),
                                                    mask[t]) if m], default=0.0) for t in order}
            order = sorted(order, key=lambda t: -top[t])
        fill = [0] * E
        for k in range(K):
            for t in order:
                e = picks[t][k]
                if mask[t][k] and fill[e] < C:
                    kept[t][k] = True
                    fill[e] += 1
    return Decision(picks=picks, kept=kept)


def forward(p, x, cfg, dec: Decision, *, noise=None):
    """The MoE output [B, S, d] for fixed decisions; differentiable in p and x."""
    B, S, d = x.shape
    xt = x.reshape(B * S, d)
    out = []
    for t in range(B * S):
        y = ffn(xt[t], p["shared"], cfg.activation) if cfg.n_shared else jnp.zeros((d,), x.dtype)
        s = None if cfg.router == "hash" else token_scores(p, xt[t], cfg, None if noise is None else noise[t])
        if cfg.router == "expert_choice":
            for e in range(cfg.n_experts):
                if t in dec.ec_tokens[e]:
                    y = y + s[e] * expert_ffn(xt[t], p["experts"], e, cfg.activation)
        else:
            g = gates(s, dec.picks[t], cfg)  # masked picks are never kept
            for k, e in enumerate(dec.picks[t]):
                if dec.kept[t][k]:
                    y = y + g[k] * expert_ffn(xt[t], p["experts"], e, cfg.activation)
        out.append(y)
    return jnp.stack(out).reshape(B, S, d)


def moe(p, x, cfg, **kw):
    """Reference MoE output: decide on concrete values, then compute."""
    return forward(p, x, cfg, decide(p, x, cfg, **kw), noise=kw.get("noise"))
