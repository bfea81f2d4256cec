"""StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks").

The rule, per row, over its real (non-padding) tokens numbered t = 0, 1, ... in stream order: with S =
`sink_tokens` and W = `window`, the query at t sees the keys

    V(t) = {r : r < S} ∪ {r : t - W <= r <= t}          (and r <= t)

i.e. the S sinks plus the W tokens before it plus itself, and every key of V(t) gets as position its place in
V(t) (0, 1, ..., |V(t)| - 1), the query the last place, |V(t)| - 1 = min(t, S + W). Positions therefore never
exceed S + W. Since RoPE scores depend on position differences only, the window keys keep their true distance
t - r to the query while a sink r < S sits at distance min(t, S + W) - r.

The same rule holds for every query of a multi-token input (a prefill longer than S + W included), so prefill
and token-by-token generation give the same result. With `use_cache`, the model keeps a
`llama_ctx.cache.StreamingCache` holding exactly the keys the next query needs, the S sinks and the last W tokens,
and the positions above are their places in that cache. Padding tokens (0 in the 2D `attention_mask`) are never
seen, do not count in t and are never sinks; a left-padded batch gives the same result per row as each row alone.
`position_ids` passed to the model are ignored: positions come from the rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .. import compat
from ..cache import StreamingCache
from ..errors import ConfigError
from ..registry import check_int, register
from ..rope.module import cos_sin, rotary_frequencies
from .base import AttentionMethod
from .engine import rotate


@dataclass
class StreamingParams:
    """Args:
    sink_tokens: first real tokens every query keeps seeing (the attention sinks), >= 0.
    window: most recent tokens each query sees besides itself, >= 1. Positions reach sink_tokens + window, which
        must stay inside the model's (possibly rope-extended) window.
    """

    window: int
    sink_tokens: int = 4

    def __post_init__(self):
        self.window = check_int("window", self.window, ge=1)
        self.sink_tokens = check_int("sink_tokens", self.sink_tokens, ge=0)


@dataclass
class _Step:
    """What every layer of one forward shares: mask, rotations and (with a cache) the eviction plan."""

    mask: torch.Tensor  # [batch, 1, new, past + new] additive float
    cos_k: torch.Tensor  # [batch, past + new, head_dim]: keys at their place
    sin_k: torch.Tensor
    cos_q: torch.Tensor  # [batch, new, head_dim]: queries at their place seen from the window keys
    sin_q: torch.Tensor
    sink: torch.Tensor | None  # [batch, past + new] bool, when some query is further than S + W from the sinks
    cos_qs: torch.Tensor | None = None  # queries at their place seen from the sinks, min(t, S + W)
    sin_qs: torch.Tensor | None = None


class Streaming(AttentionMethod):
    def validate(self, params, ctx) -> None:
        super().validate(params, ctx)
        # the rope method already applied, if any, may extend the window
        factor = float(getattr(ctx.rope.params, "factor", None) or 1.0) if ctx.rope else 1.0
        limit = int(ctx.spec.trained_window * max(factor, 1.0))
        if params.sink_tokens + params.window + 1 > limit:
            raise ConfigError(
                f"streaming: sink_tokens + window + 1 = {params.sink_tokens + params.window + 1} positions exceed the "
                f"model's window of {limit}; use a smaller window (<= {limit - 1 - params.sink_tokens}) or apply a "
                "rope method that extends it first, e.g. patch(model, 'yarn', factor=4)."
            )

    def prepare(self, params, ctx) -> dict:
        return {}  # the current forward's `_Step`, set by the backbone forward below

    def apply(self, params, ctx, patcher) -> None:
        super().apply(params, ctx, patcher)
        shared = ctx.attention_modules[0].forward.extra
        original = vars(ctx.backbone).get("forward")  # an instance-level forward (e.g. a hook's), else the class's
        compat.check_signature(type(ctx.backbone).forward, self.name, _BACKBONE_HANDLED)
        patcher.set(ctx.backbone, "forward", _BackboneForward(params, ctx.backbone, original, shared))

    def attend(self, fwd, attn, hidden_states, attention_mask, cache, position_ids):
        step: _Step = fwd.extra["step"]
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, attn.head_dim)
        q = attn.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = attn.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx)  # unrotated, past + new
        k = rotate(k, step.cos_k, step.sin_k)
        q_window = rotate(q, step.cos_q, step.sin_q)
        if step.sink is None:
            q = q_window
        else:
            # NOTE: concatenating head dims gives per-key query rotations in one attention call:
            # [q_w, q_s] . [k * not_sink, k * sink] = q_w . k for window keys and q_s . k for sinks.
            sink = step.sink[:, None, :, None].to(k.dtype)
            q = torch.cat([q_window, rotate(q, step.cos_qs, step.sin_qs)], dim=-1)
            k = torch.cat([k * (1 - sink), k * sink], dim=-1)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        out, _ = interface(attn, q, k, v, step.mask, dropout=0.0 if not attn.training else attn.attention_dropout,
                           scaling=attn.scaling)
        return attn.o_proj(out.reshape(*input_shape, -1).contiguous())


# what the backbone forward below takes (the rest of its keyword arguments go to the original forward unchanged)
_BACKBONE_HANDLED = compat.KNOWN | {"input_ids", "inputs_embeds"}


class _BackboneForward:
    """The backbone's `forward` under "streaming": plans the step (mask, rotations, eviction) and runs the original."""

    def __init__(self, params, backbone, original, shared):
        self.params, self.backbone, self.original, self.shared = params, backbone, original, shared

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, use_cache=None,
                 **kwargs):
        p, backbone = self.params, self.backbone
        cache = compat.take_cache(kwargs, "streaming")
        x = input_ids if input_ids is not None else inputs_embeds
        batch, new = x.shape[:2]
        use_cache = backbone.config.use_cache if use_cache is None else use_cache
        cache = _streaming_cache(p, cache, use_cache)
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ConfigError("streaming builds its own attention mask; pass a 2D padding mask [batch, tokens] "
                              f"or none, got a {attention_mask.ndim}D mask.")
        valid = (torch.ones(batch, new, dtype=torch.bool, device=x.device) if attention_mask is None
                 else attention_mask[:, -new:].to(device=x.device, dtype=torch.bool))
        if cache is not None:
            valid = cache.plan(valid)
        dtype = backbone.embed_tokens.weight.dtype if inputs_embeds is None else inputs_embeds.dtype
        self.shared["step"] = step = _plan(p, valid, new, backbone.rotary_emb, dtype)
        original = self.original or type(backbone).forward.__get__(backbone)
        try:
            out = original(input_ids=input_ids, attention_mask=step.mask, position_ids=position_ids,
                           inputs_embeds=inputs_embeds, use_cache=use_cache, **compat.cache_kwargs(cache), **kwargs)
        finally:
            self.shared.pop("step", None)
        if cache is not None:
            cache.commit(new)
        return out


