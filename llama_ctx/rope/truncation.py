"""Base truncation (Pal et al. 2023, "Giraffe: Adventures in Expanding Context Lengths in LLMs").

Frequencies theta_i >= b are kept; a < theta_i < b are set to the constant rho; theta_i <= a are set to 0.
The zeroed pairs never rotate, so they cannot meet an angle they did not see in training; rho (small,
rho <= a is typical) keeps some position signal in the middle band with a wavelength longer than any target.
"""

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..registry import check_number, register
from .base import default_inv_freq


@dataclass
class TruncationParams:
    """Args:
    a: frequencies <= a are set to 0; >= 0.
    b: frequencies >= b are kept; > a.
    rho: value of the frequencies strictly between a and b; >= 0.
    """

    a: float
    b: float
    rho: float

    def __post_init__(self):
        self.a = check_number("a", self.a, ge=0)
        self.b = check_number("b", self.b, ge=0)
        self.rho = check_number("rho", self.rho, ge=0)
        if self.b <= self.a:
            raise ConfigError(f"base-truncation needs b > a, got a={self.a}, b={self.b}")


def truncation_frequencies(p: TruncationParams, spec, seq_len=None):
    theta = default_inv_freq(spec)
    out = torch.where(theta >= p.b, theta, torch.full_like(theta, p.rho))
    return torch.where(theta <= p.a, torch.zeros_like(theta), out), 1.0


register("base-truncation", "rope", TruncationParams, truncation_frequencies,
         "Giraffe truncated basis: frequencies >= b kept, (a, b) set to rho, <= a set to 0")
