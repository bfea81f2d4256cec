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
from .errors import ConfigError, PatchStateError, UnsupportedModelError
from .rope.base import RopeSpec
from .rope.module import RotaryEmbedding

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_STATE_ATTR = "_llama_ctx_state"
CONFIG_KEY = "llama_ctx"  # config entry that records what is applied (saved by save_pretrained)
WRITTEN = frozenset({"rope_parameters", CONFIG_KEY})  # the config fields llama_ctx writes while patched
# The rope_type saved while a position method is applied: transformers has no rope type that turns rotary off, so a
# stock `from_pretrained` of the folder fails on this name (KeyError) instead of silently loading a RoPE model.
POSITION_ROPE_TYPE = "llama_ctx-position-method: load with llama_ctx.from_pretrained"


class Patcher:
    """Records attribute changes on objects so they can be reverted exactly, newest first.

    accelerate's hooks (`device_map` dispatch, offloading) wrap a module's forward: `module.forward` becomes a
    wrapper that runs the hook (inputs to the execution device, offloaded weights loaded) and then calls
    `module._old_forward`. A new `forward` there would bypass the hook, so on a hooked module the forward is
    replaced in `_old_forward` (see `slot`). A hook added or removed after the patch moves our forward between the
    two attributes; `undo` follows it, and `check` refuses anything else that replaced what was set.
    """

    def __init__(self):
        self._ops: list[tuple[Any, str, bool, Any, Any]] = []  # (obj, name, was own, old value, value set)

    @staticmethod
    def slot(obj, name: str) -> str:
        """The attribute `set(obj, name, ...)` writes: `_old_forward` for the forward of an accelerate-hooked module."""
        hooked = "_hf_hook" in vars(obj) and "_old_forward" in vars(obj)
        return "_old_forward" if name == "forward" and hooked else name

    def set(self, obj, name: str, value) -> None:
        name = self.slot(obj, name)
        own = name in vars(obj) or name in getattr(obj, "_modules", {})
        self._ops.append((obj, name, own, getattr(obj, name) if own else None, value))
        setattr(obj, name, value)

    def check(self) -> None:
        """Raise a `PatchStateError` (changing nothing) if something llama_ctx set was replaced since."""
        for obj, name, own, old, value in self._ops:
            if _locate(obj, name, own, old, value) is None:
                now = vars(obj).get(name, getattr(obj, "_modules", {}).get(name))
                raise PatchStateError(
                    f"{type(obj).__name__}.{name} was replaced after llama_ctx.patch() (now a {type(now).__name__}), "
                    "so unpatch() cannot restore the model exactly; undo that change first, or unpatch before "
                    "wrapping the model."
                )

    def undo(self) -> None:
        while self._ops:
            obj, *op = self._ops.pop()
            name, own, old = _locate(obj, *op)
            if own:
                setattr(obj, name, old)
            else:
                delattr(obj, name)


def _locate(obj, name: str, own: bool, old, value) -> tuple[str, bool, Any] | None:
    """(attribute, own, old value) that restores what `Patcher.set` changed, wherever `value` is now; None if gone."""
    here = vars(obj).get(name, getattr(obj, "_modules", {}).get(name))
    if here is value:
        return name, own, old
    if name == "forward" and vars(obj).get("_old_forward") is value:
        # hooked after the patch: accelerate keeps our forward in `_old_forward`, which should hold what it would
        # have found without the patch (the previous instance forward, else the class's, bound)
        return "_old_forward", True, old if own else type(obj).forward.__get__(obj)
    if name == "_old_forward" and "_old_forward" not in vars(obj) and vars(obj).get("forward") is value:
        return "forward", True, old  # the hook was removed: accelerate moved our forward back to `forward`
    return None


@dataclass
class Applied:
    method: registry.Method
    params: Any
    patcher: Patcher
    replace_native: bool = False  # a rope method applied with replace_native=True over native scaling

    def describe(self) -> dict:
        out = {"method": self.method.name, "kind": self.method.kind, "params": dataclasses.asdict(self.params)}
        return {**out, "replace_native": True} if self.replace_native else out


