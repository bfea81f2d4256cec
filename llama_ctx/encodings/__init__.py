"""Positional encodings other than LLaMA's rotary one: tables and patch methods (kind "position")."""

from .tables import sinusoidal

__all__ = ["sinusoidal"]
