"""Dual Chunk Attention against the dense reference in llama_ctx/reference/dca.py (explicit positions, float64)."""

import pytest
import torch

import llama_ctx
from llama_ctx import ConfigError, LlamaCtxError
from llama_ctx.attention import engine
from llama_ctx.reference.dca import dca_positions, dca_reference
from conftest import clone_with, ids, logits, tiny_model
from test_attention_positional import (assert_padded_generate_equals_rows, assert_patched_matches, default_inv_freq,
                                      left_padded)

P = dict(chunk_size=24, local_window=6)  # chunks of 18 positions in a model trained on 64
GEN = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)


@torch.no_grad()
def run(model, x, **kw):
    out = model(x, output_hidden_states=True, **kw)
    return out.hidden_states[-1], out.logits


def assert_matches_reference(model, x, p=P, inv_freq=None, scaling=1.0, **kw):
    inv_freq = default_inv_freq() if inv_freq is None else inv_freq
    return assert_patched_matches(
        model, x, lambda real: dca_reference(model, p["chunk_size"], p["local_window"], real, inv_freq, scaling),
        **kw)[1]


def test_reference_positions_by_hand():
    # chunk_size 4, local_window 1: chunks of s = 3; query i = 5 sits at 2 (own chunk), min(2 + 3, 4) = 4
    # (previous chunk) and 4 (older); keys at j mod 3
    query, key, visible = dca_positions(torch.arange(8), 4, 1)
    assert key[5].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert query[5, :6].tolist() == [4, 4, 4, 2, 2, 2]
    assert query[4, :3].tolist() == [4, 4, 4]  # i mod s = 1 <= local_window: exact distance to the previous chunk
    assert (query - key)[4, 2] == 2 and (query - key)[5, 2] == 2  # 5 - 2 = 3 is capped at 4 - 2
    assert query[7, :3].tolist() == [4, 4, 4] and query[7, 3:6].tolist() == [4, 4, 4]
    assert ((query - key)[visible] <= 4).all() and visible[3, 3] and not visible[3, 4]


# 20: query chunks straddle the 18-position DCA chunks; 8/4 and 20/1: every kind of engine piece
@pytest.mark.parametrize("chunk,split", [(engine.CHUNK, engine.SPLIT), (20, engine.SPLIT), (8, 4), (20, 1)])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_matches_dense_reference(impl, chunk, split, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK", chunk)
    monkeypatch.setattr(engine, "SPLIT", split)
    model = tiny_model(attn_implementation=impl)
    x = ids(150)  # 9 chunks: intra, successive and inter branches
    stock = logits(model, x)
    llama_ctx.patch(model, "dca", **P)
    got = assert_matches_reference(model, x)
    assert (got - stock).abs().max() > 1e-3  # 100x the tolerance: the check can tell DCA from the stock model


@pytest.mark.parametrize("kw,length", [(P, 18), ({}, 44)])  # defaults: chunk 48, window 4 -> s = 44
def test_one_chunk_is_the_stock_model(kw, length):
    model = tiny_model()
    x = ids(length)
    stock = run(model, x)
    llama_ctx.patch(model, "dca", **kw)
    for got, want in zip(run(model, x), stock):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    longer = ids(length + 20)  # past one chunk it is not
    patched = logits(model, longer)
    llama_ctx.unpatch(model)
    assert not torch.allclose(patched, logits(model, longer), atol=1e-3)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_with_cache_equals_full_forward(cache):
    model = tiny_model()
    llama_ctx.patch(model, "dca", **P)
    prompt = ids(40)  # 40 + 30 tokens cross three chunk boundaries
    out = model.generate(prompt, max_new_tokens=30, min_new_tokens=30, cache_implementation=cache, **GEN)
    full = logits(model, out.sequences)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full[:, 39:-1], atol=1e-4, rtol=0)
    assert torch.equal(out.sequences[:, 40:], full[:, 39:-1].argmax(-1))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_left_padding_matches_single_rows(impl, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK", 20)
    model = tiny_model(attn_implementation=impl)
    llama_ctx.patch(model, "dca", **P)
    rows = [ids(100, seed=2)[0], ids(57, seed=3)[0], ids(16, seed=4)[0]]
    x, mask = left_padded(rows)
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    batch = logits(model, x, attention_mask=mask, position_ids=position_ids)
    for b, r in enumerate(rows):
        torch.testing.assert_close(batch[b, -len(r):], logits(model, r[None])[0], atol=1e-5, rtol=0)
    assert_matches_reference(model, x, attention_mask=mask, position_ids=position_ids)
    if impl == "eager":
        return
    llama_ctx.patch(model, "dca", **P)
    assert_padded_generate_equals_rows(model, rows)


@pytest.mark.parametrize("order", ["yarn first", "dca first"])
def test_yarn_inside_chunks_equals_reference_with_yarn_frequencies(order):
    model = tiny_model()
    native = clone_with(model, rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0,
                                                    original_max_position_embeddings=64))
    inv_freq, scaling = native.model.rotary_emb.inv_freq, native.model.rotary_emb.attention_scaling
    assert scaling > 1 and not torch.allclose(inv_freq, default_inv_freq())
    steps = [("yarn", dict(factor=4.0)), ("dca", P)]
    for method, p in steps if order == "yarn first" else steps[::-1]:
        llama_ctx.patch(model, method, **p)
    assert_matches_reference(model, ids(150), inv_freq=inv_freq, scaling=scaling)


