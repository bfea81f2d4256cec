"""Model preparation and the training loss, each against an independent reference."""

import pytest
import torch
from conftest import clone_with, ids, tiny_model
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

import llama_ctx
from llama_ctx.train.trainer import LongContextTrainer


def _lora(model, seed=3):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     modules_to_save=["embed_tokens", "norm"], task_type="CAUSAL_LM")
    torch.manual_seed(seed)  # LoRA A is initialised from the global generator
    peft = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero LoRA B (PEFT initialises it to 0) so the adapter changes the output
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return peft


def test_patch_before_or_after_peft_wrapping_gives_the_native_rope_logits():
    x = ids(48)
    before = _lora(llama_ctx.patch(tiny_model(), "pi", factor=2))
    after = llama_ctx.patch(_lora(tiny_model()), "pi", factor=2)
    # reference: stock transformers with native linear rope_parameters, same weights, same LoRA
    native = _lora(clone_with(tiny_model(), rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                             "rope_theta": 10000.0}))
    stock = _lora(tiny_model())
    with torch.no_grad():
        a, b, ref, plain = (m(x).logits for m in (before, after, native, stock))
    assert torch.equal(a, b)
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=0)
    assert (a - plain).abs().max() > 1e-2  # the rope method matters: the check above can fail
    assert before.config.rope_parameters["rope_type"] == "linear"
    assert llama_ctx.state(before)["rope"]["method"] == "pi"
    llama_ctx.unpatch(after)
    with torch.no_grad():
        assert torch.equal(after(x).logits, plain)


def _trainer(model, tmp_path, chunk):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=2)
    return LongContextTrainer(model=model, args=args, loss_chunk=chunk)


def _packed_batch():
    """Two rows; row 0 packs documents of 20, 30 and 14 tokens (position ids restart, first labels -100)."""
    x = ids(64, batch=2, seed=5)
    pos = torch.cat([torch.arange(20), torch.arange(30), torch.arange(14)])[None].repeat(2, 1)
    pos[1] = torch.arange(64)
    labels = x.clone()
    labels[0, [0, 20, 50]] = -100
    labels[1, 0] = -100
    labels[1, 60:] = -100  # padding
    return x, pos, labels


@pytest.mark.parametrize("chunk", [7, 4096])
def test_chunked_loss_and_gradients_equal_the_full_logits_loss(tmp_path, chunk):
    x, pos, labels = _packed_batch()
    model = _lora(tiny_model()).train()
    trainer = _trainer(model, tmp_path, chunk)
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    loss = trainer.compute_loss(model, {"input_ids": x, "position_ids": pos, "labels": labels})
    hook.remove()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref = model(input_ids=x, position_ids=pos, labels=labels).loss  # transformers' own loss over full logits
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)
    rows = [s[0] if len(s) == 2 else s[0] * s[1] for s in seen]
    assert max(rows) <= chunk  # the output layer never saw more than one chunk of positions at once
    assert sum(rows) >= 2 * 63  # ... and every position was scored


def test_packed_documents_do_not_see_each_other(tmp_path):
    """The loss of a packed row equals the losses of its documents run one by one (no mask is passed: transformers
    builds the block-diagonal mask from the restarting position ids)."""
    x, pos, labels = _packed_batch()
    model = _lora(tiny_model()).eval()
    trainer = _trainer(model, tmp_path, 16)
    with torch.no_grad():
        total, n = 0.0, 0
        for a, b in ((0, 20), (20, 50), (50, 64)):
            seg, lab = x[:1, a:b], labels[:1, a:b].clone()
            lab[0, 0] = -100
            k = int((lab[0, 1:] != -100).sum())
            total += model(input_ids=seg, labels=lab).loss.item() * k
            n += k
        packed = trainer.compute_loss(model, {"input_ids": x[:1], "position_ids": pos[:1], "labels": labels[:1]})
    assert abs(packed.item() - total / n) < 1e-5


def test_loss_is_normalised_by_the_tokens_of_the_whole_accumulated_batch(tmp_path):
    x, pos, labels = _packed_batch()
    model = _lora(tiny_model()).eval()
    trainer = _trainer(model, tmp_path, 16)
    with torch.no_grad():
        mean = trainer.compute_loss(model, {"input_ids": x, "position_ids": pos, "labels": labels})
        assert trainer.loss_is_scaled_for_ga is False
        n = int((labels[:, 1:] != -100).sum())
        scaled = trainer.compute_loss(model, {"input_ids": x, "position_ids": pos, "labels": labels},
                                      num_items_in_batch=torch.tensor(3 * n))
        assert trainer.loss_is_scaled_for_ga is True
    torch.testing.assert_close(scaled, mean / 3, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_the_shipped_gguf_model_loads_as_a_trainable_dense_model():
    """transformers marks a dequantized GGUF model as quantized, which Trainer refuses and a merge would save."""
    from transformers.trainer_utils import validate_quantization_for_training

    from llama_ctx.io import SMOLLM2_GGUF, smollm2_dir
    from llama_ctx.train.config import validate
    from llama_ctx.train.model import load_base, prepare

    model, tokenizer = load_base(str(smollm2_dir()), SMOLLM2_GGUF)
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    cfg = validate({"model": {"path": "smollm2"}, "context": {"method": "pi", "params": {"factor": 2},
                                                             "seq_len": 16384},
                    "data": {"sources": [{"path": "x", "domain": "d", "weight": 1}]}, "training": {"output_dir": "x"}})
    peft = prepare(model, cfg)
    validate_quantization_for_training(peft)  # raises for a quantized model
    emb = peft.base_model.model.model.embed_tokens.modules_to_save["default"].weight
    assert peft.base_model.model.lm_head.modules_to_save["default"].weight is emb  # tied: trained together