def _streaming_cache(p: StreamingParams, cache, use_cache: bool) -> StreamingCache | None:
    """The cache to use: the given `StreamingCache`, or a new one for a fresh (None or empty default) cache."""
    if isinstance(cache, StreamingCache):
        if (cache.sink_tokens, cache.window) != (p.sink_tokens, p.window):
            raise ConfigError(f"this StreamingCache has sink_tokens={cache.sink_tokens}, window={cache.window} but the "
                              f"model is patched with sink_tokens={p.sink_tokens}, window={p.window}; build it with "
                              "the same values or let the model create it.")
        return cache
    if cache is None:
        return StreamingCache(p.sink_tokens, p.window) if use_cache else None
    if type(cache).__name__ == "DynamicCache" and cache.get_seq_length() == 0:
        return StreamingCache(p.sink_tokens, p.window)  # e.g. the one generate() creates
    raise ConfigError(f"streaming keeps its own bounded cache; got a filled {type(cache).__name__}. Pass "
                      "no cache (or a llama_ctx.cache.StreamingCache) to a model patched with 'streaming'.")


def _plan(p: StreamingParams, valid: torch.Tensor, new: int, rotary, dtype) -> _Step:
    """Mask and rotations for `new` queries (the last columns of `valid`, `[batch, past + new]` bool)."""
    S, W = p.sink_tokens, p.window
    rank = (valid.cumsum(-1) - 1).clamp(min=0)  # place among the row's real tokens
    q_rank, q_valid = rank[:, -new:], valid[:, -new:]
    kr, qr = rank[:, None, :], q_rank[:, :, None]
    seen = valid[:, None, :] & (kr <= qr) & ((kr < S) | (kr >= qr - W))
    seen &= q_valid[:, :, None]
    seen[:, :, -new:] |= torch.eye(new, dtype=torch.bool, device=valid.device) & ~q_valid[:, :, None]
    # (a padding query attends to itself only: finite, and its output is never seen by a real token)
    mask = torch.zeros(seen.shape, dtype=dtype, device=valid.device).masked_fill_(~seen, torch.finfo(dtype).min)
    inv_freq, scaling = rotary_frequencies(rotary, rank)
    x = torch.empty(0, dtype=dtype, device=valid.device)
    cos_k, sin_k = cos_sin(inv_freq, scaling, rank, x)
    step = _Step(mask[:, None], cos_k, sin_k, cos_k[:, -new:], sin_k[:, -new:], None)
    if S > 0 and bool((q_rank > S + W).any()):
        step.sink = valid & (rank < S)
        step.cos_qs, step.sin_qs = cos_sin(inv_freq, scaling, q_rank.clamp(max=S + W), x)
    return step


register("streaming", "attention", StreamingParams, Streaming(),
         "StreamingLLM: attention sinks + sliding window with a bounded KV cache, positions by place in the cache")
