"""Dense reference of the additive-bias position methods ("alibi", "t5-bias").

Written from the papers, independently of `llama_ctx.encodings`: ALiBi's slopes by the recursive code published with
the paper (ofirpress/attention_with_linear_biases), T5's buckets by transformers' own
`T5Attention._relative_position_bucket`. `alibi_bias` and `t5_bias` build the explicit `[heads, L, L]` bias matrix
of each row from its positions; `reference.encodings.dense_logits(..., bias=...)` adds them to the scores of a whole
LLaMA forward written out in float64. That forward runs without autograd, so `dense_reference` here also puts a
dense attention (q k^T / sqrt(d) of the unrotated projections + bias, causal and padding mask, full float64
softmax) in place of every attention module for one model call, with the graph kept: the tests compare the
gradient that reaches the T5 table with it.
"""

import contextlib
import math

import torch
from transformers.models.llama.modeling_llama import repeat_kv
from transformers.models.t5.modeling_t5 import T5Attention

from . import attention_replaced


def alibi_slopes(n: int, max_bias: float = 8.0) -> list[float]:
    """The paper's `get_slopes`, with its 8 as `max_bias`: a geometric sequence starting at 2^(-max_bias/n) with
    that ratio for a power of two; otherwise the closest lower power of two and every other slope of twice that."""
    def power_of_2(n):
        start = 2 ** (-max_bias / n)
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + alibi_slopes(2 * closest, max_bias)[0::2][: n - closest]


def alibi_bias(pos: torch.Tensor, num_heads: int, max_bias: float = 8.0) -> torch.Tensor:
    """`[..., heads, L, L]` float64: bias[h, i, j] = -m_h * (pos_i - pos_j) for positions `pos` `[..., L]`."""
    m = torch.tensor(alibi_slopes(num_heads, max_bias), dtype=torch.float64)
    rel = pos[..., :, None].double() - pos[..., None, :].double()
    return -m[:, None, None] * rel[..., None, :, :]


def t5_bias(pos: torch.Tensor, table: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """`[..., heads, L, L]` float64: bias[h, i, j] = table[bucket(pos_j - pos_i), h] with T5's causal buckets, for
    positions `pos` `[..., L]`; gradients reach `table` (`[num_buckets, heads]`)."""
    relative = pos[..., None, :].long() - pos[..., :, None].long()  # memory position - query position, T5's sign
    bucket = T5Attention._relative_position_bucket(relative, bidirectional=False, num_buckets=num_buckets,
                                                   max_distance=max_distance)
    return table.double()[bucket].movedim(-1, -3)


def dense_attention(attn, hidden, pos, key_real, bias_of):
    """Attention of one layer from its own projections, no rotation: q k^T * scaling + bias, full softmax.

    pos (B, L) positions; key_real (B, L) bool, False for padding; bias_of(pos row) -> [heads, L, L].
    """
    B, L, _ = hidden.shape
    d = attn.head_dim
    q = attn.q_proj(hidden).view(B, L, -1, d).transpose(1, 2).double()
    k = repeat_kv(attn.k_proj(hidden).view(B, L, -1, d).transpose(1, 2), attn.num_key_value_groups).double()
    v = repeat_kv(attn.v_proj(hidden).view(B, L, -1, d).transpose(1, 2), attn.num_key_value_groups).double()
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    out = []
    for b in range(B):
        scores = q[b] @ k[b].transpose(-1, -2) * attn.scaling + bias_of(pos[b])  # (H, L, L)
        scores = scores.masked_fill(~(causal & key_real[b][None, :]), -torch.inf)
        out.append(torch.softmax(scores, dim=-1).nan_to_num() @ v[b])  # padding query rows: zeros
    out = torch.stack(out)
    return attn.o_proj(out.transpose(1, 2).reshape(B, L, -1).to(hidden.dtype))


@contextlib.contextmanager
def dense_reference(model, key_real, bias_of):
    """Every attention module of the stock `model` computes `dense_attention` with `bias_of` while inside; call the
    model with explicit `position_ids`."""
    def forward(attn, hidden_states, position_embeddings=None, attention_mask=None, **kw):
        return dense_attention(attn, hidden_states, kw["position_ids"].expand(hidden_states.shape[0], -1),
                               key_real, bias_of), None

    with attention_replaced(model, forward):
        yield model
