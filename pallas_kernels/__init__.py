"""Pallas kernels for moejax's expert compute (grouped matmul; TPU Mosaic and GPU). No moejax imports."""
