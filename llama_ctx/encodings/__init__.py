"""Positional encodings other than LLaMA's rotary one: tables and patch methods (kind "position").

Importing this package registers the methods.
"""

from . import nope  # noqa: F401  (each import registers its method)
from .base import PositionMethod
from .tables import sinusoidal

__all__ = ["PositionMethod", "sinusoidal"]
