"""Dynamic NTK (emozilla, 2023): NTK-aware base recomputed from the current length.

Within the trained window the model is untouched; past it, for current length L,
base' = base * (factor * L / L_train - (factor - 1))^(d/(d-2)). Unlike transformers' stateful version, the
frequencies are a pure function of the positions of the current call (see `RotaryEmbedding`).
"""

from dataclasses import dataclass

from ..registry import check_int, check_number, from_model, register
from .base import default_inv_freq


@dataclass
class DynamicNTKParams:
    """Args:
    factor: scaling strength, > 0 (the base grows as factor * L / L_train - (factor - 1)).
    original_max_position_embeddings: trained window; defaults to the model's.
    """

    factor: float
    original_max_position_embeddings: int | None = from_model(help="trained window")

    def __post_init__(self):
        self.factor = check_number("factor", self.factor, gt=0)
        self.original_max_position_embeddings = check_int(
            "original_max_position_embeddings", self.original_max_position_embeddings)


def dynamic_frequencies(p: DynamicNTKParams, spec, seq_len=None):
    orig = p.original_max_position_embeddings
    seq_len = max(seq_len or orig, orig)
    base = spec.base * (p.factor * seq_len / orig - (p.factor - 1)) ** (spec.dim / (spec.dim - 2))
    return default_inv_freq(spec, base=base), 1.0


def _native(p: DynamicNTKParams, spec):
    # transformers reads the window from `max_position_embeddings`, which patch() leaves as it is
    if p.original_max_position_embeddings != (spec.max_position_embeddings or spec.trained_window):
        return None
    return {"rope_type": "dynamic", "factor": p.factor}


register("dynamic-ntk", "rope", DynamicNTKParams, dynamic_frequencies,
         "dynamic NTK: base recomputed from the current length once it passes the trained window",
         aliases=("dynamic",), native=_native, dynamic=True)
