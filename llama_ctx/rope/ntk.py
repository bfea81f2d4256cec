"""NTK-aware scaling (bloc97, 2023): raise the RoPE base instead of squeezing positions.

base' = base * factor^(d/(d-2)) makes the lowest frequency interpolate by exactly `factor` while the highest
ones are left almost as trained (extrapolated), so nearby tokens keep their resolution.
"""

from dataclasses import dataclass

from ..errors import ConfigError
from ..registry import check_number, register
from .base import default_inv_freq


@dataclass
class NTKParams:
    """Args:
    factor: target length / trained length, > 0; gives base' = base * factor^(d/(d-2)).
    base: or the new base itself, > 0. Give exactly one of the two.
    """

    factor: float | None = None
    base: float | None = None

    def __post_init__(self):
        if (self.factor is None) == (self.base is None):
            raise ConfigError("ntk takes exactly one of factor=... or base=...")
        if self.factor is not None:
            self.factor = check_number("factor", self.factor, gt=0)
        if self.base is not None:
            self.base = check_number("base", self.base, gt=0)


def ntk_base(p: NTKParams, spec) -> float:
    if p.base is not None:
        return p.base
    return spec.base * p.factor ** (spec.dim / (spec.dim - 2))


def ntk_frequencies(p: NTKParams, spec, seq_len=None):
    return default_inv_freq(spec, base=ntk_base(p, spec)), 1.0


def _native(p: NTKParams, spec):
    return {"rope_type": "default", "rope_theta": ntk_base(p, spec)}


register("ntk", "rope", NTKParams, ntk_frequencies, "NTK-aware scaling: base * factor^(d/(d-2)), or an explicit base",
         native=_native)
