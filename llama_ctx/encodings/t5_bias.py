"""T5's relative position bias (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", section 2.1), causal: rotary off, and each query head h adds a learned scalar
table[bucket(p_i - p_j), h] to its scores.

Buckets of the distance n = p_i - p_j >= 0 (T5's `bidirectional=False`, its decoder): half of the `num_buckets`
(max_exact = num_buckets // 2) hold one distance each, 0 .. max_exact - 1; the others split max_exact ..
`max_distance` logarithmically, and every distance from about `max_distance` on shares the last bucket:

    bucket(n) = n                                                                           if n < max_exact
              = min(num_buckets - 1,
                    max_exact + floor(log(n / max_exact) / log(max_distance / max_exact) * (num_buckets - max_exact)))

The log branch is computed in float32 in T5's (Mesh TensorFlow's) order of operations, so the buckets are T5's even
where float rounding sits on a bucket boundary. One table `[num_buckets, heads]` is shared by all layers (as in T5,
whose first layer computes the bias for all), initialised to zero: the patched model then equals "nope" until
trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError, PatchStateError
from ..registry import check_int, register
from .base import MODULE_ATTR
from .bias import BiasAttention, BiasPosition


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Causal T5 bucket of each `relative_position` = key position - query position (T5's sign); positive
    values (keys in the future) fall in bucket 0. Integer tensor in, long tensor of buckets in [0, num_buckets) out."""
    max_exact = num_buckets // 2
    n = (-relative_position).clamp(min=0).long()
    # clamped to max_exact inside the log so that the unused branch stays finite for n < max_exact
    ratio = n.clamp(min=max_exact).float() / max_exact
    log_bucket = max_exact + (torch.log(ratio) / math.log(max_distance / max_exact)
                              * (num_buckets - max_exact)).to(torch.long)
    return torch.where(n < max_exact, n, log_bucket.clamp(max=num_buckets - 1))


@dataclass
class T5BiasParams:
    """Args:
    num_buckets: buckets of the distance; half exact (0 .. num_buckets // 2 - 1), half logarithmic. >= 2.
    max_distance: distances from about here on share the last bucket; > num_buckets // 2.
    """

    num_buckets: int = 32
    max_distance: int = 128

    def __post_init__(self):
        self.num_buckets = check_int("num_buckets", self.num_buckets, ge=2)
        self.max_distance = check_int("max_distance", self.max_distance)
        if self.max_distance <= self.num_buckets // 2:
            raise ConfigError(f"max_distance must be > num_buckets // 2 = {self.num_buckets // 2} (where the exact "
                              f"buckets end and the logarithmic ones start), got {self.max_distance}; e.g. "
                              f"max_distance={4 * self.num_buckets}")


class T5Table(torch.nn.Module):
    """The trainable bias table `[num_buckets, heads]`, attached to the backbone as `llama_ctx_position` (saved with
    the model). Read by calling it, so that a PEFT `modules_to_save` wrapper (training) hands the call to its trained
    copy."""

    def __init__(self, num_buckets: int, num_heads: int, device=None, dtype=None):
        super().__init__()
        self.relative_attention_bias = torch.nn.Parameter(torch.zeros(num_buckets, num_heads, device=device,
                                                                      dtype=dtype))

    def forward(self, bucket: torch.Tensor) -> torch.Tensor:
        """`[*bucket.shape, heads]`: the row of each bucket."""
        return self.relative_attention_bias[bucket]


class T5BiasAttention(BiasAttention):
    name = "t5-bias"  # for the forwards' errors

    def bias(self, fwd, distance):
        table = fwd.backbone._modules.get(MODULE_ATTR)  # read at call time: trained, moved and copied with the model
        if table is None:
            raise PatchStateError(f"t5-bias: backbone.{MODULE_ATTR} (the bias table) was removed; call "
                                  "llama_ctx.unpatch(model) and patch again.")
        # the bias of each distance up to max_distance (every farther one is in the last bucket, as max_distance is),
        # then one gather into [heads, *distance.shape]: no L x T bucket tensor, and nothing as long as a position gap
        far = fwd.params.max_distance
        distances = torch.arange(far + 1, device=next(table.parameters()).device)
        rows = table(relative_position_bucket(-distances, fwd.params.num_buckets, far))
        return rows.to(distance.device, torch.float32).T[:, distance.clamp_(max=far)]


class T5Bias(BiasPosition):
    attention = T5BiasAttention()

    def module(self, params: T5BiasParams, backbone) -> T5Table:
        weight = backbone.embed_tokens.weight
        return T5Table(params.num_buckets, backbone.config.num_attention_heads, weight.device, weight.dtype)


register("t5-bias", "position", T5BiasParams, T5Bias(),
         "T5 relative bias: rotary off, a learned scalar per (log-bucket of the distance, head), zero at init")
