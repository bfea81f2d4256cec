"""Evaluation harness: perplexity vs length (with per-position buckets), passkey, needle in a haystack, and a
parameter sweep. Every task returns a result object with `.to_json`, `.to_csv` and `.plot`."""

from .needle import NeedleResult, needle
from .passkey import PasskeyResult, passkey
from .perplexity import PerplexityResult, perplexity, token_losses
from .specs import MethodSpec, parse_length, parse_lengths, parse_method_spec, parse_methods
from .sweep import GRID, SweepResult, sweep
from .text import builtin_long_text, load_text

__all__ = [
    "perplexity", "token_losses", "PerplexityResult", "passkey", "PasskeyResult", "needle", "NeedleResult", "sweep",
    "SweepResult", "GRID", "MethodSpec", "parse_method_spec", "parse_methods", "parse_length", "parse_lengths",
    "load_text", "builtin_long_text",
]
