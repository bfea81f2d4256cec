"""S2-attn against the dense reference in `llama_ctx.reference.s2` (explicit L x L visibility per head, float64).

The whole tiny model runs in train mode twice on the same weights: patched with "s2-attn", and unpatched with every
attention forward replaced by the reference. Logits and the gradients of every q/k/v/o projection must agree.
"""

import pytest
import torch

import llama_ctx
from llama_ctx import ConfigError, UnsupportedModelError
from llama_ctx.compat import cache_kwargs
from llama_ctx.reference.s2 import dense_reference, s2_visibility
from conftest import ids, tiny_model

L = 32


def packed(length):
    """position_ids (1, length) of documents of 10, 14 and length - 24 tokens: boundaries inside groups."""
    return torch.tensor([[*range(10), *range(14), *range(length - 24)]])


PACKED = packed(L)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def forward_and_grads(model, x, **kw):
    model.zero_grad(set_to_none=True)
    logits = model(x, use_cache=False, **kw).logits
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0), dtype=logits.dtype)
    (logits * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.split(".")[-2] in PROJ}
    return logits.detach(), grads


def s2_vs_reference(model, x, group, wrap=False, mask=None, rope=None, params=None, **kw):
    """(S2 logits, grads), (reference logits, grads) on the same weights, in train mode."""
    if rope:
        llama_ctx.patch(model, *rope)
    llama_ctx.patch(model, "s2-attn", wrap=wrap, **(params or {}))
    model.train()
    got = forward_and_grads(model, x, **kw)
    llama_ctx.unpatch(model)
    if rope:
        llama_ctx.patch(model, *rope)
    with dense_reference(model, group, wrap=wrap, mask=mask):
        want = forward_and_grads(model, x, **kw)
    llama_ctx.unpatch(model)
    return got, want


def assert_close(got, want, atol=1e-5, rtol=0.0):
    """Logits within atol; gradients within atol relative to their largest entry (they reach ~100 here)."""
    torch.testing.assert_close(got[0], want[0], atol=atol, rtol=rtol)
    assert got[1].keys() == want[1].keys() and len(got[1]) == 8  # 2 layers x 4 projections
    for name, g in got[1].items():
        w = want[1][name]
        torch.testing.assert_close(g, w, atol=atol * max(1.0, w.abs().max().item()), rtol=rtol, msg=name)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("kv_heads", [2, 1, 4])  # GQA with aligned halves, MQA (a kv head shared by both), MHA
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_matches_dense_reference(impl, kv_heads, wrap, packed):
    model = tiny_model(attn_implementation=impl, num_key_value_heads=kv_heads)
    kw = dict(position_ids=PACKED) if packed else {}
    got, want = s2_vs_reference(model, ids(L), group=8, wrap=wrap, **kw)  # default ratio 0.25: G = 8
    assert_close(got, want)
    # the test can fail: S2 differs from ordinary (document-)causal attention at this length
    with dense_reference(model.train(), L):
        full = model(ids(L), use_cache=False, **kw).logits
    assert (full - got[0]).abs().max() > 1e-3


@pytest.mark.parametrize("params,length,group", [
    (dict(group_size_ratio=0.5), 32, 16),
    (dict(group_size_ratio=0.125), 32, 4),
    (dict(group_size_ratio=1 / 3), 36, 12),
    (dict(group_size=8), 48, 8),
    (dict(group_size=2), 26, 2),  # smallest: head and tail pieces of one token
])
def test_group_sizes(params, length, group):
    got, want = s2_vs_reference(tiny_model(), ids(length), group, params=params, position_ids=packed(length))
    assert_close(got, want)


