"""Pallas kernels for moejax: grouped matmul (gmm, tgmm) and the grouped SwiGLU FFN on fused kernels
(swiglu_ffn) for TPU (Mosaic) and GPU (Triton), and causal flash attention for TPU (Mosaic); all
interpretable on CPU. No moejax imports."""
from pallas_kernels.flash import flash_attention  # noqa: F401
from pallas_kernels.grouped_matmul import default_platform, default_tiling, gmm, swiglu_ffn, tgmm  # noqa: F401
