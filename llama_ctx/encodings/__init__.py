"""Positional encodings other than LLaMA's rotary one: tables and patch methods (kind "position").

Importing this package registers the methods.
"""

# each import registers its method
from . import learned_absolute, multiplicative, nope, recursive, sinusoidal_pe  # noqa: F401
from .base import PositionMethod
from .tables import sinusoidal

__all__ = ["PositionMethod", "sinusoidal"]
