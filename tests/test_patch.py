"""The patch layer: per-instance, exact unpatch, state, persistence, supported models, bad input."""

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaModel, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import llama_ctx
from llama_ctx import ConfigError, LlamaCtxError, PatchStateError, UnsupportedModelError
from llama_ctx.patch import CONFIG_KEY
from conftest import TINY, clone_with, ids, logits, tiny_config, tiny_model


def test_unpatch_is_bit_exact_and_restores_objects(model):
    x = ids(150)
    before = logits(model, x)
    rotary, config = model.model.rotary_emb, model.config
    llama_ctx.patch(model, "yarn", factor=4)
    assert not torch.equal(logits(model, x), before)
    assert llama_ctx.unpatch(model) is model
    assert torch.equal(logits(model, x), before)
    assert model.model.rotary_emb is rotary and model.config is config
    assert llama_ctx.state(model) is None


def test_patch_returns_model_and_state_reports_resolved_params(model):
    assert llama_ctx.patch(model, "llama3", factor=8) is model
    assert llama_ctx.state(model) == {"rope": {"method": "llama3", "kind": "rope", "params": dict(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)}}


def test_patched_unpatches_even_when_body_raises(model):
    x = ids(100)
    before = logits(model, x)
    with pytest.raises(RuntimeError, match="boom"):
        with llama_ctx.patched(model, "pi", factor=2) as m:
            assert llama_ctx.state(m)["rope"]["method"] == "pi"
            raise RuntimeError("boom")
    assert llama_ctx.state(model) is None
    assert torch.equal(logits(model, x), before)


def test_per_instance_two_models_one_config():
    cfg = tiny_config()
    torch.manual_seed(0)
    a = AutoModelForCausalLM.from_config(cfg).eval()
    b = AutoModelForCausalLM.from_config(cfg).eval()
    b.load_state_dict(a.state_dict())
    x = ids(150)
    stock = logits(b, x)
    llama_ctx.patch(a, "yarn", factor=4)
    native = clone_with(b, rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0,
                                                original_max_position_embeddings=64))
    torch.testing.assert_close(logits(a, x), logits(native, x), atol=1e-5, rtol=0)
    assert torch.equal(logits(b, x), stock)  # the unpatched twin is unaffected
    assert b.config.rope_parameters["rope_type"] == "default"  # and so is the shared config object


@pytest.mark.parametrize("build", [
    lambda: LlamaModel(tiny_config()),
    lambda: MistralForCausalLM(MistralConfig(**TINY)),
    lambda: Qwen2ForCausalLM(Qwen2Config(**TINY)),
])
def test_same_layout_models(build):
    torch.manual_seed(0)
    model = build().eval()
    x = ids(120)
    out = lambda: (model(x).last_hidden_state if isinstance(model, LlamaModel) else model(x).logits)  # noqa: E731
    with torch.no_grad():
        before = out()
        llama_ctx.patch(model, "pi", factor=2)
        changed = out()
        llama_ctx.unpatch(model)
        after = out()
    assert not torch.equal(before, changed) and torch.equal(before, after)


def test_peft_wrapped_llama(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    x = ids(120)
    with torch.no_grad():
        before = peft_model(input_ids=x).logits
        llama_ctx.patch(peft_model, "ntk", factor=2)
        assert llama_ctx.state(model)["rope"]["method"] == "ntk"  # same backbone, same state
        changed = peft_model(input_ids=x).logits
        llama_ctx.unpatch(peft_model)
        assert torch.equal(peft_model(input_ids=x).logits, before)
    assert not torch.equal(changed, before)


def test_unsupported_model_names_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="llama.*mistral.*qwen2"):
        llama_ctx.patch(model, "pi", factor=2)
    with pytest.raises(UnsupportedModelError):
        llama_ctx.patch("not a model", "pi", factor=2)


