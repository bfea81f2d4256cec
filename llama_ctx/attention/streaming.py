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
`position_ids` passed to the model are not read (positions come from the rule); they must grow by one per real token
of a row (what generate() passes), and others (e.g. packed sequences restarting at 0) raise rather than be dropped.

The patched backbone forward plans each call once (ranks, rotations, sinks, query chunks) and hands the plan to
the layers attached to the attention mask it passes down, so the plan travels with the call: concurrent forwards
on one model and the recomputation of gradient checkpointing each see their own. Queries run in chunks of `CHUNK`
against the sinks and the band of keys their windows reach: no mask over all keys is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .. import compat
from ..cache import StreamingCache
from ..errors import ConfigError, UnsupportedModelError
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


CHUNK = 256  # queries per attention call: the largest temporary is a CHUNK x (sinks + CHUNK + window) mask
_STEP = "_llama_ctx_streaming_step"  # attribute of the attention mask that carries one forward's `_Step`


@dataclass
class _Step:
    """What every layer of one forward shares: ranks, rotations, sinks and query chunks (never a mask of all keys).

    It is made by the backbone forward below and travels with the call as an attribute of the attention mask the
    layers receive, so concurrent forwards and gradient-checkpointing recomputation each see their own.
    """

    cache: StreamingCache | None  # the cache the layers must receive (None: no cache)
    valid: torch.Tensor  # [batch, past + new] bool: real token (True) or padding
    rank: torch.Tensor  # [batch, past + new]: place among the row's real tokens (the key positions)
    cos_k: torch.Tensor  # [batch, past + new, head_dim]: keys at their place (queries: the last `new`)
    sin_k: torch.Tensor
    sink_idx: torch.Tensor  # [batch, sink_tokens]: column of each row's sinks (clamped)
    sink_ok: torch.Tensor  # [batch, sink_tokens] bool: the row has this sink
    chunks: list[tuple[int, int, int]]  # (first query, end query, first band key column) per attention call
    cos_qs: torch.Tensor | None = None  # queries at their place seen from the sinks, min(t, S + W), when it
    sin_qs: torch.Tensor | None = None  # differs from t for some query of the call


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

    def apply(self, params, ctx, patcher) -> None:
        super().apply(params, ctx, patcher)
        # an instance-level forward, else None (the class's); under an accelerate hook, the one the hook calls
        original = vars(ctx.backbone).get(patcher.slot(ctx.backbone, "forward"))
        compat.check_signature(type(ctx.backbone).forward, self.name, _BACKBONE_HANDLED)
        patcher.set(ctx.backbone, "forward", _BackboneForward(params, ctx.backbone, original))

    def attend(self, fwd, attn, hidden_states, attention_mask, cache, position_ids):
        step: _Step | None = getattr(attention_mask, _STEP, None)
        if step is None or cache is not step.cache:
            raise UnsupportedModelError(
                "streaming: this attention layer did not get the plan that the patched model forward makes (its "
                "attention mask and cache); call the model or its decoder stack, not the layers directly."
            )
        S, W = fwd.params.sink_tokens, fwd.params.window
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, attn.head_dim)
        q = attn.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = attn.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx)  # unrotated, past + new
        new, N = q.shape[2], k.shape[2]
        k = rotate(k, step.cos_k, step.sin_k)
        q_window = rotate(q, step.cos_k[:, -new:], step.sin_k[:, -new:])
        q_sink = None if step.cos_qs is None else rotate(q, step.cos_qs, step.sin_qs)
        if S:
            index = step.sink_idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
            k_sink, v_sink = k.gather(2, index), v.gather(2, index)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        dropout = 0.0 if not attn.training else attn.attention_dropout
        out = []
        for a, b, lo in step.chunks:
            query, keys, values = q_window[:, :, a:b], k[:, :, lo:N - new + b], v[:, :, lo:N - new + b]
            sinks = k_sink if S else None
            if q_sink is not None:
                # NOTE: concatenating head dims gives two query rotations in one attention call:
                # [q_w, q_s] . [k, 0] = q_w . k for window keys and [q_w, q_s] . [0, k] = q_s . k for sinks.
                query = torch.cat([query, q_sink[:, :, a:b]], dim=-1)
                keys = torch.cat([keys, torch.zeros_like(keys)], dim=-1)
                sinks = torch.cat([torch.zeros_like(k_sink), k_sink], dim=-1)
            if S:
                keys, values = torch.cat([sinks, keys], dim=2), torch.cat([v_sink, values], dim=2)
            mask = _chunk_mask(step, S, W, new, a, b, lo, q.dtype)
            out.append(interface(attn, query, keys, values, mask, dropout=dropout, scaling=attn.scaling)[0])
        out = torch.cat(out, dim=1) if len(out) > 1 else out[0]  # [batch, new, heads, head_dim]
        return attn.o_proj(out.reshape(*input_shape, -1).contiguous())


