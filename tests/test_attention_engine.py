"""The position-rewriting engine beyond forward values: gradients, cache types, the private flash op's use.

Gradients of every parameter are compared with those of the dense reference of tests/test_attention_positional.py
(explicit positions, full softmax, float64), which autograd differentiates directly.
"""

import pytest
import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicSlidingWindowLayer, QuantizedCache, StaticCache

import llama_ctx
from llama_ctx import UnsupportedModelError
from llama_ctx.attention import engine, kernels
from llama_ctx.cache import StreamingCache
from llama_ctx.compat import cache_kwargs
from conftest import ids, logits, tiny_model
from test_attention_positional import CASES, assert_matches_reference, default_inv_freq, dense_reference, left_padded

ALL = {**CASES, "dca": dict(chunk_size=24, local_window=6)}  # the tests that need no reference run DCA too


def parameter_grads(model, x, weights):
    model.zero_grad()
    (model(x).logits * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_grads(model, method, p, x, weights):
    """Gradients of the same loss with every attention module computing the dense reference."""
    with dense_reference(model, method, p, torch.ones_like(x).bool(), default_inv_freq()):
        model.zero_grad()
        (model(x, position_ids=torch.arange(x.shape[1])[None]).logits * weights).sum().backward()
    return {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}


def assert_grads_close(got, want):
    assert got.keys() == want.keys()
    assert any("q_proj" in n for n in want) and any("k_proj" in n for n in want)
    for name in want:
        scale = want[name].abs().max()
        assert scale > 0, name  # the check can see a dropped gradient
        torch.testing.assert_close(got[name] / scale, want[name] / scale, atol=2e-5, rtol=0, msg=name)


@pytest.mark.parametrize("method", list(CASES))
def test_gradients_match_the_dense_reference(method, monkeypatch):
    # several query chunks and both branches; the flash op must not be used where its log-sum-exp has no gradient
    monkeypatch.setattr(engine, "CHUNK", 48)
    model = tiny_model()
    x = ids(120)
    weights = torch.randn(1, 120, 256, generator=torch.Generator().manual_seed(5))
    llama_ctx.patch(model, method, **CASES[method])
    got = parameter_grads(model, x, weights)
    llama_ctx.unpatch(model)
    assert_grads_close(got, reference_grads(model, method, CASES[method], x, weights))


def test_inference_still_uses_the_flash_op(monkeypatch):
    if not kernels.flash_cpu_ok():
        pytest.skip("the private CPU flash op is not usable on this torch")
    calls = []
    real = kernels.FLASH_CPU
    monkeypatch.setattr(kernels, "FLASH_CPU", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = tiny_model()
    llama_ctx.patch(model, "rerope", window=16)
    logits(model, ids(50))  # no_grad
    assert calls
    calls.clear()
    model(ids(50)).logits.sum().backward()  # gradients: plain matmuls only
    assert not calls


@pytest.mark.parametrize("method", list(ALL))
def test_static_cache_generate_equals_dynamic_cache(method):
    model = tiny_model()
    llama_ctx.patch(model, method, **ALL[method])
    prompt = ids(40)
    kw = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, output_logits=True, return_dict_in_generate=True)
    dynamic = model.generate(prompt, **kw)
    static = model.generate(prompt, cache_implementation="static", **kw)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), atol=1e-4, rtol=0)


def test_static_cache_with_left_padding_equals_single_rows():
    model = tiny_model()
    llama_ctx.patch(model, "self-extend", **CASES["self-extend"])
    rows = [ids(50, seed=2)[0], ids(23, seed=3)[0]]
    x, mask = left_padded(rows)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    out = model.generate(x, attention_mask=mask, cache_implementation="static", **kw)
    for b, r in enumerate(rows):
        single = model.generate(r[None], **kw)
        assert torch.equal(out.sequences[b, x.shape[1]:], single.sequences[0, len(r):])
        torch.testing.assert_close(torch.stack(out.logits)[:, b], torch.stack(single.logits)[:, 0], atol=1e-4, rtol=0)


CACHES = {
    "sliding": lambda model: Cache(layers=[DynamicSlidingWindowLayer(sliding_window=8) for _ in range(2)]),
    "quantized": lambda model: QuantizedCache(backend="fp8", config=model.config),
    "streaming": lambda model: StreamingCache(sink_tokens=4, window=16),
}


