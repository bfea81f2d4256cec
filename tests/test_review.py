"""Review of the transformers-compat and issue-9 changes.

A static cache returns its whole preallocated buffer from update(): the methods that place keys by their index in
what the cache returns would attend with every position off (ReRoPE decoded 0.5 logits away from its own full
forward, silently). Every attention method refuses it instead."""

import pytest
import torch
from transformers import StaticCache

import llama_ctx
from llama_ctx import UnsupportedModelError, compat
from conftest import ids, tiny_model
from test_compat import ATTENTION


@pytest.mark.parametrize("name", list(ATTENTION))
def test_static_cache_is_refused(name):
    model = tiny_model()
    llama_ctx.patch(model, name, **ATTENTION[name])
    x = ids(30)
    cache = StaticCache(config=model.config, max_cache_len=48)
    with pytest.raises(Exception) as err, torch.no_grad():
        model(x[:, :20], use_cache=True, **compat.cache_kwargs(cache))
        model(x[:, 20:21], use_cache=True, **compat.cache_kwargs(cache))
    assert isinstance(err.value, llama_ctx.LlamaCtxError), err.value
    assert "StaticCache" in str(err.value)


@pytest.mark.parametrize("name", ["rerope", "self-extend", "lambda"])
def test_generate_with_a_static_cache_is_refused(name):
    model = tiny_model()
    llama_ctx.patch(model, name, **ATTENTION[name])
    x = ids(30)
    with pytest.raises(UnsupportedModelError, match="cache_implementation='static'"):
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False,
                       cache_implementation="static")


# ---- streaming and position_ids -----------------------------------------------------------------------------------

def test_streaming_refuses_position_ids_it_would_drop():
    """Streaming numbers positions itself; position_ids that say something else (packed documents, a stretched
    numbering) change what the stock model computes and were silently replaced. They raise; the consecutive ones
    generate() passes (any offset, left padding) still work and give the same result as none."""
    model = tiny_model()
    llama_ctx.patch(model, "streaming", window=16)
    x = ids(12)
    with torch.no_grad():
        base = model(x).logits
        for pos in (torch.arange(12)[None] + 7, torch.arange(12)[None]):
            torch.testing.assert_close(model(x, position_ids=pos).logits, base)
        for pos in (torch.arange(12)[None] * 2, torch.cat([torch.arange(6), torch.arange(6)])[None]):
            with pytest.raises(llama_ctx.ConfigError, match="position_ids must grow by one"):
                model(x, position_ids=pos)
        x2 = ids(12, batch=2)
        mask = torch.ones_like(x2)
        mask[1, :3] = 0  # left padding, positions as generate() builds them
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        torch.testing.assert_close(model(x2, attention_mask=mask, position_ids=pos).logits,
                                   model(x2, attention_mask=mask).logits)
