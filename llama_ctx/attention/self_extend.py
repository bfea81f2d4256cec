"""Self-Extend (Jin et al. 2024, "LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning").

Neighbours keep exact RoPE; distant tokens are grouped by floor division:
rel(i, j) = i - j if i - j < window, else i // g - j // g + window - window // g (g = group_size), i.e. outer
queries at P_q(i) = i // g + window - window // g and outer keys at P_k(j) = j // g (the cache stores keys
rotated at j // g). The largest outer distance stays inside the trained window T for inputs of up to
(T - window) * g + window positions; a longer input raises a `ConfigError` naming the group size it needs.

NOTE: the shift is the integer w - w // g, as in the paper's Algorithm 1 (`shift = w_size - w_size // g_size`),
so every grouped position is an integer, a position the model was trained on. The authors' code
(datamllab/LongLM, self_extend_patch/Llama.py) writes `w - w / g` in its prefill path but `w - w // g` in its
decode path, so there a prompt and the tokens generated after it see different positions unless g divides w.
"""

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..registry import check_int, register
from .engine import PositionalAttention, Scheme, window_scheme


@dataclass
class SelfExtendParams:
    """Args:
    group_size: g >= 1; covers (T - window) * g + window positions, so g >= (target - window) / (T - window).
    window: neighbour window with exact positions, 1 <= window < trained length T.
    """

    group_size: int
    window: int

    def __post_init__(self):
        self.group_size = check_int("group_size", self.group_size)
        self.window = check_int("window", self.window)


def covered_length(p: SelfExtendParams, trained: int) -> int:
    """How many positions Self-Extend keeps inside the trained window."""
    return (trained - p.window) * p.group_size + p.window


class SelfExtend(PositionalAttention):
    def scheme(self, p: SelfExtendParams, ctx) -> Scheme:
        trained, w, g = ctx.spec.trained_window, p.window, p.group_size
        if w >= trained:
            raise ConfigError(f"self-extend window must be < the trained window {trained}, got window={w}; "
                              f"typical values are {trained // 8}..{trained // 2}.")
        covered = covered_length(p, trained)

        def check(length: int) -> None:
            if length > covered:
                need = math.ceil((length - w) / (trained - w))
                raise ConfigError(
                    f"self-extend with group_size={g}, window={w} covers {covered} positions of a model trained "
                    f"on {trained}, but this input reaches {length}; patch with group_size >= {need}.")

        return window_scheme(w, outer_q=lambda pos: torch.div(pos, g, rounding_mode="floor") + (w - w // g),
                             outer_k=lambda pos: torch.div(pos, g, rounding_mode="floor"), check=check)


register("self-extend", "attention", SelfExtendParams, SelfExtend(),
         "Self-Extend: grouped (floor-divided) positions beyond a neighbour window")
