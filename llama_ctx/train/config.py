"""The fine-tuning YAML as a strict pydantic v2 schema, plus `section.key=value` overrides.

One YAML per experiment (see configs/); every section is a model with `extra="forbid"`, so a misspelt key is an
error that suggests the closest known one instead of being silently ignored. The `training:` section takes
transformers `TrainingArguments` names and types, read from the installed class, so a future transformers that adds
or renames an argument is followed without code here. Checks that need the model's config.json, files or the
machine (rope coverage, S2 groups, devices) are in `checks.py`; both raise one `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from ..errors import ConfigError
from ..data import DataConfig

DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
def checkpointing_name() -> str:
    """TrainingArguments' name for activation checkpointing in the installed transformers ("activation_checkpointing"
    in recent 5.x, "gradient_checkpointing" before, e.g. 5.18)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def aliases() -> dict[str, str]:
    """Either name of activation checkpointing (LongLoRA recipes use the old one) -> the installed one."""
    new = checkpointing_name()
    old = "gradient_checkpointing" if new == "activation_checkpointing" else "activation_checkpointing"
    return {old: new, f"{old}_kwargs": f"{new}_kwargs"}
# names users bring from PEFT / LongLoRA, suggested when they appear as unknown keys
SYNONYMS = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
            "modules_to_save": "trainable", "trainable_params": "trainable", "model_max_length": "seq_len",
            "max_seq_len": "seq_len", "scaling_factor": "params", "rope_scaling": "method"}
