"""Leaky ReRoPE (Su 2023, bojone/rerope): beyond the window, relative positions grow `factor` times slower.

rel(i, j) = i - j if i - j < window, else window + (i - j - window) / factor, i.e. outer queries at
P_q(i) = i / factor + window - window / factor and outer keys at P_k(j) = j / factor (fractional positions;
the cache stores keys rotated at j / factor). ReRoPE is the limit factor -> infinity.
"""

from dataclasses import dataclass, field

from ..registry import check_number, register
from .engine import PositionalAttention, Scheme, window_scheme
from .rerope import ReRoPEParams


@dataclass
class LeakyReRoPEParams(ReRoPEParams):
    """Args:
    window: relative positions below it are exact.
    factor: slope divisor past the window, > 1; pick it so window + (target - window) / factor < trained length.
    log_scale: scale queries past `training_length` by log(i + 1) / log(training_length).
    training_length: trained context length; defaults to the model's.
    """

    factor: float = field(kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        self.factor = check_number("factor", self.factor, gt=1)


class LeakyReRoPE(PositionalAttention):
    def scheme(self, p: LeakyReRoPEParams, ctx) -> Scheme:
        w, f = p.window, p.factor
        return window_scheme(w, outer_q=lambda pos: pos / f + (w - w / f), outer_k=lambda pos: pos / f,
                             log_scale_from=p.training_length if p.log_scale else None)


register("leaky-rerope", "attention", LeakyReRoPEParams, LeakyReRoPE(),
         "Leaky ReRoPE: relative positions beyond `window` grow 1/factor as fast")