@pytest.mark.parametrize("kind", list(CACHES))
def test_other_cache_layers_are_refused_before_the_cache_changes(kind):
    model = tiny_model()
    llama_ctx.patch(model, "rerope", window=16)
    try:
        cache = CACHES[kind](model)
    except ValueError as e:  # transformers 5.18 has no fp8 quantized-cache backend
        pytest.skip(f"{kind} cache not available in this transformers: {e}")
    with pytest.raises(UnsupportedModelError, match="needs every key of the sequence in its cache.*DynamicCache"):
        model(ids(20), **cache_kwargs(cache), use_cache=True)
    assert cache.get_seq_length() == 0


@pytest.mark.parametrize("chunk,split", [(8, 4), (20, 1), (48, 10**9)])
@pytest.mark.parametrize("method", list(CASES))
def test_every_tiling_matches_the_dense_reference(method, chunk, split, monkeypatch):
    # chunks smaller and larger than the windows; unmasked middles split off always / never: every piece kind
    # (unmasked, masked, causal diagonal) with and without padding
    monkeypatch.setattr(engine, "CHUNK", chunk)
    monkeypatch.setattr(engine, "SPLIT", split)
    model = tiny_model()
    llama_ctx.patch(model, method, **CASES[method])
    assert_matches_reference(model, method, CASES[method], ids(100))
    x, mask = left_padded([ids(90, seed=2)[0], ids(61, seed=3)[0]])
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    llama_ctx.patch(model, method, **CASES[method])
    assert_matches_reference(model, method, CASES[method], x, attention_mask=mask, position_ids=position_ids)


@pytest.mark.parametrize("cache_type", ["dynamic", "static"])
@pytest.mark.parametrize("method", list(ALL))
def test_prefill_in_pieces_equals_one_forward(method, cache_type, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK", 32)
    model = tiny_model()
    llama_ctx.patch(model, method, **ALL[method])
    x = ids(150)
    full = logits(model, x)
    cache = DynamicCache() if cache_type == "dynamic" else StaticCache(config=model.config, max_cache_len=160)
    got = [logits(model, x[:, a:b], **cache_kwargs(cache), use_cache=True, position_ids=torch.arange(a, b)[None])
           for a, b in [(0, 70), (70, 71), (71, 150)]]
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["rerope", "leaky-rerope", "self-extend"])
def test_a_fixed_offset_branch_runs_as_one_shifted_causal_call(method, monkeypatch):
    # the outer branch of an unpadded prefill: one causal call over the whole call instead of pieces per chunk, from
    # an empty cache (queries closer than the window to the start see none of it) and after a cached piece (every
    # query sees the first keys); both equal the dense reference / one forward
    if not kernels.flash_cpu_ok():
        pytest.skip("the private CPU flash op is not usable on this torch")
    monkeypatch.setattr(engine, "CHUNK", 20)
    shifts, real = [], kernels.shifted_causal
    monkeypatch.setattr(kernels, "shifted_causal", lambda q, k, v, shift, scale: shifts.append(shift) or
                        real(q, k, v, shift, scale))
    model, p, x = tiny_model(), CASES[method], ids(100)
    layers = model.config.num_hidden_layers
    llama_ctx.patch(model, method, **p)
    assert_matches_reference(model, method, p, x)
    assert shifts == [-p["window"]] * layers
    llama_ctx.patch(model, method, **p)
    full, cache = logits(model, x), DynamicCache()
    shifts.clear()
    checks, rows = [], engine._causal_rows
    monkeypatch.setattr(engine, "_causal_rows", lambda *a: checks.append(a[1:]) or rows(*a))
    got = [logits(model, x[:, a:b], **cache_kwargs(cache), use_cache=True, position_ids=torch.arange(a, b)[None])
           for a, b in [(0, 30), (30, 100)]]
    assert shifts == [-p["window"]] * layers + [30 - p["window"]] * layers
    assert checks == [(30, 70)]  # the continuation's causal mask is read once, not once per layer
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=0)


