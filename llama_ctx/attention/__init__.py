"""Attention methods; importing this package registers them."""

from . import selection, streaming  # noqa: F401  (register "topk", "block-topk", "streaming")
from .base import AttentionMethod

__all__ = ["AttentionMethod"]
