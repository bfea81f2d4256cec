"""Apply and revert a method on one model instance.

Every change goes through a `Patcher`, which remembers whether the attribute was the instance's own and its
old value, so `unpatch` puts back the very same objects (bit-exact logits) and never touches the class.
The model's config is copied on first patch and the copy is bound to this model's modules only: two models
built from one config object stay independent, and `save_pretrained` writes the patched config. `unpatch` puts
the original config object back and carries over every edit made to the copy meanwhile (e.g.
`model.config.use_cache = False`), except the fields llama_ctx itself writes (`WRITTEN`), which it restores.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from . import compat, registry
from .errors import PatchStateError, UnsupportedModelError
from .rope.base import RopeSpec
from .rope.module import RotaryEmbedding

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_STATE_ATTR = "_llama_ctx_state"
CONFIG_KEY = "llama_ctx"  # config entry that records what is applied (saved by save_pretrained)
WRITTEN = frozenset({"rope_parameters", CONFIG_KEY})  # the config fields llama_ctx writes while patched


class Patcher:
    """Records attribute changes on objects so they can be reverted exactly, newest first."""

    def __init__(self):
        self._ops: list[tuple[Any, str, bool, Any]] = []

    def set(self, obj, name: str, value) -> None:
        own = name in vars(obj) or name in getattr(obj, "_modules", {})
        self._ops.append((obj, name, own, getattr(obj, name) if own else None))
        setattr(obj, name, value)

    def undo(self) -> None:
        while self._ops:
            obj, name, own, old = self._ops.pop()
            if own:
                setattr(obj, name, old)
            else:
                delattr(obj, name)


@dataclass
class Applied:
    method: registry.Method
    params: Any
    patcher: Patcher

    def describe(self) -> dict:
        return {"method": self.method.name, "kind": self.method.kind, "params": dataclasses.asdict(self.params)}


@dataclass
class PatchState:
    """What llama_ctx applied to one model: at most one rope and one attention method."""

    spec: RopeSpec  # the model's own rotary embedding, before any method
    original_rope_parameters: dict
    config_patcher: Patcher = field(default_factory=Patcher)
    applied: dict[str, Applied] = field(default_factory=dict)  # kind -> Applied
    # (the model's config, this model's private copy, the copy's attributes when it was made)
    configs: tuple[Any, Any, dict] | None = None


@dataclass
class PatchContext:
    """What an attention method's `apply` gets: the model, its decoder stack and the original rope."""

    model: torch.nn.Module  # what the user passed
    backbone: torch.nn.Module  # the module holding `layers` and `rotary_emb`
    spec: RopeSpec
    rope: Applied | None = None  # the rope method already applied, if any

    @property
    def attention_modules(self) -> list[torch.nn.Module]:
        return [layer.self_attn for layer in self.backbone.layers]

    @property
    def config(self):
        return self.backbone.config


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (`LlamaModel`-like) inside `model`: itself, `.model`, or inside a PEFT wrapper."""
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(f"expected a transformers model, got {type(model).__name__}")
    found = next((m for m in model.modules() if hasattr(m, "rotary_emb") and hasattr(m, "layers")), None)
    model_type = getattr(getattr(found if found is not None else model, "config", None), "model_type", None)
    if found is None or model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type!r}) is not supported; llama_ctx patches models of "
            f"the LLaMA layout: model_type in {SUPPORTED_MODEL_TYPES} (LlamaForCausalLM, LlamaModel, "
            "MistralForCausalLM, Qwen2ForCausalLM, or a PEFT model wrapping one)."
        )
    return found


def state(model) -> dict | None:
    """What llama_ctx applied to `model`: `{"rope": {...}, "attention": {...}}` (only the kinds applied), or None."""
    st = _get_state(backbone_of(model))
    if st is None or not st.applied:
        return None
    return {kind: a.describe() for kind, a in st.applied.items()}


def trained_window(model) -> int:
    """The context length `model` was trained on, as it was before any llama_ctx patch."""
    backbone = backbone_of(model)
    st = _get_state(backbone)
    return (st.spec if st else RopeSpec.from_config(backbone.config)).trained_window


def _get_state(backbone) -> PatchState | None:
    return vars(backbone).get(_STATE_ATTR)


def patch(model, method: str, **params):
    """Patch `model` in place with `method` and return it.

    Args:
        model: a `LlamaForCausalLM`, `LlamaModel`, PEFT-wrapped LLaMA, `MistralForCausalLM` or `Qwen2ForCausalLM`.
        method: a name from `llama_ctx.methods()`.
        **params: the method's parameters; unknown ones raise.

    Raises:
        LlamaCtxError (ConfigError, UnsupportedModelError, PatchStateError): the model is left untouched.
    """
    compat.check_version()
    m = registry.get(method)
    backbone = backbone_of(model)
    st = _get_state(backbone)
    spec = st.spec if st else RopeSpec.from_config(backbone.config)
    p = registry.make_params(m, {registry.TRAINED_WINDOW: spec.trained_window}, **params)
    if st and m.kind in st.applied:
        raise PatchStateError(
            f"this model already has the {m.kind} method {st.applied[m.kind].method.name!r}; "
            f"call llama_ctx.unpatch(model) before applying {m.name!r}."
        )
    ctx = PatchContext(model, backbone, spec, st.applied.get("rope") if st else None)
    attention = (st.applied["attention"] if st and "attention" in st.applied else None)
    if m.kind == "attention":
        m.impl.validate(p, ctx)
    if attention is not None or m.kind == "attention":
        att_method, att_params = (m, p) if m.kind == "attention" else (attention.method, attention.params)
        rope = m if m.kind == "rope" else (st.applied["rope"].method if st and "rope" in st.applied else None)
        if rope is not None:
            reason = att_method.impl.rope_conflict(att_params, rope)
            if reason:
                raise PatchStateError(f"{rope.name!r} cannot be combined with {att_method.name!r}: {reason}")

    fresh = st is None
    if fresh:
        st = PatchState(spec, copy.deepcopy(dict(backbone.config.rope_parameters or {})))
        st.configs = _own_config(model, backbone, st.config_patcher)
    patcher = Patcher()
    try:
        if m.kind == "rope":
            rotary = RotaryEmbedding(m.impl, p, spec, dynamic=m.dynamic, original=backbone.rotary_emb)
            patcher.set(backbone, "rotary_emb", rotary)
        else:
            m.impl.apply(p, ctx, patcher)
        st.applied[m.kind] = Applied(m, p, patcher)
        _write_config(backbone.config, st)
    except BaseException:
        patcher.undo()
        st.applied.pop(m.kind, None)
        if fresh:
            st.config_patcher.undo()
        else:
            _write_config(backbone.config, st)
        raise
    if fresh:
        object.__setattr__(backbone, _STATE_ATTR, st)  # plain attribute, not a submodule
    return model


def unpatch(model):
    """Revert every llama_ctx method on `model` (newest first) and return it; a no-op on an unpatched model."""
    backbone = backbone_of(model)
    st = _get_state(backbone)
    if st is None:
        return model
    for kind in reversed(list(st.applied)):
        st.applied.pop(kind).patcher.undo()
    st.config_patcher.undo()
    _carry_back_edits(*st.configs)
    object.__delattr__(backbone, _STATE_ATTR)
    return model


@contextlib.contextmanager
def patched(model, method: str, **params):
    """`with patched(model, "yarn", factor=4): ...` patches, yields the model, and always unpatches."""
    patch(model, method, **params)
    try:
        yield model
    finally:
        unpatch(model)


def _own_config(model, backbone, patcher: Patcher) -> tuple[Any, Any, dict]:
    """Give this model a private copy of its config, bound wherever the old one was: (old, copy, copy's values)."""
    old = backbone.config
    new = copy.deepcopy(old)
    for module in {id(m): m for m in [*model.modules(), backbone]}.values():
        if vars(module).get("config") is old:
            patcher.set(module, "config", new)
    return old, new, copy.deepcopy(vars(new))


def _carry_back_edits(old, new, made: dict) -> None:
    """Apply to `old` what was changed on the private copy `new` since it was made, except llama_ctx's fields."""
    now = vars(new)
    for key in (made.keys() | now.keys()) - WRITTEN:
        if key not in now:
            vars(old).pop(key, None)  # deleted by the user
        elif key not in made or not _equal(now[key], made[key]):
            vars(old)[key] = now[key]  # the raw attribute, as the copy's own setters left it


def _equal(a, b) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # e.g. values whose == is elementwise: treat as changed, and carry them back
        return False


def _write_config(config, st: PatchState) -> None:
    """Record the applied methods so `save_pretrained` keeps them (native `rope_parameters` where possible)."""
    rope = st.applied.get("rope")
    native = rope.method.native(rope.params, st.spec) if rope and rope.method.native else None
    rope_parameters = copy.deepcopy(st.original_rope_parameters)
    if native is not None:
        keep = {k: v for k, v in rope_parameters.items() if k in ("rope_theta", "partial_rotary_factor")}
        rope_parameters = {**keep, **native}
    config.rope_parameters = rope_parameters
    entry = {kind: {**a.describe(), "native": kind == "rope" and native is not None} for kind, a in st.applied.items()}
    if entry:
        entry["original_rope_parameters"] = copy.deepcopy(st.original_rope_parameters)
        setattr(config, CONFIG_KEY, entry)
    elif hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