def test_only_a_plain_causal_mask_counts_as_no_mask():
    # the whole-call path ignores the mask, so it must be taken only where the mask hides nothing beyond causality
    past, L = 5, 7
    causal = torch.arange(past + L)[None, :] <= torch.arange(past, past + L)[:, None]
    assert engine._plain_causal(None, past, L, 0) and engine._plain_causal(causal[None, None], past, L, 0)
    padded = causal.clone()
    padded[:, 0] = False  # a padding key
    moved = causal.clone()
    moved[3, 1], moved[3, past + 4] = False, True  # as many keys as the causal row, one of them in the future
    floats = torch.where(causal, 0.0, torch.finfo(torch.float32).min)
    one_row = causal[-1:]  # broadcast over the queries: every query sees every key
    for mask in (padded, moved, floats, one_row):
        assert not engine._plain_causal(mask[None, None], past, L, 0)
    # the next layer reuses the answer for the same mask object only; a new mask of the same shape is read again
    mask = causal[None, None].clone()
    assert engine._plain_causal(mask, past, L, 0) and engine._plain_causal(mask, past, L, 1)
    assert not engine._plain_causal(moved[None, None].clone(), past, L, 2)
    assert not engine._plain_causal(padded[None, None], past, L, 1)


@pytest.mark.parametrize("method,p,most", [("rerope", dict(window=16), 16), ("self-extend", CASES["self-extend"], 16),
                                            ("dca", ALL["dca"], 1)])
def test_a_decode_step_rotates_only_the_keys_it_needs(method, p, most, monkeypatch):
    # ReRoPE-like methods re-rotate the last `window` keys; DCA reads its cache as stored
    model = tiny_model()
    llama_ctx.patch(model, method, **p)
    cache = DynamicCache()
    prompt = logits(model, ids(100), **cache_kwargs(cache), use_cache=True)
    sizes = []
    real = engine.rotate
    monkeypatch.setattr(engine, "rotate", lambda x, *a: sizes.append(x.shape[2]) or real(x, *a))
    step = logits(model, prompt[:, -1:].argmax(-1), **cache_kwargs(cache), use_cache=True,
                  position_ids=torch.tensor([[100]]))
    assert sizes and max(sizes) == most
    monkeypatch.undo()
    torch.testing.assert_close(step[:, -1], logits(model, torch.cat([ids(100), prompt[:, -1:].argmax(-1)], 1))[:, -1],
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", list(ALL))
def test_packed_documents_with_a_block_mask_equal_separate_rows(method, monkeypatch):
    # positions restart per document; bounds are turned into cache indices with each query's own offset
    monkeypatch.setattr(engine, "CHUNK", 32)
    model = tiny_model()
    llama_ctx.patch(model, method, **ALL[method])
    docs = [ids(70, seed=2)[0], ids(50, seed=3)[0]]
    doc = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(len(doc), len(doc), dtype=torch.bool).tril()
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    packed = logits(model, torch.cat(docs)[None], attention_mask=mask, position_ids=position_ids)
    for i, d in enumerate(docs):
        torch.testing.assert_close(packed[0, doc == i], logits(model, d[None])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", list(ALL))
def test_packed_documents_without_position_ids_keep_the_stock_numbering(method):
    # a block mask is not padding: the first document's queries must not all be numbered 0 (they are numbered
    # 0, 1, ... by transformers' fill-in, as in the stock model, so the first document equals itself alone)
    model = tiny_model()
    llama_ctx.patch(model, method, **ALL[method])
    docs = [ids(70, seed=2)[0], ids(50, seed=3)[0]]
    doc = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(len(doc), len(doc), dtype=torch.bool).tril()
    for mask in (allowed[None, None], torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]):
        packed = logits(model, torch.cat(docs)[None], attention_mask=mask)
        torch.testing.assert_close(packed[0, doc == 0], logits(model, docs[0][None])[0], atol=1e-5, rtol=0)


def test_positions_from_a_padding_mask_whose_padding_rows_see_everything():
    # some attention paths unmask fully masked (padding) query rows; those rows are not a sign of packed documents
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()
    allowed[:, :2] = False
    allowed[:2] = True  # the padding queries' rows, unmasked
    got = engine._positions_from_padding(allowed[None, None], 0, 6, torch.arange(6)[None])
    assert got.tolist() == [[0, 0, 0, 1, 2, 3]]