def _chunk_mask(step: _Step, S: int, W: int, new: int, a: int, b: int, lo: int, dtype) -> torch.Tensor:
    """Additive float mask `[batch, 1, b - a, S + band]` of queries [a, b) over the sinks, then key columns [lo, ..)."""
    first = step.valid.shape[1] - new  # column of the first query
    rows = slice(first + a, first + b)
    cols = slice(lo, first + b)
    qr, qv = step.rank[:, rows, None], step.valid[:, rows, None]
    kr = step.rank[:, None, cols]
    # window keys: real, not after the query, at most W places before it; sinks only through the sink columns
    seen = qv & step.valid[:, None, cols] & (kr <= qr) & (kr >= qr - W) & (kr >= S)
    # a padding query attends to itself only (finite; its output is never seen by a real token)
    seen |= ~qv & (torch.arange(cols.start, cols.stop, device=qr.device) == torch.arange(
        rows.start, rows.stop, device=qr.device)[:, None])
    if S:
        sink = qv & step.sink_ok[:, None, :] & (torch.arange(S, device=qr.device) <= qr)
        seen = torch.cat([sink, seen], dim=-1)
    return torch.zeros(seen.shape, dtype=dtype, device=qr.device).masked_fill_(~seen, torch.finfo(dtype).min)[:, None]


# what the backbone forward below takes (the rest of its keyword arguments go to the original forward unchanged)
_BACKBONE_HANDLED = compat.KNOWN | {"input_ids", "inputs_embeds"}


class _BackboneForward:
    """The backbone's `forward` under "streaming": plans the step (ranks, rotations, eviction) and runs the original.

    It keeps no per-call state: the plan goes to the layers attached to the attention mask it passes down.
    """

    def __init__(self, params, backbone, original):
        self.params, self.backbone, self.original = params, backbone, original

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, use_cache=None,
                 **kwargs):
        p, backbone = self.params, self.backbone
        cache = compat.take_cache(kwargs, "streaming")
        x = input_ids if input_ids is not None else inputs_embeds
        batch, new = x.shape[:2]
        use_cache = backbone.config.use_cache if use_cache is None else use_cache
        if _checkpointing(backbone):
            # transformers gives the layers no cache under gradient checkpointing: plan for none (as it does)
            if cache is not None and cache.get_seq_length() > 0:
                raise ConfigError("streaming: gradient checkpointing runs the layers without a cache, so a filled "
                                  "cache cannot be continued; pass no cache while training with checkpointing.")
            cache, use_cache = None, False
        cache = _streaming_cache(p, cache, use_cache)
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ConfigError("streaming builds its own attention mask; pass a 2D padding mask [batch, tokens] "
                              f"or none, got a {attention_mask.ndim}D mask.")
        valid = (torch.ones(batch, new, dtype=torch.bool, device=x.device) if attention_mask is None
                 else attention_mask[:, -new:].to(device=x.device, dtype=torch.bool))
        if position_ids is not None:
            _check_positions(position_ids, valid)
        if cache is not None:
            valid = cache.plan(valid)
        dtype = backbone.embed_tokens.weight.dtype if inputs_embeds is None else inputs_embeds.dtype
        step = _plan(p, valid, new, backbone.rotary_emb, dtype, cache)
        # NOTE: transformers passes a 4D mask to the layers as it is. This one has no key columns, so an attention
        # that is not ours fails on it instead of attending to everything.
        carrier = torch.zeros((), dtype=dtype, device=x.device).expand(batch, 1, new, 0)
        setattr(carrier, _STEP, step)
        original = self.original or type(backbone).forward.__get__(backbone)
        out = original(input_ids=input_ids, attention_mask=carrier, position_ids=position_ids,
                       inputs_embeds=inputs_embeds, use_cache=use_cache, **compat.cache_kwargs(cache), **kwargs)
        if cache is not None:
            cache.commit(new)
        return out


