"""Checks that need more than the schema: files, the model's config.json (read without weights), the machine.

Everything here runs before a model is loaded or anything is written, so a bad config costs seconds and leaves no
partial output. Each failure is one `ConfigError` naming the key, e.g. `context.params.factor: ...`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, LlamaCtxError
from .builtin import BUILTIN_PREFIX, SMOLLM2, TINY_RANDOM, resolve_model_path, resolve_text_path
from .config import TrainConfig

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, nothing that looks like a local path


@dataclass
class Checked:
    """A validated config with its local resources resolved (`tiny-random`, `builtin:` texts)."""

    config: TrainConfig
    model_path: str  # resolved model.path
    gguf_file: str | None  # resolved model.gguf_file
    model_config: object  # the transformers config read from config.json / GGUF metadata
    trained_window: int
    device: str  # "cuda" or "cpu"


def is_hub_name(path: str) -> bool:
    return bool(HUB_NAME.match(path)) and not Path(path).exists()


def model_config(path: str, gguf_file: str | None, key: str = "model.path"):
    """The transformers config of the model at `path`, read locally (no weights, no download)."""
    from transformers import AutoConfig

    p = Path(path)
    if p.suffix == ".gguf" and p.is_file():
        p, gguf_file = p.parent, p.name
    if not p.exists() and not is_hub_name(path):
        raise ConfigError(f"{key}: {path!r} does not exist; give a local model folder, a .gguf file, a hub name "
                          f"(org/name), {TINY_RANDOM!r} or {SMOLLM2!r}")
    if gguf_file:
        if p.exists() and not (p / gguf_file).is_file():
            raise ConfigError(f"model.gguf_file: no file {gguf_file!r} in {path!r}")
        if importlib.util.find_spec("gguf") is None:
            raise ConfigError("model.gguf_file: reading GGUF files needs the `gguf` package: pip install gguf")
    elif p.is_dir() and not (p / "config.json").is_file():
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        hint = f"; it holds {', '.join(ggufs)}: set model.gguf_file" if ggufs else ""
        raise ConfigError(f"{key}: {path!r} has no config.json{hint}")
    try:
        kw = {"gguf_file": gguf_file} if gguf_file else {}
        return AutoConfig.from_pretrained(p if p.exists() else path, local_files_only=True, **kw)
    except Exception as e:  # noqa: BLE001 - unreadable config or hub model not in the local cache
        raise ConfigError(f"{key}: cannot read the model config of {path!r}: {type(e).__name__}: {e}") from None


def check(config: TrainConfig, device: str | None = None) -> Checked:
    """Validate `config` against its model, files and machine; resolve local resources. Raises ConfigError."""
    import torch

    from .. import registry
    from ..patch import SUPPORTED_MODEL_TYPES
    from ..rope.base import RopeSpec

    device = device or ("cuda" if torch.cuda.is_available() and not config.training.get("use_cpu") else "cpu")
    m, ctx, tr = config.model, config.context, config.training
    path, gguf_file = resolve_model_path(m.path, m.gguf_file)
    cfg = model_config(path, gguf_file)
    if getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model.path: model_type {getattr(cfg, 'model_type', None)!r} is not supported; "
                          f"llama_ctx trains {', '.join(SUPPORTED_MODEL_TYPES)} models")
    window = RopeSpec.from_config(cfg).trained_window

    # dtypes and devices
    if device == "cpu" and m.dtype == "float16":
        raise ConfigError("model.dtype: float16 needs a CUDA GPU (CPU kernels and optimizers do not support it); "
                          "use float32 or bfloat16 on CPU")
    if device == "cpu" and tr.get("fp16"):
        raise ConfigError("training.fp16: fp16 mixed precision needs a CUDA GPU; on CPU use bf16: true or neither")
    if tr.get("fp16") and tr.get("bf16"):
        raise ConfigError("training.fp16: fp16 and bf16 are exclusive; choose one")
    if m.dtype == "float16" and tr.get("bf16"):
        raise ConfigError("training.bf16: bf16 autocast over float16 weights; load the model in bfloat16 "
                          "(model.dtype: bfloat16) or float32")

    # the rope method and its coverage of seq_len
    if ctx.method is None:
        if ctx.params:
            raise ConfigError("context.params: given without context.method")
        if ctx.seq_len > window:
            raise ConfigError(f"context.seq_len: {ctx.seq_len} exceeds the model's trained window ({window}) and "
                              "no context.method extends it; set e.g. method: pi, params: {factor: "
                              f"{-(-ctx.seq_len // window)}}}")
    else:
        try:
            method = registry.get(ctx.method)
        except LlamaCtxError as e:
            raise ConfigError(f"context.method: {e}") from None
        if method.kind == "attention":
            raise ConfigError(f"context.method: {ctx.method!r} is an attention method; the fine-tuning entry point "
                              "trains rope (frequency) and position methods (pi, yarn, ..., learned-absolute, "
                              "sinusoidal, ...); S2-attn is set under s2_attn")
        try:
            params = registry.make_params(method, {registry.TRAINED_WINDOW: window}, **ctx.params)
        except LlamaCtxError as e:
            raise ConfigError(f"context.params: {e}") from None
        rows = getattr(params, "max_positions", None)
        if rows is not None and rows < ctx.seq_len:
            raise ConfigError(f"context.params.max_positions: {rows} table rows do not cover seq_len {ctx.seq_len} "
                              f"(positions past the table are an error, never clamped); use max_positions >= "
                              f"{ctx.seq_len}")
        longest = max(config.eval.lengths, default=0)  # checked now, not when the first evaluation fails
        if rows is not None and rows < longest:
            raise ConfigError(f"context.params.max_positions: {rows} table rows do not cover eval.lengths {longest} "
                              f"(positions past the table are an error, never clamped); use max_positions >= "
                              f"{longest} or shorter eval.lengths")
        if method.kind == "position" and config.s2_attn.enabled \
                and "s2-attn" not in method.impl.compatible_attention:
            raise ConfigError(f"s2_attn.enabled: S2-attn is not combined with the position method {ctx.method!r} "
                              "(see docs/encodings.md); set s2_attn.enabled: false")
        factor = getattr(params, "factor", None)
        base_window = getattr(params, "original_max_position_embeddings", None) or window
        if factor is not None and factor * base_window < ctx.seq_len:
            need = ctx.seq_len / base_window
            raise ConfigError(f"context.params.factor: {factor:g} x trained window {base_window} = "
                              f"{factor * base_window:g} positions do not cover seq_len {ctx.seq_len}; use "
                              f"factor >= {need:g}")

    # S2-attn groups: G = seq_len / n for ratio 1/n; G must be even (the shift is G / 2)
    if config.s2_attn.enabled:
        ratio = config.s2_attn.group_size_ratio
        n = round(1 / ratio)
        if not math.isclose(n * ratio, 1.0, rel_tol=1e-9):
            raise ConfigError(f"s2_attn.group_size_ratio: must be 1/n for a whole number n (1, 0.5, 0.25, 0.125, "
                              f"...) so that groups tile the sequence; got {ratio}")
        if ctx.seq_len % (2 * n):
            raise ConfigError(f"context.seq_len: {ctx.seq_len} must be a multiple of the S2-attn group size "
                              f"seq_len x {ratio:g}, which must be a whole even number (the shift is half a group): "
                              f"seq_len must be a multiple of {2 * n}")
        if m.attn_implementation not in ("sdpa", "eager"):
            raise ConfigError(f"s2_attn.enabled: S2-attn runs with attn_implementation sdpa or eager, not "
                              f"{m.attn_implementation!r}")

    # context parallelism: torch CP supports only a plain causal mask
    pc = tr.get("parallelism_config") or {}
    cp = int(pc.get("cp_size") or 1)
    if os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "").lower() == "true":
        cp = max(cp, int(os.environ.get("PARALLELISM_CONFIG_CP_SIZE", "1")))
    if cp > 1:
        why = "S2-attn shifts groups along the sequence, which a sequence split across ranks cannot do" \
            if config.s2_attn.enabled else "training rows are packed documents (position ids restart per " \
            "document, a block-diagonal mask) and torch context parallelism supports only a plain causal mask, " \
            "so documents would silently attend to each other"
        raise ConfigError(f"training.parallelism_config.cp_size: context parallelism (cp_size={cp}) is not "
                          f"supported: {why}. Use data parallelism with FSDP2 or ZeRO-3 (configs/accelerate/) "
                          "and activation checkpointing for long sequences")

    # data and evaluation files
    data = config.data.model_copy(deep=True)
    for i, src in enumerate(data.sources):
        try:
            src.path = resolve_text_path(src.path)
        except ConfigError as e:
            raise ConfigError(f"data.sources[{i}].path: {e}") from None
        if not Path(src.path).exists() and not is_hub_name(src.path):
            raise ConfigError(f"data.sources[{i}].path: {src.path!r} does not exist (a local file or folder, "
                              f"{BUILTIN_PREFIX}python-docs, or a hub dataset name org/name)")
    ev = config.eval.model_copy()
    if ev.text is not None:
        try:
            ev.text = resolve_text_path(ev.text, plain=True)
        except ConfigError as e:
            raise ConfigError(f"eval.text: {e}") from None
        if not Path(ev.text).exists() and not is_hub_name(ev.text):
            raise ConfigError(f"eval.text: {ev.text!r} does not exist")

    if int(tr.get("max_steps", -1)) <= 0 and not getattr(config.data, "tokens", None):
        raise ConfigError("training.max_steps: set it, or data.tokens (the number of steps then follows from the "
                          "token budget); the data stream has no length")
    config.training_arguments()  # transformers' own cross-field checks
    resolved = config.model_copy(update={"data": data, "eval": ev})
    return Checked(resolved, path, gguf_file, cfg, window, device)
