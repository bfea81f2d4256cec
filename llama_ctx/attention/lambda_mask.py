"""Λ-shaped attention (Han et al. 2024, "LM-Infinite: Zero-Shot Extreme Length Generalization for LLMs").

A query sees the first `global_tokens` keys (the "attention sinks") and the last `local_window` keys; the
relative distance is capped at `local_window`, so the model never meets a distance it was not trained on.
Two position sets as ReRoPE with window = local_window (outer queries at local_window, outer keys at 0) plus
the visibility mask: outer keys are visible only at positions < global_tokens. The mask is never built as an
L x L tensor; memory grows linearly with the length (the KV cache still keeps every key).
"""

from dataclasses import dataclass

import torch

from ..registry import check_int, from_model, register
from .engine import PositionalAttention, Scheme, window_scheme


@dataclass
class LambdaParams:
    """Args:
    global_tokens: leading tokens every query sees, >= 0 (LM-Infinite uses 10).
    local_window: keys within this distance are seen with exact positions; defaults to the trained window.
    """

    global_tokens: int = 10
    local_window: int | None = from_model(help="trained window")

    def __post_init__(self):
        self.global_tokens = check_int("global_tokens", self.global_tokens, ge=0)
        self.local_window = check_int("local_window", self.local_window)


class LambdaAttention(PositionalAttention):
    def scheme(self, p: LambdaParams, ctx) -> Scheme:
        return window_scheme(p.local_window, outer_q=lambda pos: torch.full_like(pos, p.local_window),
                             outer_k=torch.zeros_like, global_tokens=p.global_tokens)


register("lambda", "attention", LambdaParams, LambdaAttention(),
         "Λ-shaped attention (LM-Infinite): global tokens + local window, distance capped at the window")
