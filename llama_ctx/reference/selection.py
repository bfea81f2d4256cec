"""Dense reference of the token-selection methods ("topk", "block-topk").

One unpadded row at positions 0..L-1, in float64: explicit capped relative positions r(i, j) = min(i - j, W),
q rotated at every r in 0..W with explicitly computed angles, k at 0, selection from explicitly computed scores,
a visibility mask built query by query, and a full softmax. Written from the definitions in
`llama_ctx.attention.selection`'s docstring, independently of its code; used by the tests and `llama-ctx check`.
"""

import copy
import types

import torch


def rotate(x, pos, inv_freq, scaling):
    """x rotated at integer position `pos`: pairs (x[m], x[m + d/2]) turned by pos * inv_freq[m]."""
    angle = pos * inv_freq.double()
    cos, sin = angle.cos() * scaling, angle.sin() * scaling
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def visible_keys(method, p, i, group_q_far, k0):
    """Key indices query i sees (one KV head): sinks, window, selection (or all of them for method 'full')."""
    W, s = p["local_window"], p.get("sink_tokens", 0)
    if method == "full":
        return set(range(i + 1))
    seen = set(range(min(s, i + 1))) | set(range(max(0, i - W + 1), i + 1))
    if method == "topk":
        cands = list(range(s, i - W + 1))
        scores = torch.stack([group_q_far @ k0[j] for j in cands]) if cands else torch.zeros(0)
        seen |= {cands[n] for n in scores.topk(min(p["k"], len(cands))).indices.tolist()}
    else:
        bs = p["block_size"]
        done = max(0, i - W + 1) // bs  # blocks entirely left of the window
        scores = torch.stack([group_q_far @ k0[b * bs:(b + 1) * bs].mean(0) for b in range(done)]) \
            if done else torch.zeros(0)
        for b in scores.topk(min(p["k_blocks"], done)).indices.tolist():
            seen |= set(range(b * bs, (b + 1) * bs))
        seen |= set(range(done * bs, i - W + 1))  # remainder: not yet in a complete block
    return seen


def reference_forward(method, p, inv_freq, scaling):
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kw):
        (_, L, _), d = hidden_states.shape, self.head_dim
        x = hidden_states[0].double()
        proj = lambda lin: (x @ lin.weight.double().T).view(L, -1, d).transpose(0, 1)  # noqa: E731
        q, k, v = proj(self.q_proj), proj(self.k_proj), proj(self.v_proj)
        g, W = q.shape[0] // k.shape[0], p["local_window"]
        pos = torch.arange(L)
        rel = (pos[:, None] - pos[None, :]).clamp(max=W)  # capped relative position matrix
        q_at = torch.stack([rotate(q, r, inv_freq, scaling) for r in range(W + 1)])  # (W+1, H, L, d)
        k0 = rotate(k, 0, inv_freq, scaling)
        out = torch.zeros_like(q)
        for h in range(q.shape[0]):
            c = h // g
            for i in range(L):
                group_q_far = q_at[W, c * g:(c + 1) * g, i].sum(0)
                seen = sorted(visible_keys(method, p, i, group_q_far, k0[c]))
                scores = torch.stack([q_at[rel[i, j], h, i] @ k0[c, j] for j in seen]) * d ** -0.5
                out[h, i] = torch.softmax(scores, 0) @ v[c, seen]
        out = out.transpose(0, 1).reshape(1, L, -1).to(hidden_states.dtype)
        return self.o_proj(out), None

    return forward


def reference_logits(model, x, method, p, rope_model=None):
    """Logits of a copy of the stock `model` whose attention is the dense reference above."""
    ref = copy.deepcopy(model)
    rotary = (rope_model or model).model.rotary_emb
    fn = reference_forward(method, p, rotary.inv_freq.double(), float(rotary.attention_scaling))
    for layer in ref.model.layers:
        layer.self_attn.forward = types.MethodType(fn, layer.self_attn)
    with torch.no_grad():
        return ref(x).logits
