"""ReRoPE, Leaky ReRoPE, Self-Extend and Λ-shaped attention against a dense reference written out here.

The reference builds, for every row, the explicit relative-position matrix and visibility mask of the method,
rotates each query by its relative position to each key (complex form: pair k of a head is x_k + i x_{k+d/2},
rotated by exp(i * rel * theta_k)), takes a full softmax, and replaces every attention module's forward for
the duration of one model call: hidden states and logits of the whole model are compared.
"""


import pytest
import torch

import llama_ctx
from llama_ctx import ConfigError, LlamaCtxError, PatchStateError, UnsupportedModelError
from llama_ctx.attention import engine, kernels
from llama_ctx.reference.positional import default_inv_freq, dense_attention, dense_reference, position_matrix  # noqa: F401
from conftest import clone_with, ids, logits, tiny_model

TRAINED = 64  # tiny model's max_position_embeddings
CASES = {  # method -> params; lengths 12 (inside every window) and 200 (past windows and trained length)
    "rerope": dict(window=16),
    "leaky-rerope": dict(window=16, factor=4.0),
    "self-extend": dict(group_size=4, window=16),  # covers (64 - 16) * 4 + 16 = 208 positions
    "lambda": dict(global_tokens=4, local_window=24),
}


@torch.no_grad()
def run(model, x, **kw):
    out = model(x, output_hidden_states=True, **kw)
    return out.hidden_states[-1], out.logits


def assert_patched_matches(model, x, reference, **kw):
    """The patched model's last hidden states and logits on `x` equal those of the unpatched model inside
    `reference(key_real)` (a context manager computing the dense reference) at every real token; returns the patch
    state and the patched logits."""
    got_h, got = run(model, x, **kw)
    state = llama_ctx.state(model)
    llama_ctx.unpatch(model)
    key_real = kw.get("attention_mask", torch.ones_like(x)).bool()
    with reference(key_real):
        want_h, want = run(model, x, position_ids=kw.get("position_ids", torch.arange(x.shape[1])[None]),
                           attention_mask=kw.get("attention_mask"))
    real = key_real[..., None]
    torch.testing.assert_close(got_h * real, want_h * real, atol=1e-5, rtol=0)
    torch.testing.assert_close(got * real, want * real, atol=1e-5, rtol=0)
    return state, got


def assert_matches_reference(model, method, p, x, inv_freq=None, scaling=1.0, **kw):
    inv_freq = default_inv_freq() if inv_freq is None else inv_freq
    return assert_patched_matches(
        model, x, lambda real: dense_reference(model, method, p, real, inv_freq, scaling), **kw)[0]


