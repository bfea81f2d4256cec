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

    file = _config_file(path, kwargs)
    on_disk = json.loads(file.read_text()) if file else {}
    saved = on_disk.get(CONFIG_KEY)
    if "config" in kwargs:
        kwargs["config"] = _given_config(kwargs["config"], saved, path)
    elif saved and "position" in saved:
        kwargs["config"] = _position_config(on_disk, saved)
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
    _load_position_tensors(model, file.parent if file else Path(path))
    return model


# the from_pretrained arguments that say where config.json is (a local folder, or a hub id in the local cache)
_WHERE = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def _config_file(path, kwargs: dict) -> Path | None:
    """The config.json that `from_pretrained(path, **kwargs)` reads: in a local folder, else resolved like
    transformers resolves it (a hub id through the cache). None where there is none; transformers then says why."""
    local = Path(path) / kwargs.get("subfolder", "") / "config.json"
    if local.is_file():
        return local
    from transformers.utils import cached_file

    try:
        found = cached_file(str(path), "config.json", **{k: kwargs[k] for k in _WHERE if k in kwargs},
                            _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):  # no such repo or folder: AutoModelForCausalLM raises its own error next
        return None
    return Path(found) if found else None


def _given_config(config, saved: dict | None, path):
    """A `config=` the caller passed. It must record the folder's llama_ctx methods: one without them (a stock
    config) would load the weights with no method re-applied, and a position method's trained tensors dropped."""
    entry = getattr(config, CONFIG_KEY, None)
    if saved and not entry:
        kinds = ", ".join(f"{k} {saved[k]['method']!r}" for k in KINDS if k in saved)
        raise ConfigError(f"{path} was saved with llama_ctx methods ({kinds}), but the config= passed does not record "
                          "them, so they would not be re-applied. Leave out config= and pass overrides as keyword "
                          "arguments, or pass AutoConfig.from_pretrained of this folder.")
    if entry and "position" in entry:  # its rope type is llama_ctx's marker, which transformers cannot build
        return _position_config(config.to_dict(), entry)
    return config


def _position_config(d: dict, entry: dict):
    """The saved config (a dict) with its original rope parameters (what the model is built with before
    re-patching)."""
    from transformers import CONFIG_MAPPING

    d = dict(d, rope_parameters=copy.deepcopy(entry["original_rope_parameters"]))
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
