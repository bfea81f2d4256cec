"""The chunked causal-LM loss against transformers' own loss (`ForCausalLMLoss`, `model(..., labels=...).loss`)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers.loss.loss_utils import ForCausalLMLoss

import llama_ctx
from llama_ctx import ConfigError
from llama_ctx.train.loss import chunked_causal_lm_loss, chunked_causal_lm_loss_sum, compute_loss
from conftest import ids, tiny_model

B, L, H, V = 2, 16, 64, 256


def case(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.1).requires_grad_()
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 3:7] = -100  # a masked prompt
    labels[1, -1] = -100
    return hidden, weight, labels


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("num_items", [None, 37, torch.tensor(37)])
@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])  # 7 divides neither L nor B * L; 1000 is one chunk
@pytest.mark.parametrize("as_module", [False, True])
def test_matches_transformers_loss(chunk, num_items, as_module):
    hidden, weight, labels = case()
    want = ForCausalLMLoss(F.linear(hidden, weight), labels, V, num_items_in_batch=num_items)
    head = (lambda h: F.linear(h, weight)) if as_module else weight
    got = chunked_causal_lm_loss(hidden, head, labels, chunk_size=chunk, num_items_in_batch=num_items)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for g, w in zip(grads(got, hidden, weight), grads(want, hidden, weight)):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_sum_and_count():
    hidden, weight, labels = case()
    total, count = chunked_causal_lm_loss_sum(hidden, weight, labels, chunk_size=5)
    assert count.item() == B * (L - 1) - 4 - 1  # the last position of each row predicts nothing
    want = ForCausalLMLoss(F.linear(hidden, weight), labels, V, num_items_in_batch=1)
    torch.testing.assert_close(total, want, atol=1e-5, rtol=1e-6)


def test_all_ignored_is_nan_like_transformers():
    hidden, weight, labels = case()
    labels[:] = -100
    assert torch.isnan(ForCausalLMLoss(F.linear(hidden, weight), labels, V))
    assert torch.isnan(chunked_causal_lm_loss(hidden, weight, labels, chunk_size=4))


def model_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(model, inputs, num_items=None, chunk=5):
    model.zero_grad(set_to_none=True)
    want = model(**inputs, use_cache=False, **({} if num_items is None else dict(num_items_in_batch=num_items))).loss
    want.backward()
    want_grads = model_grads(model)
    model.zero_grad(set_to_none=True)
    got = compute_loss(model, inputs, num_items_in_batch=num_items, chunk_size=chunk)
    got.backward()
    got_grads = model_grads(model)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert got_grads.keys() == want_grads.keys() and got_grads
    for name, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("num_items", [None, 50])
def test_compute_loss_equals_model_loss(num_items):
    model = tiny_model().train()
    x = ids(L, batch=B)
    labels = x.clone()
    labels[:, :4] = -100
    assert_same_loss_and_grads(model, dict(input_ids=x, labels=labels), num_items)


def test_compute_loss_with_s2_attn_and_packed_documents():
    model = llama_ctx.patch(tiny_model(), "s2-attn").train()
    x = ids(32)
    pos = torch.tensor([[*range(10), *range(22)]])
    assert_same_loss_and_grads(model, dict(input_ids=x, labels=x, position_ids=pos), chunk=7)


@pytest.mark.parametrize("wrap", ["modules_to_save", "lora"])
def test_compute_loss_through_peft_wrapped_lm_head(wrap):
    peft = pytest.importorskip("peft")
    model = tiny_model()
    original = model.lm_head.weight
    targets = ["q_proj", "v_proj"] + (["lm_head"] if wrap == "lora" else [])
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False,
                                                       modules_to_save=["lm_head"] if wrap != "lora" else None))
    if wrap == "modules_to_save":
        with torch.no_grad():  # the trainable copy differs from the original, as after some training
            model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    model.train()
    x = ids(L, batch=B)
    assert_same_loss_and_grads(model, dict(input_ids=x, labels=x), chunk=6)
    # the original weight alone gives another loss: the wrapper's contribution is in
    hidden = model.base_model.model.model(x).last_hidden_state
    assert abs(chunked_causal_lm_loss(hidden, original, x).item()
               - compute_loss(model, dict(input_ids=x, labels=x)).item()) > 1e-3


def test_return_outputs():
    model = tiny_model()
    x = ids(L)
    loss, out = compute_loss(model, dict(input_ids=x, labels=x), return_outputs=True)
    assert out.loss is loss and out.logits.shape == (1, 1, V)


class Largest(TorchDispatchMode):
    """Records the element count of the largest tensor any operation (forward or backward) produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numel = max([self.numel] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


def saved_numel(fn):
    """Elements of distinct tensors autograd saves for backward while `fn` runs (outside checkpointed regions)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_memory_never_holds_full_logits():
    length, vocab, chunk = 1024, 4096, 64
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, length, 32, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, 32, generator=g) * 0.1).requires_grad_()
    labels = torch.randint(0, vocab, (1, length), generator=g)
    full = length * vocab

    with Largest() as plain:
        loss, plain_saved = saved_numel(lambda: ForCausalLMLoss(F.linear(hidden, weight), labels, vocab))
        loss.backward()
    assert plain.numel >= full and plain_saved >= full  # the probes see full logits when they exist

    with Largest() as chunked:
        loss, chunked_saved = saved_numel(lambda: chunked_causal_lm_loss(hidden, weight, labels, chunk_size=chunk))
        loss.backward()
    assert chunked.numel <= chunk * vocab < full / 8  # no operation, forward or backward, makes more than a chunk
    assert chunked_saved < full / 8  # and backward keeps no chunk's logits alive between chunks


@pytest.mark.parametrize("kwargs,match", [
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=2.5), "chunk_size"),
    (dict(labels=torch.zeros(2, 5, dtype=torch.long)), "do not match"),
    (dict(labels=None), "needs labels"),
])
def test_bad_input(kwargs, match):
    hidden, weight, labels = case()
    with pytest.raises(ConfigError, match=match):
        chunked_causal_lm_loss(hidden, weight, **{"labels": labels, **kwargs})
    with pytest.raises(ConfigError, match="needs `labels`"):
        compute_loss(tiny_model(), dict(input_ids=ids(4)))
