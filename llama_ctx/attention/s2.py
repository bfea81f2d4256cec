"""S2-attn, shifted sparse attention for long-context fine-tuning (Chen et al. 2023, "LongLoRA: Efficient
Fine-tuning of Long-Context Large Language Models", dvlab-research/LongLoRA).

Training only: while `attn.training` the L tokens are cut into groups of G tokens and each query attends causally
inside its group only, so the attention work is ~L·G/2 instead of ~L²/2. Half of the heads use the groups
[kG, (k+1)G); the other half (the second half of the query heads, h >= H // 2, as in LongLoRA; with GQA each query
head reads its own key/value head) use groups shifted by G/2, [kG + G/2, (k+1)G + G/2), so information flows
between neighbouring groups from layer to layer. In `eval()` the forward is the stock attention, operation for
operation (so evaluation, `generate` and the KV cache are untouched and fine-tuned weights are used with full
attention, as LongLoRA intends).

Causality. LongLoRA shifts with `torch.roll(-G/2)`, which puts the last G/2 tokens in front of the first G/2
ones in one group: tokens 0..G/2-1 then attend to the end of the sequence (a future leak, LongLoRA issues #15 and
#90). Here the shifted groups are the head piece [0, G/2), the full groups [G/2 + kG, G/2 + (k+1)G) and the tail
piece [L - G/2, L), each causal within itself: no output at position t depends on a token after t. `wrap=True`
reproduces LongLoRA's rolled grouping exactly, leak included, for comparison only.

Documents and masks. Packed documents (position_ids restarting at 0, no attention_mask) never see each other: a
document starts wherever position_ids[t] != position_ids[t-1] + 1, and each group gets a (G x G) float mask. Any
4D mask the model passes (padding, packing, sliding window) is honoured by reading it on each group's own
(query, key) pairs; the masks are built once per forward and shared by all layers. `wrap=True` supports documents
but refuses padding masks. With G >= L (group_size_ratio=1, or a group_size not below the length) S2-attn is plain
causal attention. In training mode a KV cache is filled (transformers passes one when config.use_cache is set) but
never continued: generate in eval mode.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from .. import compat
from ..errors import ConfigError
from ..registry import check_flag, check_int, check_number, register
from .base import AttentionMethod, PatchedForward


@dataclass
class S2Params:
    """Give one of `group_size_ratio` and `group_size` (neither: group_size_ratio=0.25, LongLoRA's default).

    Args:
        group_size_ratio: group size as a fraction 1/n of the training sequence length (1, 0.5, 0.25, 0.125, ...):
            G = L / n, so the length must be a multiple of 2n. Smaller is faster; 0.25 is what LongLoRA trains with.
        group_size: a fixed group size G in tokens (even); lengths must be multiples of G, and G >= L means plain
            causal attention.
        wrap: reproduce LongLoRA's rolled shifted groups, including their future leak (for comparison only).
    """

    group_size_ratio: float | None = None
    group_size: int | None = None
    wrap: bool = False

    def __post_init__(self):
        if self.group_size is not None:
            if self.group_size_ratio is not None:
                raise ConfigError("give group_size_ratio or group_size, not both")
            self.group_size = check_int("group_size", self.group_size, ge=2)
            if self.group_size % 2:
                raise ConfigError(f"group_size must be even (the shift is half a group), got {self.group_size}")
        else:
            r = check_number("group_size_ratio", 0.25 if self.group_size_ratio is None else self.group_size_ratio,
                             gt=0)
            n = round(1 / r)
            if r > 1 or not math.isclose(n * r, 1.0, rel_tol=1e-9):
                raise ConfigError(f"group_size_ratio must be 1/n for a whole number n (1, 0.5, 0.25, 0.125, ...) so "
                                  f"that groups tile the sequence; got {r}")
            self.group_size_ratio = r
        self.wrap = check_flag("wrap", self.wrap)

    def group_for(self, seq_len: int) -> int | None:
        """The group size for a sequence of `seq_len` tokens, or None when one group covers it (plain causal)."""
        if self.group_size is not None:
            if self.group_size >= seq_len:
                return None
            if seq_len % self.group_size:
                raise ConfigError(f"s2-attn: seq_len {seq_len} is not a multiple of group_size {self.group_size}; "
                                  "pad or pack training sequences to a multiple of it.")
            return self.group_size
        n = round(1 / self.group_size_ratio)
        if n == 1:
            return None
        if seq_len % (2 * n):
            raise ConfigError(f"s2-attn: seq_len {seq_len} with group_size_ratio {self.group_size_ratio} does not give "
                              f"an even group size (seq_len * ratio = {seq_len * self.group_size_ratio:g}); pad or "
                              f"pack training sequences to a multiple of {2 * n}.")
        return seq_len // n


class _S2Forward(PatchedForward):
    """A `PatchedForward` that also hands the decoder's (cos, sin) to `attend`, so eval mode is the stock forward."""

    def __call__(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        cache = compat.take_cache(kwargs, self.name)
        position_ids = kwargs.pop("position_ids", None)
        compat.check_unhandled(kwargs, self.name)
        return self.impl.attend(self, self.module, hidden_states, attention_mask, cache, position_ids,
                                position_embeddings), None


class _Expanded:
    """What the eager/sdpa interfaces read from the module, for key/value heads already expanded to query heads."""

    num_key_value_groups = 1
    is_causal = True

    def __init__(self, attn):
        self.training, self.config = attn.training, attn.config


class S2Attention(AttentionMethod):
    def apply(self, params, ctx, patcher) -> None:
        shared = {}  # the window masks of the current forward, built by the first layer and reused by the others
        for attn in ctx.attention_modules:
            patcher.set(attn, "forward", _S2Forward(self.name, self, params, attn, ctx.backbone, shared))

    def attend(self, fwd, attn, hidden_states, attention_mask, cache, position_ids, position_embeddings=None):
        if position_embeddings is None:  # called through a plain PatchedForward: the decoder's own rotation
            position_embeddings = fwd.backbone.rotary_emb(hidden_states, position_ids)
        if not attn.training:
            return _stock(attn, hidden_states, position_embeddings, attention_mask, cache)
        masks = _masks_of_this_forward(fwd.extra, position_embeddings, attention_mask, position_ids)
        return _s2(attn, fwd.params, hidden_states, position_embeddings, attention_mask, cache, position_ids, masks)


def _masks_of_this_forward(shared: dict, position_embeddings, attention_mask, position_ids) -> dict:
    """The dict of window masks for this forward, shared by every layer.

    The decoder hands all layers the same (cos, sin), attention mask and position_ids objects, so one mask per
    window set serves every layer: built once, and saved once for backward instead of once per layer. The dict is
    emptied as soon as `cos` is freed (after backward), so nothing outlives the step.
    """
    cos = position_embeddings[0]
    key = (id(attention_mask), id(position_ids))
    owner = shared.get("owner")
    if owner is None or owner() is not cos or shared.get("key") != key:
        def release(ref):
            if shared.get("owner") is ref:
                shared.clear()

        shared.clear()
        shared.update(owner=weakref.ref(cos, release), key=key, masks={})
    return shared["masks"]


def _stock(attn, hidden_states, position_embeddings, attention_mask, cache):
    """`LlamaAttention.forward` of transformers 5, step for step (eager/sdpa)."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, attn.head_dim)
    q = attn.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    k = attn.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    v = attn.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    out, _ = interface(attn, q, k, v, attention_mask, dropout=0.0 if not attn.training else attn.attention_dropout,
                       scaling=attn.scaling)
    return attn.o_proj(out.reshape(*input_shape, -1).contiguous())


def _s2(attn, p: S2Params, x, position_embeddings, attention_mask, cache, position_ids, masks):
    B, L, _ = x.shape
    # (B, L, heads, d): token-major, so that a run of consecutive tokens is a plain reshape into groups
    q, k, v = (proj(x).view(B, L, -1, attn.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = apply_rotary_pos_emb(q, k, *position_embeddings, unsqueeze_dim=2)
    if cache is not None:  # transformers hands training a fresh cache when config.use_cache is set
        if cache.get_seq_length(attn.layer_idx) > 0:
            raise ConfigError("s2-attn: in training mode attention covers the whole input and cannot continue a "
                              "non-empty KV cache; call model.eval() to generate (S2-attn is off in eval mode).")
        cache.update(k.transpose(1, 2), v.transpose(1, 2), attn.layer_idx)
    G = p.group_for(L)
    ar = torch.arange(L, device=x.device)
    run = _Runner(attn, _doc_ids(position_ids, B, L), _check_mask(attention_mask, B, L), masks)
    if G is None:
        return attn.o_proj(run(q, k, v, ar[None], "all").reshape(B, L, -1))
    if p.wrap and run.mask is not None:
        if "checked" not in masks:
            _check_plain_causal(run.mask, run.docs, L)
            masks["checked"] = True
        run.mask = None  # it holds nothing beyond causality and documents, which the rolled groups apply
    H, rep, half, n = q.shape[2], attn.num_key_value_groups, G // 2, L // G
    hs = H // 2  # the shifted query heads are [hs, H)
    if hs % rep:  # a key/value head serves both halves: expand it (LongLoRA's repeat_kv), then split per query head
        k, v = (t.repeat_interleave(rep, dim=2) for t in (k, v))
        run.module, kv = _Expanded(attn), hs
    else:
        kv = hs // rep
    # NOTE: split / cat rather than slicing: their backward is one cat / views, where every slice's backward
    # would fill a zero tensor of the whole input and add into it (measured: a third of the step at 8K)
    (q1, qs), (k1, ks), (v1, vs) = (t.split([h, t.shape[2] - h], dim=2) for t, h in ((q, hs), (k, kv), (v, kv)))
    parts = [run(q1, k1, v1, ar.view(n, G), "groups")] if hs > 0 else []  # unshifted heads: [kG, (k+1)G)
    if p.wrap:  # LongLoRA: roll by -G/2, group, roll the output back (leaks, see the module docstring)
        out = run(*(t.roll(-half, dims=1) for t in (qs, ks, vs)), ar.roll(-half).view(n, G), "rolled")
        parts.append(out.roll(half, dims=1))
    else:
        # the head piece [0, G/2), the full shifted groups [G/2 + kG, G/2 + (k+1)G), the tail piece [L - G/2, L)
        pieces = zip(*(t.split([half, L - G, half], dim=1) for t in (qs, ks, vs)))
        windows = ((ar[:half][None], "head"), (ar[half:L - half].view(n - 1, G), "shifted"),
                   (ar[L - half:][None], "tail"))
        parts.append(torch.cat([run(*qkv, idx, name) for qkv, (idx, name) in zip(pieces, windows)], dim=1))
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return attn.o_proj(out.reshape(B, L, -1))


class _Runner:
    """Causal attention inside windows of tokens, each window one batch element of a single eager/sdpa call.

    `docs` (B, L) document ids or None (one document per row); `mask` the model's 4D mask (B or 1, 1, L, L) or None;
    `masks` the per-forward dict where each window set's additive mask is kept for the next layers.
    """

    def __init__(self, attn, docs, mask, masks):
        self.attn, self.module, self.docs, self.mask, self.masks = attn, attn, docs, mask, masks
        impl = attn.config._attn_implementation
        self.interface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        self.explicit_causal = impl != "sdpa"  # eager has no is_causal: it needs the triangle as a mask

    def __call__(self, q, k, v, idx, name):
        """q, k, v (B, m*s, heads, d) hold the tokens `idx` (m, s) window by window (the window set `name`);
        returns (B, m*s, heads, d)."""
        B = q.shape[0]
        m, s = idx.shape
        qw, kw, vw = (t.reshape(B * m, s, *t.shape[2:]).transpose(1, 2) for t in (q, k, v))
        if (name, q.dtype) not in self.masks:
            self.masks[name, q.dtype] = self.bias(idx, B, q.dtype)
        out, _ = self.interface(self.module, qw, kw, vw, self.masks[name, q.dtype],
                                dropout=self.attn.attention_dropout, scaling=self.attn.scaling)
        return out.reshape(B, m * s, *out.shape[2:])

    def bias(self, idx, B, dtype):
        """Additive float mask (B*m | 1, 1, s, s) for the windows `idx`, or None for sdpa's own causal kernel."""
        m, s = idx.shape
        if self.docs is None and self.mask is None and not self.explicit_causal:
            return None
        allowed = torch.ones(s, s, dtype=torch.bool, device=idx.device).tril()[None, None]
        if self.docs is not None:
            dw = self.docs[:, idx]  # (B, m, s)
            allowed = allowed & (dw[..., :, None] == dw[..., None, :])
        block = None
        if self.mask is not None:  # the model's mask on the window's own (query, key) pairs: (B | 1, m, s, s)
            block = self.mask[:, 0][:, idx[:, :, None], idx[:, None, :]]
            if block.dtype == torch.bool:
                allowed, block = allowed & block, None
        # NOTE: finfo.min (not -inf), as transformers does: a fully masked row (padding) stays finite
        low = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=idx.device)
        bias = torch.where(allowed, torch.zeros((), dtype=dtype, device=idx.device) if block is None
                           else block.to(dtype), low)
        if bias.shape[0] == 1 and bias.shape[1] == 1:
            return bias  # (1, 1, s, s): the same triangle for every window
        return bias.expand(B, m, s, s).reshape(B * m, 1, s, s)


def _doc_ids(position_ids, B, L):
    """(B, L) document index per token (a document starts where position_ids[t] != position_ids[t-1] + 1), or None
    when every row is one document."""
    if position_ids is None:
        return None
    pos = position_ids.expand(B, L)
    starts = pos[:, 1:] != pos[:, :-1] + 1
    if not bool(starts.any()):
        return None
    return torch.cat([torch.zeros_like(pos[:, :1]), starts.long().cumsum(-1)], dim=1)


def _check_mask(mask, B, L):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, B) \
            or tuple(mask.shape[-2:]) != (L, L):
        raise ConfigError(f"s2-attn: the attention module received a mask of shape "
                          f"{tuple(getattr(mask, 'shape', ()))} ({type(mask).__name__}); it needs a 4D tensor "
                          f"({B} or 1, 1, {L}, {L}) as transformers builds from a 2D padding mask, or none.")
    return mask


def _check_plain_causal(mask, docs, L):
    """wrap=True regroups tokens out of order; refuse any mask that says more than "causal, within documents"."""
    t = torch.arange(L, device=mask.device)
    want = (t[None, :] <= t[:, None])[None, None]
    if docs is not None:
        want = want & (docs[:, :, None] == docs[:, None, :])[:, None]
    given = mask if mask.dtype == torch.bool else mask == 0
    if not torch.equal(*torch.broadcast_tensors(given, want)):
        raise ConfigError("s2-attn: wrap=True (LongLoRA's rolled groups, for comparison) does not support padding "
                          "or custom attention masks; pass no attention_mask (documents are taken from "
                          "position_ids) or use wrap=False.")


register("s2-attn", "attention", S2Params, S2Attention(),
         "S2-attn (LongLoRA), training mode only: causal attention in groups of L * group_size_ratio (0.25 unless "
         "group_size is given), half the heads shifted by half a group")
