"""Causal self-attention of the decoder LM (moejax.model): RMSNorm, rotary position embeddings with the
scalings published models use, multi-head / grouped-query attention, and DeepSeek's multi-head latent attention.

Both attention modules take (x [B, S, d], positions [B, S], segment_ids [B, S] or None) -> [B, S, d];
softmax in float32. Names: H query heads, H_kv key/value heads, h head width, r rotary width, V vocabulary.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from moejax import moe as moe_lib
from moejax import sharding
from moejax.model_config import ModelConfig
from pallas_kernels import flash as flash_lib

LATENT_NORM_EPS = 1e-6  # MLA's latent RMSNorms (Hugging Face DeepseekV2/V3 build them with the default epsilon)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32 (Zhang & Sennrich 2019)."""

    def __init__(self, d: int, eps: float = 1e-6):
        self.scale = nnx.Param(jnp.ones((d,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 mscale ln(s) + 1 (Peng et al. 2023, eq. 22), 1 for s <= 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(config: ModelConfig, width: int) -> tuple[np.ndarray, float]:
    """(inv_freq [width / 2] float32, cos/sin factor) of the rotary embedding over `width` channels.

    base^(-2i / width) (RoFormer eq. 15) with config.rope_base, then config.rope_scaling
    (Hugging Face's rope_parameters): 'linear' divides every frequency by `factor` (Chen et al. 2023);
    'llama3' divides the low frequencies by `factor` and interpolates the middle band (Llama 3.1);
    'yarn' blends interpolated and original frequencies over the band [beta_fast, beta_slow] rotations in
    the original context (Peng et al. 2023, eq. 17-20), and scales cos and sin by the attention factor
    (its `attention_factor`, else mscale(factor, mscale) / mscale(factor, mscale_all_dim) or mscale(factor)).
    """
    inv = 1.0 / config.rope_base ** (np.arange(0, width, 2, dtype=np.float32) / width)
    p = config.rope_params
    kind, factor = p.get("rope_type", "default"), p.get("factor", 1.0)
    if kind == "linear":
        return (inv / factor).astype(np.float32), 1.0
    if kind == "llama3":
        old = p["original_max_position_embeddings"]
        low, high = p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        middle = (wavelen >= old / high) & (wavelen <= old / low)
        return np.where(middle, (1 - smooth) * scaled / factor + smooth * scaled, scaled).astype(np.float32), 1.0
    if kind == "yarn":
        old = p["original_max_position_embeddings"]
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
        att = p.get("attention_factor")
        if att is None:
            att = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all
                   else _yarn_mscale(factor))
        dim = lambda rotations: width * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(config.rope_base))
        lo, hi = dim(p.get("beta_fast") or 32), dim(p.get("beta_slow") or 1)
        if p.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, width - 1)
        ramp = np.clip((np.arange(width // 2, dtype=np.float32) - lo) / ((hi - lo) or 0.001), 0, 1)
        keep = 1 - ramp  # 1: the original (extrapolated) frequency, 0: interpolated by factor
        return (inv / factor * (1 - keep) + inv * keep).astype(np.float32), float(att)
    return inv, 1.0


def _rope_consts(config: ModelConfig, width: int) -> tuple[tuple[float, ...], float]:
    """rope_frequencies as static module data (a tuple of floats, not an array)."""
    inv, factor = rope_frequencies(config, width)
    return tuple(float(f) for f in inv), factor


def softmax_scale(config: ModelConfig, qk_width: int) -> float:
    """qk_width^-1/2, times mscale(factor, mscale_all_dim)^2 under YaRN with mscale_all_dim (DeepSeek-V2/V3)."""
    p = config.rope_params
    scale = qk_width ** -0.5
    if p.get("rope_type", "default") == "yarn" and p.get("mscale_all_dim"):
        scale *= _yarn_mscale(p["factor"], p["mscale_all_dim"]) ** 2
    return scale


def rope(x: jax.Array, positions: jax.Array, inv_freq, factor: float = 1.0) -> jax.Array:
    """Rotary embedding (RoFormer eq. 34) of x [B, S, heads, r] over pairs (i, i + r/2) (Hugging Face's
    rotate_half order); positions [B, S]; inv_freq [r/2]; cos and sin scaled by factor (YaRN)."""
    angle = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [B, S, r/2]
    sin, cos = (factor * f(angle)[:, :, None, :] for f in (jnp.sin, jnp.cos))
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def causal_mask(S: int, segment_ids=None) -> jax.Array:
    """[1 or B, S, S]: query s sees key t <= s (of its own packed document if segment_ids [B, S] is given)."""
    mask = jnp.tril(jnp.ones((S, S), bool))[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def cache_mask(valid: jax.Array, index, S: int) -> jax.Array:
    """[B, S, L] for S new tokens written at cache rows index.. : query i sees row t iff valid[b, t] (a real
    token, not left padding) and t <= index + i. valid: [B, L] with the new rows already marked."""
    t = jnp.arange(valid.shape[1])
    return valid[:, None, :] & (t[None, None, :] <= index + jnp.arange(S)[None, :, None])


def attend(q, k, v, scale: float, mask, chunk: int = 0):
    """softmax(q k^T scale) v over the keys `mask` [1 or B, S, T] allows. q [B, S, G, n, hq] (n query heads per
    key/value head), k [B, T, G, hq], v [B, T, G, hv] -> [B, S, G n, hv].

    chunk > 0 (only for a causal mask: no query s sees a key t > s, so S = T): queries in blocks of `chunk`
    rows, each block over the keys up to its last row, so the score blocks above the diagonal, all masked, are
    never computed (S = 4 chunk: 10 of 16 blocks). The same values: a masked key's weight is exactly 0 either
    way (exp underflows), only the order of the float sums changes."""
    B, S = q.shape[:2]
    if 0 < chunk < S:
        return jnp.concatenate([attend(q[:, a:a + chunk], k[:, :a + chunk], v[:, :a + chunk], scale,
                                       mask[:, a:a + chunk, :a + chunk]) for a in range(0, S, chunk)], axis=1)
    logits = jnp.einsum("bsgnk,btgk->bgnst", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], logits, -1e30), axis=-1).astype(v.dtype)
    return jnp.einsum("bgnst,btgk->bsgnk", probs, v).reshape(B, S, -1, v.shape[-1])


def causal_attention(q, k, v, scale: float, segment_ids=None, chunk: int = 0, kernel: str = "xla"):
    """`attend` under the causal mask (of segment_ids' documents when given), by model.attention_kernel:
    'xla' is `attend` (by blocks of `chunk` queries); 'flash' the Pallas TPU kernels (pallas_kernels.
    flash_attention: nothing of size S x S in HBM), inside a jax.shard_map over the current mesh (batch over
    the batch axes, key/value heads over 'tensor' where it divides them), interpreted on CPU; 'auto' flash on
    TPU where the sequence length takes it, else xla."""
    S = q.shape[1]
    if kernel == "auto":
        kernel = "flash" if sharding.platform() == "tpu" and flash_lib.supported(S) else "xla"
    if kernel == "xla":
        return attend(q, k, v, scale, causal_mask(S, segment_ids), chunk)
    run = lambda q, k, v, *seg: flash_lib.flash_attention(q, k, v, scale, seg[0] if seg else None)
    segs = () if segment_ids is None else (segment_ids,)
    mesh = sharding.current_mesh()
    if mesh is None or not mesh.are_all_axes_auto:  # no mesh, or already inside a shard_map
        return run(q, k, v, *segs)
    qs = sharding.spec(("batch", None, "heads", None, None), q.shape, mesh)
    kvs = P(qs[0], None, qs[2], None)
    return jax.shard_map(run, mesh=mesh, in_specs=(qs, kvs, kvs) + (P(qs[0], None),) * len(segs),
                         out_specs=kvs)(q, k, v, *segs)


def _write(cache: jax.Array, new: jax.Array, index) -> jax.Array:
    """cache [B, L, ...] with rows index.. replaced by new [B, S, ...]."""
    return jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), index, axis=1)


