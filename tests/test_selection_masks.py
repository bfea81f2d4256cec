"""Token selection ("topk", "block-topk") and the attention mask: padding comes from the mask, anything else is refused.

Expected values come from the dense float64 reference of test_attention_selection.py, run on each row alone.
"""

import pytest
import torch
from transformers import DynamicCache

import llama_ctx
from llama_ctx import ConfigError
from llama_ctx.compat import cache_kwargs
from conftest import ids, logits, tiny_model
from llama_ctx.reference.selection import reference_logits
from test_attention_selection import CASES

PAD = 13


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("method,params", CASES, ids=["topk", "block-topk"])
def test_padding_is_read_from_the_attention_mask(impl, method, params):
    model = tiny_model(attn_implementation=impl)
    rows = [ids(40, seed=2)[0], ids(27, seed=3)[0]]
    expected = [reference_logits(model, row[None], method, params)[0] for row in rows]
    llama_ctx.patch(model, method, **params)
    pads = torch.zeros(PAD, dtype=torch.long)
    left = torch.stack([rows[0], torch.cat([pads, rows[1]])])
    mask = torch.ones_like(left)
    mask[1, :PAD] = 0
    out = logits(model, left, attention_mask=mask)  # no position_ids: transformers passes a plain arange
    torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, PAD:], expected[1], atol=1e-5, rtol=0)
    right = torch.stack([rows[0], torch.cat([rows[1], pads])])
    out = logits(model, right, attention_mask=mask.flip(1))
    torch.testing.assert_close(out[1, :27], expected[1], atol=1e-5, rtol=0)
    cache = DynamicCache()  # decoding by hand, again without position_ids
    with torch.no_grad():
        model(left[:, :-1], attention_mask=mask[:, :-1], **cache_kwargs(cache))
        step = model(left[:, -1:], attention_mask=mask, **cache_kwargs(cache)).logits[:, -1]
    torch.testing.assert_close(step[0], expected[0][-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[1], expected[1][-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("method,params", CASES, ids=["topk", "block-topk"])
def test_a_4d_padding_mask_is_honoured_and_other_masks_are_refused(impl, method, params):
    model = tiny_model(attn_implementation=impl)
    llama_ctx.patch(model, method, **params)
    x, n = ids(30, batch=2), 30
    mask = torch.ones_like(x)
    mask[1, :PAD] = 0
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    padding = causal & mask.bool()[:, None, :]  # what transformers builds from the 2D mask
    additive = torch.zeros(2, 1, n, n).masked_fill(~padding[:, None], torch.finfo(torch.float32).min)
    expected = logits(model, x, attention_mask=mask)
    for given in (padding[:, None], additive):
        torch.testing.assert_close(logits(model, x, attention_mask=given), expected, atol=1e-6, rtol=0)
    packed = causal.clone()
    packed[15:, :15] = False  # two documents in one row
    biased = additive.clone()
    biased[..., 3] += -2.0  # a soft bias on one key
    for bad in (packed.expand(2, 1, n, n), biased, padding[:, None, :, :-1]):
        with pytest.raises(ConfigError, match="honours only a padding mask"):
            logits(model, x, attention_mask=bad)
    for bad in (torch.cat([torch.arange(15), torch.arange(15)])[None], 2 * torch.arange(n)[None]):
        with pytest.raises(ConfigError, match="position_ids must grow by one per real token"):
            logits(model, x, position_ids=bad)
    cache = DynamicCache()  # right padding, then decoding: the new token would not follow its row's tokens
    with torch.no_grad(), pytest.raises(ConfigError, match="decoding needs left padding"):
        model(x, attention_mask=mask.flip(1), **cache_kwargs(cache))
        model(x[:, :1], attention_mask=torch.cat([mask.flip(1), mask[:, :1]], 1), **cache_kwargs(cache))
