"""Shared engine of the position-rewriting attention methods (ReRoPE, Leaky ReRoPE, Self-Extend, Λ, DCA).

Each method is a `Scheme`: a partition of the causal (query i, key j) pairs into a few *branches*, each with its
own query and key positions. For positions i >= j,

    score(i, j) = <R(P_q^b(i)) q_i, R(P_k^b(j)) k_j>    for the branch b with lo_b(i) <= j <= hi_b(i)

and pairs in no branch are hidden (Λ's middle). ReRoPE is two branches (inner: j > i - window at ordinary
positions; outer: j <= i - window with queries at `window` and keys at 0); Dual Chunk Attention is three (same
chunk, previous chunk, older chunks). The bounds lo/hi are functions of the query position only, so a branch's
mask never needs an L x L position matrix, and the method code is a few lines.

Cache. The `DynamicCache` (or `StaticCache`) holds each key rotated once at the scheme's stored position,
`s * R(P_s(j)) k_j` (s is the rotary `attention_scaling`), and values as usual. A branch whose key positions are
the stored ones uses cached keys as they are; since R(a) R(b) = R(a + b), another branch rotates the cached keys it
needs by P_k^b(j) - P_s(j) (scaling 1). A decode step touches only the keys inside some branch's range: ReRoPE
re-rotates the last `window` keys, DCA none at all. Other cache layers (sliding, quantized, streaming...) are
refused before the cache changes: their `update` returns something other than every key in order.

Computation, per chunk of `CHUNK` queries: for each branch, the keys that some query of the chunk may see form
one index range. When the keys every query of the chunk sees (the intersection of the per-query ranges) are at
least `SPLIT` wide, they get an attention call without a mask (and a diagonal block where each query ends at
itself, a call with the kernel's causal flag); the rest of the range, or all of it, one call with a mask built
from the per-query bounds (at most CHUNK x range; without padding, masks of the same shape relative to their
first key are built once per call). Each call uses the branch's rotated queries and returns an output and a
log-sum-exp; the partial softmaxes are merged by their log-sum-exp (as in flash attention). The work beyond the
pairs themselves is about 1.5 x CHUNK keys per query (ReRoPE: ~9% at 8K tokens). A branch whose every query sees
the keys from the first to a fixed distance behind itself (the outer branch of ReRoPE, Leaky ReRoPE and
Self-Extend when no padding is masked) is instead one causal call over the whole call, which the kernel tiles
itself: ReRoPE's forward goes from 1.25x to 1.11x stock SDPA at 8K.

Positions are the per-row `position_ids` of the call (left padding: generate's cumsum of the attention mask; a
padded call without them, or with transformers' plain arange fill-in, numbers each row's real tokens from 0);
cached keys get the positions just before the first query of the call. Bounds are turned into cache indices with
each query's own offset (index - position), so within a row positions must grow by one per real token between a
query and the keys it may see (what a forward and `generate` produce; packed documents with a block mask too);
padding is hidden by the attention mask, which is always honoured.

Gradients. The private CPU flash op (`kernels.py`) returns a log-sum-exp that autograd does not differentiate, so it is used only
where no gradient is needed; with gradients every chunk runs on plain matmuls under activation checkpointing, so
the backward pass recomputes a chunk's scores instead of keeping L x L of them.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import DynamicLayer, StaticLayer

from ..cache import append
from ..errors import UnsupportedModelError
from ..rope.module import cos_sin, rotary_frequencies
from ..rope.module import rotate as rope_rotate
from . import kernels
from .base import AttentionMethod

CHUNK = 256  # queries per chunk: the extra work is ~1.5 x CHUNK keys per query; masks are at most CHUNK x (keys)
SPLIT = 1024  # a branch's unmasked middle gets a call of its own (no mask) when at least this many keys wide

Positions = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Branch:
    """One position set: the pairs with lo(i) <= j <= hi(i) score <R(q(i)) q_i, R(k(j)) k_j>.

    Args:
        hi: integer query positions (B, L) -> last key position of the branch (clipped to i: always causal).
        lo: integer query positions -> first key position; None: from the first key.
        q: float positions -> query rotation positions; None: the positions themselves.
        k: float positions -> key rotation positions; None: the scheme's stored key positions (no re-rotation).
    """

    hi: Positions
    lo: Positions | None = None
    q: Positions | None = None
    k: Positions | None = None


@dataclass(frozen=True)
class Scheme:
    """One method's positions.

    Args:
        keys: float positions -> the positions at which the cache stores keys.
        branches: disjoint pair sets; together they cover every visible causal pair.
        log_scale_from: if set (training length T), queries at i >= T are scaled by log(i + 1) / log(T).
        check: called with the number of positions a call reaches (max position + 1) before any computation.
    """

    keys: Positions
    branches: tuple[Branch, ...]
    log_scale_from: int | None = None
    check: Callable[[int], None] | None = None


def window_scheme(window: int, outer_q: Positions, outer_k: Positions, global_tokens: int | None = None,
                  log_scale_from: int | None = None, check=None) -> Scheme:
    """The two-branch scheme of ReRoPE, Leaky ReRoPE, Self-Extend and Λ: ordinary RoPE for i - j < window,
    queries at outer_q(i) and keys at outer_k(j) beyond (only keys at positions < `global_tokens`, if given)."""
    w = window
    outer_hi = (lambda i: i - w) if global_tokens is None else (lambda i: torch.clamp(i - w, max=global_tokens - 1))
    inner = Branch(lo=lambda i: i - (w - 1), hi=lambda i: i, k=lambda pos: pos)
    outer = Branch(hi=outer_hi, q=outer_q)
    return Scheme(keys=outer_k, branches=(inner, outer), log_scale_from=log_scale_from, check=check)


class PositionalAttention(AttentionMethod):
    """An attention method defined by a `Scheme`; subclasses implement `scheme(params, ctx)`."""

    def check_cache(self, cache, layer_idx: int) -> None:
        check_cache(cache, layer_idx)  # the engine also reads a static layer (its first past + L slots)

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
    fill_in = torch.arange(past, past + L, device=hidden_states.device).expand(B, L)
    if position_ids is None or torch.equal(position_ids.expand(B, L), fill_in):
        position_ids = _positions_from_padding(attention_mask, past, L, fill_in)
    position_ids = position_ids.expand(B, L)
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
    k = rotate(k, *cos_sin(inv_freq, scaling, scheme.keys(pos), k))
    if cache is not None:
        k, v = append(cache, attn.layer_idx, k, v)  # in place: no whole-cache copy per decoded token
        k, v = k[:, :, :past + L], v[:, :, :past + L]  # a static layer returns its whole buffer
    T = k.shape[2]
    before = torch.arange(past, 0, -1, device=pos.device, dtype=pos.dtype)
    pos_k = torch.cat([pos[:, :1] - before, pos], dim=1)  # (B, T) positions of all keys
    given_mask = attention_mask  # the object every layer gets (the slice below is a new one per layer)
    if attention_mask is not None:
        attention_mask = attention_mask[..., :T]

    index = torch.arange(past, T, device=q.device)  # cache index of each query
    shift = index - position_ids  # per query: cache index - position, to turn position bounds into indices
    plans = []
    for branch in scheme.branches:
        plan = _plan(branch, position_ids, shift, index, L)
        if plan is None:
            continue  # no pair of this call is in the branch
        qpos = pos if branch.q is None else branch.q(pos)
        qb = rotate(q, *cos_sin(inv_freq, scaling, qpos, q))
        kb, first = k, 0
        if branch.k is not None:  # re-rotate only the cached keys this branch reaches in this call
            first, stop = plan.keys
            delta = branch.k(pos_k[:, first:stop]) - scheme.keys(pos_k[:, first:stop])
            kb = rotate(k[:, :, first:stop], *cos_sin(inv_freq, 1.0, delta, k))
        plans.append((plan, qb, kb, first))

    masks = {}  # without padding, a mask depends only on the per-query bounds relative to its first key

    def bias(plan, a, b, u, z, how):
        base = attention_mask[:, :, a:b, u:z] if attention_mask is not None else None
        if how != "masked":
            return _bias(None, base, q.dtype)
        # relative to the piece and clipped to it, so that e.g. an unbounded start gives the same key in every chunk
        lo, hi = (plan.lo[:, a:b] - u).clamp(min=0), (plan.hi[:, a:b] - u).clamp(min=-1, max=z - u)
        key = (z - u, lo.cpu().numpy().tobytes(), hi.cpu().numpy().tobytes()) if base is None else None
        if key in masks:
            return masks[key]
        cols = torch.arange(z - u, device=q.device)
        out = _bias((cols >= lo[..., None]) & (cols <= hi[..., None]), base, q.dtype)
        if key is not None:
            masks[key] = out
        return out

    # A branch that every query sees from the first key up to a fixed distance behind itself (the outer branch of
    # ReRoPE, Leaky ReRoPE and Self-Extend in an unpadded prefill) is one causal call over the whole call: the
    # kernel skips the hidden blocks itself, where per-chunk calls would re-read the keys every chunk.
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    whole = {}
    if L >= CHUNK and kernels.use_flash(q, needs_grad) and _plain_causal(given_mask, past, L, attn.layer_idx):
        for n, (plan, qb, kb, first) in enumerate(plans):
            if plan.offset is not None and first == 0:
                whole[n] = kernels.shifted_causal(qb, kb, v, past + plan.offset, attn.scaling)

    def rows(a: int, b: int) -> torch.Tensor:
        parts = [(o[:, :, a:b], lse[:, :, a:b]) for o, lse in whole.values()]
        for n, (plan, qb, kb, first) in enumerate(plans):
            if n in whole:
                continue
            qa, qc = past + a, past + b  # cache indices of the chunk's queries
            for u, z, how in plan.pieces(a // CHUNK, qa, qc):
                parts.append(kernels.attend(qb[:, :, a:b], kb[:, :, u - first:z - first], v[:, :, u:z],
                                     bias(plan, a, b, u, z, how), attn.scaling, causal=how == "causal"))
        return kernels.merge(parts)

    if needs_grad:
        # recompute each chunk's scores in the backward pass instead of keeping them (L x L in all)
        out = torch.cat([checkpoint(rows, a, min(L, a + CHUNK), use_reentrant=False) for a in range(0, L, CHUNK)], 2)
    else:
        out = q.new_empty(q.shape)
        for a in range(0, L, CHUNK):
            out[:, :, a:a + CHUNK] = rows(a, min(L, a + CHUNK))
    return attn.o_proj(out.transpose(1, 2).reshape(B, L, -1))


def _plain_causal(attention_mask, past: int, L: int, layer: int) -> bool:
    """Whether `attention_mask` hides nothing beyond causality: None, or a bool mask (B or 1, 1, L, >= past + L) under
    which query r sees exactly keys [0, past + r] (what transformers passes for an unpadded call that continues a
    cache). Compared CHUNK rows at a time (no L x T temporary), once per forward: layer `layer` reuses the answer
    of layer `layer - 1` for the same mask object."""
    global _causal_seen
    if attention_mask is None:
        return True
    if (attention_mask.dtype != torch.bool or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
            or attention_mask.shape[2] != L or attention_mask.shape[3] < past + L):
        return False
    ref, seen = _causal_seen
    if ref() is attention_mask and seen == (past, L, layer - 1):
        _causal_seen = ref, (past, L, layer)
        return True
    if not _causal_rows(attention_mask, past, L):
        return False
    _causal_seen = weakref.ref(attention_mask), (past, L, layer)
    return True


def _causal_rows(attention_mask, past: int, L: int) -> bool:
    keys = torch.arange(past + L, device=attention_mask.device)
    for a in range(0, L, CHUNK):
        rows = attention_mask[:, 0, a:a + CHUNK, :past + L]
        if not bool((rows == (keys <= keys[past + a:past + a + rows.shape[1], None])).all()):
            return False
    return True


_causal_seen = (lambda: None), None  # (weak reference to the last mask found plain causal, (past, L, layer))


def _positions_from_padding(attention_mask, past: int, L: int, fill_in: torch.Tensor) -> torch.Tensor:
    """Positions of a call that got none (or transformers' plain arange fill-in): each row's real tokens numbered
    0, 1, ... as `generate()` numbers them. Padding is read from the 4D mask: the keys the last query of a row may
    see. The stock model does not need this (RoPE sees differences only), but log scaling, floor groups, global
    tokens and chunks depend on absolute positions, so an arange shifted by the padding would change the result.
    A 4D mask that is not a padding mask (packed documents) keeps the fill-in, as in the stock model."""
    if attention_mask is None or attention_mask.dim() != 4:
        return fill_in
    mask = attention_mask[:, 0, :, :past + L]
    visible = (lambda m: m) if mask.dtype == torch.bool else (lambda m: m > torch.finfo(m.dtype).min / 2)
    real = visible(mask[:, -1])
    if bool(real.all()):  # no padding: the common case reads one row of the mask
        return fill_in
    allowed = visible(mask)
    counts = real.long().cumsum(-1)
    # only a padding mask: every query that sees itself sees exactly the real keys up to it. Anything else (a block
    # mask of packed documents, hiding earlier documents from the last query) keeps transformers' numbering, as the
    # stock model does; numbering it from the last query would put every query of an earlier document at 0
    index = torch.arange(L, device=allowed.device)
    own = allowed[:, index, past + index]  # (B, L): the query sees its own key
    own[:, :-1] &= ~allowed[:, :-1, -1]  # and no later key: not a fully masked padding row that was unmasked
    seen = allowed.sum(-1, dtype=torch.int32)  # (int32: a plain sum would copy the L x T mask as int64 first)
    if not bool((seen == counts[:, past:])[own].all()):
        return fill_in
    return (counts - 1)[:, past:].clamp(min=0)  # padding queries: 0 (their rows are hidden)


@dataclass
class _Plan:
    """Where one branch's keys lie, in cache indices: per query (lo, hi: (B, L)) and per query chunk (stats)."""

    lo: torch.Tensor
    hi: torch.Tensor
    stats: list  # per chunk: [min lo, max hi, max lo, min hi, min(hi - index)]
    keys: tuple[int, int]  # the keys the branch reaches in this call
    offset: int | None  # c if every query of the call sees keys [0, index + c] (one c for all), else None

    def pieces(self, c: int, qa: int, qc: int):
        """(first key, stop, how) attention calls covering chunk `c` (queries [qa, qc)), how in "full" (no mask),
        "masked" (per-query bounds) or "causal" (the diagonal block, key <= query)."""
        x, y, fx, fy, diag = self.stats[c]
        if y < x:
            return []
        y, fy = y + 1, fy + 1  # stops
        if diag == 0 and fx <= qa:  # every query ends at itself, none starts after qa: [qa, qc) is a causal block
            if qa - fx < SPLIT:
                return [(x, qc, "masked")]
            return [p for p in [(x, fx, "masked"), (fx, qa, "full"), (qa, qc, "causal")] if p[1] > p[0]]
        if fy - fx < SPLIT:
            return [(x, y, "masked")]
        return [p for p in [(x, fx, "masked"), (fx, fy, "full"), (fy, y, "masked")] if p[1] > p[0]]


def _plan(branch: Branch, position_ids, shift, index, L: int) -> _Plan | None:
    """Per-query key index bounds of `branch` and their per-chunk extremes; None if the branch is empty."""
    hi = torch.minimum(branch.hi(position_ids) + shift, index)
    lo = torch.zeros_like(hi) if branch.lo is None else (branch.lo(position_ids) + shift).clamp(min=0)
    n = -(-L // CHUNK)
    pad = n * CHUNK - L
    big = 1 << 50  # padding of the last chunk; exact in float64, which `pad` may use for the fill value

    def per_chunk(x, reduce, fill):
        x = torch.nn.functional.pad(x, (0, pad), value=fill).view(x.shape[0], n, CHUNK)
        return reduce(reduce(x, dim=2), dim=0)

    stats = torch.stack([per_chunk(lo, torch.amin, big), per_chunk(hi, torch.amax, -big),
                         per_chunk(lo, torch.amax, -big), per_chunk(hi, torch.amin, big),
                         per_chunk(hi - index, torch.amin, 0)], dim=1).tolist()
    if all(y < x for x, y, *_ in stats):
        return None
    keys = min(x for x, y, *_ in stats if y >= x), max(y + 1 for x, y, *_ in stats if y >= x)
    gap = hi - index
    fixed = bool((lo == 0).all()) and bool((gap == gap[0, 0]).all())
    return _Plan(lo, hi, stats, keys, int(gap[0, 0]) if fixed else None)


def _bias(allowed, base, dtype):
    """Additive float mask (B or 1, 1, C, K): `base` (a 4D bool mask or float bias, or None) where `allowed`
    (B, C, K) bool, the dtype's min elsewhere."""
    if allowed is not None:
        allowed = allowed[:, None]
    if base is not None and base.dtype == torch.bool:
        allowed = base if allowed is None else allowed & base
        base = None
    if allowed is None:
        return base if base is None else base.to(dtype)
    keep = torch.zeros((), dtype=dtype, device=allowed.device) if base is None else base.to(dtype)
    return torch.where(allowed, keep, torch.finfo(dtype).min)
