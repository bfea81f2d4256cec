"""Attention methods; importing this package registers them."""

# each import registers its methods
from . import dca, lambda_mask, leaky_rerope, rerope, s2, selection, self_extend, streaming  # noqa: F401
from .base import AttentionMethod

__all__ = ["AttentionMethod"]
