"""ALiBi and T5 relative bias ("alibi", "t5-bias") against independent references.

References: slopes and bucket tables written out by hand (the sources of the numbers are noted); ALiBi slopes by
the paper's published recursive code and T5's buckets by transformers' `T5Attention._relative_position_bucket`
(`llama_ctx.reference.bias`); logits by the whole LLaMA forward written out in float64
(`reference.encodings.dense_logits`) with those explicit `[heads, L, L]` bias matrices; the T5 table's gradient by a
dense float64 attention with the graph kept (`reference.bias.dense_reference`).
"""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import llama_ctx
from conftest import assert_padded_generate_equals_full_forward, ids, logits, tiny_model
from train_util import train_cache  # noqa: F401  (fixture)
from llama_ctx.encodings import alibi_slopes, relative_position_bucket
from llama_ctx.encodings.alibi import AlibiAttention
from llama_ctx.errors import ConfigError, PatchStateError, UnsupportedModelError
from llama_ctx.reference import bias as ref
from llama_ctx.reference.encodings import dense_logits

TOL = 1e-5
GQA6 = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2)  # a non-power-of-two head count, 3 groups


def table_of(model):
    return model.model.llama_ctx_position.relative_attention_bias


def randomize_table(model, seed=0):
    """A trained-looking table (zeros at init would hide the bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        table_of(model).copy_(torch.randn(table_of(model).shape, generator=g))
    return model


def reference_bias(model, name, params):
    """(positions [B, L]) -> [B, heads, L, L] for `dense_logits`, from the reference definitions."""
    heads = model.config.num_attention_heads
    if name == "alibi":
        return lambda pos: ref.alibi_bias(pos, heads, params.get("max_bias", 8.0))
    table = table_of(model).detach()
    return lambda pos: ref.t5_bias(pos, table, params.get("num_buckets", 32), params.get("max_distance", 128))


def patched(name, params, seed=0, **model_kw):
    model = llama_ctx.patch(tiny_model(**model_kw), name, **params)
    return randomize_table(model, seed) if name == "t5-bias" else model


# ---- slopes and buckets ----------------------------------------------------------------------------------------


def test_alibi_slopes_written_out():
    # Press et al. 2022, section 3: "for 8 heads, 1/2^1, 1/2^2, ..., 1/2^8"; for 16 heads, interpolations of those
    assert alibi_slopes(8).tolist() == [2.0**-k for k in range(1, 9)]
    assert alibi_slopes(4).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]
    assert alibi_slopes(1).tolist() == [2.0**-8]
    # non-power of two: the 4 (8) slopes of 4 (8) heads, then the odd ones of 8 (16) heads: 2^(-8h/16), h = 1, 3..
    assert alibi_slopes(6).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(
        [2.0**-k for k in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5], dtype=torch.float64))
    assert alibi_slopes(4, max_bias=16).tolist() == [2.0**-4, 2.0**-8, 2.0**-12, 2.0**-16]
    for heads in range(1, 41):  # the paper's own code (geometric sequences, recursion) as the reference
        for max_bias in (8.0, 5.0):
            want = torch.tensor(ref.alibi_slopes(heads, max_bias), dtype=torch.float64)
            torch.testing.assert_close(alibi_slopes(heads, max_bias), want, rtol=1e-14, atol=0)


def test_alibi_bias_written_out():
    """Positions 0, 1, 2, 5 (a gap: the bias follows positions, not indices), slopes 1/4 and 1/256 (heads 1 and 4
    of 4): -m * (p_i - p_j) on the causal pairs."""
    pos = torch.tensor([0, 1, 2, 5])
    quarter = [[0, 0, 0, 0], [-0.25, 0, 0, 0], [-0.5, -0.25, 0, 0], [-1.25, -1.0, -0.75, 0]]
    last = [[0, 0, 0, 0], [-1 / 256, 0, 0, 0], [-2 / 256, -1 / 256, 0, 0], [-5 / 256, -4 / 256, -3 / 256, 0]]
    want = torch.tensor([quarter, last], dtype=torch.float64)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    torch.testing.assert_close(ref.alibi_bias(pos, 4)[[0, 3]] * causal, want, rtol=0, atol=0)
    impl = AlibiAttention()
    fwd = SimpleNamespace(extra=impl.prepare(llama_ctx.registry.get("alibi").params(), SimpleNamespace(
        config=SimpleNamespace(num_attention_heads=4))))
    distance = (pos[:, None] - pos[None, :]).clamp(min=0)
    got = impl.bias(fwd, distance)[[0, 3]]
    torch.testing.assert_close(got.double() * causal, want, rtol=0, atol=1e-9)


def test_t5_buckets_written_out():
    # defaults (32 buckets, max_distance 128): distances 0..15 exact; bucket b >= 16 starts at the smallest n with
    # 16 + 16 * log(n / 16) / log(8) >= b, i.e. n >= 16 * 8^((b - 16) / 16), worked out by hand; 113.. share 31
    starts = list(range(16)) + [16, 19, 21, 24, 27, 31, 35, 40, 46, 52, 59, 67, 77, 87, 99, 113]
    want = torch.tensor([sum(n >= s for s in starts) - 1 for n in range(300)])
    assert torch.equal(relative_position_bucket(-torch.arange(300)), want)
    # 8 buckets, max_distance 20: 0..3 exact, then n >= 4 * 5^(k/4): 6, 9, 14 (13.4); the last bucket from 14 on
    small = [0, 1, 2, 3, 4, 4, 5, 5, 5, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7]
    assert relative_position_bucket(-torch.arange(22), 8, 20).tolist() == small
    assert relative_position_bucket(torch.arange(1, 5), 8, 20).tolist() == [0] * 4  # future keys: bucket 0


def test_t5_buckets_match_transformers_t5():
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-20000, 40)
    grid = [(b, d) for b in (2, 3, 8, 16, 31, 32, 33, 64) for d in (b // 2 + 1, 20, 128, 256, 1000, 4096) if d > b // 2]
    # where T5's float32 log lands on the other side of a bucket boundary than exact arithmetic (found by search)
    grid += [(9, 128), (10, 160), (48, 81), (54, 64)]
    for num_buckets, max_distance in grid:
        want = T5Attention._relative_position_bucket(relative, bidirectional=False, num_buckets=num_buckets,
                                                     max_distance=max_distance)
        assert torch.equal(relative_position_bucket(relative, num_buckets, max_distance), want), \
            (num_buckets, max_distance)


# ---- the patched model against the dense float64 forward -------------------------------------------------------

CASES = [("alibi", {}, {}), ("alibi", dict(max_bias=5.0), GQA6), ("t5-bias", {}, {}),
         ("t5-bias", dict(num_buckets=8, max_distance=20), GQA6)]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name,params,model_kw", CASES)
def test_forward_matches_dense_reference_and_unpatch_is_exact(name, params, model_kw, impl):
    model, x = tiny_model(attn_implementation=impl, **model_kw), ids(96, batch=2)
    before = logits(model, x)
    llama_ctx.patch(model, name, **params)
    if name == "t5-bias":
        randomize_table(model)
    # a gap and an offset in the second row: the bias follows position_ids
    pos = torch.stack([torch.arange(96), torch.cat([torch.arange(40), torch.arange(50, 106)]) + 7])
    got = logits(model, x, position_ids=pos)
    want = dense_logits(model, x, pos, bias=reference_bias(model, name, params))
    torch.testing.assert_close(got.double(), want, atol=TOL, rtol=0)
    llama_ctx.unpatch(model)
    assert torch.equal(logits(model, x), before) and llama_ctx.state(model) is None
    assert not hasattr(model.model, "llama_ctx_position")
    assert all("forward" not in vars(layer.self_attn) for layer in model.model.layers)


@pytest.mark.parametrize("name", ["alibi", "t5-bias"])
def test_a_huge_position_gap(name):
    """Distances of 10^9: T5 looks up only distances up to max_distance (all farther share its bucket)."""
    model = patched(name, {})
    x, pos = ids(20), torch.cat([torch.arange(10), torch.arange(10) + 10**9])[None]
    want = dense_logits(model, x, pos, bias=reference_bias(model, name, {}))
    torch.testing.assert_close(logits(model, x, position_ids=pos).double(), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["alibi", "t5-bias"])
def test_left_padded_rows_equal_rows_alone(name, impl):
    """With generate's position_ids and without any (the bias needs only differences, which padding keeps)."""
    model = patched(name, {}, attn_implementation=impl)
    row, other = ids(50, seed=5), ids(70, seed=6)
    x = torch.cat([torch.cat([torch.zeros(1, 20, dtype=torch.long), row], 1), other])
    mask = torch.ones_like(x)
    mask[0, :20] = 0
    alone = logits(model, row)
    for pos in ((mask.cumsum(-1) - 1).clamp(min=0), None):
        batch = logits(model, x, attention_mask=mask, position_ids=pos)
        assert torch.isfinite(batch).all()  # padding queries see no key: finite, not NaN
        torch.testing.assert_close(batch[:1, 20:], alone, atol=TOL, rtol=0)
        torch.testing.assert_close(batch[1:], logits(model, other), atol=TOL, rtol=0)
    want = dense_logits(model, row, bias=reference_bias(model, name, {}))
    torch.testing.assert_close(alone.double(), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name,params,model_kw", CASES[::3])
def test_cached_generate_equals_full_forward(name, params, model_kw, impl):
    model = patched(name, params, attn_implementation=impl, **model_kw)
    assert_padded_generate_equals_full_forward(model, TOL)


def test_static_cache_generate_equals_full_forward():
    model = patched("alibi", {})
    x = ids(20)
    out = model.generate(x, max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, cache_implementation="static")
    full = logits(model, out.sequences, use_cache=False)
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, 19:-1], atol=TOL, rtol=0)


