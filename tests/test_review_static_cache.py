"""A static cache returns its whole preallocated buffer from update(): the methods that place keys by their index in
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
