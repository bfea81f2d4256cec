"""The Transformer's sinusoidal encoding (Vaswani et al. 2017), added to the input embeddings; rotary off."""

from dataclasses import dataclass

from ..registry import check_number, register
from .base import EMBEDDING_SIDE_ATTENTION, PositionMethod, encode_embeddings, rotary_off, sinusoidal_width
from .tables import sinusoidal_at


@dataclass
class SinusoidalParams:
    """Args:
    scale: the table is multiplied by this before it is added (LLaMA's embeddings are small next to its +-1), > 0.
    base: the wavelength base, > 1 (10000 in the paper).
    """

    scale: float = 1.0
    base: float = 10000.0

    def __post_init__(self):
        self.scale = check_number("scale", self.scale, gt=0)
        self.base = check_number("base", self.base, gt=1.0)


class Sinusoidal(PositionMethod):
    compatible_attention = EMBEDDING_SIDE_ATTENTION

    def apply(self, patcher, model, backbone, params) -> None:
        sinusoidal_width(backbone, self.name)  # checked before anything changes
        rotary_off(patcher, backbone)
        encode_embeddings(patcher, backbone, self, params)

    def encode(self, fwd, embeds, position_ids):
        p = fwd.params
        table = sinusoidal_at(position_ids, embeds.shape[-1], p.base)  # float64, computed per call: no length limit
        return embeds + (p.scale * table).to(embeds.dtype)


register("sinusoidal", "position", SinusoidalParams, Sinusoidal(),
         "rotary off, scale x the sinusoidal table added to the input embeddings")
