"""Pallas kernels for moejax's expert compute: grouped matmul (gmm, tgmm) for TPU (Mosaic) and GPU
(Triton), interpretable on CPU. No moejax imports."""
from pallas_kernels.grouped_matmul import default_platform, default_tiling, gmm, tgmm  # noqa: F401
