"""Shared engine of the position-rewriting attention methods (ReRoPE, Leaky ReRoPE, Self-Extend, Λ-shaped).

For query position i and key position j <= i (rel = i - j) every one of these methods is two position sets:

    score(i, j) = <R(i) q_i, R(j) k_j>              if rel < window   (inner branch: ordinary RoPE)
    score(i, j) = <R(P_q(i)) q_i, R(P_k(j)) k_j>    otherwise         (outer branch)

so the outer relative position is P_q(i) - P_k(j) (ReRoPE: P_q = window, P_k = 0). Λ-shaped attention also
hides outer keys at positions >= `global_tokens`.

Cache. The `DynamicCache` holds each key rotated once at its outer position, `s * R(P_k(j)) k_j` (s is the
rotary `attention_scaling`), and values as usual. The outer branch uses cached keys as they are; since
R(a) R(b) = R(a + b), the inner branch gets R(j) k_j by rotating a cached key by j - P_k(j) (scaling 1). Only
keys within `window` of a query of the current call take part in the inner branch, so a decode step re-rotates
the last `window` keys, never the whole cache. A `StaticCache` works too (its layers return their whole buffer:
only the first past + L slots are read); other cache layers (sliding, quantized, streaming...) are refused before
the cache changes, since their `update` does not return every key in order.

Computation, per chunk of `CHUNK` queries with cache indices [qa, qb): keys [0, qa - w] are outer for every
query (no mask needed), keys [qb - w, qb) inner (or causally hidden), and the band in between is outer for some
queries and inner for others. Three attention calls (pure outer, outer band, inner band + window), each with
its own rotated queries and a mask that lets every (query, key) pair through exactly one of them, return an
output and a log-sum-exp; the partial softmaxes are merged by their log-sum-exp (as in flash attention). No
L x L map exists: the largest temporary is a CHUNK x L mask, only where padding or the band needs one.

Positions are the per-row `position_ids` of the call (left padding: generate's cumsum of the attention mask);
cached keys get the positions just before the first query of the call. The inner/outer split and the causal
order use cache indices, so positions must grow by one per real token within a row (what a forward and
`generate` produce); padding is hidden by the attention mask, which is always honoured.

Gradients. Autograd does not differentiate the log-sum-exp of the private CPU flash op, and the merge weights
depend on it, so that op is used only where no gradient is needed; training runs on plain matmuls.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from transformers.cache_utils import DynamicLayer, StaticLayer

from ..cache import append
from ..errors import UnsupportedModelError
from ..rope.module import cos_sin, rotary_frequencies
from ..rope.module import rotate as rope_rotate
from .base import AttentionMethod

CHUNK = 1024  # queries per chunk: bounds the per-chunk masks at CHUNK x (cache length) floats

# NOTE: torch's CPU flash-attention kernel also returns the log-sum-exp, which the merge needs; the public
# `scaled_dot_product_attention` does not. It is a private op, so it is used only after `_flash_cpu_ok` has
# checked it against `_attend_dense` on a tiny GQA input; elsewhere (other devices, a torch where the op is
# missing or behaves differently) `_attend_dense` computes the same two tensors with plain matmuls.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass(frozen=True)
class Scheme:
    """One method's positions.

    Args:
        window: pairs with rel < window use ordinary RoPE.
        outer_q: float positions (B, L) -> outer query positions P_q.
        outer_k: float positions (B, L) -> outer key positions P_k.
        log_scale_from: if set (training length T), queries at i >= T are scaled by log(i + 1) / log(T).
        global_tokens: if set, outer keys are visible only at positions < global_tokens (Λ-shaped mask).
        check: called with the number of positions a call reaches (max position + 1) before any computation.
    """

    window: int
    outer_q: Callable[[torch.Tensor], torch.Tensor]
    outer_k: Callable[[torch.Tensor], torch.Tensor]
    log_scale_from: int | None = None
    global_tokens: int | None = None
    check: Callable[[int], None] | None = None


class PositionalAttention(AttentionMethod):
    """An attention method defined by a `Scheme`; subclasses implement `scheme(params, ctx)`."""

    def scheme(self, params, ctx) -> Scheme:
        raise NotImplementedError

    def validate(self, params, ctx) -> None:
        super().validate(params, ctx)
        head_dim = ctx.attention_modules[0].head_dim
        if ctx.spec.dim != head_dim:
            raise UnsupportedModelError(
                f"this method rotates whole heads, but the model rotates {ctx.spec.dim} of {head_dim} channels "
                "(partial_rotary_factor < 1); use a model with full rotary embedding."
            )
        self.scheme(params, ctx)

    def rope_conflict(self, params, rope_method) -> str | None:
        if rope_method.dynamic:
            return ("its frequencies change with the length of each call, so keys cached (rotated) during one "
                    "call would not match queries rotated in the next; use a static method such as 'yarn', "
                    "'ntk' or 'pi'.")
        return None

    def prepare(self, params, ctx) -> Scheme:
        return self.scheme(params, ctx)

    def attend(self, fwd, attn, hidden_states, attention_mask, cache, position_ids):
        # the rotary module is read at call time: a rope method may be patched after this one
        return positional_attention(attn, fwd.extra, fwd.backbone.rotary_emb, hidden_states, attention_mask, cache,
                                    position_ids)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of x (B, H, L, d) with cos/sin (B, L, d): the same angles for every head."""
    return rope_rotate(x, cos[:, None], sin[:, None])


