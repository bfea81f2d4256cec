"""Load a model saved after `patch()` and re-apply what was applied."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .errors import ConfigError
from .patch import CONFIG_KEY, backbone_of, patch
from .registry import KINDS


def from_pretrained(path, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)`, then re-apply the recorded llama_ctx methods.

    Native rope types were already loaded by transformers; they are rebuilt from the original rope so that the
    returned model is patched like the saved one: `state()` reports the methods and `unpatch()` works.
    A position method saved its config with a rope type transformers does not know (so that stock loading fails
    instead of giving a RoPE model); its config is read with the original rope here, and its trained tensors
    (`llama_ctx_position.*`, which stock transformers reports as unexpected keys) are loaded after re-applying it.
    """
    from transformers import AutoModelForCausalLM

    saved = _saved_entry(path)
    if saved and "position" in saved and "config" not in kwargs:
        kwargs["config"] = _position_config(path, saved)
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
    for kind in KINDS:
        if kind in entry:
            patch(model, entry[kind]["method"], replace_native=entry[kind].get("replace_native", False),
                  **entry[kind]["params"])
    _load_position_tensors(model, Path(path))
    return model


def _saved_entry(path) -> dict | None:
    """The `llama_ctx` entry of a local folder's config.json (None for anything else)."""
    file = Path(path) / "config.json"
    return json.loads(file.read_text()).get(CONFIG_KEY) if file.is_file() else None


def _position_config(path, entry: dict):
    """The saved config with its original rope parameters (what the model is built with before re-patching)."""
    from transformers import CONFIG_MAPPING

    d = json.loads((Path(path) / "config.json").read_text())
    d["rope_parameters"] = copy.deepcopy(entry["original_rope_parameters"])
    return CONFIG_MAPPING[d["model_type"]].from_dict(d)


def _load_position_tensors(model, path: Path) -> None:
    """Copy the saved `llama_ctx_position.*` tensors into the re-applied method's module; error if any is missing."""
    from .encodings.base import MODULE_ATTR

    wanted = [k for k in model.state_dict() if MODULE_ATTR in k.split(".")]
    if not wanted:
        return
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path} holds no .safetensors file, so the trained position tensors {wanted} cannot be "
                          "restored; save with model.save_pretrained(dir) (safetensors, the default).")
    from safetensors import safe_open

    found = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            found.update({k: f.get_tensor(k) for k in f.keys() if k in wanted})
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ConfigError(f"{path} lacks the trained position tensors {missing}; it was not saved from a model "
                          "patched with this method (save_pretrained after patch, or merge after training).")
    model.load_state_dict(found, strict=False)


def _takes_device(module) -> bool:
    import inspect

    return "device" in inspect.signature(type(module).__init__).parameters
