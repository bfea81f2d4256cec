"""Training a position method's table with the fine-tuning recipe (`context.method: learned-absolute`).

The table is trained next to LoRA (PEFT `modules_to_save`): it receives gradients, changes over a few optimizer
steps, is saved in every checkpoint and the final adapter, comes back with `load_adapter`, and the merged model holds
it (reloaded by `llama_ctx.from_pretrained`; stock transformers refuses the folder).
"""

import pytest
import torch
from conftest import ids
from safetensors import safe_open
from train_util import tiny_run, train_cache  # noqa: F401
from transformers import AutoModelForCausalLM

import llama_ctx
from llama_ctx.errors import ConfigError
from llama_ctx.reference.encodings import sinusoidal_at
from llama_ctx.train import run
from llama_ctx.train.builtin import tiny_random
from llama_ctx.train.config import validate
from llama_ctx.train.merge import merge
from llama_ctx.train.model import load_adapter, load_base, prepare

CONTEXT = {"method": "learned-absolute", "params": {"max_positions": 128, "scale": 0.1}, "seq_len": 128}


def saved_table(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        (key,) = [k for k in f.keys() if "llama_ctx_position" in k]
        return f.get_tensor(key)


def trained_copy(peft_model):
    return peft_model.base_model.model.model.llama_ctx_position.modules_to_save["default"].weight


def test_table_is_trainable_next_to_lora_and_receives_gradients(tmp_path, train_cache):  # noqa: F811
    cfg = validate(tiny_run(tmp_path, context=CONTEXT))
    model, _ = load_base(str(tiny_random()))
    peft = prepare(model, cfg)
    table = trained_copy(peft)
    assert table.requires_grad and table.shape == (128, 64)
    assert not peft.base_model.model.model.llama_ctx_position.original_module.weight.requires_grad
    x = ids(100, batch=2)
    peft(input_ids=x, labels=x).loss.backward()
    assert table.grad is not None and table.grad[:100].abs().sum() > 0
    assert not table.grad[100:].any()  # rows of positions not in the batch get nothing


def test_trained_table_is_saved_resumed_and_merged(tmp_path, train_cache):  # noqa: F811
    out = tmp_path / "run"
    result = run(tiny_run(out, context=CONTEXT, training={"max_steps": 3, "save_steps": 3}))
    assert result.steps == 3
    init = 0.1 * sinusoidal_at(torch.arange(128), 64).float()
    final = saved_table(out)
    assert (final - init).abs().max() > 1e-4  # it changed over 3 steps (learning rate 2e-3)
    assert torch.equal(saved_table(out / "checkpoint-3"), final)  # the checkpoint holds it (resume restores it)
    reference, _ = load_adapter(tiny_random(), out)
    assert torch.equal(trained_copy(reference), final)
    merged = merge("tiny-random", out, tmp_path / "merged")  # verified on reload inside merge, checked again here
    with pytest.raises(KeyError, match="llama_ctx.from_pretrained"):
        AutoModelForCausalLM.from_pretrained(merged)
    again = llama_ctx.from_pretrained(merged).eval()
    assert torch.equal(again.model.llama_ctx_position.weight, final)
    x = ids(120)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, reference.eval()(x).logits, atol=1e-4, rtol=0)


def test_config_refuses_a_table_shorter_than_seq_len(tmp_path, train_cache):  # noqa: F811
    from llama_ctx.train.checks import check

    with pytest.raises(ConfigError, match="max_positions: 64 table rows do not cover seq_len 128"):
        check(validate(tiny_run(tmp_path, context={**CONTEXT, "params": {}})))
    check(validate(tiny_run(tmp_path, context=CONTEXT, s2_attn={"enabled": True})))  # S2-attn composes with it
    with pytest.raises(ConfigError, match="'pi' cannot be combined|context.method: 'rerope' is an attention"):
        check(validate(tiny_run(tmp_path, context={**CONTEXT, "method": "rerope", "params": {"window": 8}})))


def test_config_refuses_a_table_shorter_than_the_eval_lengths(tmp_path, train_cache):  # noqa: F811
    # evaluation at 256 positions would fail with max_positions 128 only after training (or at its first eval)
    from llama_ctx.train.checks import check

    with pytest.raises(ConfigError, match="max_positions: 128 table rows do not cover eval.lengths 256"):
        check(validate(tiny_run(tmp_path, context=CONTEXT, eval={"lengths": [128, 256]})))
    check(validate(tiny_run(tmp_path, context=CONTEXT, eval={"lengths": [64, 128]})))
