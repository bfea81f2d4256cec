"""Positional encodings other than LLaMA's rotary one: tables and patch methods (kind "position").

Importing this package registers the methods.
"""

from . import alibi, nope, t5_bias  # noqa: F401  (each import registers its method)
from .alibi import alibi_slopes
from .base import PositionMethod
from .t5_bias import relative_position_bucket
from .tables import sinusoidal

__all__ = ["PositionMethod", "alibi_slopes", "relative_position_bucket", "sinusoidal"]
