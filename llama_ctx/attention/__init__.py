"""Attention methods; importing this package registers them."""

from . import selection  # noqa: F401  (registers "topk", "block-topk")
from .base import AttentionMethod

__all__ = ["AttentionMethod"]
