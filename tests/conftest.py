"""Tiny random LLaMA models (the same ones `llama-ctx check` uses) and small helpers shared by the tests."""

import pytest
from transformers import LlamaConfig

from llama_ctx.check import TINY, clone_with, ids, logits, tiny_model  # noqa: F401


def tiny_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **overrides})


@pytest.fixture
def model():
    return tiny_model()


def assert_padded_generate_equals_full_forward(model, tol=1e-5, new=12):
    """Greedy cached `generate()` on a left-padded batch of two gives, at every step, the logits of a full forward
    over the final sequences (position_ids from the mask, as generate() numbers them)."""
    import torch

    x = ids(30, batch=2)
    mask = torch.ones_like(x)
    mask[0, :6] = 0  # left padding: generate() passes position_ids from the mask
    out = model.generate(x, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    steps = torch.stack(out.logits, 1)
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=torch.long)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    full = logits(model, out.sequences, attention_mask=full_mask, position_ids=pos, use_cache=False)
    torch.testing.assert_close(steps, full[:, 29:-1], atol=tol, rtol=0)
