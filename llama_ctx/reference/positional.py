"""Dense reference of the position-rewriting methods (ReRoPE, Leaky ReRoPE, Self-Extend, Λ-shaped attention).

For every row it builds the explicit relative-position matrix and visibility mask of the method (the table in
docs/attention.md), rotates each query by its relative position to each key (complex form: pair k of a head is
x_k + i x_{k+d/2}, rotated by exp(i * rel * theta_k)), and takes a full softmax in float64. `dense_reference`
puts it in place of every attention module's forward for the duration of one model call. Written from the
definitions, independently of `llama_ctx.attention.engine`; used by the tests and by `llama-ctx check`.
"""

import contextlib
import math

import torch
from transformers.models.llama.modeling_llama import repeat_kv

from . import attention_replaced

TRAINED = 64  # default training length of the tiny test models (max_position_embeddings)


def position_matrix(method, p, pos):
    """(rel (L, L) float, visible (L, L) bool) for one row of positions `pos` (L,), from the table in the docs."""
    i, j = pos[:, None].double(), pos[None, :].double()
    rel = i - j
    w = p.get("window", p.get("local_window"))
    if method in ("rerope", "lambda"):
        outer = torch.full_like(rel, w)
    elif method == "leaky-rerope":
        outer = w + (rel - w) / p["factor"]
    else:
        g = p["group_size"]
        outer = torch.floor(i / g) - torch.floor(j / g) + w - w // g
    visible = j <= i
    if method == "lambda":
        visible &= (rel < w) | (j < p["global_tokens"])
    return torch.where(rel < w, rel, outer), visible


def dense_attention(attn, hidden, pos, key_real, method, p, inv_freq, scaling):
    """Attention of one layer from its own projections: explicit positions, full softmax. pos (B, L)."""
    B, L, _ = hidden.shape
    d = attn.head_dim
    q = attn.q_proj(hidden).view(B, L, -1, d).transpose(1, 2).double()
    k = repeat_kv(attn.k_proj(hidden).view(B, L, -1, d).transpose(1, 2), attn.num_key_value_groups).double()
    v = repeat_kv(attn.v_proj(hidden).view(B, L, -1, d).transpose(1, 2), attn.num_key_value_groups).double()
    if method in ("rerope", "leaky-rerope") and p.get("log_scale", True):
        T = p.get("training_length", TRAINED)
        q = q * torch.clamp(torch.log(pos.double() + 1) / math.log(T), min=1)[:, None, :, None]
    zq = torch.complex(q[..., : d // 2], q[..., d // 2:])
    zk = torch.complex(k[..., : d // 2], k[..., d // 2:])
    out = torch.empty_like(q)
    for b in range(B):
        rel, visible = position_matrix(method, p, pos[b])
        visible = visible & key_real[b][None, :]
        turn = torch.polar(torch.ones(()).double(), rel[..., None] * inv_freq.double())  # (L, L, d/2)
        scores = (zq[b][:, :, None] * zk[b][:, None].conj() * turn).real.sum(-1) * scaling**2 * attn.scaling
        scores = scores.masked_fill(~visible, -torch.inf)
        out[b] = torch.softmax(scores, dim=-1).nan_to_num() @ v[b]
    return attn.o_proj(out.transpose(1, 2).reshape(B, L, -1).float())


@contextlib.contextmanager
def dense_reference(model, method, p, key_real, inv_freq, scaling=1.0):
    """Every attention module of `model` computes `dense_attention` while inside."""
    def forward(attn, hidden_states, position_embeddings=None, attention_mask=None, **kw):
        return dense_attention(attn, hidden_states, kw["position_ids"], key_real, method, p, inv_freq, scaling), None

    with attention_replaced(model, forward):
        yield model


def default_inv_freq(d=16, base=10000.0):
    return torch.tensor([base ** (-2 * i / d) for i in range(d // 2)])