def test_composes_with_a_rope_method_and_unpatches_exactly():
    model = tiny_model()
    x = ids(L)
    before = model(x).logits
    llama_ctx.patch(model, "pi", factor=4)
    llama_ctx.patch(model, "s2-attn")
    assert llama_ctx.state(model)["attention"]["params"] == dict(group_size_ratio=0.25, group_size=None, wrap=False)
    model.train()
    got = forward_and_grads(model, x)
    llama_ctx.unpatch(model)
    llama_ctx.patch(model, "pi", factor=4)
    with dense_reference(model, 8):
        want = forward_and_grads(model, x)
    assert_close(got, want)
    stock_pi = forward_and_grads(model, x)[0]
    assert (stock_pi - got[0]).abs().max() > 1e-3
    llama_ctx.unpatch(model)
    assert "forward" not in vars(model.model.layers[0].self_attn)
    assert torch.equal(model.eval()(x).logits, before)


@pytest.mark.parametrize("params", [dict(group_size_ratio=1.0), dict(group_size=64), dict(group_size=32)])
def test_one_group_is_ordinary_causal_attention(params):
    model = tiny_model()
    x = ids(L)
    model.train()
    want = forward_and_grads(model, x, position_ids=PACKED)  # stock packed path (use_cache=False: block mask)
    llama_ctx.patch(model, "s2-attn", **params)
    got = forward_and_grads(model, x, position_ids=PACKED)
    assert_close(got, want, atol=1e-6)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_strictly_causal_on_the_whole_model(impl):
    model = llama_ctx.patch(tiny_model(attn_implementation=impl), "s2-attn").train()
    leaky = llama_ctx.patch(tiny_model(attn_implementation=impl), "s2-attn", wrap=True).train()
    x = ids(L)
    with torch.no_grad():
        base, base_leaky = model(x).logits, leaky(x).logits
        leaks = 0
        for t in (0, 3, 7, 11, 15, 22, 27, 30):
            y = x.clone()
            y[0, t + 1] = (y[0, t + 1] + 1) % 256
            out = model(y).logits
            assert torch.equal(out[:, :t + 1], base[:, :t + 1]), t
            assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 0  # the change is seen from t + 1 on
            leaks += not torch.equal(leaky(y).logits[:, :t + 1], base_leaky[:, :t + 1])
    assert leaks > 0  # LongLoRA's roll lets tokens 0..G/2-1 see the end: the check above can fail


