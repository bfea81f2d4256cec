"""Stand-in for `llama_ctx.train.loss` (branch s2) until that branch lands: the chunked causal-LM loss the
trainer calls. Delete this file once s2 is merged (llama_ctx/train/deps.py picks the real one when it imports).
"""

from __future__ import annotations

import torch


def chunked_causal_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head, chunk_size: int = 4096):
    """(sum of token losses, number of scored tokens) for next-token prediction, `chunk_size` positions at a time.

    Each chunk's logits are recomputed in backward (checkpointed), so at most one chunk of logits is ever alive.
    """
    shift_h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    target = labels[:, 1:].reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)

    def piece(h, t):
        return torch.nn.functional.cross_entropy(head(h).float(), t, ignore_index=-100, reduction="sum")

    for i in range(0, len(target), chunk_size):
        h, t = shift_h[i:i + chunk_size], target[i:i + chunk_size]
        if torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(piece, h, t, use_reentrant=False)
        else:
            total = total + piece(h, t)
    return total, (target != -100).sum()
