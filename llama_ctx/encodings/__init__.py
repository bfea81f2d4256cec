"""Positional encodings other than LLaMA's rotary one: tables and patch methods (kind "position").

Importing this package registers the methods.
"""

# each import registers its method
from . import alibi, learned_absolute, multiplicative, nope, recursive, sinusoidal_pe, t5_bias  # noqa: F401
from .alibi import alibi_slopes
from .base import PositionMethod
from .t5_bias import relative_position_bucket
from .tables import sinusoidal

__all__ = ["PositionMethod", "alibi_slopes", "relative_position_bucket", "sinusoidal"]
