"""Token-selection attention ("topk", "block-topk") against a dense reference written out here.

The reference runs one unpadded row at positions 0..L-1, in float64: explicit capped relative positions
r(i, j) = min(i - j, W), q rotated at every r in 0..W with explicitly computed angles, k at 0, selection from
explicitly computed scores, a visibility mask built query by query, and a full softmax.
"""


import pytest
import torch
from transformers import DynamicCache, MistralConfig, MistralForCausalLM

import llama_ctx
from llama_ctx import ConfigError, LlamaCtxError, UnsupportedModelError
from llama_ctx.compat import cache_kwargs
from llama_ctx.reference.selection import reference_forward, reference_logits, rotate, visible_keys  # noqa: F401
from conftest import TINY, clone_with, ids, logits, tiny_model

TOPK = dict(k=3, sink_tokens=2, local_window=16)
BLOCK = dict(block_size=4, k_blocks=2, sink_tokens=2, local_window=10)  # W % block_size != 0: a remainder
CASES = [("topk", TOPK), ("block-topk", BLOCK)]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("method,params", CASES, ids=["topk", "block-topk"])
@pytest.mark.parametrize("length", [9, 70])  # below and above local_window
def test_matches_dense_reference(impl, method, params, length):
    model = tiny_model(attn_implementation=impl)
    x = ids(length)
    expected = reference_logits(model, x, method, params)
    llama_ctx.patch(model, method, **params)
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=0)


def test_sinks_and_default_window():
    model = tiny_model()
    x = ids(90)
    p = dict(k=2, sink_tokens=4, local_window=64)  # the trained window, filled in by default
    expected = reference_logits(model, x, "topk", p)
    llama_ctx.patch(model, "topk", k=2)
    assert llama_ctx.state(model)["attention"]["params"] == p
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,params", [("topk", dict(k=1000, local_window=16)),
                                           ("block-topk", dict(block_size=3, k_blocks=1000, local_window=16))])
def test_selecting_everything_is_full_attention_with_capped_distances(method, params):
    model = tiny_model()
    short, long = ids(16), ids(60)
    stock_short = logits(model, short)
    expected = reference_logits(model, long, "full", params)
    llama_ctx.patch(model, method, **params)
    torch.testing.assert_close(logits(model, short), stock_short, atol=1e-5, rtol=0)  # within W: the stock model
    torch.testing.assert_close(logits(model, long), expected, atol=1e-5, rtol=0)


def test_composes_with_rope_method():
    model = tiny_model()
    x = ids(50)
    yarn = clone_with(model, rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0,
                                                  original_max_position_embeddings=64))
    assert float(yarn.model.rotary_emb.attention_scaling) != 1.0  # so that R(0) k's scaling is exercised
    expected = reference_logits(model, x, "block-topk", BLOCK, rope_model=yarn)
    llama_ctx.patch(model, "yarn", factor=4)
    llama_ctx.patch(model, "block-topk", **BLOCK)
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=0)


def greedy(model, x, n, attention_mask=None):
    # NOTE: an explicit mask, else generate() takes every token equal to pad_token_id for padding.
    mask = torch.ones_like(x) if attention_mask is None else attention_mask
    out = model.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("method,params", CASES, ids=["topk", "block-topk"])
def test_generate_with_cache_equals_full_forward_each_step(method, params):
    model = tiny_model()
    llama_ctx.patch(model, method, **params)
    prompt = ids(20)
    assert greedy(model, prompt[:, :1], 3)[0].shape == (1, 4)  # a one-token prompt decodes from scratch
    seq, step_logits = greedy(model, prompt, 25)
    for t in range(25):
        full = logits(model, seq[:, :20 + t])[:, -1]
        torch.testing.assert_close(step_logits[:, t], full, atol=1e-4, rtol=0)
        assert seq[0, 20 + t] == full.argmax(-1)[0]


@pytest.mark.parametrize("method,params", CASES, ids=["topk", "block-topk"])
def test_left_padding_rows_equal_single_rows(method, params):
    model = tiny_model()
    llama_ctx.patch(model, method, **params)
    rows = [ids(40, seed=2)[0], ids(27, seed=3)[0]]
    pad = 40 - 27
    batch = torch.stack([rows[0], torch.cat([torch.zeros(pad, dtype=torch.long), rows[1]])])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    out = logits(model, batch, attention_mask=mask, position_ids=position_ids)
    torch.testing.assert_close(out[0], logits(model, rows[0][None])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, pad:], logits(model, rows[1][None])[0], atol=1e-5, rtol=0)
    seq, step_logits = greedy(model, batch, 12, attention_mask=mask)
    for r, row in enumerate(rows):
        seq_r, logits_r = greedy(model, row[None], 12)
        assert torch.equal(seq[r, 40:], seq_r[0, len(row):])
        torch.testing.assert_close(step_logits[r], logits_r[0], atol=1e-4, rtol=0)


