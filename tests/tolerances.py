"""Tolerances, stated once for every test: import from here, never loosen to make a test pass."""
# float32 moejax vs the slow loop reference, outputs and gradients.
F32 = dict(rtol=1e-5, atol=1e-5)
# bfloat16 activations vs a float32 reference (8 mantissa bits).
BF16 = dict(rtol=2e-2, atol=2e-2)
