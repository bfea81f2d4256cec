"""Learned absolute positions (GPT-2, BERT): a trainable `[max_positions, hidden]` table whose row at each token's
position is added to its input embedding; rotary off. Fine-tune it with the training script (`context.method:
learned-absolute`); it is saved with the model (`model.llama_ctx_position.weight`)."""

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import check_int, check_number, from_model, register
from .base import EMBEDDING_SIDE_ATTENTION, PositionMethod, attach, encode_embeddings, rotary_off, sinusoidal_width
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
    """The trainable table; `weight[pos]` is added at position `pos`.

    Read by calling it, so that a PEFT `modules_to_save` wrapper (training) hands the call to its trained copy.
    """

    def __init__(self, weight: torch.Tensor, name: str):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.method = name

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight.shape[0]
        low, high = int(position_ids.min()), int(position_ids.max())
        if low < 0 or high >= rows:
            raise ConfigError(
                f"{self.method}: position {high if high >= rows else low} is outside the table's 0 .. {rows - 1} "
                f"(max_positions={rows}); positions are never clamped. Patch with max_positions >= {high + 1} "
                "(new rows start from init and need training) or shorten the input."
            )
        return self.weight[position_ids]


class LearnedAbsolute(PositionMethod):
    compatible_attention = EMBEDDING_SIDE_ATTENTION

    def apply(self, patcher, model, backbone, params) -> None:
        emb = backbone.embed_tokens.weight
        if params.init == "sinusoidal":
            table = params.scale * sinusoidal(params.max_positions, sinusoidal_width(backbone, self.name),
                                              dtype=torch.float64)
        else:
            table = torch.zeros(params.max_positions, emb.shape[-1], dtype=torch.float64)
        rotary_off(patcher, backbone)
        attach(patcher, backbone, PositionTable(table.to(emb.dtype), self.name))
        encode_embeddings(patcher, backbone, self, params)

    def encode(self, fwd, embeds, position_ids):
        return embeds + fwd.module(position_ids).to(embeds.dtype)


register("learned-absolute", "position", LearnedAbsoluteParams, LearnedAbsolute(),
         "rotary off, a trainable [max_positions, hidden] table added to the input embeddings")
