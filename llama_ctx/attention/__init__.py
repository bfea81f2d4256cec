"""Attention methods; importing this package registers them."""

from . import streaming  # noqa: F401
from .base import AttentionMethod

__all__ = ["AttentionMethod"]