def check_cache(cache, layer_idx: int) -> None:
    """Raise unless layer `layer_idx` of `cache` returns every key in order from `update` (a full dynamic or static
    layer); called before the cache is touched."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"position-rewriting attention needs a transformers Cache, got {type(cache).__name__}.")
    layer = layers[layer_idx] if layer_idx < len(layers) else getattr(cache, "layer_class_to_replicate", None)
    kind = layer if isinstance(layer, type) else type(layer)
    if kind not in (DynamicLayer, StaticLayer):
        raise UnsupportedModelError(
            f"position-rewriting attention needs every key of the sequence in its cache, in order, at full precision; "
            f"got a {getattr(kind, '__name__', kind)} (sliding-window, quantized and other special caches are not "
            "supported). Use the default DynamicCache or cache_implementation='static'.")


def positional_attention(attn, scheme: Scheme, rotary, hidden_states, attention_mask, cache, position_ids):
    """The attention block of `attn` (projections included) under `scheme`; returns (B, L, hidden)."""
    B, L, _ = hidden_states.shape
    past = 0
    if cache is not None:
        check_cache(cache, attn.layer_idx)
        past = int(cache.get_seq_length(attn.layer_idx))  # a tensor for a static layer
    if position_ids is None:
        position_ids = torch.arange(past, past + L, device=hidden_states.device).expand(B, L)
    if scheme.check is not None:
        scheme.check(int(position_ids.max()) + 1)

    shape = (B, L, -1, attn.head_dim)
    q = attn.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)

    inv_freq, scaling = rotary_frequencies(rotary, position_ids)
    pos = position_ids.to(torch.float32)
    if scheme.log_scale_from is not None:
        log_scale = (torch.log1p(pos) / math.log(scheme.log_scale_from)).clamp(min=1)
        q = q * log_scale[:, None, :, None].to(q.dtype)
    q_inner = rotate(q, *cos_sin(inv_freq, scaling, pos, q))
    q_outer = rotate(q, *cos_sin(inv_freq, scaling, scheme.outer_q(pos), q))
    k = rotate(k, *cos_sin(inv_freq, scaling, scheme.outer_k(pos), k))
    if cache is not None:
        k, v = append(cache, attn.layer_idx, k, v)  # in place: no whole-cache copy per decoded token
        k, v = k[:, :, :past + L], v[:, :, :past + L]  # a static layer returns its whole buffer

    T, w = k.shape[2], scheme.window
    first = T - L  # cache index of the first query
    before = torch.arange(first, 0, -1, device=pos.device, dtype=pos.dtype)
    pos_k = torch.cat([pos[:, :1] - before, pos], dim=1)  # (B, T) positions of all keys
    lo = max(0, first - w + 1)  # keys [lo, T) are inner for some query of this call
    k_inner = rotate(k[:, :, lo:], *cos_sin(inv_freq, 1.0, pos_k[:, lo:] - scheme.outer_k(pos_k[:, lo:]), k))

    global_end, key_ok = T, None
    if scheme.global_tokens is not None:
        is_global = pos_k < scheme.global_tokens  # (B, T)
        key_ok = is_global[:, None, None, :]
        hits = is_global.any(dim=0).nonzero()
        global_end = int(hits.max()) + 1 if len(hits) else 0
    if attention_mask is not None:
        attention_mask = attention_mask[..., :T]

    out = torch.empty_like(q_inner)
    for a in range(0, L, CHUNK):
        b = min(L, a + CHUNK)
        qa, qb = first + a, first + b
        base = attention_mask[:, :, a:b] if attention_mask is not None else None
        ko = min(max(qb - w, 0), global_end)  # outer keys: [0, ko)
        p = min(max(qa - w + 1, 0), ko)  # of which [0, p) are outer for every query of the chunk
        ki = max(qa - w + 1, 0)  # inner keys: [ki, qb)
        rows = torch.arange(qa, qb, device=q.device)[:, None]
        parts = []
        if p > 0:
            allowed = None if key_ok is None else key_ok[..., :p]
            parts.append(_attend(q_outer[:, :, a:b], k[:, :, :p], v[:, :, :p],
                                 _bias(allowed, _cols(base, 0, p), q.dtype), attn.scaling))
        if ko > p:
            cols = torch.arange(p, ko, device=q.device)
            allowed = cols <= rows - w
            if key_ok is not None:
                allowed = allowed & key_ok[..., p:ko]
            parts.append(_attend(q_outer[:, :, a:b], k[:, :, p:ko], v[:, :, p:ko],
                                 _bias(allowed, _cols(base, p, ko), q.dtype), attn.scaling))
        cols = torch.arange(ki, qb, device=q.device)
        allowed = (cols <= rows) & (cols > rows - w)
        parts.append(_attend(q_inner[:, :, a:b], k_inner[:, :, ki - lo:qb - lo], v[:, :, ki:qb],
                             _bias(allowed, _cols(base, ki, qb), q.dtype), attn.scaling))
        out[:, :, a:b] = _merge(parts)
    return attn.o_proj(out.transpose(1, 2).reshape(B, L, -1))


def _cols(mask, start: int, stop: int):
    return None if mask is None else mask[..., start:stop]


def _bias(allowed, base, dtype):
    """Additive float mask: `base` (a 4D bool mask or float bias, or None) where `allowed`, the dtype's min elsewhere."""
    if base is not None and base.dtype == torch.bool:
        allowed = base if allowed is None else allowed & base
        base = None
    if allowed is None:
        return base if base is None else base.to(dtype)
    keep = torch.zeros((), dtype=dtype, device=allowed.device) if base is None else base.to(dtype)
    bias = torch.where(allowed, keep, torch.finfo(dtype).min)
    return bias if bias.dim() == 4 else bias[None, None]