BAD = [
    (dict(method="yran", factor=4), ConfigError, "Did you mean 'yarn'"),
    (dict(method="pi"), ConfigError, "needs parameter.*'factor'"),
    (dict(method="pi", factor=2, scale=3), ConfigError, "unknown parameter.*'scale'.*accepted: factor"),
    (dict(method="pi", factor=0), ConfigError, "factor must be > 0"),
    (dict(method="pi", factor=-1), ConfigError, "factor must be > 0"),
    (dict(method="pi", factor="4"), ConfigError, "factor must be a finite number"),
    (dict(method="pi", factor=float("nan")), ConfigError, "finite"),
    (dict(method="ntk", factor=2, base=1e5), ConfigError, "exactly one"),
    (dict(method="base-truncation", a=0.1, b=0.1, rho=0.0), ConfigError, "b > a"),
    (dict(method="yarn", factor=4, original_max_position_embeddings=0), ConfigError, ">= 1"),
    (dict(method="llama3", factor=4, low_freq_factor=4, high_freq_factor=1), ConfigError, "high_freq_factor"),
]


@pytest.mark.parametrize("kw,err,match", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_raises_one_clear_error_and_leaves_model_untouched(model, kw, err, match):
    x = ids(100)
    before = logits(model, x)
    with pytest.raises(err, match=match) as info:
        llama_ctx.patch(model, **kw)
    assert isinstance(info.value, LlamaCtxError) and isinstance(info.value, (ValueError, TypeError))
    assert llama_ctx.state(model) is None
    assert torch.equal(logits(model, x), before)


def test_second_rope_method_is_refused_and_first_kept(model):
    x = ids(100)
    llama_ctx.patch(model, "yarn", factor=4)
    patched = logits(model, x)
    with pytest.raises(PatchStateError, match="already has the rope method 'yarn'.*unpatch"):
        llama_ctx.patch(model, "pi", factor=2)
    assert torch.equal(logits(model, x), patched)
    assert llama_ctx.state(model)["rope"]["method"] == "yarn"


@pytest.mark.parametrize("version", ["4.46.0", "5.17.0", "6.0.0"])
def test_transformers_version_is_checked(model, monkeypatch, version):
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    with pytest.raises(UnsupportedModelError, match=f">= 5.18.0, < 6, found {version}"):
        llama_ctx.patch(model, "pi", factor=2)
    assert llama_ctx.state(model) is None


NATIVE_SAVE = [("pi", dict(factor=4.0)), ("dynamic-ntk", dict(factor=2.0)), ("yarn", dict(factor=4.0)),
               ("llama3", dict(factor=8.0)), ("ntk", dict(factor=4.0))]


@pytest.mark.parametrize("method,params", NATIVE_SAVE)
def test_save_pretrained_loads_in_stock_transformers(tmp_path, method, params):
    model = tiny_model()
    llama_ctx.patch(model, method, **params)
    x = ids(150)
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert stock.model.rotary_emb.__class__.__module__.startswith("transformers")
    torch.testing.assert_close(logits(stock, x), expected, atol=1e-5, rtol=0)
    again = llama_ctx.from_pretrained(tmp_path).eval()
    assert llama_ctx.state(again) == llama_ctx.state(model)
    torch.testing.assert_close(logits(again, x), expected, atol=1e-5, rtol=0)
    llama_ctx.unpatch(again)
    torch.testing.assert_close(logits(again, x), logits(llama_ctx.unpatch(model), x), atol=1e-6, rtol=0)


def test_save_non_native_method_is_reapplied_by_from_pretrained(tmp_path):
    model = tiny_model()
    llama_ctx.patch(model, "base-truncation", a=0.01, b=0.1, rho=0.005)
    x = ids(150)
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not torch.allclose(logits(stock, x), expected)  # stock transformers cannot know this method
    again = llama_ctx.from_pretrained(tmp_path).eval()
    assert llama_ctx.state(again)["rope"]["method"] == "base-truncation"
    torch.testing.assert_close(logits(again, x), expected, atol=1e-6, rtol=0)


def test_methods_table_lists_every_method():
    rows = {r["name"]: r for r in llama_ctx.methods()}
    for name in ["pi", "ntk", "dynamic-ntk", "yarn", "llama3", "base-truncation"]:
        assert rows[name]["kind"] == "rope" and rows[name]["description"]
    assert rows["pi"]["aliases"] == ["linear"] and rows["yarn"]["params"]["beta_fast"] == 32.0


def test_rope_plus_attention_method_saved_and_reapplied(tmp_path):
    model = tiny_model()
    llama_ctx.patch(model, "yarn", factor=4)
    llama_ctx.patch(model, "rerope", window=16)
    x = ids(150)
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    again = llama_ctx.from_pretrained(tmp_path).eval()
    assert llama_ctx.state(again) == llama_ctx.state(model)
    assert set(llama_ctx.state(again)) == {"rope", "attention"}
    torch.testing.assert_close(logits(again, x), expected, atol=1e-5, rtol=0)
    stock = logits(llama_ctx.unpatch(model), x)
    torch.testing.assert_close(logits(llama_ctx.unpatch(again), x), stock, atol=1e-5, rtol=0)


def _snapshot(model):
    """Everything a patch could leave behind: instance attributes of every module, config values, state."""
    modules = {name: dict(vars(m)) for name, m in model.named_modules()}
    return modules, model.config, model.config.to_dict(), llama_ctx.state(model)


def _assert_same(model, snap):
    modules, config, values, st = snap
    now = {name: dict(vars(m)) for name, m in model.named_modules()}
    assert now.keys() == modules.keys()
    for name, attrs in modules.items():  # same attribute names, the very same objects
        assert now[name].keys() == attrs.keys(), name
        assert all(now[name][k] is v for k, v in attrs.items()), name
    assert model.config is config and model.config.to_dict() == values and llama_ctx.state(model) == st


@pytest.mark.parametrize("first", [None, ("yarn", dict(factor=2.0))])
def test_attention_method_failing_half_way_leaves_the_model_untouched(first, monkeypatch):
    model = tiny_model()
    if first:
        llama_ctx.patch(model, first[0], **first[1])
    x = ids(150)
    before, snap = logits(model, x), _snapshot(model)
    impl = llama_ctx.registry.get("rerope").impl
    apply = impl.apply

    def half_way(params, ctx, patcher):
        apply(params, ctx, patcher)  # every attention forward replaced, through the patcher
        patcher.set(ctx.backbone, "extra_attribute", 1)
        raise RuntimeError("boom")

    monkeypatch.setattr(impl, "apply", half_way)
    with pytest.raises(RuntimeError, match="boom"):
        llama_ctx.patch(model, "rerope", window=16)
    _assert_same(model, snap)
    assert torch.equal(logits(model, x), before)
    monkeypatch.undo()
    llama_ctx.unpatch(model)
    assert torch.equal(logits(model, x), logits(tiny_model(), x))


def test_rope_method_failing_after_the_rotary_swap_leaves_the_model_untouched(monkeypatch):
    import dataclasses

    model = tiny_model()
    x = ids(150)
    before, snap = logits(model, x), _snapshot(model)
    pi = llama_ctx.registry.get("pi")

    def boom(params, spec):  # called by the config update, after the rotary module was replaced
        raise RuntimeError("boom")

    monkeypatch.setitem(llama_ctx.registry._METHODS, "pi", dataclasses.replace(pi, native=boom))
    with pytest.raises(RuntimeError, match="boom"):
        llama_ctx.patch(model, "pi", factor=2)
    _assert_same(model, snap)
    assert torch.equal(logits(model, x), before)


def test_unpatch_keeps_config_edits_made_while_patched(model):
    config = model.config
    x = ids(150)
    before = logits(model, x)
    llama_ctx.patch(model, "yarn", factor=4)
    model.config.use_cache = False
    model.config.pad_token_id = 7
    model.config._attn_implementation = "eager"
    model.config.my_note = "kept"
    del model.config.problem_type
    llama_ctx.unpatch(model)
    assert model.config is config
    assert (config.use_cache, config.pad_token_id, config._attn_implementation, config.my_note) == \
        (False, 7, "eager", "kept")
    assert "problem_type" not in vars(config)
    # what llama_ctx wrote is gone: the original rope, no llama_ctx entry, the stock logits
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert not hasattr(config, CONFIG_KEY)
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)  # eager instead of sdpa now
    model.config._attn_implementation = "sdpa"
    assert torch.equal(logits(model, x), before)


def test_config_edits_while_patched_reach_the_shared_config_only_on_unpatch():
    cfg = tiny_config()
    a, b = AutoModelForCausalLM.from_config(cfg), AutoModelForCausalLM.from_config(cfg)
    llama_ctx.patch(a, "pi", factor=2)
    a.config.pad_token_id = 7
    assert cfg.pad_token_id is None and b.config is cfg  # the twin does not see the patched model's config
    assert b.config.rope_parameters["rope_type"] == "default"
    llama_ctx.unpatch(a)
    assert a.config is cfg and cfg.pad_token_id == 7  # back to one shared config, with the edit
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
