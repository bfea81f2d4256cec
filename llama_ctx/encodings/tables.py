"""Positional-encoding tables (pure functions, no model)."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import check_int, check_number


def sinusoidal(num_positions: int, dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Transformer's sinusoidal table, `[num_positions, dim]`.

    PE(pos, 2i) = sin(pos / base^(2i/dim)), PE(pos, 2i+1) = cos(pos / base^(2i/dim)). Computed in float64 and
    cast to `dtype`: at i = 0 the angle is pos itself (a common hand-written variant, pos / sqrt(i // 2**0.5),
    divides by zero at i = 0 and 1).
    """
    num_positions = check_int("num_positions", num_positions, ge=0)
    return sinusoidal_at(torch.arange(num_positions), dim, base).to(dtype)


def sinusoidal_at(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The rows of `sinusoidal` at `positions` (any shape, any non-negative values): float64 `[*positions.shape, dim]`
    on the positions' device, so a patched model needs no table of a fixed length."""
    dim = check_int("dim", dim)
    base = check_number("base", base, gt=1.0)
    if dim % 2:
        raise ConfigError(f"dim must be even (sin and cos share each frequency), got {dim}; use dim={dim + 1} "
                          f"and drop the last column if you need {dim}")
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)  # 1/base^(2i/d)
    angle = positions.to(torch.float64)[..., None] * inv_freq
    return torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(*positions.shape, dim)
