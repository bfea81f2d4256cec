"""Rope methods against transformers' own implementations (native `rope_parameters`) as the oracle."""

import math

import pytest
import torch

import llama_ctx
from llama_ctx.reference.rope import NATIVE, ntk_base, truncated_frequencies
from conftest import clone_with, ids, logits, tiny_model

LENGTHS = [40, 200]  # below and well above the trained window

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
    new_base = ntk_base(10000.0, 4.0, 64 // 4)
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
    want = truncated_frequencies(16, 10000.0, a, b, rho)
    for i, r in enumerate(rows):
        assert math.isclose(r["theta_after"], float(want[i]), rel_tol=1e-6), (i, r)
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
    model.model.rotary_emb.inv_freq.copy_(truncated_frequencies(16, 10000.0, 0.01, 0.1, 0.005))
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
