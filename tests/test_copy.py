"""Copies of patched models: `copy.deepcopy` (reference and EMA models are made with it) and torch.save / torch.load.

A copy must be a model of its own: its forwards use the copy's weights and modules, later changes to the original
(weights, unpatch) do not reach it, `state(copy)` reports what is applied to it and `unpatch(copy)` restores the
copy exactly. Checked for every registered method and for a rope method combined with each attention method.
"""

import copy
import io

import pytest
import torch

import llama_ctx
from conftest import ids, logits, tiny_model

PARAMS = {
    "pi": dict(factor=2), "ntk": dict(factor=2), "dynamic-ntk": dict(factor=2), "yarn": dict(factor=2),
    "llama3": dict(factor=2), "base-truncation": dict(a=0.01, b=0.1, rho=0.005),
    "rerope": dict(window=8), "leaky-rerope": dict(window=8, factor=2), "self-extend": dict(group_size=2, window=8),
    "lambda": dict(global_tokens=4, local_window=16), "streaming": dict(window=16),
    "topk": dict(k=3, local_window=16), "block-topk": dict(block_size=4, k_blocks=2, local_window=10),
    "s2-attn": dict(group_size_ratio=0.25), "dca": dict(chunk_size=24, local_window=6),
    "nope": dict(), "sinusoidal": dict(scale=0.5), "multiplicative": dict(), "recursive": dict(width=16),
    "learned-absolute": dict(max_positions=80), "alibi": dict(), "t5-bias": dict(num_buckets=8, max_distance=20),
}
ATTENTION = [m["name"] for m in llama_ctx.methods() if m["kind"] == "attention"]
# every method alone, the rope method "yarn" applied before each attention method, and after two of them
CASES = [[(m, PARAMS.get(m))] for m in PARAMS] + [[("yarn", dict(factor=2)), (m, PARAMS.get(m))] for m in ATTENTION] \
    + [[(m, PARAMS[m]), ("yarn", dict(factor=2))] for m in ("rerope", "topk")]
IDS = ["+".join(name for name, _ in case) for case in CASES]
X = ids(80)  # past the trained window (64) and every method's window: each method changes the logits


def test_every_registered_method_is_covered():
    assert sorted(PARAMS) == sorted(m["name"] for m in llama_ctx.methods())


def patched_model(case):
    # s2-attn acts only in training (eval mode is the stock model): such cases run in train mode (dropout is 0)
    model = tiny_model().train(any(name == "s2-attn" for name, _ in case))
    stock = logits(model, X)
    for name, params in case:
        llama_ctx.patch(model, name, **params)
    assert not torch.allclose(logits(model, X), stock, atol=1e-4)
    return model, stock


def forwards(model):
    return [vars(layer.self_attn).get("forward") for layer in model.model.layers]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_deepcopy_is_independent_of_the_original(case):
    original, stock = patched_model(case)
    patched, state = logits(original, X), llama_ctx.state(original)
    twin = copy.deepcopy(original)
    for layer in twin.model.layers:  # the copy's forwards are wired to the copy's modules
        fwd = vars(layer.self_attn).get("forward")
        assert fwd is None or (fwd.module is layer.self_attn and fwd.backbone is twin.model)
    assert torch.equal(logits(twin, X), patched)
    with torch.no_grad():
        for p in original.parameters():
            p.mul_(1.5)
    llama_ctx.unpatch(original)
    assert torch.equal(logits(twin, X), patched) and llama_ctx.state(twin) == state
    assert llama_ctx.unpatch(twin) is twin and llama_ctx.state(twin) is None
    assert torch.equal(logits(twin, X), stock) and forwards(twin) == [None, None]
    assert "forward" not in vars(twin.model) and "rotary_emb" in twin.model._modules


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_torch_save_and_load(case):
    original, stock = patched_model(case)
    patched, state = logits(original, X), llama_ctx.state(original)
    buffer = io.BytesIO()
    torch.save(original, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert llama_ctx.state(loaded) == state
    assert torch.equal(logits(loaded, X), patched)
    llama_ctx.unpatch(original)  # the loaded model is not tied to the original
    assert torch.equal(logits(loaded, X), patched)
    llama_ctx.unpatch(loaded)
    assert torch.equal(logits(loaded, X), stock) and forwards(loaded) == [None, None]
