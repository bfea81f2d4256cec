"""transformers moves (issue 8): the cache under either name, no argument dropped, renames refused at patch()."""

import dataclasses

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaModel

import llama_ctx
from llama_ctx import UnsupportedModelError, compat
from conftest import ids, logits, tiny_model

ATTENTION = {  # every registered attention method, small parameters for the tiny model
    "rerope": dict(window=16), "leaky-rerope": dict(window=16, factor=4.0),
    "self-extend": dict(group_size=4, window=16), "lambda": dict(global_tokens=4, local_window=24),
    "topk": dict(k=3, local_window=16), "block-topk": dict(block_size=4, k_blocks=2, local_window=10),
    "streaming": dict(window=16), "s2-attn": dict(), "dca": dict(chunk_size=24, local_window=6),
}


def test_every_attention_method_is_covered():
    registered = {m["name"] for m in llama_ctx.methods() if m["kind"] == "attention"}
    assert registered <= set(ATTENTION), f"add {registered - set(ATTENTION)} to this file"


@pytest.mark.parametrize("name", [n for n in ATTENTION if n != "streaming"])
def test_cache_under_either_name_gives_the_same_result(name):
    """Call one patched attention module as each transformers version would: cache= (>= 5.24) or
    past_key_values= (< 5.24). Both must use the cache: the second call sees the first call's keys."""
    model = tiny_model()
    llama_ctx.patch(model, name, **ATTENTION[name])
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 20, 64)
    outs = []
    for arg in compat.CACHE_NAMES:
        cache = DynamicCache(config=model.config)
        pos = torch.arange(20)[None]
        attn(x[:, :12], attention_mask=None, position_ids=pos[:, :12], **{arg: cache})
        out, _ = attn(x[:, 12:], attention_mask=None, position_ids=pos[:, 12:], **{arg: cache})
        assert cache.get_seq_length(0) == 20
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    without_cache, _ = attn(x[:, 12:], attention_mask=None, position_ids=pos[:, 12:])
    assert not torch.allclose(without_cache, outs[0])  # the cache really took part


@pytest.mark.parametrize("name", list(ATTENTION))
def test_unknown_argument_raises(name):
    model = tiny_model()
    llama_ctx.patch(model, name, **ATTENTION[name])
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 5, 64)
    with pytest.raises(compat.UnhandledArgumentError, match="'kv_cache'.*DynamicCache.*transformers"):
        attn(x, attention_mask=None, kv_cache=DynamicCache(config=model.config))
    with pytest.raises(compat.UnhandledArgumentError, match="'segment_ids'.*Tensor"):
        attn(x, attention_mask=None, segment_ids=torch.zeros(1, 5))
    with pytest.raises(compat.UnhandledArgumentError, match="cu_seq_lens_q.*packed"):
        attn(x, attention_mask=None, cu_seq_lens_q=torch.tensor([0, 5]))
    with pytest.raises(compat.UnhandledArgumentError, match="output_attentions=True"):
        attn(x, attention_mask=None, output_attentions=True)


def test_two_different_caches_raise():
    model = tiny_model()
    llama_ctx.patch(model, "rerope", window=16)
    attn = model.model.layers[0].self_attn
    with pytest.raises(compat.UnhandledArgumentError, match="two different caches"):
        attn(torch.randn(1, 5, 64), attention_mask=None, cache=DynamicCache(), past_key_values=DynamicCache())


@pytest.mark.parametrize("name", list(ATTENTION))
def test_a_renamed_forward_argument_is_refused_at_patch(name, monkeypatch):
    """A transformers release whose attention forward takes a parameter we do not know: patch() refuses."""
    model = tiny_model()
    before = logits(model, ids(20))

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, kv_store=None, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(LlamaAttention, "forward", forward)
    with pytest.raises(UnsupportedModelError, match="'kv_store'.*does not handle"):
        llama_ctx.patch(model, name, **ATTENTION[name])
    monkeypatch.undo()
    assert llama_ctx.state(model) is None
    torch.testing.assert_close(logits(model, ids(20)), before, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["rerope", "topk", "streaming"])
def test_a_new_transformers_kwarg_is_refused_at_patch(name, monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(compat, "transformers_kwargs", lambda: {"position_ids", "attention_sinks"})
    with pytest.raises(UnsupportedModelError, match="'attention_sinks'"):
        llama_ctx.patch(model, name, **ATTENTION[name])
    assert llama_ctx.state(model) is None


def test_streaming_backbone_signature_is_checked(monkeypatch):
    model = tiny_model()
    original = LlamaModel.forward

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, prefix_tokens=None, **kwargs):
        return original(self, input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, **kwargs)

    monkeypatch.setattr(LlamaModel, "forward", forward)
    with pytest.raises(UnsupportedModelError, match="'prefix_tokens'"):
        llama_ctx.patch(model, "streaming", window=16)
    assert llama_ctx.state(model) is None


def test_current_signatures_are_known():
    """Guards the lists in compat: the installed transformers passes nothing the patched forwards ignore."""
    compat.check_signature(LlamaAttention.forward, "test")
    assert compat.model_cache_name() in compat.CACHE_NAMES
    out = tiny_model()(ids(3), use_cache=True)
    assert isinstance(compat.output_cache(out), DynamicCache)


# ---- llama-ctx check ------------------------------------------------------------------------------------------

from llama_ctx import check  # noqa: E402
from llama_ctx.attention import rerope  # noqa: E402


def test_check_has_a_reference_for_every_registered_method():
    assert {m["name"] for m in llama_ctx.methods()} <= set(check.CASES)


def test_check_passes_on_the_installed_versions(capsys):
    from llama_ctx.cli import main

    assert main(["check", "--methods", "yarn,dynamic-ntk,rerope,block-topk,streaming"]) == 0
    out = capsys.readouterr().out
    assert "transformers" in out and "FAIL" not in out and "14 passed, 0 failed" in out


def test_check_fails_on_a_broken_method(monkeypatch, capsys):
    """ReRoPE with its window off by one: its forward row fails (generate only checks that the cache
    agrees with recomputation, which a consistently wrong method still does), and the exit code is 1."""
    original = rerope.ReRoPE.scheme

    def off_by_one(self, p, ctx):
        return original(self, dataclasses.replace(p, window=p.window + 1), ctx)

    monkeypatch.setattr(rerope.ReRoPE, "scheme", off_by_one)
    assert check.main(["rerope", "pi"]) == 1
    rows = {(r.method, r.check): r for r in check.run(["rerope", "pi"])}
    assert not rows["rerope", "forward"].ok and rows["rerope", "generate"].ok
    assert rows["rerope", "unpatch"].ok and rows["pi", "forward"].ok
    assert "FAIL" in capsys.readouterr().out


def test_check_fails_for_a_method_without_a_reference(monkeypatch):
    monkeypatch.delitem(check.CASES, "lambda")
    (row,) = check.run(["lambda"])
    assert not row.ok and "no reference" in row.note
