"""NoPE: no positional encoding at all (Kazemnejad et al. 2023, "The Impact of Positional Encoding on Length
Generalization in Transformers"). Rotary is off; the causal mask is the only signal of order."""

from dataclasses import dataclass

from ..registry import register
from .base import EMBEDDING_SIDE_ATTENTION, PositionMethod, rotary_off


@dataclass
class NopeParams:
    """No parameters."""


class Nope(PositionMethod):
    compatible_attention = EMBEDDING_SIDE_ATTENTION

    def apply(self, patcher, model, backbone, params) -> None:
        rotary_off(patcher, backbone)


register("nope", "position", NopeParams, Nope(), "no positional encoding: rotary off, only the causal mask orders")
