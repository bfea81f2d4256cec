"""Rope methods against transformers' own implementations (native `rope_parameters`) as the oracle."""

import math

import pytest
import torch

import llama_ctx
from conftest import clone_with, ids, logits, tiny_model

WINDOW = 64
LENGTHS = [40, 200]  # below and well above the trained window

NATIVE = [  # (llama_ctx method, params, equivalent transformers rope_parameters)
    ("pi", dict(factor=4.0), dict(rope_type="linear", factor=4.0)),
    ("linear", dict(factor=2.5), dict(rope_type="linear", factor=2.5)),
    ("dynamic-ntk", dict(factor=4.0), dict(rope_type="dynamic", factor=4.0)),
    ("yarn", dict(factor=4.0), dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=WINDOW)),
    ("yarn", dict(factor=8.0, beta_fast=16, beta_slow=2, attention_factor=1.3),
     dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=WINDOW, beta_fast=16, beta_slow=2,
          attention_factor=1.3)),
    ("llama3", dict(factor=8.0), dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=WINDOW)),
]


def native_model(model, rope_parameters):
    return clone_with(model, rope_parameters={"rope_theta": 10000.0, **rope_parameters})


@pytest.mark.parametrize("method,params,native", NATIVE, ids=lambda v: str(v))
@pytest.mark.parametrize("length", LENGTHS)
def test_matches_native_transformers(method, params, native, length):
    model = tiny_model()
    x = ids(length)
    expected = logits(native_model(model, native), x)
    llama_ctx.patch(model, method, **params)
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=0)


def test_ntk_equals_stock_model_with_closed_form_base():
    model = tiny_model()
    d = 64 // 4
    new_base = 10000.0 * 4.0 ** (d / (d - 2))
    x = ids(200)
    expected = logits(native_model(model, dict(rope_type="default", rope_theta=new_base)), x)
    llama_ctx.patch(model, "ntk", factor=4.0)
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=0)
    llama_ctx.unpatch(model)
    llama_ctx.patch(model, "ntk", base=new_base)
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=0)


def test_base_truncation_formula():
    a, b, rho = 0.01, 0.1, 0.005
    rows = llama_ctx.inspect_rope(tiny_model(), "base-truncation", a=a, b=b, rho=rho)
    d = 16
    for i, r in enumerate(rows):
        theta = 10000.0 ** (-2 * i / d)
        want = theta if theta >= b else (0.0 if theta <= a else rho)
        assert math.isclose(r["theta_after"], want, rel_tol=1e-6), (i, r)
    kept = sum(r["theta_after"] == r["theta"] for r in rows)
    zeroed = sum(r["theta_after"] == 0 for r in rows)
    assert kept and zeroed and len(rows) - kept - zeroed  # the test parameters exercise all three bands


def test_base_truncation_forward_uses_those_frequencies():
    model = tiny_model()
    x = ids(100)
    llama_ctx.patch(model, "base-truncation", a=0.01, b=0.1, rho=0.005)
    patched = logits(model, x)
    # reference: rotate with explicitly computed frequencies through transformers' own rotary module
    llama_ctx.unpatch(model)
    d = 16
    theta = torch.tensor([10000.0 ** (-2 * i / d) for i in range(d // 2)])
    theta = torch.where(theta >= 0.1, theta, torch.where(theta <= 0.01, torch.zeros_like(theta), 0.005))
    model.model.rotary_emb.inv_freq.copy_(theta)
    torch.testing.assert_close(patched, logits(model, x), atol=1e-5, rtol=0)


def test_dynamic_ntk_generate_crossing_window_matches_native():
    model = tiny_model()
    native = native_model(model, dict(rope_type="dynamic", factor=2.0))
    llama_ctx.patch(model, "dynamic-ntk", factor=2.0)
    x = ids(50)
    kw = dict(max_new_tokens=40, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=0)
    a = model.generate(x, **kw)
    b = native.generate(x, **kw)
    assert a.sequences.shape[1] == 90  # crossed the 64-token window with the cache
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,params", [("yarn", dict(factor=4.0)), ("dynamic-ntk", dict(factor=4.0)),
                                           ("pi", dict(factor=4.0))])
def test_rope_math_in_float32_for_bf16_model(method, params):
    model = tiny_model().to(torch.bfloat16)
    llama_ctx.patch(model, method, **params)
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32
    pos = torch.arange(300)[None]
    x = torch.zeros(1, dtype=torch.bfloat16)
    cos, sin = rotary(x, pos)
    assert cos.dtype == torch.bfloat16
    # reference in float64, rounded once to bf16: equal to what a float32 computation gives
    inv, scale = rotary.frequencies(pos)
    ang = pos[..., None].double() * inv.double()
    ref = (torch.cat([ang, ang], -1).cos() * scale).to(torch.bfloat16)
    assert (cos.float() - ref.float()).abs().max() <= 2 ** -7  # one bf16 ulp at most
