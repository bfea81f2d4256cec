"""LLaMA-3.1 wavelength-banded scaling (Meta, 2024).

Pairs whose wavelength is shorter than L_train / high_freq_factor are kept; those longer than
L_train / low_freq_factor are interpolated by `factor`; in between, 1/theta is blended linearly in
L_train / wavelength. A banded, step-edged cousin of YaRN without the temperature.
"""

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..registry import check_int, check_number, from_model, register
from .base import default_inv_freq, wavelengths


@dataclass
class Llama3Params:
    """Args:
    factor: interpolation factor of the low-frequency band, > 0.
    low_freq_factor: wavelengths above L_train / low_freq_factor are fully interpolated.
    high_freq_factor: wavelengths below L_train / high_freq_factor are kept; > low_freq_factor.
    original_max_position_embeddings: trained window; defaults to the model's.
    """

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = from_model(help="trained window")

    def __post_init__(self):
        self.factor = check_number("factor", self.factor, gt=0)
        self.low_freq_factor = check_number("low_freq_factor", self.low_freq_factor, gt=0)
        self.high_freq_factor = check_number("high_freq_factor", self.high_freq_factor, gt=0)
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"high_freq_factor ({self.high_freq_factor}) must be > low_freq_factor "
                              f"({self.low_freq_factor})")
        self.original_max_position_embeddings = check_int(
            "original_max_position_embeddings", self.original_max_position_embeddings)


def llama3_frequencies(p: Llama3Params, spec, seq_len=None):
    theta = default_inv_freq(spec)
    turns = p.original_max_position_embeddings / wavelengths(theta)  # full turns inside the window
    # smooth = 1 keeps theta, 0 divides it by factor; linear in `turns` between the band edges
    smooth = ((turns - p.low_freq_factor) / (p.high_freq_factor - p.low_freq_factor)).clamp(0, 1)
    inv_freq = (1 - smooth) * theta / p.factor + smooth * theta
    return inv_freq.to(torch.float32), 1.0


def _native(p: Llama3Params, spec):
    return {"rope_type": "llama3", "factor": p.factor, "low_freq_factor": p.low_freq_factor,
            "high_freq_factor": p.high_freq_factor,
            "original_max_position_embeddings": p.original_max_position_embeddings}


register("llama3", "rope", Llama3Params, llama3_frequencies, "LLaMA-3 wavelength-banded scaling", native=_native)
