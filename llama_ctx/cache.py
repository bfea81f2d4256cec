"""transformers-5 `Cache` subclasses used by llama_ctx attention methods.

`StreamingCache` is the bounded cache of StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models
with Attention Sinks"); transformers 5 removed its `SinkCache`. Per row it keeps the first `sink_tokens` real
tokens and the last `window` real tokens, so its size is at most `sink_tokens + window` whatever the stream length.

Keys are stored *unrotated*: the "streaming" attention method rotates them by their place in the cache at every
step. Storing rotated keys instead would not be cheaper: each eviction shifts the place of every window key by one,
so all `window` keys would have to be re-rotated at every step anyway (the same O(window * head_dim) work), and the
repeated re-rotations would accumulate rounding error over a long stream. Unrotated keys are rotated once per use,
from the exact projection, so positions stay exact after any number of evictions.

Rows of a batch may hold different numbers of real tokens (left padding): the cache keeps a per-row `valid` mask
(shared by all layers) and right-aligns each row's kept tokens, so padding never counts as a sink.

`append` is `DynamicCache.update` without its O(L) copy per decoded token (see its docstring), for the attention
methods that own their forward (position-rewriting and token-selection); the cache stays a standard `DynamicCache`.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .registry import check_int


class _Spare:
    """Buffers with spare capacity behind one `DynamicLayer`, and weak references to the views the layer holds."""

    def __init__(self, key_buf, value_buf, keys, values):
        self.capacity = key_buf.shape[2]
        self.bufs = weakref.ref(key_buf), weakref.ref(value_buf)  # alive while a view of them is
        self.views = weakref.ref(keys), weakref.ref(values)

    def holds(self, layer) -> bool:
        """The layer still holds exactly the views we gave it (not after reset, crop, reorder, batch ops...)."""
        return self.views[0]() is layer.keys and self.views[1]() is layer.values


_SPARES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # DynamicLayer -> _Spare


def _capacity(tokens: int) -> int:
    """Buffer size for `tokens` tokens: +25% (+16), so at most 1.25 x tokens + 16 slots are ever held."""
    return tokens + tokens // 4 + 16


def append(cache, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
    """`cache.update(key_states, value_states, layer_idx)`, in amortized O(new tokens) for a plain `DynamicLayer`.

    `DynamicLayer.update` concatenates, i.e. copies the whole layer cache at every decoded token. Here the layer's
    keys/values are views `buf[:, :, :n]` of buffers with spare capacity (`_capacity`): new states are written
    into the spare slots and the layer gets new, longer views, so everything else (`get_seq_length`, `crop`,
    `reorder_cache`, `reset`, `generate()`) sees a standard `DynamicLayer`. Views handed out earlier keep their
    contents (only slots past their end are written). When the layer no longer holds the views recorded for it
    (reset, crop, reorder, a layer seen for the first time) or the buffer is full, the current keys/values and the
    new states are copied into a fresh buffer (the same cost as the concatenation it replaces).

    Falls back to `cache.update` for other layer types, an offloading cache, a missing layer, states that need
    autograd, or any dtype/device/shape mismatch (which then behaves, or fails, exactly as the standard path).
    """
    layers = getattr(cache, "layers", None)
    layer = layers[layer_idx] if layers is not None and layer_idx < len(layers) else None
    if (type(layer) is not DynamicLayer or getattr(cache, "offloading", False)
            or (torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad))):
        return cache.update(key_states, value_states, layer_idx)
    if not layer.is_initialized:
        layer.lazy_initialization(key_states, value_states)
    keys, values, T = layer.keys, layer.values, key_states.shape[2]
    n = keys.shape[2] if keys.numel() else 0
    states = (key_states, value_states)
    spare = _SPARES.get(layer)
    bufs = (spare.bufs[0](), spare.bufs[1]()) if spare is not None and spare.holds(layer) else (None, None)
    if (any(b is None for b in bufs) or n + T > spare.capacity
            or not all(_fits(b, s) for b, s in zip(bufs, states))):
        if n and not all(_fits(old, s) for old, s in zip((keys, values), states)):
            return cache.update(key_states, value_states, layer_idx)
        cap = _capacity(n + T)
        bufs = tuple(s.new_empty(*s.shape[:2], cap, *s.shape[3:]) for s in states)
        if n:
            bufs[0][:, :, :n], bufs[1][:, :, :n] = keys, values
    for buf, s in zip(bufs, states):
        buf[:, :, n:n + T] = s
    layer.keys, layer.values = bufs[0][:, :, :n + T], bufs[1][:, :, :n + T]
    _SPARES[layer] = _Spare(*bufs, layer.keys, layer.values)
    return layer.keys, layer.values


def _fits(t: torch.Tensor, states: torch.Tensor) -> bool:
    """`t` can hold `states` along dim 2: same dtype, device and other dims (no silent broadcasting)."""
    return (t.dim() == 4 and t.dtype == states.dtype and t.device == states.device
            and t.shape[:2] == states.shape[:2] and t.shape[3:] == states.shape[3:])


class StreamingLayer(DynamicLayer):
    """One layer of a `StreamingCache`: unrotated keys and values, `[batch, kv_heads, kept, head_dim]`."""

    def update(self, key_states, value_states, *args, keep: torch.Tensor | None = None, **kwargs):
        """Append the new states, store only the `keep` columns (`[batch, kept]` indices), return all of them."""
        keys, values = super().update(key_states, value_states)
        if keep is not None:
            index = keep[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
            self.keys, self.values = keys.gather(2, index), values.gather(2, index)
        return keys, values


class StreamingCache(Cache):
    """Attention sinks + sliding window, bounded to `sink_tokens + window` tokens per row.

    Only for a model patched with the "streaming" attention method, which drives it: before each forward it
    calls `plan(new_valid)`, every layer then calls `update`, and `commit()` records the new rows' state.
    `get_seq_length()` is the number of tokens seen (what `generate()` needs); `cached_tokens()` is the stored size.

    Args:
        sink_tokens: number of first real tokens kept forever, >= 0.
        window: number of most recent real tokens kept, >= 1.
    """

    def __init__(self, sink_tokens: int, window: int):
        super().__init__(layer_class_to_replicate=StreamingLayer)
        self.sink_tokens = check_int("sink_tokens", sink_tokens, ge=0)
        self.window = check_int("window", window)
        self.valid: torch.Tensor | None = None  # [batch, kept] bool: real token (True) or padding slot
        self.seen = 0
        self._keep = self._next_valid = None

    def plan(self, new_valid: torch.Tensor) -> torch.Tensor:
        """Validity of past + new tokens, `[batch, kept + new]`; prepares what `update` will keep.

        Per row, real tokens are ranked 0, 1, ... in stream order (past ones are right-aligned and contiguous in
        rank after the sinks); those with rank < sink_tokens or among the last `window` are kept.
        """
        past = self.valid if self.valid is not None else new_valid.new_zeros(new_valid.shape[0], 0)
        valid = torch.cat([past, new_valid], dim=-1)
        rank = valid.cumsum(-1) - 1
        count = rank[:, -1:] + 1
        keep = valid & ((rank < self.sink_tokens) | (rank >= count - self.window))
        kept = int(keep.sum(-1).max())
        if kept == valid.shape[-1]:
            self._keep, self._next_valid = None, valid
        else:
            # Stable sort puts dropped columns first and kept ones last, in order: rows end up right-aligned.
            self._keep = torch.sort(keep.to(torch.int8), dim=-1, stable=True).indices[:, -kept:]
            self._next_valid = keep.gather(-1, self._keep)
        return valid

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(StreamingLayer())
        return self.layers[layer_idx].update(key_states, value_states, keep=self._keep)

    def commit(self, new_tokens: int) -> None:
        """Record the forward planned by `plan` (call once, after every layer has been updated)."""
        self.valid, self.seen = self._next_valid, self.seen + new_tokens
        self._keep = self._next_valid = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.cached_tokens() + query_length, 0

    def cached_tokens(self) -> int:
        """Stored tokens per row (padding slots included): at most `sink_tokens + window`."""
        return 0 if self.valid is None else self.valid.shape[-1]

    def reset(self) -> None:
        self.layers, self.valid, self.seen = [], None, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("StreamingCache cannot be cropped: evicted tokens are gone (no assisted decoding).")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.valid is not None:
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.valid is not None:
            self.valid = self.valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.valid is not None:
            self.valid = self.valid[indices]
