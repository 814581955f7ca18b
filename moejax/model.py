"""Decoder-only transformer LM whose FFNs are dense or MoE layers (moejax.moe.MoE).

Pre-norm blocks (RMSNorm, Zhang & Sennrich 2019), causal attention with rotary positions (moejax.attention:
multi-head or grouped-query, optionally with query/key norms and q, k, v biases; or DeepSeek's multi-head
latent attention), tied or untied embeddings. Layer l uses an MoE FFN iff l >= first_k_dense and
(l - first_k_dense) % moe_every == 0 (DeepSeekMoE: first layer dense; GShard: every other layer MoE);
other layers use a dense FFN of width `dense_d_ff`. Parameters are float32; `dtype` is the compute
dtype (bf16 on accelerators); the router always computes in float32 (moejax.moe).
Names: B batch, S sequence, d width, H heads (H_kv key/value heads) of width h, V vocabulary.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import moe as moe_lib
from moejax.attention import RMSNorm
from moejax import attention as attention_lib
from moejax.model_config import ModelConfig
from moejax import routing
from moejax import sharding


ACT = ("batch", "length", "embed")  # activations between layers: split by batch (moejax.sharding)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Context:
    """What every block reads besides x: positions [B, S], segment_ids [B, S] (packed documents) or None,
    token_ids [B, S] (the hash router's input), key (this layer's randomness, training only) and train
    (static: training or evaluation mode)."""

    positions: jax.Array
    segment_ids: jax.Array | None = None
    token_ids: jax.Array | None = None
    key: jax.Array | None = None
    train: bool = dataclasses.field(default=False, metadata=dict(static=True))


class Block(nnx.Module):
    """Pre-norm transformer block: x + Attn(norm(x)); x + FFN(norm(x)) with a dense or MoE FFN."""

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.remat_attention = config.remat and not config.remat_ffn  # else the whole block's or none
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = attention_lib.make(config, rngs)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = moe_lib.MoE(config.ffn_config(layer), rngs=rngs, init_std=config.init_std)

    def ffn_input(self, x, ctx: Context):
        """(h = x + Attn(norm(x)) [B, S, d], the FFN's (and router's) input norm(h))."""
        attend = lambda attn, u, positions, segment_ids: attn(u, positions, segment_ids)
        if self.remat_attention:  # keep only the sublayer's input for the backward pass
            attend = nnx.remat(attend)
        h = x + attend(self.attn, self.attn_norm(x), ctx.positions, ctx.segment_ids)
        return h, self.ffn_norm(h)

    def __call__(self, x, ctx: Context):
        h, u = self.ffn_input(x, ctx)
        y, stats = self.ffn(u, token_ids=ctx.token_ids, key=ctx.key, train=ctx.train)
        return h + y, stats

    def decode(self, x, positions, token_ids, cache: dict, valid, index):
        """Evaluation-mode block over new tokens x [B, S, d] with this layer's attention cache -> (x, cache)."""
        a, cache = self.attn.decode(self.attn_norm(x), positions, cache, valid, index)
        h = x + a
        y, _ = self.ffn(self.ffn_norm(h), token_ids=token_ids)
        return h + y, cache