def test_reference_visibility():
    no_wrap, wrap = s2_visibility(16, 8, True), s2_visibility(16, 8, True, wrap=True)
    assert not (no_wrap & ~torch.ones(16, 16).tril().bool()).any()
    assert wrap[0, 12] and wrap[3, 15] and not no_wrap[0, 12]  # the leak, as in LongLoRA issues #15 / #90
    assert no_wrap[4:12, 4:12].equal(torch.ones(8, 8).tril().bool()) and not no_wrap[4, 3]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_eval_mode_is_the_stock_model(impl):
    model = tiny_model(attn_implementation=impl)
    x = ids(L, batch=2)
    want = model(x, position_ids=PACKED.expand(2, -1)).logits
    gen = model.generate(x[:, :20], max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    llama_ctx.patch(model, "s2-attn")
    assert torch.equal(model(x, position_ids=PACKED.expand(2, -1)).logits, want)
    got = model.generate(x[:, :20], max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, gen.sequences)
    for a, b in zip(got.logits, gen.logits):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    model.train()
    assert (model(x).logits - want).abs().max() > 1e-3  # train mode is S2


def test_training_with_transformers_default_cache():
    """In train mode transformers passes a fresh DynamicCache (config.use_cache); S2 fills it like the stock model."""
    model = llama_ctx.patch(tiny_model(), "s2-attn").train()
    out = model(ids(L))
    cache = out.cache if "cache" in out else out.past_key_values
    assert cache.get_seq_length() == L
    with torch.no_grad(), pytest.raises(ConfigError, match="model.eval"):
        model(ids(8), **cache_kwargs(cache))


def test_left_padding():
    x = ids(L, batch=2)
    pad = torch.ones(2, L, dtype=torch.long)
    pad[1, :5] = 0
    real = pad.bool()
    mask = real[:, None, :].expand(2, L, L)  # key padding, on top of the groups
    got, want = s2_vs_reference(tiny_model(), x, 8, mask=mask, attention_mask=pad)
    assert torch.isfinite(got[0]).all()
    torch.testing.assert_close(got[0][real], want[0][real], atol=1e-5, rtol=0)
    # without the key padding the padded row's real tokens would differ: the mask was honoured, not ignored
    unmasked = s2_vs_reference(tiny_model(), x, 8, attention_mask=pad)[1][0]
    assert (unmasked[1][real[1]] - got[0][1][real[1]]).abs().max() > 1e-3


def test_bfloat16():
    model = tiny_model().to(torch.bfloat16)
    got, want = s2_vs_reference(model, ids(L), 8, position_ids=PACKED)
    assert_close(got, want, atol=0.02)  # measured: 0.004 on logits, <= 0.01 x the largest gradient entry


def test_gradient_checkpointing():
    model = llama_ctx.patch(tiny_model(), "s2-attn").train()
    want = forward_and_grads(model, ids(L), position_ids=PACKED)
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    assert_close(forward_and_grads(model, ids(L), position_ids=PACKED), want, atol=1e-6)


@pytest.mark.parametrize("params,match", [
    (dict(group_size_ratio=0.3), "1/n"),
    (dict(group_size_ratio=0.0), "> 0"),
    (dict(group_size_ratio=2.0), "1/n"),
    (dict(group_size_ratio=0.25, group_size=8), "not both"),
    (dict(group_size=7), "even"),
    (dict(group_size=0), ">= 2"),
    (dict(wrap="yes"), "True or False"),
    (dict(group_ratio=0.25), "unknown parameter"),
])
def test_bad_parameters_leave_the_model_untouched(params, match):
    model = tiny_model()
    with pytest.raises(ConfigError, match=match):
        llama_ctx.patch(model, "s2-attn", **params)
    assert llama_ctx.state(model) is None and "forward" not in vars(model.model.layers[0].self_attn)


@pytest.mark.parametrize("params,length,match", [
    (dict(), 36, r"seq_len 36 with group_size_ratio 0.25 .* multiple of 8"),
    (dict(group_size=8), 36, "seq_len 36 is not a multiple of group_size 8"),
])
def test_length_that_groups_do_not_tile(params, length, match):
    model = llama_ctx.patch(tiny_model(), "s2-attn", **params)
    model(ids(length))  # eval: stock attention, any length
    with pytest.raises(ConfigError, match=match):
        model.train()(ids(length))


def test_unsupported_attention_implementation():
    model = tiny_model(attn_implementation="flash_attention_2")
    with pytest.raises(UnsupportedModelError, match="attention implementation"):
        llama_ctx.patch(model, "s2-attn")
    assert llama_ctx.state(model) is None


def test_saved_and_reloaded(tmp_path):
    model = llama_ctx.patch(tiny_model(), "s2-attn", group_size=8)
    model.save_pretrained(tmp_path)
    loaded = llama_ctx.from_pretrained(tmp_path)
    loaded.config._attn_implementation = "sdpa"
    assert llama_ctx.state(loaded)["attention"]["params"]["group_size"] == 8
    torch.testing.assert_close(loaded.train()(ids(L), use_cache=False).logits,
                               model.train()(ids(L), use_cache=False).logits, atol=1e-6, rtol=0)


def test_window_masks_built_once_per_forward_and_freed(monkeypatch):
    from llama_ctx.attention import s2

    built = []
    bias = s2._Runner.bias
    monkeypatch.setattr(s2._Runner, "bias", lambda self, *a: built.append(a) or bias(self, *a))
    model = tiny_model()
    other = torch.tensor([[*range(20), *range(12)]])
    for pos in (PACKED, other):  # two forwards with different documents: each matches its own reference
        built.clear()
        got, want = s2_vs_reference(model, ids(L), 8, position_ids=pos)
        assert_close(got, want)
        assert len(built) == 4  # groups; head piece, shifted groups, tail piece: once for both layers
    shared = vars(model.model.layers[0].self_attn).get("forward")
    assert shared is None  # unpatched by s2_vs_reference; now check the dict empties once the step is over
    llama_ctx.patch(model, "s2-attn").train()
    forward_and_grads(model, ids(L), position_ids=PACKED)
    assert model.model.layers[0].self_attn.forward.extra == {}
