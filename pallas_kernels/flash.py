"""Causal flash attention (FlashAttention-2, Dao 2023) on the Mosaic TPU kernels of pallas_kernels/flash_tpu.py,
with a custom VJP built from its backward kernels (first derivatives).

    flash_attention(q [B, S, G, n, hq], k [B, S, G, hq], v [B, S, G, hv], scale, segment_ids [B, S] | None)
        -> [B, S, G n, hv]

the layout and values of moejax.attention.attend under a causal mask (query s sees keys u <= s of its own
segment): n query heads per key/value head, heads ordered g n + r. Nothing of size S x S is written to HBM:
per head the kernels keep the output, a float32 logsumexp row and the gradients. Scores and softmax in
float32, matmul inputs in the inputs' dtype (bfloat16 in training), so the values match `attend` to bfloat16
rounding of the probabilities (attend also multiplies probabilities in the value dtype).

platform (default: pallas_kernels.default_platform()): 'tpu' compiles the Mosaic kernels (on a sharded mesh
call it inside jax.shard_map, as moejax.attention does); 'interpret' (CPU) runs them interpreted, for tests.
There is no GPU kernel: on GPU use moejax's XLA path. block: the square block size t (default
`default_block(S)`); S must be a multiple of it, and on TPU t a multiple of 128 (or t = S <= 512; `supported`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import flash_tpu
from pallas_kernels.grouped_matmul import _default_interpret, default_platform

BLOCKS = (512, 256, 128)  # default block sizes, largest first: 512 x 512 float32 scores are 1 MiB of VMEM


def default_block(S: int) -> int:
    """The largest of BLOCKS that divides S, else S itself (one block)."""
    return next((t for t in BLOCKS if S % t == 0), S)


def supported(S: int, block: int | None = None) -> bool:
    """Whether the TPU kernels take sequence length S with that block (default `default_block`): S a multiple
    of a block that is a multiple of 128, or one block of S <= 512 rows (a multiple of 16: bfloat16 tiles)."""
    t = block or default_block(S)
    return S % t == 0 and (t % 128 == 0 or (t == S <= max(BLOCKS) and S % 16 == 0))


def flash_attention(q, k, v, scale: float, segment_ids=None, *, block: int | None = None,
                    platform: str | None = None, interpret=None):
    """Causal attention as the module docstring states; interpret: True or a pltpu.InterpretParams to run the
    kernels interpreted (default: by platform)."""
    if q.ndim != 5 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"flash_attention: expected q [B, S, G, n, hq], k [B, S, G, hq], v [B, S, G, hv]; got q "
                         f"{q.shape}, k {k.shape}, v {v.shape}")
    B, S, G, n, hq = q.shape
    if k.shape != (B, S, G, hq) or v.shape[:3] != (B, S, G):
        raise ValueError(f"flash_attention: k {k.shape} and v {v.shape} do not match q {q.shape} (self-attention: "
                         f"keys of the same length S={S}, G={G} key/value heads, query/key width {hq})")
    if segment_ids is not None and segment_ids.shape != (B, S):
        raise ValueError(f"flash_attention: segment_ids {segment_ids.shape}; expected [B, S] = {(B, S)}")
    platform = platform or default_platform()
    if platform not in ("tpu", "interpret"):
        raise ValueError(f"flash_attention: platform={platform!r}; allowed: 'tpu', 'interpret' (CPU); there is "
                         f"no GPU kernel")
    t = block or default_block(S)
    if S % t or t < 1:
        raise ValueError(f"flash_attention: block={t} does not divide the sequence length S={S}")
    if platform == "tpu" and not supported(S, t):
        raise ValueError(f"flash_attention: block={t} with S={S}: a TPU block must be a multiple of 128, or all of "
                         f"an S <= {max(BLOCKS)} that is a multiple of 16")
    if interpret is None:
        interpret = _default_interpret() if platform == "interpret" else False
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    qt = q.reshape(B, S, G * n, hq).transpose(0, 2, 1, 3)  # [B, H, S, hq]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, G, S, h]
    o = _flash(qt, kt, vt, seg, (float(scale), t, interpret))  # [B, H, S, hv]
    return o.transpose(0, 2, 1, 3)


def _segments(seg):
    """(column form [B, S, LANES], row form [B, 1, S]) of segment ids [B, S], or (None, None)."""
    if seg is None:
        return None, None
    B, S = seg.shape
    return jnp.broadcast_to(seg[:, :, None], (B, S, flash_tpu.LANES)), seg[:, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, opts):
    return _forward(q, k, v, seg, opts)[0]


def _forward(q, k, v, seg, opts):
    scale, t, interpret = opts
    return flash_tpu.forward(q, k, v, *_segments(seg), scale=scale, t=t, interpret=interpret)


def _flash_fwd(q, k, v, seg, opts):
    o, lse = _forward(q, k, v, seg, opts)
    return o, (q, k, v, seg, o, lse)


def _flash_bwd(opts, res, do):
    scale, t, interpret = opts
    q, k, v, seg, o, lse = res
    dq, dk, dv = flash_tpu.backward(q, k, v, o, lse, do, *_segments(seg), scale=scale, t=t, interpret=interpret)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
