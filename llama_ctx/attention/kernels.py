"""The attention kernels of the position-rewriting engine: each returns (output, float32 log-sum-exp), so partial
softmaxes over disjoint key sets can be merged (`merge`), as in flash attention."""

from __future__ import annotations

import functools
import math

import torch

# NOTE: torch's CPU flash-attention kernel also returns the log-sum-exp, which the merge needs; the public
# `scaled_dot_product_attention` does not. It is a private op, so it is used only after `flash_cpu_ok` has
# checked it against `attend_dense` on a tiny GQA input; elsewhere (other devices, a torch where the op is
# missing or behaves differently, or when gradients are needed) `attend_dense` computes the same two tensors
# with plain matmuls.
FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend(q, k, v, bias, scale, causal=False):
    """Softmax attention of q (B, H, C, d) over k, v (B, Hkv, K, d): (output, float32 log-sum-exp (B, H, C)).
    `causal`: query c sees keys <= c only (top-left aligned)."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if use_flash(q, needs_grad):
        return FLASH_CPU(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)[:2]
    return attend_dense(q, k, v, bias, scale, causal)


def use_flash(q, needs_grad: bool) -> bool:
    """Whether `attend` uses the fused CPU kernel (memory linear in the keys) rather than plain matmuls."""
    return (not needs_grad and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
            and flash_cpu_ok())


@functools.cache
def flash_cpu_ok() -> bool:
    """Whether the private CPU flash op exists here and agrees with `attend_dense` (output and log-sum-exp)."""
    if FLASH_CPU is None:
        return False
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 5, 8, generator=g) for h in (4, 2, 2))
    bias = torch.where(torch.rand(1, 1, 5, 5, generator=g) < 0.3, torch.finfo(torch.float32).min, 0.0)
    try:
        with torch.no_grad():
            got = [FLASH_CPU(q, k, v, 0.0, causal, attn_mask=bias, scale=0.3)[:2] for causal in (False, True)]
    except (RuntimeError, TypeError):
        return False
    want = [attend_dense(q, k, v, bias, 0.3, causal) for causal in (False, True)]
    return all(torch.allclose(a, b, atol=1e-5) for pair in zip(got, want) for a, b in zip(*pair))


def attend_dense(q, k, v, bias, scale, causal=False):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if bias is not None:
        scores = scores + bias
    if causal:
        C, K = scores.shape[-2:]
        future = torch.ones(C, K, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    lse = scores.logsumexp(dim=-1)
    return torch.matmul((scores - lse[..., None]).exp().to(v.dtype), v), lse


def merge(parts, with_lse: bool = False):
    """Combine partial attentions over disjoint key sets: weights softmax(lse) across parts, per query (and the
    log-sum-exp of the union, `with_lse`)."""
    if len(parts) == 1:
        return parts[0] if with_lse else parts[0][0]
    # the weights are small (B, H, C); only one multiply-add per part touches the outputs
    top = functools.reduce(torch.maximum, [lse for _, lse in parts])
    weights = [(lse - top).exp() for _, lse in parts]
    total = functools.reduce(torch.add, weights)
    out = parts[0][0].float() * (weights[0] / total)[..., None]
    for (o, _), w in zip(parts[1:], weights[1:]):
        out = out.addcmul_(o.float(), (w / total)[..., None])
    out = out.to(parts[0][0].dtype)
    return (out, top + total.log()) if with_lse else out


def shifted_causal(q, k, v, shift: int, scale):
    """Attention of every query r of q (B, H, L, d) over keys [0, r + shift] of k, v (B, Hkv, T, d), with its
    log-sum-exp; queries that see no key get output 0 and log-sum-exp -inf (no weight in `merge`)."""
    B, H, L, d = q.shape
    if shift >= 0:  # keys [0, shift) are seen by every query, then one more key per query: a full and a causal call
        parts = [attend(q, k[:, :, shift:shift + L], v[:, :, shift:shift + L], None, scale, causal=True)]
        if shift > 0:
            parts.append(attend(q, k[:, :, :shift], v[:, :, :shift], None, scale))
        return merge(parts, with_lse=True)
    out = q.new_zeros(B, H, L, v.shape[-1])
    lse = torch.full((B, H, L), -math.inf, device=q.device)
    if L + shift > 0:  # query r >= -shift sees keys [0, r + shift]: causal from the top-left corner
        out[:, :, -shift:], lse[:, :, -shift:] = attend(q[:, :, -shift:], k[:, :, :L + shift], v[:, :, :L + shift],
                                                         None, scale, causal=True)
    return out, lse
