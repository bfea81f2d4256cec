"""Load the base model, apply the context method with the public patch layer, wrap it for LoRA.

The order is the LongLoRA recipe written with llama_ctx's own calls: `patch(model, <rope method>)`, then
`patch(model, "s2-attn")` when enabled, then PEFT `get_peft_model(LoraConfig(..., modules_to_save=[embed, norm]))`.
`patch` copies the config and writes native `rope_parameters` into it, so everything saved from this model (the
adapter folder's config.json, a merged model) carries the rope method; `load_adapter` refuses an adapter folder
without it rather than rebuilding a model that would run at the wrong positions.

Tied embeddings (SmolLM2, many small models): training `embed_tokens` with PEFT's default `modules_to_save` gives the
input embedding a trainable copy while `lm_head` keeps the original, and a merged model re-ties them to one of the
two: the logits change after the merge (PEFT #2777). We pass `ensure_weight_tying=True`, so `lm_head` shares the
trained copy, as the tied model itself would.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..patch import patch
from .config import TrainConfig

ADAPTER_CONFIG = "config.json"  # the patched model config, written beside adapter_config.json
RECIPE_FILE = "llama_ctx_train.json"  # the training config that produced an adapter (its context section)


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def load_base(path: str, gguf_file: str | None = None, dtype: str = "float32", attn_implementation: str = "sdpa"):
    """(model, tokenizer) from a local folder, a GGUF file in a folder, or a hub name (downloaded if reachable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if p.suffix == ".gguf" and p.is_file():
        p, gguf_file = p.parent, p.name
    kw = dict(local_files_only=True) if p.exists() else {}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    src = p if p.exists() else path
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=_dtype(dtype), attn_implementation=attn_implementation,
                                                     **kw)
        tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path: cannot load {path!r}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if gguf_file:
        _as_dense(model, path)
    return model, tokenizer


def _as_dense(model, path) -> None:
    """A GGUF file loaded into plain float weights is an ordinary model: drop the GGUF quantizer marks.

    transformers keeps `hf_quantizer` (and `quantization_config` in the config) after dequantizing a GGUF file, so
    `Trainer` refuses to train it and a merged model would be saved as if it were still GGUF-quantized.
    """
    import torch

    if getattr(model, "hf_quantizer", None) is None:
        return
    if any(not p.dtype.is_floating_point for p in model.parameters()) or any(
            type(m).__module__.startswith("transformers.integrations.gguf") for m in model.modules()):
        raise ConfigError(f"model.path: {path!r} was loaded with its GGUF weights packed; training needs them "
                          "dense (uninstall `kernels`, or convert the file to safetensors first)")
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    for cfg in {id(c): c for c in (model.config, getattr(model.config, "text_config", None)) if c}.values():
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
    assert all(p.dtype.is_floating_point for p in model.parameters()) and torch.is_tensor(next(model.parameters()))


def lora_config(config: TrainConfig, model):
    """The PEFT `LoraConfig` of the recipe (LoRA on `lora.target_modules`, `lora.trainable` trained fully).

    A position method's trainable tensors (`llama_ctx_position`, e.g. learned-absolute's table) are trained fully
    too: as `modules_to_save`, so PEFT saves them in every checkpoint, restores them on resume and `load_adapter`,
    and `merge_and_unload` puts the trained copy in the merged model.
    """
    from peft import LoraConfig

    from ..encodings.base import MODULE_ATTR

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    trainable = list(config.lora.trainable)
    has_position = any(name.split(".")[-1] == MODULE_ATTR for name, _ in model.named_modules())
    modules_to_save = trainable + ([MODULE_ATTR] if has_position and MODULE_ATTR not in trainable else [])
    return LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=list(config.lora.target_modules), modules_to_save=modules_to_save or None,
                      task_type="CAUSAL_LM", ensure_weight_tying=tied and "embed_tokens" in trainable)


def apply_context(model, config: TrainConfig):
    """Patch `model` (plain or PEFT-wrapped) with the rope or position method and, if enabled, S2-attn."""
    if config.context.method:
        patch(model, config.context.method, **config.context.params)
    if config.s2_attn.enabled:
        patch(model, "s2-attn", group_size_ratio=config.s2_attn.group_size_ratio)
    return model


def prepare(model, config: TrainConfig):
    """The PEFT model to train: context methods applied, LoRA injected, extra modules trainable."""
    from peft import get_peft_model

    apply_context(model, config)
    try:
        peft_model = get_peft_model(model, lora_config(config, model))
    except ValueError as e:  # e.g. a target module that the model does not have
        raise ConfigError(f"lora: {e}") from None
    return peft_model


def save_adapter(peft_model, out: Path, config: TrainConfig | None = None, state_dict=None) -> None:
    """Adapter weights (safetensors) + adapter_config.json + the patched model config (native rope_parameters)."""
    peft_model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    write_adapter_metadata(peft_model, out, config)


def write_adapter_metadata(peft_model, out: Path, config: TrainConfig | None = None) -> None:
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    base.config.save_pretrained(out)  # config.json: rope_parameters + the `llama_ctx` entry
    if config is not None:
        from .config import dump

        (Path(out) / RECIPE_FILE).write_text(json.dumps(dump(config), indent=1) + "\n")


def adapter_context(adapter_dir) -> dict:
    """What llama_ctx applied to the model an adapter was trained on (the `llama_ctx` entry of its config.json).

    Raises:
        ConfigError: the folder has no config.json with it (an adapter trained without llama_ctx, or a copy that
            lost the file): loading it on a stock base model would silently use the wrong positions.
    """
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter: {str(adapter_dir)!r} is not a PEFT adapter folder (no adapter_config.json)")
    if not path.is_file():
        raise ConfigError(f"--adapter: {str(adapter_dir)!r} has no {ADAPTER_CONFIG} recording the rope method it was "
                          "trained with; adapters from `llama_ctx.train.run` have one. Without it the merged model "
                          "would run at the wrong positions")
    entry = json.loads(path.read_text()).get("llama_ctx") or {}
    return entry


def apply_recorded(model, entry: dict) -> None:
    """Apply the rope or position method recorded in a `llama_ctx` config entry (what training applied first)."""
    for kind in ("rope", "position"):
        if kind in entry:
            patch(model, entry[kind]["method"], **entry[kind]["params"])


def load_adapter(base, adapter_dir, trainable: bool = False, **load_kw):
    """Base model (a folder or a loaded model) + the adapter at `adapter_dir`, patched as in training.

    The rope or position method (and any attention method other than S2-attn, which is a training-time method)
    recorded in the adapter's config.json is applied to the base first, exactly as `prepare` did before training;
    PEFT then loads a position method's trained tensors with the other `modules_to_save`.
    """
    from peft import PeftModel

    entry = adapter_context(adapter_dir)
    tokenizer = None
    if not hasattr(base, "forward"):
        base, tokenizer = load_base(str(base), **load_kw)
    apply_recorded(base, entry)
    if "attention" in entry and entry["attention"]["method"] != "s2-attn":
        patch(base, entry["attention"]["method"], **entry["attention"]["params"])
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
    return model, tokenizer
