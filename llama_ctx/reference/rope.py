"""References for the rope (frequency) methods: transformers' own implementations, and closed forms.

`NATIVE` pairs a llama_ctx method with the transformers `rope_parameters` that define the same frequencies, so a
stock model built with them (transformers computing its own frequencies) is the oracle. Methods transformers does
not have are checked against their closed forms below, written from the papers.
"""

import torch

WINDOW = 64  # trained window of the tiny test models

NATIVE = [  # (llama_ctx method, params, equivalent transformers rope_parameters)
    ("pi", dict(factor=4.0), dict(rope_type="linear", factor=4.0)),
    ("linear", dict(factor=2.5), dict(rope_type="linear", factor=2.5)),
    ("dynamic-ntk", dict(factor=4.0), dict(rope_type="dynamic", factor=4.0)),
    ("yarn", dict(factor=4.0), dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=WINDOW)),
    ("yarn", dict(factor=8.0, beta_fast=16, beta_slow=2, attention_factor=1.3),
     dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=WINDOW, beta_fast=16, beta_slow=2,
          attention_factor=1.3)),
    ("llama3", dict(factor=8.0), dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=WINDOW)),
]


def ntk_base(base: float, factor: float, dim: int) -> float:
    """NTK-aware scaling (bloc97 2023): the base that stretches the lowest frequency by `factor`, b * s^(d/(d-2))."""
    return base * factor ** (dim / (dim - 2))


def truncated_frequencies(dim: int, base: float, a: float, b: float, rho: float) -> torch.Tensor:
    """Giraffe's truncated basis (Pal et al. 2023): theta_i >= b kept, <= a set to 0, in between set to rho."""
    theta = torch.tensor([base ** (-2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)
    return torch.where(theta >= b, theta, torch.where(theta <= a, torch.zeros_like(theta), torch.full_like(theta, rho)))
