"""Position methods (kind "position") against the dense float64 forward of `llama_ctx.reference.encodings`.

For every method: logits past the trained window against the reference with the encoding written in from its
formula; a left-padded batch row (with position_ids) equal to the row alone; cached generate() equal to full
forwards; unpatch bit-exact; save_pretrained + llama_ctx.from_pretrained; conflicts and bad parameters refused
with the model untouched.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import llama_ctx
from conftest import ids, logits, tiny_model
from llama_ctx.errors import ConfigError, PatchStateError
from llama_ctx.reference.encodings import dense_logits

TOL = 1e-5
CASES = {  # method -> (params, (patched model, params) -> `encode` for dense_logits, or None)
    "nope": (dict(), lambda model, p: None),
}


def expected(model, name, x, position_ids=None, attention_mask=None):
    params, encode = CASES[name]
    return dense_logits(model, x, position_ids, encode=encode(model, params), attention_mask=attention_mask)


def test_dense_reference_with_rope_is_the_stock_model():
    """The reference itself: with RoPE written in, it gives the stock model's logits (padding and offsets too)."""
    model, x = tiny_model(), ids(80, batch=2)
    mask = torch.ones_like(x)
    mask[1, :7] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0) + torch.tensor([[3], [0]])
    got = logits(model, x, attention_mask=mask, position_ids=pos)
    want = dense_logits(model, x, pos, attention_mask=mask, rope=True)
    torch.testing.assert_close(got[mask.bool()].double(), want[mask.bool()], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_dense_reference_and_unpatch_is_exact(name):
    model, x = tiny_model(), ids(96)
    before = logits(model, x)
    llama_ctx.patch(model, name, **CASES[name][0])
    assert llama_ctx.state(model) == {"position": {"method": name, "kind": "position", "params": CASES[name][0]}}
    got = logits(model, x)
    assert not torch.allclose(got, before, atol=1e-3)  # rotary is off: the model changed
    torch.testing.assert_close(got.double(), expected(model, name, x), atol=TOL, rtol=0)
    llama_ctx.unpatch(model)
    assert torch.equal(logits(model, x), before) and llama_ctx.state(model) is None
    assert "forward" not in vars(model.model) and not hasattr(model.model, "llama_ctx_position")


@pytest.mark.parametrize("name", list(CASES))
def test_left_padded_row_equals_the_row_alone(name):
    model = llama_ctx.patch(tiny_model(), name, **CASES[name][0])
    row, other = ids(50, seed=5), ids(70, seed=6)
    x = torch.cat([torch.cat([torch.zeros(1, 20, dtype=torch.long), row], 1), other])
    mask = torch.ones_like(x)
    mask[0, :20] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = logits(model, x, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(batch[:1, 20:], logits(model, row), atol=TOL, rtol=0)
    torch.testing.assert_close(batch[:1, 20:].double(), expected(model, name, row), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_cached_generate_equals_full_forward(name):
    model = llama_ctx.patch(tiny_model(), name, **CASES[name][0])
    x = ids(30, batch=2)
    mask = torch.ones_like(x)
    mask[0, :6] = 0  # left padding: generate() passes position_ids from the mask
    out = model.generate(x, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    steps = torch.stack(out.logits, 1)
    full_mask = torch.cat([mask, torch.ones(2, 12, dtype=torch.long)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    full = logits(model, out.sequences, attention_mask=full_mask, position_ids=pos, use_cache=False)
    torch.testing.assert_close(steps, full[:, 29:-1], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_saved_and_reapplied_stock_loading_refuses(name, tmp_path):
    model = llama_ctx.patch(tiny_model(), name, **CASES[name][0])
    x = ids(90)
    want = logits(model, x)
    model.save_pretrained(tmp_path)
    with pytest.raises(KeyError, match="llama_ctx.from_pretrained"):  # not a RoPE model in silence
        AutoModelForCausalLM.from_pretrained(tmp_path)
    again = llama_ctx.from_pretrained(tmp_path).eval()
    assert llama_ctx.state(again) == llama_ctx.state(model)
    torch.testing.assert_close(logits(again, x), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(llama_ctx.unpatch(again), x), logits(tiny_model(), x), atol=1e-6, rtol=0)


def test_position_methods_refuse_rope_methods_and_unlisted_attention_methods():
    model, x = tiny_model(), ids(40)
    before = logits(model, x)
    llama_ctx.patch(model, "yarn", factor=2)
    with pytest.raises(PatchStateError, match="'nope' turns rotary off.*'yarn'"):
        llama_ctx.patch(model, "nope")
    llama_ctx.unpatch(model).eval()
    llama_ctx.patch(model, "rerope", window=8)
    with pytest.raises(PatchStateError, match="'rerope' cannot be combined with the position method 'nope'"):
        llama_ctx.patch(model, "nope")
    llama_ctx.unpatch(model)
    llama_ctx.patch(model, "nope")
    state = llama_ctx.state(model)
    for method, params in [("pi", dict(factor=2)), ("rerope", dict(window=8)), ("nope", {})]:
        with pytest.raises(PatchStateError):
            llama_ctx.patch(model, method, **params)
        assert llama_ctx.state(model) == state
    with pytest.raises(ConfigError, match="replace_native=True is for rope methods"):
        llama_ctx.patch(tiny_model(), "nope", replace_native=True)
    assert torch.equal(logits(llama_ctx.unpatch(model), x), before)


def test_bad_parameters_leave_the_model_untouched():
    model, x = tiny_model(), ids(20)
    before = logits(model, x)
    with pytest.raises(ConfigError, match="unknown parameter"):
        llama_ctx.patch(model, "nope", scale=2)
    assert llama_ctx.state(model) is None and torch.equal(logits(model, x), before)
