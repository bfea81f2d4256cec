"""Attention with an additive position bias, shared by "alibi" and "t5-bias".

Rotary is off; each attention module computes

    score_h(i, j) = q_i . k_j / sqrt(d) + b_h(p_i - p_j)      for the keys j the attention mask lets query i see

where p are the `position_ids` of the call (left padding: generate's cumsum of the attention mask) and b_h is the
method's bias for query head h (ALiBi: -m_h * distance; T5: a learned scalar per log bucket of the distance). Under
GQA every query head has its own bias although it shares keys with others.

The bias and the attention mask are folded into one float additive mask `[B or 1, heads, queries, keys]`, handed to
the model's own attention function (`sdpa` or `eager`, chosen by `config._attn_implementation`). It lives for one
layer call only and is rebuilt by the next layer (the bias is the same in every layer; recomputing it costs far less
than the attention itself and keeps nothing L x L alive between layers). That is heads times what the stock path
holds per call (a `[B, 1, q, k]` bool mask, or none at all when sdpa can use its causal flag), in the model dtype:
at 8K tokens, 32 heads, float32: 8 GiB per call, plus an int64 `[B or 1, q, k]` distance matrix. On GPU a float mask
also keeps sdpa off its flash kernel. Measurements: docs/encodings.md.

Cached keys. `position_ids` give the positions of the call's own tokens; cached keys get the positions just before
the first query of the call, one per token (what a forward followed by `generate` produces). So within a row,
positions must grow by one per real token from the cache into the call; padding is hidden by the mask whatever its
positions. A forward without a cache uses the positions as given, gaps included.
"""

from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from ..attention.base import AttentionMethod, PatchedForward
from ..attention.engine import check_cache
from ..cache import append
from .base import PositionMethod, attach, rotary_off


class BiasAttention(AttentionMethod):
    """The attention forward of an additive-bias method; subclasses define `bias`."""

    def bias(self, fwd: PatchedForward, distance: torch.Tensor) -> torch.Tensor:
        """`[heads, *distance.shape]` float32 bias for non-negative integer distances p_i - p_j (`distance` is the
        method's to change in place)."""
        raise NotImplementedError

    def check_cache(self, cache, layer_idx: int) -> None:
        check_cache(cache, layer_idx)  # dynamic or static layers: every key in order (a static one is sliced)

    def attend(self, fwd, attn, hidden_states, attention_mask, cache, position_ids):
        B, L, _ = hidden_states.shape
        past = int(cache.get_seq_length(attn.layer_idx)) if cache is not None else 0  # a tensor for a static layer
        if position_ids is None:
            position_ids = torch.arange(past, past + L, device=hidden_states.device)[None]
        shape = (B, L, -1, attn.head_dim)
        # NOTE: no rotation: rotary is off (the backbone's rotary_emb is the identity), so q and k are used as projected
        q = attn.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
        if cache is not None:
            k, v = append(cache, attn.layer_idx, k, v)
            k, v = k[:, :, :past + L], v[:, :, :past + L]  # a static layer returns its whole buffer

        before = torch.arange(past, 0, -1, device=position_ids.device)
        key_pos = torch.cat([position_ids[:, :1] - before, position_ids], dim=1)  # (B or 1, T)
        # pairs j > i are masked below; clamping keeps their bias finite and the bias defined on distances >= 0
        distance = (position_ids[:, :, None] - key_pos[:, None, :]).clamp_(min=0)  # (B or 1, L, T)
        bias = self.bias(fwd, distance).transpose(0, 1)  # (B or 1, heads, L, T)
        del distance  # (the only other L x T tensor of the call; T5's gather keeps it for its backward)
        mask = _additive(bias, attention_mask, past, q.dtype)

        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        out, _ = interface(attn, q, k, v, mask, dropout=attn.attention_dropout if attn.training else 0.0,
                           scaling=attn.scaling)
        return attn.o_proj(out.reshape(B, L, -1).contiguous())


class BiasPosition(PositionMethod):
    """A position method whose attention forwards add a bias: rotary off, a `PatchedForward` per attention module
    (so every argument transformers passes is handled or refused, see `llama_ctx.compat`), and the method's
    trainable module, if any. `attention` is the `BiasAttention` the forwards call."""

    attention: BiasAttention

    def module(self, params, backbone) -> torch.nn.Module | None:
        """The trainable tensors to attach at `backbone.llama_ctx_position`, or None."""
        return None

    def apply(self, patcher, model, backbone, params) -> None:
        from ..patch import PatchContext

        ctx = PatchContext(model, backbone, spec=None)
        self.attention.validate(params, ctx)  # attention implementation and forward signature, before any change
        rotary_off(patcher, backbone)
        module = self.module(params, backbone)
        if module is not None:
            attach(patcher, backbone, module)
        extra = self.attention.prepare(params, ctx)
        for attn in ctx.attention_modules:
            patcher.set(attn, "forward", PatchedForward(self.name, self.attention, params, attn, backbone, extra))


def _additive(bias: torch.Tensor, attention_mask, past: int, dtype) -> torch.Tensor:
    """The float mask `bias` where the attention mask allows a pair, the dtype's minimum elsewhere (in place where
    the shapes allow, so one `[B or 1, heads, L, T]` tensor is all the call holds).

    The minimum, not -inf: a row with no visible key (a padding query) then gets a uniform softmax instead of NaN,
    which would reach the real rows through the next layer's keys.
    """
    L, T = bias.shape[-2:]
    bias = bias.to(torch.promote_types(bias.dtype, dtype))  # float64 models: their minimum does not fit in float32
    low = torch.finfo(dtype).min
    if attention_mask is None:  # sdpa without padding: the causal pattern by cache index
        allowed = torch.arange(T, device=bias.device) <= past + torch.arange(L, device=bias.device)[:, None]
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[..., :T]  # a static cache's mask covers its whole buffer
    else:  # an additive float mask (eager): add it, clamped so that min + bias does not overflow in half precision
        mask = attention_mask[..., :T].float()
        in_place = torch.broadcast_shapes(mask.shape, bias.shape) == bias.shape
        return (bias.add_(mask) if in_place else bias + mask).clamp_(min=low).to(dtype)
    if torch.broadcast_shapes(allowed.shape, bias.shape) == bias.shape:
        return bias.masked_fill_(~allowed, low).to(dtype)
    return torch.where(allowed, bias, low).to(dtype)  # a padding mask per row, a bias shared by the rows
