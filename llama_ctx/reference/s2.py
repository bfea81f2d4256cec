"""Dense reference of S2-attn (shifted sparse attention, LongLoRA; Chen et al. 2023).

Written from the definition, independently of `llama_ctx.attention.s2`: one explicit L x L visibility matrix per
head, a full softmax in float64. With group size G and tokens t = 0..L-1:

* unshifted heads: t belongs to group  t // G;
* shifted heads (no wrap): t belongs to group (t + G/2) // G, i.e. [0, G/2), [G/2, 3G/2), ..., [L - G/2, L);
* shifted heads, `wrap=True` (LongLoRA's `torch.roll(-G/2)`): t sits at slot s = (t - G/2) mod L of the rolled
  sequence, belongs to group s // G and is ordered by s, so the last group is [L - G/2, L) followed by [0, G/2)
  and tokens 0..G/2-1 see the last G/2 tokens (the future leak of LongLoRA issues #15 / #90).

A query sees a key iff both are in the same group and the key comes first (by t; with `wrap`, by s), and, when
`doc_ids` is given, both belong to the same document. With G >= L every head is plain causal attention.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from . import attention_replaced


def s2_visibility(length: int, group: int, shifted: bool, wrap: bool = False) -> torch.Tensor:
    """(L, L) bool: may query i see key j, for one head (before documents and padding)."""
    t = torch.arange(length)
    i, j = t[:, None], t[None, :]
    if group >= length:
        return j <= i
    if not shifted:
        return (i // group == j // group) & (j <= i)
    half = group // 2
    if not wrap:
        return ((i + half) // group == (j + half) // group) & (j <= i)
    s = (t - half) % length  # slot of token t in the rolled sequence
    si, sj = s[:, None], s[None, :]
    return (si // group == sj // group) & (sj <= si)


def s2_attention_reference(q, k, v, group: int, shifted_heads=None, doc_ids=None, wrap: bool = False,
                           mask=None, scaling: float | None = None) -> torch.Tensor:
    """S2-attn by its definition, in float64.

    Args:
        q, k, v: (B, H, L, d), rotated, key/value heads already expanded to the H query heads.
        group: group size G (even when G < L).
        shifted_heads: the heads whose groups are shifted by G/2: a list of head indices or an (H,) bool tensor;
            default: the second half, heads h >= H // 2 (LongLoRA).
        doc_ids: (B, L) document of each token, or None (one document per row).
        wrap: LongLoRA's rolled grouping instead of the causal one.
        mask: (B, L, L) bool, further pairs (query, key) allowed (e.g. key padding), or None.
        scaling: score scale, default d ** -0.5.

    Returns:
        (B, H, L, d) float64.
    """
    B, H, L, d = q.shape
    if shifted_heads is None:
        shifted_heads = torch.arange(H) >= H // 2
    elif not isinstance(shifted_heads, torch.Tensor) or shifted_heads.dtype != torch.bool:
        shifted_heads = torch.isin(torch.arange(H), torch.as_tensor(list(shifted_heads), dtype=torch.long))
    visible = torch.stack([s2_visibility(L, group, bool(s), wrap) for s in shifted_heads])  # (H, L, L)
    visible = visible[None].expand(B, H, L, L)
    if doc_ids is not None:
        visible = visible & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    if mask is not None:
        visible = visible & mask[:, None]
    scale = d ** -0.5 if scaling is None else scaling
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, -torch.inf)
    return torch.softmax(scores, dim=-1).nan_to_num() @ v.double()


def doc_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) document index of each token: a new document starts wherever position_ids[t] != position_ids[t-1] + 1."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(-1)


def dense_attention(attn, hidden, position_embeddings, position_ids, group, wrap=False, mask=None):
    """One attention layer from its own projections with `s2_attention_reference` (documents from position_ids)."""
    B, L, _ = hidden.shape
    d = attn.head_dim
    q = attn.q_proj(hidden).view(B, L, -1, d).transpose(1, 2)
    k = attn.k_proj(hidden).view(B, L, -1, d).transpose(1, 2)
    v = attn.v_proj(hidden).view(B, L, -1, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
    k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
    docs = doc_ids_from_positions(position_ids.expand(B, L))
    out = s2_attention_reference(q, k, v, group, doc_ids=docs, wrap=wrap, mask=mask, scaling=attn.scaling)
    return attn.o_proj(out.transpose(1, 2).reshape(B, L, -1).to(hidden.dtype))


@contextlib.contextmanager
def dense_reference(model, group, wrap=False, mask=None):
    """Inside, every attention module of `model` (a stock, unpatched LLaMA) computes `dense_attention`."""
    def forward(attn, hidden_states, position_embeddings=None, attention_mask=None, **kw):
        return dense_attention(attn, hidden_states, position_embeddings, kw["position_ids"], group, wrap, mask), None

    with attention_replaced(model, forward):
        yield model