def _attend(q, k, v, bias, scale):
    """Softmax attention of q (B, H, C, d) over k, v (B, Hkv, K, d): (output, float32 log-sum-exp (B, H, C))."""
    # NOTE: autograd does not differentiate the flash op's log-sum-exp, so the merge would drop the gradient
    # through its weights: the flash op is only for calls that need no gradient.
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if (not needs_grad and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
            and _flash_cpu_ok()):
        return _FLASH_CPU(q, k, v, 0.0, False, attn_mask=bias, scale=scale)[:2]
    return _attend_dense(q, k, v, bias, scale)


@functools.cache
def _flash_cpu_ok() -> bool:
    """Whether the private CPU flash op exists here and agrees with `_attend_dense` (output and log-sum-exp)."""
    if _FLASH_CPU is None:
        return False
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 5, 8, generator=g) for h in (4, 2, 2))
    bias = torch.where(torch.rand(1, 1, 5, 5, generator=g) < 0.3, torch.finfo(torch.float32).min, 0.0)
    try:
        with torch.no_grad():
            out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=bias, scale=0.3)[:2]
    except (RuntimeError, TypeError):
        return False
    ref_out, ref_lse = _attend_dense(q, k, v, bias, 0.3)
    return bool(torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5))


def _attend_dense(q, k, v, bias, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if bias is not None:
        scores = scores + bias
    lse = scores.logsumexp(dim=-1)
    return torch.matmul((scores - lse[..., None]).exp().to(v.dtype), v), lse


def _merge(parts):
    """Combine partial attentions over disjoint key sets: weights exp(lse_i - max) per query."""
    if len(parts) == 1:
        return parts[0][0]
    lse = torch.stack([p[1] for p in parts])
    weights = (lse - lse.max(dim=0).values).exp()
    total = sum(w[..., None] * o.float() for w, (o, _) in zip(weights, parts))
    return (total / weights.sum(dim=0)[..., None]).to(parts[0][0].dtype)