def _param(rngs, std, shape, fan_in, axes):
    """A float32 weight N(0, std) (std > 0) or fan-in scaled over the dimensions `fan_in`."""
    out = tuple(i for i in range(len(shape)) if i not in fan_in)
    return nnx.Param(moe_lib.initializer(std, fan_in, out)(rngs.params(), shape, jnp.float32), axes=axes)


class Attention(nnx.Module):
    """Causal self-attention with rotary positions. H query heads of width h share H_kv key/value heads in
    groups of H / H_kv (grouped-query attention, Ainslie et al. 2023; H_kv = H is multi-head attention).
    Query head j reads key/value head j // (H / H_kv), as Hugging Face's `repeat_kv` orders them. qk_norm:
    RMSNorm of queries and keys before the rotary embedding, over each head ('head': Qwen3) or over all heads'
    concatenation ('full': OLMoE); qkv_bias: biases on the q, k, v projections (Qwen2)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, H, G, h, std = config.d_model, config.n_heads, config.kv_heads, config.head_width, config.init_std
        self.wq = _param(rngs, std, (d, H, h), (0,), ("embed", "heads", None))  # [d, H, h]
        self.wkv = _param(rngs, std, (d, 2, G, h), (0,), ("embed", None, "heads", None))  # [d, 2, H_kv, h]: k, v
        self.wo = _param(rngs, std, (H, h, d), (0, 1), ("heads", None, "embed"))  # [H, h, d]
        self.qkv_bias = config.qkv_bias
        if config.qkv_bias:
            self.bq = nnx.Param(jnp.zeros((H, h), jnp.float32), axes=("heads", None))
            self.bkv = nnx.Param(jnp.zeros((2, G, h), jnp.float32), axes=(None, "heads", None))
        self.qk_norm = config.qk_norm
        if config.qk_norm != "none":
            full = config.qk_norm == "full"
            self.q_norm = RMSNorm(H * h if full else h, config.norm_eps)
            self.k_norm = RMSNorm(G * h if full else h, config.norm_eps)
        self.rope = _rope_consts(config, h)
        self.scale = softmax_scale(config, h)
        self.chunk, self.kernel = config.attention_chunk, config.attention_kernel

    def _norm(self, norm: RMSNorm, x):  # x [B, S, heads, h]
        if self.qk_norm == "head":
            return norm(x)
        return norm(x.reshape(*x.shape[:2], -1)).reshape(x.shape)

    def _qkv(self, x, positions):
        """q [B, S, H_kv, H / H_kv, h], k and v [B, S, H_kv, h], rotary embedding applied."""
        B, S, _ = x.shape
        q = jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(x.dtype))
        kv = jnp.einsum("bsd,dthk->tbshk", x, self.wkv[...].astype(x.dtype))
        if self.qkv_bias:
            q, kv = q + self.bq[...].astype(x.dtype), kv + self.bkv[...].astype(x.dtype)[:, None, None]
        k, v = kv[0], kv[1]
        if self.qk_norm != "none":
            q, k = self._norm(self.q_norm, q), self._norm(self.k_norm, k)
        q, k = (rope(a, positions, *self.rope) for a in (q, k))
        return q.reshape(B, S, k.shape[2], -1, q.shape[-1]), k, v

    def _out(self, out):  # [B, S, H, h] -> [B, S, d]
        return jnp.einsum("bshk,hkd->bsd", out, self.wo[...].astype(out.dtype))

    def __call__(self, x, positions, segment_ids=None):
        q, k, v = self._qkv(x, positions)
        return self._out(causal_attention(q, k, v, self.scale, segment_ids, self.chunk, self.kernel))

    def init_cache(self, batch: int, length: int, dtype) -> dict:
        """Key/value cache rows [B, L, H_kv, h]."""
        G, h = self.wkv.shape[2], self.wkv.shape[3]
        return {"k": jnp.zeros((batch, length, G, h), dtype), "v": jnp.zeros((batch, length, G, h), dtype)}

    def decode(self, x, positions, cache: dict, valid, index):
        """x [B, S, d] written at cache rows index.. -> (y [B, S, d], cache); see `cache_mask` for valid."""
        q, k, v = self._qkv(x, positions)
        cache = {"k": _write(cache["k"], k, index), "v": _write(cache["v"], v, index)}
        out = attend(q, cache["k"].astype(x.dtype), cache["v"].astype(x.dtype), self.scale,
                     cache_mask(valid, index, x.shape[1]))
        return self._out(out), cache


class LatentAttention(nnx.Module):
    """Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434, sec. 2.1, eq. 9-19). Keys and values come
    from a latent c_kv = RMSNorm(x W_DKV) of width kv_lora_rank (eq. 9-11) and a rotary key k_R = RoPE(x W_KR)
    of width r shared by all heads (eq. 14); queries from c_q = RMSNorm(x W_DQ) of width q_lora_rank
    (eq. 12-13; q_lora_rank 0: straight from x, as in DeepSeek-V2-Lite). Head i attends with
    [q_C,i; RoPE(q_R,i)] . [k_C,i; k_R] (widths h + r) and reads values of width v_head_dim.
    Weights: wq_a [d, r_q] and wq_b [r_q, H, h + r] (or wq [d, H, h + r]), wkv_a [d, r_kv + r] (latent, then
    rotary key), wkv_b [r_kv, H, h + h_v] (keys, then values), wo [H, h_v, d]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, H, h, std = config.d_model, config.n_heads, config.head_width, config.init_std
        r, hv, rq, rkv = config.rope_head_dim, config.v_width, config.q_lora_rank, config.kv_lora_rank
        self.dims = (h, r, hv, rkv)
        if rq:
            self.wq_a = _param(rngs, std, (d, rq), (0,), ("embed", None))
            self.q_norm = RMSNorm(rq, LATENT_NORM_EPS)
            self.wq_b = _param(rngs, std, (rq, H, h + r), (0,), (None, "heads", None))
        else:
            self.wq = _param(rngs, std, (d, H, h + r), (0,), ("embed", "heads", None))
        self.q_lora = bool(rq)
        self.wkv_a = _param(rngs, std, (d, rkv + r), (0,), ("embed", None))
        self.kv_norm = RMSNorm(rkv, LATENT_NORM_EPS)
        self.wkv_b = _param(rngs, std, (rkv, H, h + hv), (0,), (None, "heads", None))
        self.wo = _param(rngs, std, (H, hv, d), (0, 1), ("heads", None, "embed"))
        self.rope = _rope_consts(config, r)
        self.scale = softmax_scale(config, h + r)
        self.chunk, self.kernel = config.attention_chunk, config.attention_kernel

    def _latent(self, x, positions):
        """(q [B, S, H, 1, h + r] with RoPE on its last r channels, the cache entries: c_kv [B, S, r_kv] after
        its norm and k_R [B, S, 1, r] after RoPE)."""
        h, r, hv, rkv = self.dims
        dt = x.dtype
        if self.q_lora:
            q = jnp.einsum("bsc,chk->bshk", self.q_norm(x @ self.wq_a[...].astype(dt)), self.wq_b[...].astype(dt))
        else:
            q = jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(dt))  # [B, S, H, h + r]
        q = jnp.concatenate([q[..., :h], rope(q[..., h:], positions, *self.rope)], -1)
        ckv = x @ self.wkv_a[...].astype(dt)  # [B, S, r_kv + r]
        return q[:, :, :, None], self.kv_norm(ckv[..., :rkv]), rope(ckv[..., None, rkv:], positions, *self.rope)

    def _attend(self, q, c, k_rot, mask=None, segment_ids=None):
        """Heads' keys [k_C; k_R] and values from the latent c [B, T, r_kv] and k_R [B, T, 1, r] -> [B, S, d];
        attention under `mask` [1 or B, S, T], or causal (`causal_attention`, of segment_ids) without one."""
        h, r, hv, rkv = self.dims
        kv = jnp.einsum("btc,chk->bthk", c, self.wkv_b[...].astype(q.dtype))  # [B, T, H, h + h_v]
        k = jnp.concatenate([kv[..., :h], jnp.broadcast_to(k_rot, (*kv.shape[:3], r))], -1)
        if mask is None:
            out = causal_attention(q, k, kv[..., h:], self.scale, segment_ids, self.chunk, self.kernel)
        else:
            out = attend(q, k, kv[..., h:], self.scale, mask)  # [B, S, H, h_v]
        return jnp.einsum("bshk,hkd->bsd", out, self.wo[...].astype(q.dtype))

    def __call__(self, x, positions, segment_ids=None):
        q, c, k_rot = self._latent(x, positions)
        return self._attend(q, c, k_rot, segment_ids=segment_ids)

    def init_cache(self, batch: int, length: int, dtype) -> dict:
        """The compressed cache of DeepSeek-V2 sec. 2.1.2: latent rows [B, L, r_kv] and rotary keys [B, L, 1, r]."""
        h, r, hv, rkv = self.dims
        return {"c": jnp.zeros((batch, length, rkv), dtype), "k_rot": jnp.zeros((batch, length, 1, r), dtype)}

    def decode(self, x, positions, cache: dict, valid, index):
        """As Attention.decode, caching the latent and the rotary key (the heads' keys and values are
        recomputed from the latent at each step; DeepSeek-V2's weight absorption is not done)."""
        q, c, k_rot = self._latent(x, positions)
        cache = {"c": _write(cache["c"], c, index), "k_rot": _write(cache["k_rot"], k_rot, index)}
        y = self._attend(q, cache["c"].astype(x.dtype), cache["k_rot"].astype(x.dtype),
                         cache_mask(valid, index, x.shape[1]))
        return y, cache


def make(config: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The attention module config.attention names."""
    return LatentAttention(config, rngs=rngs) if config.attention == "mla" else Attention(config, rngs=rngs)
