"""Dense reference of a LLaMA forward with a position encoding written in explicitly (float64).

`dense_logits` re-implements the whole causal LM from its weights, not through transformers' modules: embedding
lookup, then per layer RMSNorm, q/k/v projections, grouped heads, scores q.k / sqrt(d) plus an optional additive
bias matrix, causal (and padding) mask, full softmax, output projection, residual, SwiGLU MLP; final norm and
output layer. The encoding enters where its definition puts it: `encode(embeddings, positions)` on the input
embeddings, `bias(positions)` on the attention scores, or RoPE (`rope=True`, to check this reference against the
stock model). Nothing here touches a patched forward, so the tests compare the patch methods against it; the
per-method encodings below are written from their formulas (math.sin/math.cos loops, explicit recurrences).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _w(linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    b = linear.bias
    return linear.weight.detach().double(), (b.detach().double() if b is not None else None)


def _lin(x, linear):
    w, b = _w(linear)
    return F.linear(x, w, b)


def _rms(x, norm, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight.detach().double()


@torch.no_grad()
def dense_logits(model, input_ids, position_ids=None, *, encode=None, bias=None, attention_mask=None,
                 rope: bool = False) -> torch.Tensor:
    """Float64 logits `[B, L, vocab]` of a `LlamaForCausalLM` with the given encoding.

    Args:
        input_ids: `[B, L]`.
        position_ids: `[B, L]` (default 0..L-1 for every row).
        encode: `(embeddings [B, L, H] float64, positions [B, L]) -> embeddings`, applied to the input embeddings.
        bias: `(positions [B, L]) -> [B or 1, heads, L, L]` added to the attention scores before the softmax.
        attention_mask: `[B, L]`, 0 where a key is padding.
        rope: rotate q and k with the model's default RoPE (rope_theta, all of head_dim), computed here in float64.
    """
    cfg = model.config
    if cfg.hidden_act != "silu":
        raise ValueError(f"dense_logits writes out LLaMA's SwiGLU MLP; this model uses {cfg.hidden_act!r}")
    B, L = input_ids.shape
    pos = torch.arange(L)[None].expand(B, L) if position_ids is None else position_ids.expand(B, L)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    eps = cfg.rms_norm_eps
    backbone = model.model
    x = backbone.embed_tokens.weight.detach().double()[input_ids]
    if encode is not None:
        x = encode(x, pos)
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None, None].expand(B, 1, L, L)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    extra = bias(pos).double() if bias is not None else 0.0
    if rope:
        theta = float(cfg.rope_parameters["rope_theta"])
        angle = pos.double()[..., None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [B, L, d/2]
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    for layer in backbone.layers:
        attn, h = layer.self_attn, _rms(x, layer.input_layernorm, eps)
        q = _lin(h, attn.q_proj).view(B, L, heads, d).transpose(1, 2)
        k = _lin(h, attn.k_proj).view(B, L, kv, d).transpose(1, 2).repeat_interleave(heads // kv, dim=1)
        v = _lin(h, attn.v_proj).view(B, L, kv, d).transpose(1, 2).repeat_interleave(heads // kv, dim=1)
        if rope:  # pair i is (x_i, x_{i + d/2}), rotated by pos * theta_i
            q, k = (torch.cat([t[..., : d // 2] * cos - t[..., d // 2:] * sin,
                               t[..., : d // 2] * sin + t[..., d // 2:] * cos], -1) for t in (q, k))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + extra
        scores = scores.masked_fill(~allowed, -math.inf)
        out = torch.softmax(scores, -1).nan_to_num() @ v  # a fully padded query row gives 0, not NaN
        x = x + _lin(out.transpose(1, 2).reshape(B, L, heads * d), attn.o_proj)
        h = _rms(x, layer.post_attention_layernorm, eps)
        x = x + _lin(F.silu(_lin(h, layer.mlp.gate_proj)) * _lin(h, layer.mlp.up_proj), layer.mlp.down_proj)
    return _lin(_rms(x, backbone.norm, eps), model.lm_head)


# ---- the encodings, from their formulas ---------------------------------------------------------------------------


def sinusoidal_row(pos: int, dim: int, base: float = 10000.0) -> list[float]:
    """PE(pos, 2i) = sin(pos / base^(2i/dim)), PE(pos, 2i+1) = cos(pos / base^(2i/dim)), one position, in Python."""
    row = []
    for i in range(dim // 2):
        angle = pos / base ** (2 * i / dim)
        row += [math.sin(angle), math.cos(angle)]
    return row


def sinusoidal_at(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """`[*positions.shape, dim]` float64 table built row by row with `sinusoidal_row`."""
    flat = [sinusoidal_row(int(p), dim, base) for p in positions.reshape(-1)]
    return torch.tensor(flat, dtype=torch.float64).reshape(*positions.shape, dim)


def added(table_at):
    """`encode` for an additive encoding: embeddings + table_at(positions)."""
    return lambda x, pos: x + table_at(pos)


def multiplied(table_at):
    """`encode` for a multiplicative encoding: embeddings * (1 + table_at(positions))."""
    return lambda x, pos: x * (1 + table_at(pos))


def recurrent_positions(module, n: int) -> torch.Tensor:
    """p_0 .. p_{n-1} `[n, H]` float64 of p_{k+1} = p_k + W2 tanh(W1 p_k + b1) + b2, one matrix-vector step at a time
    from the parameters of a `recursive` method's module."""
    w1, b1, w2, b2 = (t.detach().double() for t in (module.w1, module.b1, module.w2, module.b2))
    rows = [module.start.detach().double()]
    for _ in range(n - 1):
        p = rows[-1]
        rows.append(p + torch.mv(w2, torch.tanh(torch.mv(w1, p) + b1)) + b2)
    return torch.stack(rows)
