"""Token-selection attention: "topk" (query-token) and "block-topk" (query-block, InfLLM-style).

A query at position i sees the union of
  * the sinks: keys at positions j < `sink_tokens` (StreamingLLM, Xiao et al. 2023),
  * its local window: keys with 0 <= i - j < `local_window` (itself included),
  * "topk": the `k` best other keys, candidates sink_tokens <= j <= i - local_window;
    "block-topk": the keys of the `k_blocks` best blocks, plus the remainder (InfLLM, Xiao et al. 2024).
    Block b holds positions [b*block_size, (b+1)*block_size); it is a candidate for query i once all of it
    has left the window, i.e. b < n_i = max(0, i - local_window + 1) // block_size. The remainder, positions
    n_i*block_size <= j <= i - local_window (fewer than block_size keys not yet in a complete block), is always
    visible, so that selecting every block gives full attention.

Distances (LM-Infinite, Han et al. 2023; InfLLM): window keys use normal RoPE, <R(i) q, R(j) k>; every other
visible key sits at distance `local_window`: <R(W) q, R(0) k>, W = local_window. Hence when every key is
visible ("topk" with k >= length, "block-topk" with k_blocks >= number of blocks) this is full causal attention
with relative distances min(i - j, W), and plain full attention for inputs no longer than W.

Selection score, per KV head (the g query heads sharing it choose together), with the model's rotation R
(current rotary frequencies and attention scaling):
  * "topk":       s(i, j) = sum_{h in group} <R(W) q_h,i , R(0) k_j>   (the capped-distance logit, summed)
  * "block-topk": s(i, b) = sum_{h in group} <R(W) q_h,i , R(0) mean_{j in b} k_j>
The best k / k_blocks candidates (torch.topk) are selected; fewer candidates -> all of them.

Positions: each row's real tokens are numbered 0, 1, ... in order (what `generate()` passes as `position_ids`;
`position_ids` starting later, growing by one per real token, shift them); which tokens are padding comes from the
attention mask, so a padded batch needs no `position_ids`. Padding keys are never visible. Only a padding mask
(causal, padded keys hidden, as transformers builds it from a 2D mask) is accepted; custom 4D masks and
`position_ids` that do not grow by one per real token (packed sequences) raise a `ConfigError`. Decoding one token
needs left padding (the layout `generate()` uses).

Cache: the standard `DynamicCache` holds *unrotated* keys; each call rotates only what it needs (the window,
or all keys of a prefill chunk) with the rotary frequencies current at call time, so any rope method composes.
"block-topk" keeps per-block key sums next to the cache (per layer, weakly keyed by the cache object) and
updates them incrementally; they are rebuilt whenever the cache no longer holds the tensor they were built on
(reset, crop, reorder, a new cache). New keys/values go in with `llama_ctx.cache.append`, which writes them into
spare capacity behind the layer's tensors instead of concatenating (copying) the whole cache at every step.

Prefill runs in query chunks (never an L x L map). Decoding one token gathers only the sinks, the selected
keys or blocks and the window; "block-topk" scores only the block means, so its cost grows with L / block_size.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from ..cache import append
from ..errors import ConfigError, UnsupportedModelError
from ..registry import check_int, from_model, register
from ..rope.module import cos_sin, rotary_frequencies, rotate
from .base import AttentionMethod

_CHUNK_ELEMENTS = 1 << 22  # score-map elements per prefill chunk (batch x heads x queries x keys)
_WINDOW_HELP = "keys within this distance keep their RoPE position; default: the trained window"


@dataclass
class TopKParams:
    """Args:
    k: other keys each query selects by score, >= 1.
    sink_tokens: first positions always visible, >= 0.
    local_window: trailing keys (the query included) at their true distance, >= 1; default: trained window.
    """

    k: int
    sink_tokens: int = 4
    local_window: int | None = from_model(help=_WINDOW_HELP)

    def __post_init__(self):
        self.k = check_int("k", self.k)
        self.sink_tokens = check_int("sink_tokens", self.sink_tokens, ge=0)
        self.local_window = check_int("local_window", self.local_window)


@dataclass
class BlockTopKParams:
    """Args:
    block_size: positions per block, >= 1.
    k_blocks: blocks each query (per KV head) selects by the score of the block's mean key, >= 1.
    sink_tokens: first positions always visible, >= 0.
    local_window: trailing keys (the query included) at their true distance, >= 1; default: trained window.
    """

    block_size: int
    k_blocks: int
    sink_tokens: int = 4
    local_window: int | None = from_model(help=_WINDOW_HELP)

    def __post_init__(self):
        self.block_size = check_int("block_size", self.block_size)
        self.k_blocks = check_int("k_blocks", self.k_blocks)
        self.sink_tokens = check_int("sink_tokens", self.sink_tokens, ge=0)
        self.local_window = check_int("local_window", self.local_window)


def _rotate(x, positions, inv_freq, scaling):
    """RoPE of `x` at `positions` (broadcast against x.shape[:-1]), transformers' `rotate_half` layout."""
    return rotate(x, *cos_sin(inv_freq, scaling, positions, x))