class Transformer(nnx.Module):
    """__call__(tokens [B, S], positions, segment_ids, *, key, train) -> (logits [B, S, V] float32, [MoEStats
    per routed layer (ModelConfig.routed_layers)]). Auxiliary losses are in each MoEStats.loss. train=True
    (training: GShard's random second expert, router jitter) needs a key.

    scan_layers=True (MaxText's scan_layers): the n_layers - first_k_dense layers from first_k_dense on
    (all MoE, moe_every=1) are one Block whose parameters carry a leading layer axis [L, ...] (logical axis
    None: not split), run by jax.lax.scan, so XLA compiles one layer instead of L: the DeepSeekMoE-16B step
    compiles for v5p:4x4x4 in a fraction of the time (tests/test_aot.py). Same function of the same weights
    as the unrolled model (tests/test_model.py); a different parameter layout, so checkpoints of one do not
    load into the other. The first_k_dense layers stay in `blocks`.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Param((config.init_std or 1.0) * jax.random.normal(
            rngs.params(), (config.vocab_size, config.d_model), jnp.float32), axes=("vocab", "embed"))
        n_unrolled = config.first_k_dense if config.scan_layers else config.n_layers
        self.blocks = nnx.List([Block(config, l, rngs=rngs) for l in range(n_unrolled)])
        if config.scan_layers and config.n_layers > n_unrolled:
            self.scanned = _stacked_blocks(config, config.n_layers - n_unrolled, rngs)
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        if not config.tie_embeddings:
            init = moe_lib.initializer(config.init_std, in_axis=0, out_axis=1)
            self.unembed = nnx.Param(init(rngs.params(), (config.d_model, config.vocab_size), jnp.float32),
                                     axes=("embed", "vocab"))

    @property
    def n_scanned(self) -> int:
        return self.config.n_layers - len(self.blocks)

    def block(self, layer: int) -> Block:
        """Layer `layer`'s Block (for a scanned layer, a copy holding its slice of the stacked weights)."""
        if layer < len(self.blocks):
            return self.blocks[layer]
        graphdef, state = nnx.split(self.scanned)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[layer - len(self.blocks)], state))

    def update_biases(self, loads) -> None:
        """Aux-loss-free bias step of every routed layer with a router bias from its load [E] (one per routed
        layer, in layer order, as __call__ returns its stats); call after the optimizer step."""
        c = self.config
        if not c.moe.aux_free_bias:
            return
        loads = list(loads)
        for layer, load in zip(c.routed_layers, loads):
            if layer < len(self.blocks):
                self.blocks[layer].ffn.update_bias(load)
        if self.n_scanned and c.moe.n_experts:
            ffn = self.scanned.ffn
            scanned = jnp.stack(loads[-self.n_scanned:])  # [L, E]
            ffn.bias[...] = jax.vmap(routing.update_bias, (0, 0, None))(ffn.bias[...], scanned,
                                                                        ffn.config.bias_update_rate)

    def _embed(self, tokens, positions):
        """(x [B, S, d] in the compute dtype, positions [B, S] (default 0..S-1))."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return sharding.constrain(self.embed[...].astype(jnp.dtype(self.config.dtype))[tokens], ACT), positions

    def routes(self, tokens, positions=None, segment_ids=None) -> list:
        """Eval-mode routing of tokens [B, S] in every routed layer, for inspection: one `routing.Routing`
        (expert_ids, weights [B S, K]) or `routing.ExpertChoice` per routed layer."""
        x, positions = self._embed(tokens, positions)
        ctx = Context(positions, segment_ids, tokens)
        out = []
        for layer, block in enumerate(map(self.block, range(self.config.n_layers))):
            if self.config.is_routed(layer):
                out.append(block.ffn.route(block.ffn_input(x, ctx)[1], token_ids=tokens))
            x, _ = block(x, ctx)
        return out

    def init_cache(self, batch: int, length: int) -> dict:
        """An empty decoding cache for `batch` sequences of up to `length` tokens: every layer's attention
        cache ('layers'), 'valid' [B, L] (rows holding real tokens) and 'index' (rows written so far)."""
        dtype = jnp.dtype(self.config.dtype)
        return {"layers": [self.block(l).attn.init_cache(batch, length, dtype) for l in range(self.config.n_layers)],
                "valid": jnp.zeros((batch, length), bool), "index": jnp.zeros((), jnp.int32)}

    def decode(self, tokens, positions, cache: dict, real=None):
        """Evaluation-mode logits of new tokens [B, S] at positions [B, S], attending to the cache and to each
        other -> (logits [B, S, V] float32, cache with the S tokens written). real [B, S] bool marks tokens to
        attend to (False: left padding of a shorter prompt; default all True). Routing is per token, so the
        MoE layers compute what the full forward pass computes (use dropless dispatch: a capacity layer
        would drop by a batch's competition)."""
        c = self.config
        index = cache["index"]
        real = jnp.ones(tokens.shape, bool) if real is None else real
        valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], real, index, axis=1)
        x, _ = self._embed(tokens, positions)
        layers = []
        for l in range(c.n_layers):
            x, layer_cache = self.block(l).decode(x, positions, tokens, cache["layers"][l], valid, index)
            layers.append(layer_cache)
        return self._logits(x), {"layers": layers, "valid": valid, "index": index + tokens.shape[1]}

    def _logits(self, x):
        """Final norm and unembedding of x [B, S, d] -> logits [B, S, V] float32."""
        c, dtype = self.config, jnp.dtype(self.config.dtype)
        x = self.final_norm(x)
        if c.tie_embeddings:  # scale by d^-1/2 so tied logits start at unit scale
            logits = jnp.einsum("bsd,vd->bsv", x, self.embed[...].astype(dtype), preferred_element_type=jnp.float32)
            return logits * c.d_model ** -0.5
        return jnp.einsum("bsd,dv->bsv", x, self.unembed[...].astype(dtype), preferred_element_type=jnp.float32)

    def __call__(self, tokens, positions=None, segment_ids=None, *, key=None, train: bool = False):
        c = self.config
        if train and key is None:
            raise ValueError("Transformer(...)(tokens, train=True) needs key= (routing randomness in training)")
        x, positions = self._embed(tokens, positions)
        ctx = Context(positions, segment_ids, tokens, None, train)
        keys = jax.random.split(key, c.n_layers) if train else None
        stats = []
        call = lambda block, *args: block(*args)
        if c.remat and c.remat_ffn:  # keep only each block's input for the backward pass (else: Block)
            call = nnx.remat(call)
        for layer, block in enumerate(self.blocks):
            x, s = call(block, x, dataclasses.replace(ctx, key=keys[layer] if train else None))
            x = sharding.constrain(x, ACT)
            if c.is_routed(layer):
                stats.append(s)
        if self.n_scanned:
            x, s = self._scan(x, ctx, keys[len(self.blocks):] if train else None)
            if c.moe.n_experts:
                stats += [jax.tree.map(lambda a: a[i], s) for i in range(self.n_scanned)]
        return sharding.constrain(self._logits(x), ("batch", "length", "vocab")), stats

    def _scan(self, x, ctx: Context, keys):
        """The stacked layers over x [B, S, d] by jax.lax.scan -> (x, MoEStats with a leading layer axis)."""
        graphdef, state = nnx.split(self.scanned)

        def body(x, xs):
            layer_state, key = xs
            y, stats = nnx.merge(graphdef, layer_state)(x, dataclasses.replace(ctx, key=key))
            return sharding.constrain(y, ACT), stats

        if self.config.remat and self.config.remat_ffn:  # keep only each layer's input for the backward pass
            body = jax.checkpoint(body)
        return jax.lax.scan(body, x, (state, keys))


def _stacked_blocks(config: ModelConfig, n: int, rngs: nnx.Rngs) -> Block:
    """n independently initialised MoE Blocks as one Block whose variables are stacked [n, ...]; their `axes`
    metadata gets a leading None (the layer axis is never split across devices)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return Block(config, config.first_k_dense, rngs=rngs)

    stacked = create(rngs)
    for v in jax.tree.leaves(nnx.state(stacked), is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = v.get_metadata().get("axes")
        if axes:
            v.set_metadata(axes=(None, *axes))
    return stacked