@pytest.mark.parametrize("chunk", [engine.CHUNK, 48])  # 48: several chunks, so pure-outer / band / inner tiles
@pytest.mark.parametrize("length", [12, 200])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("method", list(CASES))
def test_matches_dense_reference(method, impl, length, chunk, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK", chunk)
    model = tiny_model(attn_implementation=impl)
    llama_ctx.patch(model, method, **CASES[method])
    assert_matches_reference(model, method, CASES[method], ids(length))


def test_without_log_scale_and_other_training_length():
    p = dict(window=10, factor=2.5, log_scale=False, training_length=100)
    model = tiny_model()
    llama_ctx.patch(model, "leaky-rerope", **p)
    assert_matches_reference(model, "leaky-rerope", p, ids(150))
    p = dict(window=10, training_length=32)
    llama_ctx.patch(model, "rerope", **p)
    assert_matches_reference(model, "rerope", p, ids(150))


def test_plain_matmul_path_matches_reference(monkeypatch):
    monkeypatch.setattr(kernels, "flash_cpu_ok", lambda: False)  # force the plain-matmul path
    monkeypatch.setattr(engine, "CHUNK", 48)
    for method, p in CASES.items():
        model = tiny_model()
        llama_ctx.patch(model, method, **p)
        assert_matches_reference(model, method, p, ids(130))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_rerope_with_window_past_length_is_the_stock_model(impl):
    model = tiny_model(attn_implementation=impl)
    x = ids(150)
    stock = run(model, x)
    llama_ctx.patch(model, "rerope", window=150, log_scale=False)
    for got, want in zip(run(model, x), stock):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", list(CASES))
def test_generate_with_cache_equals_full_forward(method):
    model = tiny_model()
    llama_ctx.patch(model, method, **CASES[method])
    prompt = ids(40)  # 40 + 30 tokens: crosses every window and the trained length
    out = model.generate(prompt, max_new_tokens=30, min_new_tokens=30, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    full = logits(model, out.sequences)
    step = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(step, full[:, 39:-1], atol=1e-4, rtol=0)
    assert torch.equal(out.sequences[:, 40:], full[:, 39:-1].argmax(-1))


def left_padded(rows):
    width = max(len(r) for r in rows)
    x = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(x)
    for b, r in enumerate(rows):
        x[b, width - len(r):], mask[b, width - len(r):] = r, 1
    return x, mask


def assert_padded_generate_equals_rows(model, rows, new=8):
    """`generate` on the left-padded batch of `rows` gives each row's own tokens and logits."""
    x, mask = left_padded(rows)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True)
    out = model.generate(x, attention_mask=mask, **kw)
    for b, r in enumerate(rows):
        single = model.generate(r[None], **kw)
        assert torch.equal(out.sequences[b, x.shape[1]:], single.sequences[0, len(r):])
        torch.testing.assert_close(torch.stack(out.logits)[:, b], torch.stack(single.logits)[:, 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("method", list(CASES))
def test_left_padding_matches_single_rows(method, impl, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK", 48)
    model = tiny_model(attn_implementation=impl)
    llama_ctx.patch(model, method, **CASES[method])
    rows = [ids(120, seed=2)[0], ids(77, seed=3)[0], ids(30, seed=4)[0]]
    x, mask = left_padded(rows)
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    batch = logits(model, x, attention_mask=mask, position_ids=position_ids)
    for b, r in enumerate(rows):
        torch.testing.assert_close(batch[b, -len(r):], logits(model, r[None])[0], atol=1e-5, rtol=0)
    # and the batch itself equals the dense reference with per-row positions and padding
    assert_matches_reference(model, method, CASES[method], x, attention_mask=mask, position_ids=position_ids)

    if impl == "eager":
        return  # generation with padding: once per method is enough
    llama_ctx.patch(model, method, **CASES[method])
    assert_padded_generate_equals_rows(model, rows)


@pytest.mark.parametrize("order", ["yarn first", "rerope first"])
def test_yarn_plus_rerope_equals_reference_with_yarn_frequencies(order):
    model = tiny_model()
    native = clone_with(model, rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0,
                                                    original_max_position_embeddings=TRAINED))
    inv_freq, scaling = native.model.rotary_emb.inv_freq, native.model.rotary_emb.attention_scaling
    assert scaling > 1 and not torch.allclose(inv_freq, default_inv_freq())  # the check can tell yarn apart
    steps = [("yarn", dict(factor=4.0)), ("rerope", CASES["rerope"])]
    for method, p in steps if order == "yarn first" else steps[::-1]:
        llama_ctx.patch(model, method, **p)
    assert set(llama_ctx.state(model)) == {"rope", "attention"}
    assert_matches_reference(model, "rerope", CASES["rerope"], ids(200), inv_freq=inv_freq, scaling=scaling)


@pytest.mark.parametrize("first,second", [("dynamic-ntk", "rerope"), ("self-extend", "dynamic-ntk")])
def test_dynamic_rope_is_refused_with_a_reason(first, second):
    params = {"dynamic-ntk": dict(factor=2.0), **CASES}
    model = tiny_model()
    x = ids(150)
    llama_ctx.patch(model, first, **params[first])
    before = logits(model, x)
    with pytest.raises(PatchStateError, match="'dynamic-ntk' cannot be combined with .*length of each call"):
        llama_ctx.patch(model, second, **params[second])
    assert torch.equal(logits(model, x), before)
    assert list(llama_ctx.state(model)) == [llama_ctx.registry.get(first).kind]


@pytest.mark.parametrize("method", list(CASES))
def test_unpatch_is_bit_exact(method):
    model = tiny_model()
    x = ids(150)
    before = logits(model, x)
    llama_ctx.patch(model, "yarn", factor=2.0)
    llama_ctx.patch(model, method, **CASES[method])
    assert llama_ctx.state(model)["attention"]["params"]["window" if method != "lambda" else "local_window"]
    assert not torch.allclose(logits(model, x), before)
    llama_ctx.unpatch(model)
    assert torch.equal(logits(model, x), before)
    assert all("forward" not in vars(layer.self_attn) for layer in model.model.layers)


BAD = [
    ("rerope", dict(window=0), ConfigError, "window must be >= 1"),
    ("rerope", dict(window=-3), ConfigError, "window must be >= 1"),
    ("rerope", dict(window=1.5), ConfigError, "window must be an integer"),
    ("rerope", dict(window="16"), ConfigError, "window must be an integer"),
    ("rerope", dict(window=16, log_scale="yes"), ConfigError, "log_scale must be True or False"),
    ("rerope", dict(window=16, training_length=1), ConfigError, "training_length must be >= 2"),
    ("leaky-rerope", dict(window=16, factor=1), ConfigError, "factor must be > 1"),
    ("leaky-rerope", dict(window=16, factor=0.5), ConfigError, "factor must be > 1"),
    ("leaky-rerope", dict(window=16), ConfigError, "needs parameter.*'factor'"),
    ("self-extend", dict(group_size=0, window=16), ConfigError, "group_size must be >= 1"),
    ("self-extend", dict(group_size=2.0, window=16), ConfigError, "group_size must be an integer"),
    ("self-extend", dict(group_size=4, window=0), ConfigError, "window must be >= 1"),
    ("self-extend", dict(group_size=4, window=64), ConfigError, "window must be < the trained window 64"),
    ("lambda", dict(local_window=0), ConfigError, "local_window must be >= 1"),
    ("lambda", dict(global_tokens=-1), ConfigError, "global_tokens must be >= 0"),
    ("lambda", dict(window=8), ConfigError, "unknown parameter.*'window'"),
]


@pytest.mark.parametrize("method,kw,err,match", BAD, ids=[f"{b[0]}-{b[1]}" for b in BAD])
def test_bad_input_raises_one_clear_error_and_leaves_model_untouched(method, kw, err, match):
    model = tiny_model()
    x = ids(100)
    before = logits(model, x)
    with pytest.raises(err, match=match) as info:
        llama_ctx.patch(model, method, **kw)
    assert isinstance(info.value, LlamaCtxError)
    assert llama_ctx.state(model) is None
    assert torch.equal(logits(model, x), before)


@pytest.mark.parametrize("method", list(CASES))
def test_unsupported_attention_implementation_names_the_supported_ones(method):
    model = tiny_model()
    x = ids(50)
    before = logits(model, x)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="'flex_attention' is not supported.*'eager', 'sdpa'"):
        llama_ctx.patch(model, method, **CASES[method])
    model.config._attn_implementation = "sdpa"
    assert llama_ctx.state(model) is None and torch.equal(logits(model, x), before)


def test_self_extend_past_its_coverage_names_the_group_size_before_computing():
    model = tiny_model()
    llama_ctx.patch(model, "self-extend", group_size=2, window=16)  # covers (64 - 16) * 2 + 16 = 112
    logits(model, ids(112))
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ConfigError, match="covers 112 positions.*reaches 113.*group_size >= 3"):
        logits(model, ids(113))
    assert not calls  # raised before any attention computation
    with pytest.raises(ConfigError, match="reaches 401.*group_size >= 9"):
        logits(model, ids(401))


def test_private_flash_op_is_used_only_if_it_agrees_with_plain_matmuls(monkeypatch):
    def wrong(q, k, v, *a, **kw):  # a torch whose private op changed behaviour
        out, lse = kernels.attend_dense(q, k, v, kw.get("attn_mask"), kw["scale"])
        return out + 1e-3, lse

    def gone(*a, **kw):
        raise RuntimeError("no such op")

    for bad in (wrong, gone, None):
        monkeypatch.setattr(kernels, "FLASH_CPU", bad)
        kernels.flash_cpu_ok.cache_clear()
        assert kernels.flash_cpu_ok() is False
    kernels.flash_cpu_ok.cache_clear()
    monkeypatch.undo()
    assert kernels.flash_cpu_ok() is (kernels.FLASH_CPU is not None)
    kernels.flash_cpu_ok.cache_clear()