# our defaults where transformers' would be wrong or noisy for this entry point
TRAINING_DEFAULTS = dict(logging_steps=10, report_to="none", remove_unused_columns=False)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSection(Section):
    path: str = Field(description="local HF folder, folder holding `gguf_file`, a .gguf file, a hub name, or "
                                  "`tiny-random` (a tiny random LLaMA built locally, see llama_ctx/train/builtin.py)")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path` (needs the `gguf` package)")
    dtype: Literal[DTYPES] = Field("float32", description="weights dtype; float16 needs a CUDA GPU")
    attn_implementation: Literal[ATTN_IMPLEMENTATIONS] = "sdpa"


class ContextSection(Section):
    method: str | None = Field(None, description="a llama_ctx rope method (pi, ntk, yarn, llama3, ...) or position "
                                                 "method (learned-absolute: its table is trained, sinusoidal, nope, "
                                                 "...); None keeps the model's own RoPE (seq_len must then fit its "
                                                 "window)")
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters, e.g. {factor: 4}")
    seq_len: int = Field(gt=1, description="training sequence length (packed rows of this many tokens)")


class LoraSection(Section):
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    trainable: list[str] = Field(["embed_tokens", "norm"], description="modules trained fully (PEFT "
                                 "modules_to_save; matched by name suffix: `norm` also matches every layer norm)")


class S2Section(Section):
    enabled: bool = False
    group_size_ratio: float = Field(0.25, gt=0, le=1, description="group size = seq_len x ratio (LongLoRA: 1/4)")


class EvalSection(Section):
    lengths: list[int | str] = Field(default_factory=list, description="window lengths, e.g. [4k, 16k]; empty: "
                                                                       "no evaluation")
    text: str | None = Field(None, description="file, folder or builtin:NAME; None: Python's documentation")
    text_field: str = "text"
    tokens: int | None = Field(None, gt=0, description="evaluate on the first this many tokens of the text (None: "
                                                       "all of it)")
    eval_steps: int | None = Field(None, gt=0, description="also evaluate every this many steps")
    stride: int | None = Field(None, gt=0)

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v):
        from ..eval.specs import parse_length

        return [parse_length(x) for x in v]


@functools.cache
def training_section() -> type[BaseModel]:
    """A pydantic model with one field per `TrainingArguments` argument (its own type and default)."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(TrainingArguments):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else ...)
        typ = hints[f.name]
        if f.name == "parallelism_config":
            typ = dict[str, Any] | None  # YAML gives a mapping; ParallelismConfig(**it) when building arguments
        elif f.name == "fsdp":
            typ = bool | str | list[str] | None  # annotated str, but `fsdp: true` is the documented 5.x form
        elif f.name == "resume_from_checkpoint":
            typ = bool | str | None  # a path, "auto" (newest checkpoint if any) or true (newest, must exist)
        fields[f.name] = (typ, TRAINING_DEFAULTS.get(f.name, default))
    fields["output_dir"] = (str, ...)
    return create_model("TrainingSection", __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
                        **fields)


class TrainConfig(Section):
    """The whole YAML. `training` is a `training_section()` instance (kept as a plain mapping of set keys)."""

    model: ModelSection
    context: ContextSection
    lora: LoraSection = Field(default_factory=LoraSection)
    s2_attn: S2Section = Field(default_factory=S2Section)
    data: DataConfig
    training: dict[str, Any] = Field(description="TrainingArguments names (validated by `training_section()`)")
    eval: EvalSection = Field(default_factory=EvalSection)


    def training_arguments(self, **overrides):
        """`TrainingArguments` for this config (transformers' own cross-field checks run here)."""
        from accelerate.parallelism_config import ParallelismConfig
        from transformers import TrainingArguments

        kw = {k: v for k, v in {**self.training, **overrides}.items() if k != "resume_from_checkpoint"}
        if "use_cpu" not in kw and not _accelerator_available():
            kw["use_cpu"] = True  # the only device there is: GPU recipes (bf16: true) then start on CPU as they are
        if kw.get("parallelism_config"):
            kw["parallelism_config"] = ParallelismConfig(**kw["parallelism_config"])
        ckpt = checkpointing_name()
        if kw.get(ckpt) and not kw.get(f"{ckpt}_kwargs"):
            kw[f"{ckpt}_kwargs"] = {"use_reentrant": False}  # works with frozen inputs and PEFT
        try:
            return TrainingArguments(**kw)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"training: {e}") from None

    @property
    def output_dir(self) -> Path:
        return Path(self.training["output_dir"])


def _accelerator_available() -> bool:
    import torch

    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


# ---- loading ---------------------------------------------------------------------------------------------------


def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    """`["training.learning_rate=1e-4", "data.sources.0.weight=2"]` -> [(path, value)], values typed as YAML."""
    out = []
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r} is not section.key=value (e.g. training.max_steps=100)")
        out.append((key.split("."), yaml.safe_load(text) if text else None))
    return out


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of `raw` with each `section.key=value` set (list items by index: data.sources.0.weight=2)."""
    import copy

    raw = copy.deepcopy(raw)
    for path, value in parse_overrides(overrides):
        node = raw
        for i, part in enumerate(path[:-1]):
            where = ".".join(path[:i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{where}: no list item {part!r} (the list has {len(node)})")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise ConfigError(f"{where}: is a value, not a section; cannot set {'.'.join(path)}")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"{'.'.join(path)}: no list item {last!r}")
            node[int(last)] = value
        else:
            node[last] = value
    return raw


def read_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, context, lora, ...), got "
                          f"{type(raw).__name__}")
    return raw


def validate(raw: dict) -> TrainConfig:
    """A `TrainConfig` from a plain mapping; every problem as one `ConfigError` line naming its key."""
    lines, config, training = [], None, None
    try:
        config = TrainConfig.model_validate(raw)
    except ValidationError as e:
        lines += error_lines(e)
    section = raw.get("training") if isinstance(raw, dict) else None
    if isinstance(section, dict):
        try:
            training = training_section().model_validate({aliases().get(k, k): v for k, v in section.items()})
        except ValidationError as e:
            lines += error_lines(e, prefix=("training",))
    if lines:
        lines = list(dict.fromkeys(lines))
        raise ConfigError(lines[0] if len(lines) == 1 else "invalid config:\n  " + "\n  ".join(lines))
    config.training = {k: getattr(training, k) for k in training.model_fields_set | set(TRAINING_DEFAULTS)}
    return config


def load_config(path, overrides: list[str] = ()) -> TrainConfig:
    """Read the YAML at `path`, apply `section.key=value` overrides, validate the schema (no model loaded)."""
    return validate(apply_overrides(read_yaml(path), list(overrides)))


# ---- error messages --------------------------------------------------------------------------------------------


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that holds the key at the end of `loc` (for suggestions)."""
    cls: Any = TrainConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if cls is TrainConfig and part == "training":
            cls = training_section()
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        for arg in (ann, *typing.get_args(ann), *(a for t in typing.get_args(ann) for a in typing.get_args(t))):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                cls = arg
                break
        else:
            return None
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def error_lines(e: ValidationError, prefix: tuple = ()) -> list[str]:
    """Pydantic's errors as `key.path: message` lines (pydantic's own text names the model class, not the key)."""
    lines = []
    for err in e.errors():
        loc = prefix + tuple(p for p in err["loc"]
                             if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            cls = _section_at(loc)
            known = list(getattr(cls, "model_fields", {}))
            close = [SYNONYMS[loc[-1]]] if SYNONYMS.get(loc[-1]) in known else \
                difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
            msg = f"unknown key; did you mean {close[0]!r}?" if close else \
                f"unknown key; known keys: {', '.join(known)}"
        elif err["type"] == "missing":
            msg = "missing (required)"
        lines.append(f"{_where(loc) or 'config'}: {msg}")
    return lines


def dump(config: TrainConfig) -> dict:
    """The config as plain data (what is written to the output folder and fingerprinted)."""
    return config.model_dump(mode="json", exclude_none=False)
