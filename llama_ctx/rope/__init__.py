"""Rotary-frequency methods; importing this package registers them."""

from . import dynamic, llama3, ntk, pi, truncation, yarn  # noqa: F401
from .base import RopeSpec, default_inv_freq, wavelengths

__all__ = ["RopeSpec", "default_inv_freq", "wavelengths"]
