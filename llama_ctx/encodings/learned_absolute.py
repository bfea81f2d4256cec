"""Learned absolute positions (GPT-2, BERT): a trainable `[max_positions, hidden]` table whose row at each token's
position is added to its input embedding; rotary off. Fine-tune it with the training script (`context.method:
learned-absolute`); it is saved with the model (`model.llama_ctx_position.weight`)."""

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import check_int, check_number, from_model, register
from .base import PositionMethod, attach, encode_embeddings, rotary_off, sinusoidal_width
from .tables import sinusoidal

INITS = ("sinusoidal", "zeros")


@dataclass
class LearnedAbsoluteParams:
    """Args:
    max_positions: rows of the table: positions 0 .. max_positions - 1 (default: the trained window). A position
        past it is an error, never clamped.
    init: "sinusoidal" (scale x the sinusoidal table: an encoding from the first step) or "zeros" (starts as NoPE).
    scale: amplitude of the sinusoidal initialisation, > 0.
    """

    max_positions: int | None = from_model(help="table rows; default: the model's trained window")
    init: str = "sinusoidal"
    scale: float = 1.0

    def __post_init__(self):
        self.max_positions = check_int("max_positions", self.max_positions)
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}")
        self.scale = check_number("scale", self.scale, gt=0)


class PositionTable(nn.Module):
    """The trainable table; `weight[pos]` is added at position `pos`."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


class LearnedAbsolute(PositionMethod):
    def apply(self, patcher, model, backbone, params) -> None:
        emb = backbone.embed_tokens.weight
        if params.init == "sinusoidal":
            table = params.scale * sinusoidal(params.max_positions, sinusoidal_width(backbone, self.name),
                                              dtype=torch.float64)
        else:
            table = torch.zeros(params.max_positions, emb.shape[-1], dtype=torch.float64)
        rotary_off(patcher, backbone)
        attach(patcher, backbone, PositionTable(table.to(emb.dtype)))
        encode_embeddings(patcher, backbone, self, params)

    def encode(self, fwd, embeds, position_ids):
        weight = fwd.module.weight
        low, high = int(position_ids.min()), int(position_ids.max())
        if low < 0 or high >= weight.shape[0]:
            raise ConfigError(
                f"{self.name}: position {high if high >= weight.shape[0] else low} is outside the table's "
                f"0 .. {weight.shape[0] - 1} (max_positions={weight.shape[0]}); positions are never clamped. Patch "
                f"with max_positions >= {high + 1} (new rows start from init and need training) or shorten the input."
            )
        return embeds + weight[position_ids].to(embeds.dtype)


register("learned-absolute", "position", LearnedAbsoluteParams, LearnedAbsolute(),
         "rotary off, a trainable [max_positions, hidden] table added to the input embeddings")
