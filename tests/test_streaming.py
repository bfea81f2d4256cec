"""The "streaming" method (attention sinks + window, bounded cache) against its dense definition."""


import pytest
import torch
from transformers import DynamicCache

import llama_ctx
from llama_ctx import ConfigError, UnsupportedModelError
from llama_ctx.cache import StreamingCache
from llama_ctx.compat import cache_kwargs, output_cache
from llama_ctx.reference.streaming import default_rope, dense_reference, rotate  # noqa: F401
from conftest import clone_with, ids, logits, tiny_model

S, W = 4, 16


def greedy(model, x, new, **kw):
    kw.setdefault("attention_mask", torch.ones_like(x))  # token 0 in x is a word, not padding
    out = model.generate(x, max_new_tokens=new, do_sample=False, return_dict_in_generate=True, output_logits=True,
                         pad_token_id=0, eos_token_id=None, **kw)
    return out.sequences, torch.stack(out.logits, dim=1), output_cache(out)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_generate_matches_dense_reference(impl):
    model = tiny_model(attn_implementation=impl)
    llama_ctx.patch(model, "streaming", sink_tokens=S, window=W)
    prompt = ids(30)  # longer than S + W: the prefill itself evicts
    seq, scores, cache = greedy(model, prompt, 40)
    ref = dense_reference(model, seq[0])
    assert torch.equal(seq[0, 30:], ref[29:-1].argmax(-1))
    torch.testing.assert_close(scores[0], ref[29:-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(model, seq, use_cache=False)[0], ref, atol=1e-4, rtol=0)
    assert cache.cached_tokens() == S + W and cache.get_seq_length() == 69
    assert all(layer.keys.shape[-2] == S + W for layer in cache.layers)


def test_chunks_through_a_full_cache_match_reference():
    model = tiny_model()
    llama_ctx.patch(model, "streaming", sink_tokens=S, window=W)
    x, cache, out = ids(75), StreamingCache(S, W), []
    with torch.no_grad():
        for start in range(0, 75, 7):  # chunks of 7 after the cache is full: sinks seen from several places
            out.append(model(x[:, start:start + 7], **cache_kwargs(cache)).logits)
    torch.testing.assert_close(torch.cat(out, 1)[0], dense_reference(model, x[0]), atol=1e-4, rtol=0)


def test_no_sinks_is_a_sliding_window():
    model = tiny_model()
    llama_ctx.patch(model, "streaming", sink_tokens=0, window=8)
    x = ids(40)
    seq, scores, _ = greedy(model, x, 10)
    ref = dense_reference(model, seq[0], sinks=0, window=8)
    torch.testing.assert_close(scores[0], ref[39:-1], atol=1e-4, rtol=0)


class RecordingCache(StreamingCache):
    def commit(self, new_tokens):
        super().commit(new_tokens)
        self.sizes = [*getattr(self, "sizes", []), self.cached_tokens()]


def test_cache_stays_bounded_over_long_generate(model):
    llama_ctx.patch(model, "streaming", sink_tokens=S, window=32)
    cache = RecordingCache(S, 32)
    seq, _, _ = greedy(model, ids(10), 300, **cache_kwargs(cache))
    assert seq.shape[1] == 310 and cache.get_seq_length() == 309
    assert max(cache.sizes) == S + 32 and cache.sizes[-270:] == [S + 32] * 270
    assert all(layer.keys.shape[-2] == S + 32 for layer in cache.layers)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_left_padded_batch_equals_single_rows(impl):
    model = tiny_model(attn_implementation=impl)
    llama_ctx.patch(model, "streaming", sink_tokens=S, window=W)
    a, b = ids(30, seed=2), ids(12, seed=3)  # b shorter than S + W: its cache fills later than a's
    batch = torch.cat([a, torch.cat([torch.zeros(1, 18, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :18] = 0
    seq, scores, _ = greedy(model, batch, 25, attention_mask=mask)
    for row, x in enumerate([a, b]):
        single_seq, single_scores, _ = greedy(model, x, 25)
        assert torch.equal(seq[row, 30:], single_seq[0, x.shape[1]:])
        torch.testing.assert_close(scores[row], single_scores[0], atol=1e-4, rtol=0)
        ref = dense_reference(model, single_seq[0])
        torch.testing.assert_close(scores[row], ref[x.shape[1] - 1:-1], atol=1e-4, rtol=0)


def test_yarn_plus_streaming_matches_reference_with_yarn_frequencies(model):
    native = clone_with(model, rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0,
                                                    original_max_position_embeddings=64)).model.rotary_emb
    rope = (native.inv_freq.float(), float(native.attention_scaling))
    llama_ctx.patch(model, "yarn", factor=4)
    llama_ctx.patch(model, "streaming", sink_tokens=S, window=100)  # beyond the trained 64: needs yarn
    assert llama_ctx.state(model)["attention"]["params"] == {"sink_tokens": S, "window": 100}
    seq, scores, cache = greedy(model, ids(70), 45)
    ref = dense_reference(model, seq[0], window=100, rope=rope)
    torch.testing.assert_close(scores[0], ref[69:-1], atol=1e-4, rtol=0)
    assert cache.cached_tokens() == S + 100


def test_unpatch_is_bit_exact(model):
    x = ids(50)
    before = logits(model, x)
    forwards = [vars(layer.self_attn).get("forward") for layer in model.model.layers]
    llama_ctx.patch(model, "streaming", window=8)
    assert not torch.equal(logits(model, x), before)
    llama_ctx.unpatch(model)
    assert torch.equal(logits(model, x), before)
    assert "forward" not in vars(model.model) and forwards == [None, None]
    assert [vars(layer.self_attn).get("forward") for layer in model.model.layers] == forwards
    assert isinstance(output_cache(model(x, use_cache=True)), DynamicCache)


@pytest.mark.parametrize("params,match", [
    (dict(window=0), "window must be >= 1"),
    (dict(window=8.0), "window must be an integer"),
    (dict(window="8"), "window must be an integer"),
    (dict(window=8, sink_tokens=-1), "sink_tokens must be >= 0"),
    (dict(window=8, sink_tokens=True), "sink_tokens must be an integer"),
    (dict(window=60), "exceed the model's window of 64.*yarn"),
    (dict(sink_tokens=4), "needs parameter.*'window'"),
    (dict(window=8, sinks=4), "unknown parameter"),
])
def test_bad_parameters_raise_and_leave_model_untouched(model, params, match):
    x = ids(40)
    before = logits(model, x)
    with pytest.raises(ConfigError, match=match):
        llama_ctx.patch(model, "streaming", **params)
    assert torch.equal(logits(model, x), before) and llama_ctx.state(model) is None


@pytest.mark.parametrize("impl", ["flex_attention", "flash_attention_2"])
def test_unsupported_attention_implementation(impl):
    model = tiny_model()
    x = ids(20)
    before = logits(model, x)
    model.config._attn_implementation = impl
    with pytest.raises(UnsupportedModelError, match="attn_implementation in"):
        llama_ctx.patch(model, "streaming", window=8)
    model.config._attn_implementation = "sdpa"
    assert torch.equal(logits(model, x), before) and llama_ctx.state(model) is None


def test_bad_runtime_inputs(model):
    llama_ctx.patch(model, "streaming", window=8)
    x = ids(20)
    filled = DynamicCache()
    filled.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    with pytest.raises(ConfigError, match="bounded cache"):
        model(x, **cache_kwargs(filled))
    with pytest.raises(ConfigError, match="sink_tokens=2, window=8"):
        model(x, **cache_kwargs(StreamingCache(2, 8)))
    with pytest.raises(ConfigError, match="2D padding mask"):
        model(x, attention_mask=torch.zeros(1, 1, 20, 20))


def test_prefill_runs_in_query_chunks_without_a_mask_over_all_keys(monkeypatch):
    import llama_ctx.attention.streaming as streaming

    monkeypatch.setattr(streaming, "CHUNK", 16, raising=False)
    shapes, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        shapes.append(tuple(attn_mask.shape))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = tiny_model()
    llama_ctx.patch(model, "streaming", sink_tokens=S, window=W)
    a, b = ids(75, seed=2), ids(40, seed=3)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 35, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :35] = 0
    out = logits(model, batch, attention_mask=mask, use_cache=False)  # 5 chunks of queries, no cache
    assert shapes and max(s[-2] for s in shapes) == 16 and max(s[-1] for s in shapes) <= S + 16 + W < 75
    torch.testing.assert_close(out[0], dense_reference(model, a[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1, 35:], dense_reference(model, b[0]), atol=1e-4, rtol=0)
    cache, chunks = StreamingCache(S, W), []
    with torch.no_grad():  # chunks of 30 through the cache, each in two query chunks
        for start in range(0, 75, 30):
            chunks.append(model(batch[:, start:start + 30], attention_mask=mask[:, :start + 30],
                                **cache_kwargs(cache)).logits)
    torch.testing.assert_close(torch.cat(chunks, 1), out, atol=1e-4, rtol=0)


def _enable_checkpointing(model, reentrant: bool):
    enable = getattr(model, "activation_checkpointing_enable", None)  # the 5.x name
    kwargs = {"use_reentrant": reentrant}
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    x = ids(40, batch=2, seed=4)  # longer than S + W: sinks seen from far away
    grads, losses = [], []
    for checkpointing in (False, True):
        model = tiny_model().train()
        llama_ctx.patch(model, "streaming", sink_tokens=S, window=W)
        if checkpointing:
            _enable_checkpointing(model, reentrant)
        loss = model(x, labels=x).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
        if checkpointing:
            model.eval()
            torch.testing.assert_close(logits(model, x)[1], dense_reference(model, x[1]), atol=1e-4, rtol=0)
    assert torch.equal(losses[0], losses[1]) and grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5)


def test_concurrent_forwards_equal_sequential(model):
    import threading

    llama_ctx.patch(model, "streaming", sink_tokens=S, window=8)
    inputs = [ids(12 + 7 * (i % 5), seed=i) for i in range(100)]  # different lengths: different plans
    expected = [logits(model, x) for x in inputs]
    results, errors = [None] * len(inputs), []

    def work(first):
        try:
            for i in range(first, len(inputs), 4):
                results[i] = logits(model, inputs[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


def test_layers_called_without_the_plan_raise(model):
    llama_ctx.patch(model, "streaming", window=8)
    layer, x = model.model.layers[0], torch.randn(1, 5, 64)
    cos_sin = model.model.rotary_emb(x, torch.arange(5)[None])
    with pytest.raises(UnsupportedModelError, match="not the layers directly"):
        layer(x, position_embeddings=cos_sin, attention_mask=None)