@dataclass
class PatchState:
    """What llama_ctx applied to one model: at most one rope, one attention and one position method (a position
    method turns rotary off, so never together with a rope method)."""

    spec: RopeSpec  # the model's rotary embedding as the methods see it (`.unscaled()` after replace_native=True)
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
    """What llama_ctx applied: `{"rope" | "position": {...}, "attention": {...}}` (the kinds applied), or None."""
    st = _get_state(backbone_of(model))
    if st is None or not st.applied:
        return None
    return {kind: a.describe() for kind, a in st.applied.items()}


def trained_window(model) -> int:
    """The context length `model` handles as it is, which llama_ctx's methods extend.

    For a model without native rope scaling: `max_position_embeddings` (or `original_max_position_embeddings`).
    For a model that scales its RoPE natively (`rope_parameters["rope_type"]` "linear", "llama3", "yarn", ...):
    the extended length, max(max_position_embeddings, original_max_position_embeddings * factor); 131072 for
    Llama 3.1, not its 8192 pre-training window, since the model as shipped handles 131072 (dynamic NTK:
    `max_position_embeddings`, past which it scales). After a rope method applied with `replace_native=True`
    the methods start from the unscaled model, and this is its pre-training window (8192 for Llama 3.1).
    """
    backbone = backbone_of(model)
    st = _get_state(backbone)
    return (st.spec if st else RopeSpec.from_config(backbone.config)).trained_window


def _get_state(backbone) -> PatchState | None:
    return vars(backbone).get(_STATE_ATTR)


def patch(model, method: str, *, replace_native: bool = False, **params):
    """Patch `model` in place with `method` and return it.

    Args:
        model: a `LlamaForCausalLM`, `LlamaModel`, PEFT-wrapped LLaMA, `MistralForCausalLM` or `Qwen2ForCausalLM`.
        method: a name from `llama_ctx.methods()`.
        replace_native: rope methods only. Frequency methods are defined on the unscaled frequencies, so on a
            model that scales its RoPE natively (e.g. Llama 3.1's "llama3") they are refused; with True the
            method replaces the native scaling and starts from the unscaled frequencies and pre-training window
            (`original_max_position_embeddings`). Attention methods keep the native scaling without this.
        **params: the method's parameters; unknown ones raise.

    Raises:
        LlamaCtxError (ConfigError, UnsupportedModelError, PatchStateError): the model is left untouched.
    """
    compat.check_version()
    m = registry.get(method)
    backbone = backbone_of(model)
    st = _get_state(backbone)
    spec = st.spec if st else RopeSpec.from_config(backbone.config)
    if registry.check_flag("replace_native", replace_native) and m.kind != "rope":
        raise ConfigError(f"replace_native=True is for rope methods; {m.name!r} is an {m.kind} method, which "
                          + ("keeps the model's own (native) rope scaling." if m.kind == "attention" else
                             "turns rotary off altogether."))
    _check_position(m, st)
    replace_native = replace_native and spec.scaled  # nothing to replace on a model without native scaling
    if m.kind == "rope" and spec.scaled:
        _check_replace_native(m, spec, replace_native, st)
        spec = spec.unscaled() if replace_native else spec
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
    position = m.kind == "position" or bool(st and "position" in st.applied)  # then rotary is off: no rope conflict
    if (attention is not None or m.kind == "attention") and not position:
        att_method, att_params = (m, p) if m.kind == "attention" else (attention.method, attention.params)
        rope = m if m.kind == "rope" else (st.applied["rope"].method if st and "rope" in st.applied else None)
        native = rope is None and spec.scaled  # then the attention method rotates with the model's own scaling
        if native:
            rope = registry.Method(spec.native, "rope", object, "native", None, dynamic=spec.length_dependent)
        reason = att_method.impl.rope_conflict(att_params, rope) if rope is not None else None
        if reason:
            who = f"the model's native rope scaling (rope_type {spec.native!r})" if native else repr(rope.name)
            fix = (f" To use {att_method.name!r}, replace the native scaling first: "
                   "llama_ctx.patch(model, 'yarn', factor=..., replace_native=True).") if native else ""
            raise PatchStateError(f"{who} cannot be combined with {att_method.name!r}: {reason}{fix}")

    fresh = st is None
    if fresh:
        st = PatchState(spec, copy.deepcopy(dict(backbone.config.rope_parameters or {})))
        st.configs = _own_config(model, backbone, st.config_patcher)
    patcher = Patcher()
    try:
        if m.kind == "rope":
            rotary = RotaryEmbedding(m.impl, p, spec, dynamic=m.dynamic, original=backbone.rotary_emb)
            patcher.set(backbone, "rotary_emb", rotary)
        elif m.kind == "position":
            m.impl.apply(patcher, model, backbone, p)
        else:
            m.impl.apply(p, ctx, patcher)
        st.applied[m.kind] = Applied(m, p, patcher, replace_native)
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
    for patcher in [*(a.patcher for a in st.applied.values()), st.config_patcher]:
        patcher.check()  # before anything changes
    for kind in reversed(list(st.applied)):
        st.applied.pop(kind).patcher.undo()
    st.config_patcher.undo()
    _carry_back_edits(*st.configs)
    object.__delattr__(backbone, _STATE_ATTR)
    return model


