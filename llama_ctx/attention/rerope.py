"""ReRoPE (Su 2023, "Rectified Rotary Position Embeddings", bojone/rerope): relative positions truncated at a window.

rel(i, j) = i - j if i - j < window, else window: nearby tokens keep exact RoPE, distant ones all sit at the
largest trained-looking distance `window`, so no position beyond the window is ever seen and any length works.
Two position sets: outer queries at P_q(i) = window, outer keys at P_k(j) = 0 (the cache stores unrotated keys,
times the rotary scaling). With `log_scale`, queries at i >= training_length are multiplied by
log(i + 1) / log(training_length) (entropy-invariant scaling, as in the reference implementation).
"""

from dataclasses import dataclass

import torch

from ..registry import check_flag, check_int, from_model, register
from .engine import PositionalAttention, Scheme, window_scheme


@dataclass
class ReRoPEParams:
    """Args:
    window: relative positions >= window are truncated to window; a few hundred to the trained window/4.
    log_scale: scale queries past `training_length` by log(i + 1) / log(training_length).
    training_length: trained context length (for `log_scale`); defaults to the model's, >= 2.
    """

    window: int
    log_scale: bool = True
    training_length: int | None = from_model(help="trained window")

    def __post_init__(self):
        self.window = check_int("window", self.window)
        self.training_length = check_int("training_length", self.training_length, ge=2)
        self.log_scale = check_flag("log_scale", self.log_scale)


class ReRoPE(PositionalAttention):
    def scheme(self, p: ReRoPEParams, ctx) -> Scheme:
        return window_scheme(p.window, outer_q=lambda pos: torch.full_like(pos, p.window), outer_k=torch.zeros_like,
                             log_scale_from=p.training_length if p.log_scale else None)


register("rerope", "attention", ReRoPEParams, ReRoPE(),
         "ReRoPE: relative positions beyond `window` truncated to `window` (two-branch attention)")
