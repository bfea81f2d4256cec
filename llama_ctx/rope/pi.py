"""Position interpolation (Chen et al. 2023, "Extending Context Window of LLMs via Positional Interpolation").

Positions are divided by `factor`; since the angle is position * theta, dividing every theta by `factor`
is the same thing and keeps integer position ids.
"""

from dataclasses import dataclass

from ..registry import check_number, register
from .base import default_inv_freq


@dataclass
class PIParams:
    """Args:
    factor: positions are divided by this (target length / trained length), > 0.
    """

    factor: float

    def __post_init__(self):
        self.factor = check_number("factor", self.factor, gt=0)


def pi_frequencies(p: PIParams, spec, seq_len=None):
    return default_inv_freq(spec) / p.factor, 1.0


def _native(p: PIParams, spec):
    return {"rope_type": "linear", "factor": p.factor}


register("pi", "rope", PIParams, pi_frequencies, "position interpolation: positions divided by factor",
         aliases=("linear",), native=_native)
