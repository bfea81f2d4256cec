"""Load a model saved after `patch()` and re-apply what was applied."""

from __future__ import annotations

import copy

from .patch import CONFIG_KEY, backbone_of, patch


def from_pretrained(path, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)`, then re-apply the recorded llama_ctx methods.

    Native rope types were already loaded by transformers; they are rebuilt from the original rope so that the
    returned model is patched like the saved one: `state()` reports the methods and `unpatch()` works.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    entry = getattr(model.config, CONFIG_KEY, None)
    if not entry:
        return model
    backbone = backbone_of(model)
    config = backbone.config
    delattr(config, CONFIG_KEY)
    config.rope_parameters = copy.deepcopy(entry["original_rope_parameters"])
    if entry.get("rope", {}).get("native"):
        old = backbone.rotary_emb
        device = next((b.device for b in old.buffers()), None)
        backbone.rotary_emb = type(old)(config=config, device=device) if _takes_device(old) else type(old)(config)
    for kind in ("rope", "attention"):
        if kind in entry:
            patch(model, entry[kind]["method"], replace_native=entry[kind].get("replace_native", False),
                  **entry[kind]["params"])
    return model


def _takes_device(module) -> bool:
    import inspect

    return "device" in inspect.signature(type(module).__init__).parameters
