"""A multiplicative absolute encoding: each input embedding multiplied element-wise by (1 + scale x its sinusoidal
row), instead of adding the row; rotary off. The variant the background material mentions next to the additive
one; order then modulates the embedding's channels instead of shifting them."""

from dataclasses import dataclass

from ..registry import register
from .sinusoidal_pe import Sinusoidal, SinusoidalParams
from .tables import sinusoidal_at


@dataclass
class MultiplicativeParams(SinusoidalParams):
    """Args:
    scale: the sinusoidal table is multiplied by this (1: factors between 0 and 2), > 0.
    base: the wavelength base, > 1.
    """


class Multiplicative(Sinusoidal):  # the same checks and changes; only the encoding differs
    def encode(self, fwd, embeds, position_ids):
        p = fwd.params
        factor = 1 + p.scale * sinusoidal_at(position_ids, embeds.shape[-1], p.base)
        return embeds * factor.to(embeds.dtype)


register("multiplicative", "position", MultiplicativeParams, Multiplicative(),
         "rotary off, input embeddings multiplied element-wise by (1 + scale x the sinusoidal table)")
