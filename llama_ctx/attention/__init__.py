"""Attention methods; importing this package registers them."""

from .base import AttentionMethod

__all__ = ["AttentionMethod"]