def _scores(q, k):
    """(B, Hkv, g, T, d) x (B, Hkv, N, d) -> (B, Hkv, g, T, N), without copying k for each of the g heads."""
    B, Hkv, g, T, d = q.shape
    return (q.reshape(B, Hkv, g * T, d) @ k.transpose(-1, -2)).view(B, Hkv, g, T, -1)


def _mix(probs, v):
    """(B, Hkv, g, T, N) x (B, Hkv, N, d) -> (B, Hkv, g, T, d)."""
    B, Hkv, g, T, N = probs.shape
    return (probs.reshape(B, Hkv, g * T, N) @ v).view(B, Hkv, g, T, -1)


class _BlockSums:
    """Per-block key sums (B, Hkv, nb, d, float32) and counts (B, nb) for the keys of one cache layer."""

    def __init__(self):
        self.sums = self.counts = None
        self.done, self.keys = 0, lambda: None  # keys covered; weak reference to the tensor they came from

    def update(self, keys, key_pos, block_size, previous):
        """Add the keys after `previous` (the layer's keys before this call) or, if the sums were not built on
        exactly that tensor, rebuild them from all `keys`."""
        start = self.done if previous is not None and self.keys() is previous else 0
        B, Hkv, N, d = keys.shape
        nb = int(key_pos.max().clamp(min=0)) // block_size + 1
        if start == 0:
            self.sums = keys.new_zeros((B, Hkv, 0, d), dtype=torch.float32)
            self.counts = keys.new_zeros((B, 0), dtype=torch.float32)
        grow = nb - self.sums.shape[2]
        if grow > 0:
            self.sums = torch.cat([self.sums, self.sums.new_zeros(B, Hkv, grow, d)], dim=2)
            self.counts = torch.cat([self.counts, self.counts.new_zeros(B, grow)], dim=1)
        pos = key_pos[:, start:]
        valid = (pos >= 0).float()
        blk = pos.clamp(min=0) // block_size
        new = keys[:, :, start:].float() * valid[:, None, :, None]
        self.sums.scatter_add_(2, blk[:, None, :, None].expand_as(new), new)
        self.counts.scatter_add_(1, blk, valid)
        self.done, self.keys = N, weakref.ref(keys)

    def means(self, dtype):
        return (self.sums / self.counts.clamp(min=1)[:, None, :, None]).to(dtype)


def _layer_keys(cache, layer_idx):
    """The key tensor a cache layer holds now, or None."""
    layers = getattr(cache, "layers", None)
    return getattr(layers[layer_idx], "keys", None) if layers is not None and layer_idx < len(layers) else None


def _check_layer(layer) -> None:
    if not isinstance(layer, DynamicLayer) or layer.is_sliding:
        raise UnsupportedModelError(
            f"token selection needs every key in a growing cache, got a {type(layer).__name__}; use the default "
            "DynamicCache (do not pass cache_implementation='static' / 'sliding_window' etc. to generate())."
        )


def _real_keys(mask, B: int, T: int, N: int, name: str, device) -> torch.Tensor:
    """Which of the N keys are real tokens, (B, N) bool, read from the attention mask the layer gets.

    Only the mask transformers builds from a 2D padding mask is understood: causal, padded keys hidden (bool for
    sdpa, 0 / dtype-min float for eager; None when nothing is padded). Selection decides visibility itself, so any
    other mask (packed documents, prefix-LM, additive biases) would be ignored: it raises instead.
    """
    if mask is None:
        return torch.ones(B, N, dtype=torch.bool, device=device)
    if mask.dim() != 4 or mask.shape[0] not in (1, B) or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (T, N):
        raise _not_padding(name, f"a mask of shape {tuple(mask.shape)} for {T} queries over {N} keys")
    last = mask[:, 0, -1]
    real = (last if last.dtype == torch.bool else last == 0).expand(B, N)  # the newest query sees every real key
    cols = torch.arange(N, device=mask.device)
    for a in range(0, T, 256):  # compare row chunks with what a padding mask gives: no second T x N map
        m = mask[:, 0, a:a + 256]
        allowed = m if m.dtype == torch.bool else m == 0
        expected = (cols <= torch.arange(N - T + a, N - T + a + m.shape[1], device=mask.device)[:, None]) & real[:, None]
        if not torch.equal(allowed.expand_as(expected), expected) or (
                m.dtype != torch.bool and bool(((m != 0) & (m > torch.finfo(m.dtype).min / 2)).any())):
            raise _not_padding(name, "a custom attention mask")
    return real