def test_gradients_match_the_dense_reference(monkeypatch):
    monkeypatch.setattr(engine, "CHUNK", 20)
    model = tiny_model()
    x = ids(100)
    weights = torch.randn(1, 100, 256, generator=torch.Generator().manual_seed(5))

    def grads():
        model.zero_grad()
        (model(x, position_ids=torch.arange(100)[None]).logits * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    llama_ctx.patch(model, "dca", **P)
    got = grads()
    llama_ctx.unpatch(model)
    with dca_reference(model, P["chunk_size"], P["local_window"], torch.ones_like(x).bool(), default_inv_freq()):
        want = grads()
    assert got.keys() == want.keys() and any("k_proj" in n for n in want)
    for name in want:
        scale = want[name].abs().max()
        assert scale > 0, name
        torch.testing.assert_close(got[name] / scale, want[name] / scale, atol=2e-5, rtol=0, msg=name)


def test_unpatch_is_bit_exact():
    model = tiny_model()
    x = ids(150)
    before = logits(model, x)
    llama_ctx.patch(model, "dca")
    assert llama_ctx.state(model)["attention"]["params"] == dict(chunk_size=48, local_window=4, training_length=64)
    assert not torch.allclose(logits(model, x), before)
    llama_ctx.unpatch(model)
    assert torch.equal(logits(model, x), before)


BAD = [
    (dict(chunk_size=64), "chunk_size must be < training_length 64"),
    (dict(chunk_size=100), "chunk_size must be < training_length 64"),
    (dict(chunk_size=24, local_window=24), "local_window must be < chunk_size 24"),
    (dict(chunk_size=4), "local_window must be < chunk_size 4"),  # default local_window 64 // 16 = 4
    (dict(local_window=-1), "local_window must be >= 0"),
    (dict(chunk_size=0), "chunk_size must be >= 1"),
    (dict(chunk_size=24.0), "chunk_size must be an integer"),
    (dict(local_window="6"), "local_window must be an integer"),
    (dict(training_length=1), "training_length must be >= 2"),
    (dict(chunk_size=40, training_length=32), "chunk_size must be < training_length 32"),
    (dict(window=8), "unknown parameter.*'window'"),
]


@pytest.mark.parametrize("kw,match", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_raises_one_clear_error_and_leaves_model_untouched(kw, match):
    model = tiny_model()
    x = ids(80)
    before = logits(model, x)
    with pytest.raises(ConfigError, match=match) as info:
        llama_ctx.patch(model, "dca", **kw)
    assert isinstance(info.value, LlamaCtxError)
    assert llama_ctx.state(model) is None
    assert torch.equal(logits(model, x), before)