def _check_positions(position_ids, valid: torch.Tensor) -> None:
    """Raise unless `position_ids` grow by one per real token of each row (`valid`, [batch, new]): the only ones
    the rule agrees with. Any other numbering (packed documents, gaps) would otherwise be silently replaced."""
    batch, new = valid.shape
    if position_ids.ndim != 2 or position_ids.shape[-1] != new or position_ids.shape[0] not in (1, batch):
        raise ConfigError(f"streaming: position_ids must be [batch, {new}], got shape {tuple(position_ids.shape)}.")
    diff = position_ids.to(valid.device).expand(batch, new) - valid.cumsum(-1)
    big = torch.iinfo(diff.dtype).max if not diff.is_floating_point() else float("inf")
    hi, lo = torch.where(valid, diff, -big).amax(-1), torch.where(valid, diff, big).amin(-1)
    if bool((valid.any(-1) & (hi != lo)).any()):
        raise ConfigError("streaming: position_ids must grow by one per real token of a row (what generate() "
                          "passes); streaming numbers positions by place in its cache and cannot honour others "
                          "(e.g. packed sequences restarting at 0). Pass none, or one sequence per row.")


def _checkpointing(backbone) -> bool:
    """Whether the layers will run under gradient checkpointing (transformers' condition, which drops the cache)."""
    return backbone.training and torch.is_grad_enabled() and any(
        getattr(layer, "gradient_checkpointing", False) for layer in backbone.layers)


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


def _plan(p: StreamingParams, valid: torch.Tensor, new: int, rotary, dtype, cache) -> _Step:
    """Ranks, rotations and query chunks for `new` queries (the last columns of `valid`, `[batch, past + new]`)."""
    S, W = p.sink_tokens, p.window
    batch, n = valid.shape
    count = valid.cumsum(-1)  # real tokens up to and including each column
    rank = (count - 1).clamp(min=0)  # place among the row's real tokens
    inv_freq, scaling = rotary_frequencies(rotary, rank)
    x = torch.empty(0, dtype=dtype, device=valid.device)
    cos_k, sin_k = cos_sin(inv_freq, scaling, rank, x)
    # the column of each row's r-th real token, r < S: the first column where `count` reaches r + 1
    sink_idx = torch.searchsorted(count, torch.arange(1, S + 1, device=valid.device).expand(batch, S).contiguous())
    sink_ok = sink_idx < n
    q_rank, q_valid = rank[:, -new:], valid[:, -new:]
    chunks = []
    for a in range(0, new, CHUNK):
        b = min(new, a + CHUNK)
        # band: from the first real key of rank >= max(lowest query rank - W, S) (its column: count reaches rank + 1)
        lowest = torch.where(q_valid[:, a:b], q_rank[:, a:b], n).min(-1).values
        need = (lowest - W).clamp(min=S)
        lo = torch.searchsorted(count, need[:, None] + 1)[:, 0]
        chunks.append((a, b, min(n - new + a, int(lo.min()))))
    step = _Step(cache, valid, rank, cos_k, sin_k, sink_idx.clamp(max=n - 1), sink_ok, chunks)
    if S > 0 and bool((q_rank > S + W).any()):
        step.cos_qs, step.sin_qs = cos_sin(inv_freq, scaling, q_rank.clamp(max=S + W), x)
    return step


register("streaming", "attention", StreamingParams, Streaming(),
         "StreamingLLM: attention sinks + sliding window with a bounded KV cache, positions by place in the cache")