def _not_padding(name: str, what: str) -> ConfigError:
    return ConfigError(f"{name}: got {what}; token selection decides which keys each query sees and honours only a "
                       "padding mask: pass a 2D attention_mask [batch, tokens] (1 = real token, 0 = padding).")


def _key_positions(real: torch.Tensor, position_ids, T: int, name: str) -> torch.Tensor:
    """Key positions (B, N): each row's real tokens numbered in order from its first position, negative for padding.

    The first position is 0 (what generate() passes) unless `position_ids` start the row's real tokens later (e.g.
    a continuation without its cache); they must grow by one per real token. The plain arange transformers fills
    in when no position_ids are given is not read, so a padded batch needs none.
    """
    B, N = real.shape
    rank = real.cumsum(-1) - 1
    base = torch.zeros(B, 1, dtype=rank.dtype, device=rank.device)
    if position_ids is not None:
        given = position_ids.to(rank.device).expand(B, T)
        if not torch.equal(given, torch.arange(N - T, N, device=rank.device).expand(B, T)):
            q_real, diff = real[:, N - T:], given - rank[:, N - T:]
            base = torch.where(q_real, diff, 0).amax(-1, keepdim=True)
            if not bool(((diff == base) | ~q_real).all()) or bool((base < 0).any()):
                raise ConfigError(f"{name}: position_ids must grow by one per real token of a row (what generate() "
                                  "passes, with the padding given by attention_mask); got others (e.g. packed "
                                  "sequences), which this method does not handle.")
    if T > 1:
        return torch.where(real, rank + base, -1)
    # decoding gathers keys by column (sinks, blocks): real tokens must be the last columns of each row
    first = N - real.sum(-1, keepdim=True)
    columns = torch.arange(N, device=real.device)[None]
    if not torch.equal(columns >= first, real) or bool((first == N).any()):
        raise ConfigError(f"{name}: decoding needs left padding (each row's padding before its tokens, and the new "
                          "token real), as generate() builds it.")
    return torch.where(real, columns - first + base, columns - first)


