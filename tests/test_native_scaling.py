"""Models that already scale their RoPE natively (Llama 3.1/3.2: rope_type "llama3", factor 8, 8K -> 128K).

Semantics (see `llama_ctx.patch`): frequency methods are defined on the unscaled frequencies, so they are refused
on such a model unless `replace_native=True`, which starts them from the unscaled frequencies and the pre-training
window; attention methods keep the native scaling; `trained_window` is the extended length. transformers' own
rope functions (native `rope_parameters`) are the oracle.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import llama_ctx
from llama_ctx import ConfigError, PatchStateError
from llama_ctx.patch import trained_window
from llama_ctx.reference.positional import default_inv_freq
from conftest import clone_with, ids, logits, tiny_model
from test_attention_positional import assert_matches_reference

LLAMA31 = dict(max_position_embeddings=131072, rope_parameters=dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192,
    rope_theta=500000.0))


def llama31(**kw):
    return tiny_model(**LLAMA31, **kw)


def test_the_tiny_llama31_really_is_scaled():
    model = llama31()
    native = model.model.rotary_emb.inv_freq
    unscaled = default_inv_freq(base=500000.0)
    assert model.model.rotary_emb.rope_type == "llama3"
    torch.testing.assert_close(native[:4], unscaled[:4], atol=0, rtol=1e-6)  # 4 pairs kept, 3 divided by 8
    assert (native[5:] < unscaled[5:] / 7.9).all()


@pytest.mark.parametrize("overrides,window", [
    (LLAMA31, 131072),  # max_position_embeddings, not the 8192 pre-training window
    (dict(rope_parameters=dict(rope_type="linear", factor=4.0)), 256),  # max_position_embeddings left at the base
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)), 256),
    (dict(rope_parameters=dict(rope_type="dynamic", factor=4.0)), 64),  # scales past max_position_embeddings
    ({}, 64),
])
def test_trained_window_is_the_length_the_scaled_model_handles(overrides, window):
    model = tiny_model(**overrides)
    assert trained_window(model) == window
    assert llama_ctx.inspect_rope(model)[0]["critical"] is False


ROPE = [("pi", dict(factor=2.0)), ("ntk", dict(factor=1.0)), ("dynamic-ntk", dict(factor=2.0)),
        ("yarn", dict(factor=16.0)), ("llama3", dict(factor=8.0)), ("base-truncation", dict(a=1e-5, b=1e-3, rho=0.0))]


@pytest.mark.parametrize("method,params", ROPE)
def test_rope_method_is_refused_rather_than_dropping_the_native_scaling(method, params):
    model = llama31()
    x = ids(100)
    before, rope_parameters = logits(model, x), dict(model.config.rope_parameters)
    with pytest.raises(PatchStateError, match=r"natively \(rope_type 'llama3', trained window 131072 from 8192\).*"
                                              r"attention method.*replace_native=True"):
        llama_ctx.patch(model, method, **params)
    assert llama_ctx.state(model) is None and model.config.rope_parameters == rope_parameters
    assert torch.equal(logits(model, x), before)
    with pytest.raises(PatchStateError, match="replace_native=True"):
        llama_ctx.inspect_rope(model, method, **params)


HF = [  # replace_native=True: the method from the unscaled frequencies equals transformers' type of that name
    ("pi", dict(factor=2.0), dict(rope_type="linear", factor=2.0)),
    ("yarn", dict(factor=16.0), dict(rope_type="yarn", factor=16.0, original_max_position_embeddings=8192)),
    ("llama3", dict(factor=8.0), LLAMA31["rope_parameters"]),  # the defaults rebuild the native model itself
]


@pytest.mark.parametrize("method,params,native", HF, ids=[h[0] for h in HF])
def test_replace_native_starts_from_the_unscaled_frequencies(method, params, native, tmp_path):
    model = llama31()
    x = ids(200)
    stock, rotary, config = logits(model, x), model.model.rotary_emb, model.config
    rope_parameters = dict(config.rope_parameters)
    expected = logits(clone_with(model, rope_parameters={"rope_theta": 500000.0, **native}), x)
    llama_ctx.patch(model, method, replace_native=True, **params)
    assert trained_window(model) == 8192
    assert llama_ctx.state(model)["rope"]["replace_native"] is True
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=0)
    if method != "llama3":
        assert not torch.allclose(logits(model, x), stock)  # the check can tell the native model apart

    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(loaded, x), expected, atol=1e-5, rtol=0)
    again = llama_ctx.from_pretrained(tmp_path).eval()
    assert llama_ctx.state(again) == llama_ctx.state(model)
    torch.testing.assert_close(logits(again, x), expected, atol=1e-5, rtol=0)

    llama_ctx.unpatch(model)  # the exact native model
    assert model.model.rotary_emb is rotary and model.config is config and config.rope_parameters == rope_parameters
    assert torch.equal(logits(model, x), stock)
    llama_ctx.unpatch(again)
    torch.testing.assert_close(logits(again, x), stock, atol=1e-6, rtol=0)


def test_replace_native_dynamic_is_saved_for_llama_ctx_only(tmp_path):
    # transformers' dynamic type reads its window from max_position_embeddings (131072), not 8192: not native
    model = llama31()
    x = ids(100)
    llama_ctx.patch(model, "dynamic-ntk", factor=2.0, replace_native=True)
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "llama3" and not saved["llama_ctx"]["rope"]["native"]
    again = llama_ctx.from_pretrained(tmp_path).eval()
    assert llama_ctx.state(again) == llama_ctx.state(model)
    torch.testing.assert_close(logits(again, x), expected, atol=1e-6, rtol=0)


def test_attention_method_alone_keeps_the_native_frequencies():
    model = llama31()
    x = ids(200)
    stock = logits(model, x)
    native, scaling = model.model.rotary_emb.inv_freq.clone(), model.model.rotary_emb.attention_scaling
    p = dict(window=16, training_length=64)
    llama_ctx.patch(model, "rerope", **p)
    assert_matches_reference(model, "rerope", p, x, inv_freq=native, scaling=scaling)  # it unpatches
    assert torch.equal(logits(model, x), stock)
    llama_ctx.patch(model, "rerope", window=16)
    assert llama_ctx.state(model)["attention"]["params"]["training_length"] == 131072  # the extended window
    assert model.config.rope_parameters == LLAMA31["rope_parameters"]
    llama_ctx.unpatch(model)
    assert torch.equal(logits(model, x), stock)


@pytest.mark.parametrize("method,params", [("rerope", dict(window=16)), ("leaky-rerope", dict(window=16, factor=4.0)),
                                           ("self-extend", dict(group_size=4, window=16)), ("lambda", {})])
def test_native_dynamic_is_refused_like_dynamic_ntk(method, params):
    ours = tiny_model()
    llama_ctx.patch(ours, "dynamic-ntk", factor=2.0)
    with pytest.raises(PatchStateError) as refused:
        llama_ctx.patch(ours, method, **params)
    reason = str(refused.value).split(": ", 1)[1]
    model = tiny_model(rope_parameters=dict(rope_type="dynamic", factor=2.0))
    x = ids(100)
    before = logits(model, x)
    with pytest.raises(PatchStateError, match=r"native rope scaling \(rope_type 'dynamic'\) cannot be combined "
                                              rf"with '{method}'") as native:
        llama_ctx.patch(model, method, **params)
    assert reason in str(native.value) and "replace_native=True" in str(native.value)
    assert llama_ctx.state(model) is None and torch.equal(logits(model, x), before)
    llama_ctx.patch(model, "yarn", factor=2.0, replace_native=True)  # the way out the message names
    llama_ctx.patch(model, method, **params)
    assert set(llama_ctx.state(model)) == {"rope", "attention"}


def test_streaming_on_native_dynamic_reads_the_frequencies_of_each_call():
    # the stock dynamic module keeps the frequencies of the longest input seen; streaming must not read them stale
    model = tiny_model(rope_parameters=dict(rope_type="dynamic", factor=2.0))
    twin = tiny_model()
    llama_ctx.patch(twin, "dynamic-ntk", factor=2.0)
    for m in (model, twin):
        llama_ctx.patch(m, "streaming", window=32)
    for length in (150, 150, 40):
        x = ids(length)
        torch.testing.assert_close(logits(model, x), logits(twin, x), atol=1e-5, rtol=0)


def test_replace_native_only_for_rope_methods_and_before_attention_methods():
    model = llama31()
    with pytest.raises(ConfigError, match="replace_native=True is for rope methods"):
        llama_ctx.patch(model, "rerope", window=16, replace_native=True)
    with pytest.raises(ConfigError, match="replace_native must be True or False"):
        llama_ctx.patch(model, "yarn", factor=16.0, replace_native="yes")
    llama_ctx.patch(model, "rerope", window=16)
    with pytest.raises(PatchStateError, match="attention method 'rerope'.*unpatch.*replace_native=True first"):
        llama_ctx.patch(model, "yarn", factor=16.0, replace_native=True)
    assert list(llama_ctx.state(model)) == ["attention"]
    plain = tiny_model()  # nothing to replace: accepted, and the same as without it
    llama_ctx.patch(plain, "yarn", factor=4.0, replace_native=True)
    assert llama_ctx.state(plain) == llama_ctx.state(llama_ctx.patch(tiny_model(), "yarn", factor=4.0))


def test_inspect_shows_the_native_frequencies_and_the_replacement():
    model = llama31()
    rows = llama_ctx.inspect_rope(model)
    assert [r["theta"] for r in rows] == model.model.rotary_emb.inv_freq.tolist()
    assert [r["critical"] for r in rows] == [r["wavelength"] > 131072 for r in rows]
    rows = llama_ctx.inspect_rope(model, "yarn", factor=16.0, replace_native=True)
    yarn = clone_with(model, rope_parameters=dict(HF[1][2], rope_theta=500000.0)).model.rotary_emb.inv_freq
    unscaled = clone_with(model, rope_parameters=dict(rope_type="default", rope_theta=500000.0)).model.rotary_emb
    assert [r["theta"] for r in rows] == unscaled.inv_freq.tolist()
    torch.testing.assert_close(torch.tensor([r["theta_after"] for r in rows]), yarn, atol=0, rtol=1e-6)
    assert [r["critical"] for r in rows] == [r["wavelength"] > 8192 for r in rows]
