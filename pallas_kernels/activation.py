"""The SwiGLU activation (Shazeer 2020, "GLU Variants Improve Transformer", FFN_SwiGLU) and its gradient,
in float32, as the fused grouped-matmul kernels compute them (pallas_kernels.swiglu_ffn) and the
unfused paths compute them around the kernels."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def swiglu(gate, up):
    """h = silu(gate) * up = gate * sigmoid(gate) * up, float32. gate, up: [..., f]."""
    g = gate.astype(jnp.float32)
    return g / (1.0 + jnp.exp(-g)) * up.astype(jnp.float32)


def swiglu_grad(dh, gate, up):
    """(d gate, d up) of h = silu(gate) * up given dh (float32): d up = dh silu(gate),
    d gate = dh up sigmoid(gate) (1 + gate (1 - sigmoid(gate)))."""
    g, u = gate.astype(jnp.float32), up.astype(jnp.float32)
    s = 1.0 / (1.0 + jnp.exp(-g))
    return dh * u * s * (1.0 + g * (1.0 - s)), dh * g * s


@dataclasses.dataclass(frozen=True)
class Fuse:
    """What a grouped-matmul kernel computes besides lhs @ rhs (the fused SwiGLU FFN's kernels):
    - swiglu_in: lhs is the pair (gate, up) [m, k] and the kernel multiplies silu(gate) * up, so the hidden
      activations are never written (the down projection and its weight gradient);
    - base: out = base + lhs @ rhs with base [m, n] (the sum of the two input-gradient matmuls);
    - swiglu_grad: the product is dh [m, n]; the outputs are (d gate, d up) of silu(gate) * up, given the
      pair (gate, up) [m, n] (the activation's backward pass as the down projection's input gradient)."""

    swiglu_in: bool = False
    base: bool = False
    swiglu_grad: bool = False

    @property
    def n_lhs(self) -> int:
        return 2 if self.swiglu_in else 1

    @property
    def n_extra(self) -> int:
        """[m, n] inputs read like the output: base, or (gate, up)."""
        return 2 if self.swiglu_grad else int(self.base)

    @property
    def n_out(self) -> int:
        return 2 if self.swiglu_grad else 1


NO_FUSE = Fuse()