class _Selection(AttentionMethod):
    """Shared forward; subclasses define the selection (dense prefill mask and one-query gather)."""

    def validate(self, params, ctx) -> None:
        super().validate(params, ctx)
        cfg = ctx.config
        types_ = getattr(cfg, "layer_types", None) or ["sliding_attention"]
        if getattr(cfg, "sliding_window", None) is not None and "sliding_attention" in types_:
            raise UnsupportedModelError(
                f"this model uses sliding-window attention (sliding_window={cfg.sliding_window}), whose cache drops "
                "old keys that token selection needs; load it with sliding_window=None "
                "(e.g. from_pretrained(..., sliding_window=None))."
            )

    def prepare(self, params, ctx):
        return weakref.WeakKeyDictionary()  # cache -> {layer_idx: _BlockSums}

    def attend(self, fwd, attn, hidden_states, attention_mask, cache, position_ids):
        params = fwd.params
        B, T, _ = hidden_states.shape
        shape = (B, T, -1, attn.head_dim)
        q = attn.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
        previous = _layer_keys(cache, attn.layer_idx)
        if cache is not None:  # unrotated keys go into the standard cache
            k, v = append(cache, attn.layer_idx, k, v)  # = update(), O(1) amortized
            _check_layer(cache.layers[attn.layer_idx])
        key_pos = _key_positions(_real_keys(attention_mask, B, T, k.shape[2], self.name, q.device), position_ids, T, self.name)
        inv_freq, scaling = rotary_frequencies(fwd.backbone.rotary_emb, key_pos[:, -T:].clamp(min=0))
        rot = lambda x, pos: _rotate(x, pos, inv_freq, scaling)  # noqa: E731
        blocks = None
        if self.keeps_blocks:
            if cache is None:
                blocks = _BlockSums()
            else:
                blocks = fwd.extra.setdefault(cache, {}).setdefault(attn.layer_idx, _BlockSums())
            blocks.update(k, key_pos, params.block_size, previous)
        g = q.shape[1] // k.shape[1]
        q = q.reshape(B, k.shape[1], g, T, attn.head_dim)
        q_far = rot(q, torch.tensor(params.local_window, device=q.device)) * scaling  # vs R(0) k = scaling * k
        run = self._decode if T == 1 else self._prefill
        out = run(params, q, q_far, k, v, key_pos, rot, blocks, attn.scaling)  # (B, Hkv, g, T, d)
        out = out.reshape(B, -1, T, attn.head_dim).transpose(1, 2).reshape(B, T, -1)
        return attn.o_proj(out)

    keeps_blocks = False

    # ---- prefill: query chunks against all keys, explicit visibility mask -------------------------------------

    def _prefill(self, p, q, q_far, k, v, key_pos, rot, blocks, scale):
        B, Hkv, g, T, d = q.shape
        N = k.shape[2]
        W = p.local_window
        q_pos = key_pos[:, N - T:]
        q_near = rot(q, q_pos[:, None, None])
        k_near = rot(k, key_pos[:, None])
        group = q_far.sum(2)  # (B, Hkv, T, d): selection query of each KV head
        means = blocks.means(k.dtype) if blocks is not None else None
        out = q.new_empty(B, Hkv, g, T, d)
        C = max(1, _CHUNK_ELEMENTS // (B * Hkv * g * N))
        for t0 in range(0, T, C):
            c = slice(t0, t0 + C)
            rel = q_pos[:, c, None] - key_pos[:, None, :]  # (B, C, N)
            causal = (rel >= 0) & (key_pos[:, None, :] >= 0)
            window = causal & (rel < W)
            always = window | (causal & (key_pos[:, None, :] < p.sink_tokens)) | (rel == 0)  # rel == 0: pad query
            visible = always[:, None] | self._select_dense(p, group[:, :, c], k, means, key_pos, q_pos[:, c],
                                                           causal, rel)
            near = _scores(q_near[:, :, :, c], k_near)  # (B, Hkv, g, C, N)
            far = _scores(q_far[:, :, :, c], k)
            logits = torch.where(window[:, None, None], near, far) * scale
            logits = logits.masked_fill(~visible[:, :, None], float("-inf"))
            out[:, :, :, c] = _mix(torch.softmax(logits.float(), dim=-1).to(v.dtype), v)
        return out

    # ---- decode: one query, gather sinks + selected keys + trailing span --------------------------------------

    def _decode(self, p, q, q_far, k, v, key_pos, rot, blocks, scale):
        B, Hkv, g, _, d = q.shape
        N = k.shape[2]
        W = p.local_window
        q_pos = key_pos[:, -1]  # (B,)
        group = q_far.sum(2)  # (B, Hkv, 1, d)
        # lo: first position of the trailing span (window, plus the remainder for blocks); far: gathered indices
        lo, far_idx, far_ok, span_len, in_blocks = self._select_one(p, group, k, blocks, key_pos, q_pos)
        offset = -key_pos[:, 0]
        sink_pos = torch.arange(p.sink_tokens, device=q.device)[None]  # (1, S)
        sink_ok = ((sink_pos < lo[:, None])[:, None] & ~in_blocks(sink_pos)).expand(-1, Hkv, -1)  # (B, Hkv, S)
        sink_idx = (offset[:, None] + sink_pos).clamp(max=N - 1)[:, None].expand(-1, Hkv, -1)
        far_idx = torch.cat([sink_idx, far_idx], dim=-1)
        far_ok = torch.cat([sink_ok, far_ok], dim=-1)
        gather = lambda x, i: x.gather(2, i[..., None].expand(-1, -1, -1, d))  # noqa: E731
        k_far, v_far = gather(k, far_idx), gather(v, far_idx)
        R = min(N, span_len)
        span_pos = key_pos[:, N - R:]  # (B, R)
        span_ok = (span_pos >= lo[:, None]) & (span_pos >= 0)
        k_span = k[:, :, N - R:]
        q_near = rot(q, q_pos[:, None, None, None])
        near = _scores(q_near, rot(k_span, span_pos[:, None]))  # (B, Hkv, g, 1, R)
        span_far = _scores(q_far, k_span)
        in_window = (q_pos[:, None] - span_pos < W)[:, None, None, None]
        logits = torch.cat([_scores(q_far, k_far),
                            torch.where(in_window, near, span_far)], dim=-1) * scale
        ok = torch.cat([far_ok, span_ok[:, None].expand(-1, Hkv, -1)], dim=-1)
        logits = logits.masked_fill(~ok[:, :, None, None], float("-inf"))
        probs = torch.softmax(logits.float(), dim=-1).to(v.dtype)
        return _mix(probs, torch.cat([v_far, v[:, :, N - R:]], dim=2))


class TopK(_Selection):
    """Query-token selection: each query (per KV head) adds the k best keys by capped-distance score."""

    def _select_dense(self, p, group, k, means, key_pos, q_pos, causal, rel):
        cand = causal & (rel >= p.local_window) & (key_pos[:, None, :] >= p.sink_tokens)
        score = (group @ k.transpose(-1, -2)).masked_fill(~cand[:, None], float("-inf"))  # (B, Hkv, C, N)
        top = score.topk(min(p.k, score.shape[-1]), dim=-1)
        return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top.indices, top.values > float("-inf"))

    def _select_one(self, p, group, k, blocks, key_pos, q_pos):
        lo = q_pos - p.local_window + 1
        cand = (key_pos >= p.sink_tokens) & (key_pos < lo[:, None])  # (B, N)
        score = (group @ k.transpose(-1, -2))[:, :, 0].masked_fill(~cand[:, None], float("-inf"))  # (B, Hkv, N)
        top = score.topk(min(p.k, score.shape[-1]), dim=-1)
        no_blocks = lambda pos: torch.zeros(1, 1, pos.shape[-1], dtype=torch.bool, device=pos.device)  # noqa: E731
        return lo, top.indices, top.values > float("-inf"), p.local_window, no_blocks


