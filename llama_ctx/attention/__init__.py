"""Attention methods; importing this package registers them."""

from . import lambda_mask, leaky_rerope, rerope, self_extend  # noqa: F401
from .base import AttentionMethod

__all__ = ["AttentionMethod"]
