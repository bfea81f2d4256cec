"""Merge: stock transformers loads the merged model and gives the logits of base + adapter + patch."""

from pathlib import Path

import pytest
import torch
from conftest import ids
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llama_ctx import ConfigError
from llama_ctx.cli import main
from llama_ctx.train import merge as merge_module
from llama_ctx.train.builtin import TINY_CONFIG, byte_tokenizer
from llama_ctx.train.config import validate
from llama_ctx.train.merge import merge
from llama_ctx.train.model import load_adapter, load_base, prepare, save_adapter


def _base(folder: Path, tied: bool) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIG, "tie_word_embeddings": tied})).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def _trained_adapter(base: Path, out: Path, method=("pi", {"factor": 4})) -> Path:
    """An adapter as training leaves it: non-zero LoRA, changed embeddings and norms (set directly: same files)."""
    cfg = validate({"model": {"path": str(base)}, "context": {"method": method[0], "params": method[1],
                                                             "seq_len": 128},
                    "data": {"sources": [{"path": "x", "domain": "d", "weight": 1}]},
                    "training": {"output_dir": str(out)}})
    model, _ = load_base(str(base))
    peft = prepare(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if p.requires_grad:  # lora_A, lora_B, modules_to_save copies of embed_tokens / norms
                p.add_(torch.randn(p.shape, generator=g) * (0.5 if "norm" in name else 0.1))
    save_adapter(peft, out, cfg)
    return out


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_merged_model_in_stock_transformers_equals_base_adapter_patch(tmp_path, tied):
    base = _base(tmp_path / "base", tied)
    adapter = _trained_adapter(base, tmp_path / "adapter")
    merged = merge(base, adapter, tmp_path / "merged")
    x = ids(200)  # beyond the 64-token trained window: positions matter
    stock = AutoModelForCausalLM.from_pretrained(merged).eval()  # no llama_ctx involved in loading
    reference, _ = load_adapter(base, adapter)  # base + patch from the adapter's config + PEFT adapter
    from peft import PeftModel

    no_rope = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    original = AutoModelForCausalLM.from_pretrained(base)  # (PEFT wraps the model it is given: load it again)
    with torch.no_grad():
        got, want, wrong = stock(x).logits, reference.eval()(x).logits, no_rope(x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - wrong).abs().max() > 1e-2  # the comparison can fail: the rope method is what makes them equal
    assert stock.config.rope_parameters["rope_type"] == "linear" and stock.config.rope_parameters["factor"] == 4
    trained_embed = reference.base_model.model.model.embed_tokens.modules_to_save["default"].weight
    assert torch.equal(stock.model.embed_tokens.weight, trained_embed)
    base_embed = original.model.embed_tokens.weight
    assert not torch.equal(stock.model.embed_tokens.weight, base_embed)
    if tied:  # the output layer is the trained embedding too (it is tied in the base model)
        assert torch.equal(stock.lm_head.weight, trained_embed)
    else:
        assert torch.equal(stock.lm_head.weight, original.lm_head.weight)
    trained_norm = reference.base_model.model.model.norm.modules_to_save["default"].weight
    assert torch.equal(stock.model.norm.weight, trained_norm)
    assert not torch.equal(trained_norm, original.model.norm.weight)


def test_merge_refuses_to_overwrite_and_force_swaps_atomically(tmp_path, monkeypatch):
    base = _base(tmp_path / "base", tied=False)
    adapter = _trained_adapter(base, tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        merge(base, adapter, out)
    assert (out / "keep.txt").read_text() == "old"

    def broken(*a, **k):
        raise ConfigError("merge verification failed: simulated")

    monkeypatch.setattr(merge_module, "_verify", broken)
    with pytest.raises(ConfigError, match="simulated"):
        merge(base, adapter, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # untouched by the failed attempt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "merged"]  # no temporary left
    monkeypatch.undo()
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--force"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "merged"]


def test_merge_refuses_an_adapter_without_its_rope_record(tmp_path, capsys):
    base = _base(tmp_path / "base", tied=False)
    adapter = _trained_adapter(base, tmp_path / "adapter")
    (adapter / "config.json").unlink()
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 2
    assert "has no config.json recording the rope method" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    with pytest.raises(ConfigError, match="not a PEFT adapter folder"):
        merge(base, base, tmp_path / "m")