# ---- the T5 table: zero at init, gradients, persistence ---------------------------------------------------------


def test_t5_table_is_zero_at_init_so_the_model_equals_nope():
    model, x = tiny_model(), ids(80)
    llama_ctx.patch(model, "t5-bias")
    table = table_of(model)
    assert table.shape == (32, 4) and table.requires_grad and not table.any()
    assert any(p is table for p in model.parameters())  # trainable with the rest of the model
    got = logits(model, x)
    llama_ctx.unpatch(model)
    with llama_ctx.patched(model, "nope"):
        torch.testing.assert_close(got, logits(model, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_t5_table_gradient_matches_dense_reference(impl):
    p = dict(num_buckets=8, max_distance=20)
    model = patched("t5-bias", p, attn_implementation=impl, **GQA6)
    x = ids(40, batch=2)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    upstream = torch.randn(2, 40, 256, generator=torch.Generator().manual_seed(3))
    real = mask.bool()[..., None]
    (model(x, attention_mask=mask, position_ids=pos).logits * upstream * real).sum().backward()
    got_table, got_q = table_of(model).grad.clone(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    leaf = table_of(model).detach().clone().requires_grad_(True)
    stock = llama_ctx.unpatch(copy.deepcopy(model))
    stock.zero_grad()
    with ref.dense_reference(stock, mask.bool(), lambda row: ref.t5_bias(row, leaf, **p)):
        (stock(x, attention_mask=mask, position_ids=pos).logits * upstream * real).sum().backward()
    assert leaf.grad.abs().max() > 1e-2  # the bias matters: a test that can fail
    torch.testing.assert_close(got_table, leaf.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_q, stock.model.layers[0].self_attn.q_proj.weight.grad, atol=1e-5, rtol=1e-4)


def test_saved_and_reloaded(tmp_path):
    for i, (name, params) in enumerate([("t5-bias", dict(num_buckets=16, max_distance=64)),
                                        ("alibi", dict(max_bias=4.0))]):
        model = patched(name, params)
        x = ids(90)
        want = logits(model, x)
        model.save_pretrained(tmp_path / str(i))
        with pytest.raises(KeyError, match="llama_ctx.from_pretrained"):  # stock loading refuses, not silently RoPE
            AutoModelForCausalLM.from_pretrained(tmp_path / str(i))
        again = llama_ctx.from_pretrained(tmp_path / str(i)).eval()
        assert llama_ctx.state(again) == llama_ctx.state(model)
        if name == "t5-bias":
            assert torch.equal(table_of(again), table_of(model))
        torch.testing.assert_close(logits(again, x), want, atol=1e-6, rtol=0)


def test_deep_copy_has_its_own_table():
    model = patched("t5-bias", {})
    other = copy.deepcopy(model)
    x = ids(30)
    torch.testing.assert_close(logits(other, x), logits(model, x), atol=0, rtol=0)
    with torch.no_grad():
        table_of(other).zero_()
    assert table_of(model).any() and not torch.equal(logits(other, x), logits(model, x))


# ---- refusals, model untouched -----------------------------------------------------------------------------------


def test_refusals_leave_the_model_untouched():
    model, x = tiny_model(), ids(30)
    before = logits(model, x)
    for params, match in [(dict(num_buckets=32, max_distance=16), "max_distance must be > num_buckets // 2"),
                          (dict(num_buckets=1), "num_buckets must be >= 2"), (dict(scale=2), "unknown parameter")]:
        with pytest.raises(ConfigError, match=match):
            llama_ctx.patch(model, "t5-bias", **params)
    with pytest.raises(ConfigError, match="max_bias must be > 0"):
        llama_ctx.patch(model, "alibi", max_bias=-1)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="attn_implementation in"):
        llama_ctx.patch(model, "alibi")
    model.config._attn_implementation = "sdpa"
    for method, params in [("rerope", dict(window=8)), ("s2-attn", dict(group_size_ratio=0.25))]:
        llama_ctx.patch(model, method, **params)
        with pytest.raises(PatchStateError, match=f"'{method}' cannot be combined with the position method 't5-bias'"):
            llama_ctx.patch(model, "t5-bias")
        llama_ctx.unpatch(model)
    llama_ctx.patch(model, "alibi")
    for method, params in [("yarn", dict(factor=2)), ("self-extend", dict(group_size=4, window=8)),
                           ("s2-attn", dict(group_size_ratio=0.25)), ("t5-bias", {})]:
        with pytest.raises(PatchStateError):
            llama_ctx.patch(model, method, **params)
        assert llama_ctx.state(model)["position"]["method"] == "alibi" and len(llama_ctx.state(model)) == 1
    assert torch.equal(logits(llama_ctx.unpatch(model), x), before) and llama_ctx.state(model) is None
    assert not hasattr(model.model, "llama_ctx_position") and math.isfinite(float(before.sum()))


def test_t5_table_trains_as_a_peft_modules_to_save_copy(tmp_path, train_cache):  # noqa: F811
    """The fine-tuning recipe trains the table next to LoRA: the bias is read by calling the table module, so the
    trained copy inside PEFT's wrapper answers and receives the gradient."""
    from train_util import tiny_run

    from llama_ctx.train.builtin import tiny_random
    from llama_ctx.train.config import validate
    from llama_ctx.train.model import load_base, prepare

    cfg = validate(tiny_run(tmp_path, context={"method": "t5-bias", "params": {"num_buckets": 16}, "seq_len": 128}))
    peft = prepare(load_base(str(tiny_random()))[0], cfg)
    wrapper = peft.base_model.model.model.llama_ctx_position
    trained = wrapper.modules_to_save["default"].relative_attention_bias
    assert trained.requires_grad and not wrapper.original_module.relative_attention_bias.requires_grad
    x = ids(100, batch=2)
    peft(input_ids=x, labels=x).loss.backward()
    assert trained.grad is not None and trained.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["alibi", "t5-bias"])
def test_bfloat16_model_close_to_the_float64_reference(name):
    """The mask is handed to sdpa in the model dtype; in bfloat16 the logits stay within bfloat16 rounding."""
    model = patched(name, {})
    x = ids(120, batch=2)
    want = dense_logits(model, x, bias=reference_bias(model, name, {}))
    got = logits(model.to(torch.bfloat16), x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=0)


@pytest.mark.slow
def test_t5_table_trained_by_the_recipe_saved_merged_and_reloaded(tmp_path, train_cache):  # noqa: F811
    """The fine-tuning recipe end to end (~10 s): the table leaves zero, is in the adapter, the merged model holds
    it and, reloaded by llama_ctx.from_pretrained, gives base + adapter's logits."""
    from safetensors import safe_open
    from train_util import tiny_run

    from llama_ctx.train import run
    from llama_ctx.train.builtin import tiny_random
    from llama_ctx.train.merge import merge
    from llama_ctx.train.model import load_adapter

    out = tmp_path / "run"
    run(tiny_run(out, context={"method": "t5-bias", "params": {}, "seq_len": 128},
                 training={"max_steps": 3, "save_steps": 3}))
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        (key,) = [k for k in f.keys() if "llama_ctx_position" in k]
        final = f.get_tensor(key)
    assert final.abs().max() > 1e-4  # trained away from its zero init
    reference, _ = load_adapter(tiny_random(), out)
    again = llama_ctx.from_pretrained(merge("tiny-random", out, tmp_path / "merged")).eval()
    assert torch.equal(table_of(again), final)
    x = ids(120)
    torch.testing.assert_close(logits(again, x), logits(reference.eval(), x), atol=1e-4, rtol=0)
