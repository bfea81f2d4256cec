"""YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of LLMs"): NTK-by-parts + temperature.

Each dimension pair is judged by how many full turns r = L_train / wavelength it makes inside the trained
window: pairs with r > beta_fast are kept (extrapolated), pairs with r < beta_slow are interpolated by
`factor` (PI), and a linear ramp blends the ones in between. cos/sin are multiplied by `attention_factor`
(sqrt of the paper's 1/t), which compensates the flatter attention of the interpolated dimensions.
"""

import math
from dataclasses import dataclass

import torch

from ..registry import check_int, check_number, from_model, register
from .base import default_inv_freq


@dataclass
class YarnParams:
    """Args:
    factor: target length / trained length, > 0.
    original_max_position_embeddings: trained window; defaults to the model's.
    beta_fast: pairs turning more than this many times in the window are not interpolated.
    beta_slow: pairs turning fewer times are fully interpolated.
    attention_factor: cos/sin multiplier; default 0.1 * ln(factor) + 1 (1 when factor <= 1).
    """

    factor: float
    original_max_position_embeddings: int | None = from_model(help="trained window")
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None

    def __post_init__(self):
        self.factor = check_number("factor", self.factor, gt=0)
        self.original_max_position_embeddings = check_int(
            "original_max_position_embeddings", self.original_max_position_embeddings)
        self.beta_fast = check_number("beta_fast", self.beta_fast, gt=0)
        self.beta_slow = check_number("beta_slow", self.beta_slow, gt=0)
        if self.attention_factor is None:
            self.attention_factor = 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0
        self.attention_factor = check_number("attention_factor", self.attention_factor, gt=0)


def _pair_index_for_turns(turns: float, spec, window: int) -> float:
    # Solve window / (2*pi*base^(2i/d)) = turns for i, in units of dimension pairs.
    return spec.dim * math.log(window / (turns * 2 * math.pi)) / (2 * math.log(spec.base))


def yarn_frequencies(p: YarnParams, spec, seq_len=None):
    theta = default_inv_freq(spec)
    window = p.original_max_position_embeddings
    lo = max(math.floor(_pair_index_for_turns(p.beta_fast, spec, window)), 0)
    hi = min(math.ceil(_pair_index_for_turns(p.beta_slow, spec, window)), spec.dim - 1)
    if hi == lo:
        hi += 0.001  # a step instead of a ramp
    # ramp = 0 for fast pairs (keep), 1 for slow pairs (interpolate)
    ramp = ((torch.arange(spec.dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    inv_freq = theta * (1 - ramp) + (theta / p.factor) * ramp
    return inv_freq, p.attention_factor


def _native(p: YarnParams, spec):
    return {"rope_type": "yarn", "factor": p.factor,
            "original_max_position_embeddings": p.original_max_position_embeddings,
            "beta_fast": p.beta_fast, "beta_slow": p.beta_slow, "attention_factor": p.attention_factor}


register("yarn", "rope", YarnParams, yarn_frequencies,
         "YaRN: NTK-by-parts interpolation plus attention temperature", native=_native)