def _check_position(m, st: PatchState | None) -> None:
    """Refuse a position method with a rope method (rotary is off) or with an attention method it does not list."""
    applied = st.applied if st else {}
    position = m if m.kind == "position" else (applied["position"].method if "position" in applied else None)
    if position is None:
        return
    if "rope" in applied or m.kind == "rope":
        rope = m if m.kind == "rope" else applied["rope"].method
        raise PatchStateError(
            f"the position method {position.name!r} turns rotary off, so the rope method {rope.name!r} cannot be "
            f"combined with it; call llama_ctx.unpatch(model) and apply one of the two."
        )
    attention = m if m.kind == "attention" else (applied["attention"].method if "attention" in applied else None)
    if attention is not None and attention.name not in position.impl.compatible_attention:
        ok = ", ".join(sorted(position.impl.compatible_attention)) or "none"
        raise PatchStateError(
            f"the attention method {attention.name!r} cannot be combined with the position method {position.name!r}: "
            f"it is defined on rotary positions, which {position.name!r} turns off (attention methods that work with "
            f"{position.name!r}: {ok}); call llama_ctx.unpatch(model) and apply one of the two."
        )


def _check_replace_native(m, spec: RopeSpec, replace_native: bool, st: PatchState | None) -> None:
    """Refuse a rope method that would silently drop the model's native scaling, or replace it too late."""
    if not replace_native:
        raise PatchStateError(
            f"this model already scales its RoPE natively (rope_type {spec.native!r}, trained window "
            f"{spec.trained_window} from {spec.base_window}); {m.name!r} is defined on the unscaled frequencies "
            f"and would replace that scaling. To extend the model as it is, use an attention method (e.g. "
            f"'rerope', 'self-extend'), which keeps it. To start from the unscaled frequencies and the "
            f"{spec.base_window}-token pre-training window instead, pass replace_native=True: "
            f"llama_ctx.patch(model, {m.name!r}, ..., replace_native=True)."
        )
    if st and st.applied:
        raise PatchStateError(
            f"replace_native=True changes the frequencies and window that {sorted(st.applied)[0]} method "
            f"{next(iter(st.applied.values())).method.name!r} was set up for; call llama_ctx.unpatch(model), "
            f"then apply {m.name!r} with replace_native=True first and the attention method after it."
        )


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
    if "position" in st.applied:
        rope_parameters = {**rope_parameters, "rope_type": POSITION_ROPE_TYPE}
    config.rope_parameters = rope_parameters
    entry = {kind: {**a.describe(), "native": kind == "rope" and native is not None} for kind, a in st.applied.items()}
    if entry:
        entry["original_rope_parameters"] = copy.deepcopy(st.original_rope_parameters)
        setattr(config, CONFIG_KEY, entry)
    elif hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
