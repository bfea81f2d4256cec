"""The rotary module that replaces `model.model.rotary_emb`, and helpers that read any rotary module."""

from __future__ import annotations

import torch
from torch import nn

from .base import RopeSpec, length_dependent


class RotaryEmbedding(nn.Module):
    """Drop-in for transformers' `LlamaRotaryEmbedding`: `forward(x, position_ids) -> (cos, sin)`.

    The frequencies come from a pure frequency function and are kept in float32 as a plain attribute, not a
    buffer, so `model.to(torch.bfloat16)` cannot round them; cos/sin are computed in float32 and cast to
    `x.dtype` at the end, as transformers does.

    Dynamic methods recompute the frequencies from the largest position of the current call
    (seq_len = max(position_ids) + 1), a pure function of the input: transformers' dynamic RoPE keeps the
    largest length seen so far instead, so a short input after a long one gets a different answer there.
    """

    def __init__(self, fn, params, spec: RopeSpec, dynamic: bool = False, original: nn.Module | None = None):
        super().__init__()
        self.fn, self.params, self.spec, self.dynamic = fn, params, spec, dynamic
        inv_freq, self.attention_scaling = fn(params, spec, None)
        self._inv_freq = inv_freq.to(torch.float32)
        # For code that reads `rotary_emb.inv_freq` / `.config` / `.rope_type` (e.g. kernels, generation utils).
        self.config = getattr(original, "config", None)
        self.rope_type = "llama_ctx"

    @property
    def inv_freq(self) -> torch.Tensor:
        return self._inv_freq

    def frequencies(self, position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """(inv_freq, attention_scaling) that `forward` uses for these positions."""
        if self.dynamic and position_ids is not None:
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.spec.trained_window:
                inv_freq, scaling = self.fn(self.params, self.spec, seq_len)
                return inv_freq.to(torch.float32), scaling
        return self._inv_freq, self.attention_scaling

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        inv_freq, scaling = self.frequencies(position_ids)
        return cos_sin(inv_freq, scaling, position_ids, x)

    def extra_repr(self) -> str:
        return f"{self.fn.__name__}, {self.params}"


def cos_sin(inv_freq: torch.Tensor, scaling: float, positions: torch.Tensor, x: torch.Tensor):
    """cos/sin of shape `positions.shape + (dim,)` in `x.dtype`, computed in float32.

    `positions` may be fractional (e.g. Leaky ReRoPE); the layout matches transformers' `rotate_half`.
    """
    freqs = positions[..., None].to(torch.float32) * inv_freq.to(device=x.device, dtype=torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of `x` in transformers' rotate-half layout: x * cos + rotate_half(x) * sin (cos/sin broadcast to x)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rotary_frequencies(rotary: nn.Module, position_ids: torch.Tensor | None = None):
    """(float32 inv_freq, attention_scaling) of a llama_ctx or a stock transformers rotary module.

    Attention methods that rotate at positions of their own (ReRoPE, Self-Extend, ...) use this so that they
    compose with whatever frequency method is active, the model's native scaling included (a stock module's
    `inv_freq` is already scaled by its `rope_type`).

    A stock module whose frequencies depend on the length ("dynamic", "longrope") keeps in `inv_freq` those of
    the longest input it has seen so far (transformers' `dynamic_rope_update`), stale for any other call; its
    frequencies are computed here from `position_ids` instead, a pure function of the call as in
    `RotaryEmbedding.frequencies`.
    """
    if isinstance(rotary, RotaryEmbedding):
        return rotary.frequencies(position_ids)
    rope_type = getattr(rotary, "rope_type", "default")
    if length_dependent(rope_type):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        seq_len = int(position_ids.max()) + 1 if position_ids is not None else None
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](rotary.config, None, seq_len=seq_len)
        return inv_freq.to(torch.float32), float(scaling)
    return rotary.inv_freq.to(torch.float32), float(rotary.attention_scaling)
