"""Dense reference of Dual Chunk Attention (An et al. 2024, ChunkLlama), written from the definition.

With chunk length s = chunk_size - local_window, every key j sits at position j mod s; a query i sits at
i mod s for keys of its own chunk (i // s == j // s), at min(i mod s + s, chunk_size) for keys of the previous
chunk and at chunk_size for keys of older chunks. This module builds those explicit (L, L) position matrices per
row, rotates each query by its relative position to each key (complex form: pair k of a head is
x_k + i x_{k+d/2}, rotated by exp(i * rel * theta_k)) and takes a full softmax in float64. It shares no code with
`llama_ctx.attention.engine`.
"""

import contextlib

import torch

from . import attention_replaced


def dca_positions(pos: torch.Tensor, chunk_size: int, local_window: int):
    """(query positions, key positions, visible) as (L, L) matrices for one row of integer positions `pos` (L,)."""
    s = chunk_size - local_window
    i, j = pos.long()[:, None], pos.long()[None, :]
    same, previous = i // s == j // s, i // s - 1 == j // s
    key = (j % s).expand(len(pos), -1)
    query = torch.where(same, i % s, torch.where(previous, torch.clamp(i % s + s, max=chunk_size), chunk_size))
    return query, key, j <= i


def dca_attention(attn, hidden, pos, key_real, chunk_size, local_window, inv_freq, scaling=1.0):
    """One attention layer (its own projections) under DCA: explicit positions, full softmax, float64.

    Args:
        attn: a LLaMA attention module (q/k/v/o projections, head_dim, scaling, num_key_value_groups).
        hidden: (B, L, hidden) input; pos: (B, L) positions; key_real: (B, L) bool, False for padding.
        inv_freq: (head_dim / 2,) rotary frequencies; scaling: rotary attention scaling (applied to q and k).
    Returns:
        (B, L, hidden), in the dtype of `hidden`.
    """
    B, L, _ = hidden.shape
    d = attn.head_dim
    q = attn.q_proj(hidden).view(B, L, -1, d).transpose(1, 2).double()
    k = attn.k_proj(hidden).view(B, L, -1, d).transpose(1, 2).double()
    v = attn.v_proj(hidden).view(B, L, -1, d).transpose(1, 2).double()
    k, v = (t.repeat_interleave(attn.num_key_value_groups, dim=1) for t in (k, v))
    zq = torch.complex(q[..., : d // 2], q[..., d // 2:])
    zk = torch.complex(k[..., : d // 2], k[..., d // 2:])
    out = torch.empty_like(q)
    for b in range(B):
        query, key, visible = dca_positions(pos[b], chunk_size, local_window)
        visible = visible & key_real[b][None, :]
        rel = (query - key).double()
        turn = torch.polar(torch.ones(()).double(), rel[..., None] * inv_freq.double())  # (L, L, d/2)
        scores = (zq[b][:, :, None] * zk[b][:, None].conj() * turn).real.sum(-1) * scaling**2 * attn.scaling
        scores = scores.masked_fill(~visible, -torch.inf)
        out[b] = torch.softmax(scores, dim=-1).nan_to_num() @ v[b]
    return attn.o_proj(out.transpose(1, 2).reshape(B, L, -1).to(hidden.dtype))


@contextlib.contextmanager
def dca_reference(model, chunk_size, local_window, key_real, inv_freq, scaling=1.0):
    """Every attention module of `model` computes `dca_attention` while inside (the model must be unpatched)."""
    def forward(attn, hidden_states, position_embeddings=None, attention_mask=None, **kw):
        out = dca_attention(attn, hidden_states, kw["position_ids"], key_real, chunk_size, local_window, inv_freq,
                            scaling)
        return out, None

    with attention_replaced(model, forward):
        yield model
