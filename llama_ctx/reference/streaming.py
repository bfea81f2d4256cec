"""Dense reference of "streaming" (StreamingLLM: attention sinks + window, positions by place in the cache).

Logits of one row of real tokens, each query t attending to its explicit kept set {r < sinks} ∪ {t - window <= r
<= t}, keys at their place in that set and the query at the last place, full softmax, layer by layer. Written from
the rule in `llama_ctx.attention.streaming`'s docstring; used by the tests and by `llama-ctx check`.
"""

import math

import torch

S, W = 4, 16  # default sinks and window of the tiny test models


def default_rope(model):
    d = model.config.hidden_size // model.config.num_attention_heads
    return 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d), 1.0


def rotate(x, pos, inv_freq, scale):
    """x [..., d] rotated at integer position `pos` (pairs i and i + d/2 turn by pos * inv_freq[i])."""
    ang = pos * inv_freq.double()
    cos, sin = torch.cat([ang.cos(), ang.cos()]) * scale, torch.cat([ang.sin(), ang.sin()]) * scale
    x1, x2 = x.double().chunk(2, dim=-1)
    return (x.double() * cos + torch.cat([-x2, x1], dim=-1) * sin).float()


@torch.no_grad()
def dense_reference(model, tokens, sinks=S, window=W, rope=None):
    """Logits [T, vocab] of one row of real tokens, each query t attending to its explicit kept set
    {r < sinks} ∪ {t - window <= r <= t}, keys at their place in that set and the query at the last place."""
    inv_freq, scale = rope or default_rope(model)
    m, T = model.model, len(tokens)
    hq, hkv = model.config.num_attention_heads, model.config.num_key_value_heads
    h = m.embed_tokens(tokens)
    for layer in m.layers:
        a = layer.self_attn
        x = layer.input_layernorm(h)
        d = a.head_dim
        q, k, v = a.q_proj(x).view(T, hq, d), a.k_proj(x).view(T, hkv, d), a.v_proj(x).view(T, hkv, d)
        out = torch.zeros(T, hq, d)
        for t in range(T):
            kept = [r for r in range(t + 1) if r < sinks or r >= t - window]
            keys = torch.stack([rotate(k[r], place, inv_freq, scale) for place, r in enumerate(kept)])
            keys, vals = keys.repeat_interleave(hq // hkv, dim=1), v[kept].repeat_interleave(hq // hkv, dim=1)
            qt = rotate(q[t], len(kept) - 1, inv_freq, scale)  # [hq, d]
            scores = torch.einsum("hd,khd->hk", qt, keys) / math.sqrt(d)
            out[t] = torch.einsum("hk,khd->hd", scores.softmax(-1), vals)
        h = h + a.o_proj(out.reshape(T, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(m.norm(h))
