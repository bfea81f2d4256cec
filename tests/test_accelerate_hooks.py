"""Models dispatched by accelerate (`device_map`, CPU/disk offloading): the hooks wrap `forward` on the instance.

accelerate's `add_hook_to_module` puts a wrapper in `module.forward` that runs the hook (inputs to the execution
device, offloaded weights loaded from disk) and calls `module._old_forward`. A patch must run inside that wrapper,
never around or instead of it, in both orders (dispatch then patch, patch then dispatch), and `unpatch` must leave
the hooks as they were. Checked on CPU with a layer offloaded to disk (its weights are on the meta device between
calls), against the same method on a model that was never dispatched.
"""

import pytest
import torch
from accelerate import dispatch_model
from accelerate.hooks import remove_hook_from_submodules
from transformers import AutoModelForCausalLM

import llama_ctx
from llama_ctx import PatchStateError
from conftest import ids, logits, tiny_model

OFFLOAD = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
           "model.norm": "cpu", "lm_head": "cpu"}
BACKBONE = {"model": "cpu", "lm_head": "cpu"}  # a hook on the decoder stack itself (streaming replaces its forward)
METHODS = [("rerope", dict(window=16)), ("streaming", dict(window=32)), ("yarn", dict(factor=4.0)),
           ("learned-absolute", dict(max_positions=160)),  # a new forward on the decoder stack, a new module
           ("t5-bias", dict())]  # rotary off, new attention forwards reading a new module
X = ids(150)


def dispatched(model, tmp_path, device_map=OFFLOAD):
    extra = {"model.llama_ctx_position": "cpu"} if hasattr(model.model, "llama_ctx_position") else {}
    full = {**device_map, **extra} if device_map is OFFLOAD else device_map  # a position method's table needs a place
    model = dispatch_model(model, device_map=full, offload_dir=tmp_path, force_hooks=True)
    if device_map is OFFLOAD:
        assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    return model


def hooked(device_map):
    """The module whose hook the patch must not bypass."""
    return (lambda m: m.model.layers[1].self_attn) if device_map is OFFLOAD else (lambda m: m.model)


def count_hook_calls(module) -> list:
    calls, hook = [], module._hf_hook
    pre_forward = hook.pre_forward
    hook.pre_forward = lambda *a, **kw: (calls.append(1), pre_forward(*a, **kw))[1]
    return calls


def reference(method, params):
    model = tiny_model()
    llama_ctx.patch(model, method, **params)
    return logits(model, X)


@pytest.mark.parametrize("device_map", [OFFLOAD, BACKBONE], ids=["offload", "backbone"])
@pytest.mark.parametrize("method,params", METHODS, ids=[m for m, _ in METHODS])
def test_patch_after_dispatch_runs_inside_the_hooks(method, params, device_map, tmp_path):
    model = dispatched(tiny_model(), tmp_path, device_map)
    module = hooked(device_map)(model)
    stock, wrapper, inner = logits(model, X), vars(module)["forward"], vars(module)["_old_forward"]
    calls = count_hook_calls(module)
    llama_ctx.patch(model, method, **params)
    assert torch.equal(logits(model, X), reference(method, params))
    assert calls  # the hook ran: not bypassed by the patched forward
    assert vars(module)["forward"] is wrapper
    llama_ctx.unpatch(model)
    assert vars(module)["forward"] is wrapper and vars(module)["_old_forward"] is inner
    assert torch.equal(logits(model, X), stock)


@pytest.mark.parametrize("device_map", [OFFLOAD, BACKBONE], ids=["offload", "backbone"])
@pytest.mark.parametrize("method,params", METHODS, ids=[m for m, _ in METHODS])
def test_dispatch_after_patch_then_unpatch_keeps_the_hooks(method, params, device_map, tmp_path):
    model = tiny_model()
    stock = logits(model, X)
    llama_ctx.patch(model, method, **params)
    patched = logits(model, X)
    dispatched(model, tmp_path, device_map)
    calls = count_hook_calls(hooked(device_map)(model))
    assert torch.equal(logits(model, X), patched) and calls
    llama_ctx.unpatch(model)
    seen = len(calls)
    assert torch.equal(logits(model, X), stock)
    assert len(calls) > seen  # the hook still runs after unpatch
    remove_hook_from_submodules(model)  # and removing it later does not bring the patch back
    assert torch.equal(logits(model, X), stock)


@pytest.mark.parametrize("method,params", METHODS, ids=[m for m, _ in METHODS])
def test_hooks_removed_while_patched(method, params, tmp_path):
    model = dispatched(tiny_model(), tmp_path)
    stock = logits(model, X)
    llama_ctx.patch(model, method, **params)
    remove_hook_from_submodules(model)
    assert torch.equal(logits(model, X), reference(method, params))
    llama_ctx.unpatch(model)
    assert torch.equal(logits(model, X), stock)


def test_from_pretrained_with_offloading_device_map(tmp_path):
    tiny_model().save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=OFFLOAD,
                                                 offload_folder=tmp_path / "offload").eval()
    model.config._attn_implementation = "sdpa"
    stock = logits(model, X)
    calls = count_hook_calls(model.model.layers[1].self_attn)
    llama_ctx.patch(model, "self-extend", group_size=4, window=16)
    want = tiny_model()
    llama_ctx.patch(want, "self-extend", group_size=4, window=16)
    assert torch.equal(logits(model, X), logits(want, X)) and calls
    llama_ctx.unpatch(model)
    assert torch.equal(logits(model, X), stock)


def test_unpatch_refuses_when_a_patched_attribute_was_replaced_since():
    model = tiny_model()
    llama_ctx.patch(model, "rerope", window=16)
    patched = logits(model, X)
    attn = model.model.layers[0].self_attn
    ours = attn.forward
    attn.forward = lambda *a, **kw: ours(*a, **kw)  # some other library's wrapper, unknown to llama_ctx
    with pytest.raises(PatchStateError, match="LlamaAttention.forward was replaced after llama_ctx.patch"):
        llama_ctx.unpatch(model)
    assert llama_ctx.state(model)["attention"]["method"] == "rerope"  # nothing changed
    assert torch.equal(logits(model, X), patched)
    attn.forward = ours
    llama_ctx.unpatch(model)
    assert torch.equal(logits(model, X), logits(tiny_model(), X))
