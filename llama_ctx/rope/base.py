"""What every frequency method starts from: the model's default RoPE frequencies.

A frequency method is a pure function `fn(params, spec, seq_len=None) -> (inv_freq, attention_scaling)`
(the transformers `_compute_<type>_parameters` shape): float32 `inv_freq` of shape `(dim // 2,)` and the
factor that cos/sin are multiplied by. `seq_len` is only read by dynamic methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeSpec:
    """The unscaled rotary embedding of a model.

    Args:
        base: `rope_theta`.
        dim: number of rotated channels per head (head_dim * partial_rotary_factor), even.
        trained_window: context length the model was pre-trained on.
    """

    base: float
    dim: int
    trained_window: int

    @classmethod
    def from_config(cls, config) -> "RopeSpec":
        rp = dict(getattr(config, "rope_parameters", None) or {})
        base = rp.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * rp.get("partial_rotary_factor", 1.0))
        window = rp.get("original_max_position_embeddings") or config.max_position_embeddings
        return cls(float(base), dim, int(window))


def default_inv_freq(spec: RopeSpec, base: float | None = None) -> torch.Tensor:
    """theta_i = base^(-2i/d), i = 0 .. d/2-1, in float32 (computed in float64 first for accuracy at any base)."""
    base = spec.base if base is None else base
    exponent = torch.arange(0, spec.dim, 2, dtype=torch.int64).to(torch.float32) / spec.dim
    return (1.0 / (base**exponent)).to(torch.float32)


def wavelengths(inv_freq: torch.Tensor) -> torch.Tensor:
    """Tokens per full turn of each dimension pair: 2*pi/theta (inf where theta is 0)."""
    return 2 * torch.pi / inv_freq