class BlockTopK(_Selection):
    """Query-block selection: each query (per KV head) adds the k_blocks complete blocks with the best mean key."""

    keeps_blocks = True

    @staticmethod
    def _evicted(p, q_pos):
        """Blocks entirely left of the window of a query at `q_pos`."""
        return (q_pos - p.local_window + 1).clamp(min=0) // p.block_size

    def _top_blocks(self, p, group, means, n_done):
        score = group @ means.transpose(-1, -2)  # (B, Hkv, C, nb)
        cand = torch.arange(score.shape[-1], device=score.device) < n_done[..., None]  # (B, C, nb)
        top = score.masked_fill(~cand[:, None], float("-inf")).topk(min(p.k_blocks, score.shape[-1]), dim=-1)
        return top.indices, top.values > float("-inf")

    def _select_dense(self, p, group, k, means, key_pos, q_pos, causal, rel):
        n_done = self._evicted(p, q_pos)  # (B, C)
        idx, ok = self._top_blocks(p, group, means, n_done)
        chosen = torch.zeros(*idx.shape[:-1], means.shape[2], dtype=torch.bool, device=idx.device).scatter_(-1, idx, ok)
        blk = (key_pos.clamp(min=0) // p.block_size)[:, None, None, :].expand(*chosen.shape[:-1], -1)
        span = causal & (key_pos[:, None, :] >= (n_done * p.block_size)[..., None])  # remainder + window
        return (chosen.gather(-1, blk) & causal[:, None]) | span[:, None]

    def _select_one(self, p, group, k, blocks, key_pos, q_pos):
        n_done = self._evicted(p, q_pos)  # (B,)
        idx, ok = self._top_blocks(p, group, blocks.means(k.dtype), n_done[:, None])
        idx, ok = idx[:, :, 0], ok[:, :, 0]  # (B, Hkv, kb)
        bs = p.block_size
        keys = (-key_pos[:, 0])[:, None, None, None] + idx[..., None] * bs + torch.arange(bs, device=idx.device)
        keys = keys.clamp(max=k.shape[2] - 1).flatten(2)  # (B, Hkv, kb * bs)

        def in_blocks(pos):  # (1, S) positions -> (B, Hkv, S): inside a selected block
            return ((pos // bs)[:, None, :, None] == idx[:, :, None, :]).logical_and(ok[:, :, None, :]).any(-1)

        return n_done * bs, keys, ok.repeat_interleave(bs, dim=-1), p.local_window + bs - 1, in_blocks


register("topk", "attention", TopKParams, TopK(),
         "query-token selection: sinks + local window + the k best keys, outside the window at distance window")
register("block-topk", "attention", BlockTopKParams, BlockTopK(),
         "query-block selection (InfLLM): sinks + local window + the k_blocks best blocks by mean key")