def test_block_sums_follow_a_reset_or_cropped_cache():
    model = tiny_model()
    llama_ctx.patch(model, "block-topk", **BLOCK)
    a, b = ids(30, seed=4), ids(30, seed=5)
    cache = DynamicCache()
    with torch.no_grad():
        model(a, **cache_kwargs(cache))
        cache.crop(-12)  # keep a[:, :18], then continue with b's tokens
        step = model(b[:, 18:], **cache_kwargs(cache)).logits
        torch.testing.assert_close(step, logits(model, torch.cat([a[:, :18], b[:, 18:]], 1))[:, 18:],
                                   atol=1e-5, rtol=0)
        cache.reset()
        again = model(b, **cache_kwargs(cache)).logits
    torch.testing.assert_close(again, logits(model, b), atol=1e-5, rtol=0)


def plain_update(cache, layer_idx, k, v):
    return cache.update(k, v, layer_idx)  # the standard DynamicLayer path (torch.cat of the whole cache)


@torch.no_grad()
def decode_steps(model, x, prefill, cache):
    """Logits of x[:, prefill:] decoded one token at a time after a prefill of x[:, :prefill]."""
    out = [model(x[:, :prefill], **cache_kwargs(cache)).logits[:, -1]]
    for t in range(prefill, x.shape[1] - 1):
        out.append(model(x[:, t:t + 1], **cache_kwargs(cache)).logits[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("method,params", CASES, ids=["topk", "block-topk"])
def test_buffered_append_gives_the_same_logits_and_bounded_memory(method, params, monkeypatch):
    from llama_ctx.cache import _SPARES
    model = tiny_model()
    x = ids(90, seed=6)
    llama_ctx.patch(model, method, **params)
    cache = DynamicCache()
    held, grown, kept = [], 0, {}

    def spy(cache_, layer_idx, k, v):  # the real append, watching the buffers between calls
        before = cache_.layers[layer_idx].keys if layer_idx < len(cache_.layers) else None
        old = None if before is None else before.clone()
        keys, values = append(cache_, layer_idx, k, v)
        layer = cache_.layers[layer_idx]
        assert keys is layer.keys and values is layer.values
        if before is not None:
            assert torch.equal(before, old)  # views handed out earlier keep their contents
        spare = _SPARES.get(layer)
        if spare is not None:
            n, cap = keys.shape[2], spare.capacity
            assert keys._base is spare.bufs[0]() and cap <= n + n // 4 + 16 + k.shape[2] and cap <= max(2 * n, 40)
            nonlocal grown
            grown += kept.get(layer_idx) != keys.data_ptr()
            kept[layer_idx] = keys.data_ptr()
            held.append(n)
        return keys, values

    import llama_ctx.attention.selection as selection
    append = selection.append
    monkeypatch.setattr(selection, "append", spy)
    buffered = decode_steps(model, x, 12, cache)
    assert len(held) == 2 * 77 and grown < 20  # buffered after the prefill, a few regrowths over 77 steps
    monkeypatch.setattr(selection, "append", plain_update)
    torch.testing.assert_close(buffered, decode_steps(model, x, 12, DynamicCache()), atol=1e-6, rtol=0)
    expected = reference_logits(tiny_model(), x[:, :-1], method, params)[:, 11:]
    torch.testing.assert_close(buffered, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method,params", CASES, ids=["topk", "block-topk"])
def test_crop_reorder_reset_after_buffered_appends(method, params):
    model = tiny_model()
    llama_ctx.patch(model, method, **params)
    a, b = ids(60, batch=2, seed=7), ids(60, batch=2, seed=8)
    cache = DynamicCache()
    with torch.no_grad():
        decode_steps(model, a[:, :45], 10, cache)  # 44 tokens cached, the last 34 by buffered appends
        assert cache.get_seq_length() == 44
        before = cache.layers[0].keys, cache.layers[0].values  # (which keeps the buffers alive)
        saved = [t.clone() for t in before]
        cache.crop(-14)  # keep a[:, :30]: a view into the buffer
        cache.reorder_cache(torch.tensor([1, 0]))  # swap the rows (a new tensor, the buffer is stale)
        mixed = torch.cat([a.flip(0)[:, :30], b[:, 30:]], 1)
        got = [model(mixed[:, t:t + 1], **cache_kwargs(cache)).logits[:, -1] for t in range(30, 59)]
        torch.testing.assert_close(torch.stack(got, 1), logits(model, mixed)[:, 30:59], atol=1e-4, rtol=0)
        assert cache.get_seq_length() == 59 and all(map(torch.equal, before, saved))  # old views were not written into
        cache.crop(-9)  # a crop alone: the next appends must not overwrite what the cropped view leaves out
        kept = cache.layers[1].values
        mixed2 = torch.cat([mixed[:, :50], a[:, 50:]], 1)
        got = [model(mixed2[:, t:t + 1], **cache_kwargs(cache)).logits[:, -1] for t in range(50, 59)]
        torch.testing.assert_close(torch.stack(got, 1), logits(model, mixed2)[:, 50:59], atol=1e-4, rtol=0)
        assert torch.equal(kept, cache.layers[1].values[:, :, :50])
        cache.reset()
        again = decode_steps(model, b, 20, cache)
    torch.testing.assert_close(again, logits(model, b)[:, 19:59], atol=1e-4, rtol=0)


BAD = [
    (dict(method="topk", k=0), ConfigError, "k must be >= 1"),
    (dict(method="topk", k=2.5), ConfigError, "k must be an integer"),
    (dict(method="topk", k=4, local_window=0), ConfigError, "local_window must be >= 1"),
    (dict(method="topk", k=4, local_window=8.0), ConfigError, "local_window must be an integer"),
    (dict(method="topk", k=4, sink_tokens=-1), ConfigError, "sink_tokens must be >= 0"),
    (dict(method="topk", k=4, window=8), ConfigError, "unknown parameter.*'window'.*local_window"),
    (dict(method="block-topk", block_size=0, k_blocks=2), ConfigError, "block_size must be >= 1"),
    (dict(method="block-topk", block_size=4, k_blocks=0), ConfigError, "k_blocks must be >= 1"),
    (dict(method="block-topk", block_size=4), ConfigError, "needs parameter.*'k_blocks'"),
    (dict(method="block-topk", block_size=4, k_blocks=2, local_window=-3), ConfigError, "local_window must be >= 1"),
]


@pytest.mark.parametrize("kw,err,match", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_raises_one_clear_error_and_leaves_model_untouched(kw, err, match):
    model = tiny_model()
    x = ids(40)
    before = logits(model, x)
    with pytest.raises(err, match=match) as info:
        llama_ctx.patch(model, **kw)
    assert isinstance(info.value, LlamaCtxError)
    assert llama_ctx.state(model) is None
    assert torch.equal(logits(model, x), before)


@pytest.mark.parametrize("method,params", CASES, ids=["topk", "block-topk"])
def test_unsupported_attention_implementation_and_sliding_window(method, params):
    model = tiny_model()
    x = ids(40)
    before = logits(model, x)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="'flex_attention'.*\\('eager', 'sdpa'\\)"):
        llama_ctx.patch(model, method, **params)
    model.config._attn_implementation = "sdpa"
    assert llama_ctx.state(model) is None and torch.equal(logits(model, x), before)
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(**TINY, sliding_window=32)).eval()
    with pytest.raises(UnsupportedModelError, match="sliding_window=None"):
        llama_ctx.patch(mistral, method, **params)
    assert llama_ctx.state(mistral) is None
    llama_ctx.patch(model, method, **params)
    with pytest.raises(UnsupportedModelError, match="DynamicCache"):
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=2, cache_implementation="static")


@pytest.mark.parametrize("method,params", CASES, ids=["topk", "block-topk"])
def test_unpatch_is_bit_exact(method, params):
    model = tiny_model()
    x = ids(70)
    before = logits(model, x)
    forwards = [layer.self_attn.forward for layer in model.model.layers]
    llama_ctx.patch(model, method, **params)
    assert not torch.allclose(logits(model, x), before, atol=1e-3)
    llama_ctx.unpatch(model)
    assert torch.equal(logits(model, x), before)
    assert [layer.self_attn.forward for layer in model.model.layers] == forwards
