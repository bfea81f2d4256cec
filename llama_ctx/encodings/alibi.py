"""ALiBi (Press, Smith and Lewis 2022, "Train Short, Test Long: Attention with Linear Biases"): rotary off, and each
query head h adds -m_h * (p_i - p_j) to its scores, a penalty linear in the distance to the key.

Slopes: for a power-of-two head count H, the geometric sequence m_h = 2^(-8h/H), h = 1..H (1/2, 1/4, ... 1/256 for
H = 8). Otherwise, with n the largest power of two below H, the n slopes of n heads followed by every other slope
of 2n heads (h = 1, 3, 5, ...), H - n of them: the paper's code and BLOOM's `build_alibi_tensor`. `max_bias` is
the 8 (ggml/llama.cpp call it the same): larger values make every head more local.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..registry import check_int, check_number, register
from .bias import BiasAttention, BiasPosition


def alibi_slopes(num_heads: int, max_bias: float = 8.0) -> torch.Tensor:
    """The `[num_heads]` ALiBi slopes in float64, in head order."""
    num_heads = check_int("num_heads", num_heads)
    max_bias = check_number("max_bias", max_bias, gt=0.0)
    n = 2 ** int(math.floor(math.log2(num_heads)))
    h = torch.arange(1, n + 1, dtype=torch.float64)
    slopes = 2.0 ** (-max_bias * h / n)
    # the remaining heads interleave between those: odd exponents of the 2n-head sequence
    odd = torch.arange(1, 2 * (num_heads - n) + 1, 2, dtype=torch.float64)
    return torch.cat([slopes, 2.0 ** (-max_bias * odd / (2 * n))])


@dataclass
class AlibiParams:
    """Args:
    max_bias: the 8 of the slopes 2^(-8h/H); the paper's (and BLOOM's) value is 8. > 0.
    """

    max_bias: float = 8.0

    def __post_init__(self):
        self.max_bias = check_number("max_bias", self.max_bias, gt=0.0)


class AlibiAttention(BiasAttention):
    name = "alibi"  # for the forwards' errors

    def prepare(self, params: AlibiParams, ctx) -> torch.Tensor:
        return alibi_slopes(ctx.config.num_attention_heads, params.max_bias).to(torch.float32)

    def bias(self, fwd, distance):
        slopes = fwd.extra.to(distance.device)
        return -slopes.view(-1, *[1] * distance.ndim) * distance


class Alibi(BiasPosition):
    attention = AlibiAttention()


register("alibi", "position", AlibiParams, Alibi(),
         "ALiBi: rotary off, each head's scores minus slope x distance (slopes 2^(-8h/H))")
