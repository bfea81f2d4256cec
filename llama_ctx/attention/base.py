"""What an attention method provides to the patch layer.

An attention method is registered with kind "attention" and an `impl` that subclasses `AttentionMethod`.
`patch()` calls, in order: `validate` (model-dependent checks, before anything changes), `rope_conflict`
(composition with the active or requested rope method) and `apply`, which must make every change through
`patcher.set(obj, name, value)` so that `unpatch()` can revert it exactly.

By default `apply` puts a `PatchedForward` on each attention module. It takes the arguments as the installed
transformers passes them (the cache under `cache` or `past_key_values`, see `llama_ctx.compat`), raises for any
argument the method does not handle, and calls `attend(fwd, attn, hidden_states, attention_mask, cache,
position_ids)`, which subclasses implement.
"""

from __future__ import annotations

from .. import compat
from ..errors import UnsupportedModelError

_NONE = object()  # `PatchedForward.extra` not computed yet


class PatchedForward:
    """The `forward` of one patched attention module: argument handling shared by every attention method.

    It holds no closures and no state of a call, so a patched model can be deep-copied (the copy's forwards refer to
    the copy's modules: `copy.deepcopy` maps `module` and `backbone` with the rest of the model), pickled with
    `torch.save`, and called from several threads.

    Attributes:
        name: the method's registered name (for errors).
        impl: the `AttentionMethod`.
        params: the method's parameters.
        module: the attention module this forward belongs to.
        backbone: the decoder stack; its `rotary_emb` is read at call time (a rope method may come later).
        extra: what `prepare` returned. It is neither copied nor pickled (it may hold lambdas or weak references):
            a copy or a loaded model rebuilds its own from `params` on first use.
    """

    def __init__(self, name, impl, params, module, backbone, extra=_NONE):
        self.name, self.impl, self.params = name, impl, params
        self.module, self.backbone = module, backbone
        if extra is not _NONE:
            self._extra = extra

    @property
    def extra(self):
        extra = self.__dict__.get("_extra", _NONE)
        if extra is _NONE:
            from ..patch import PatchContext, _get_state
            from ..rope.base import RopeSpec

            state = _get_state(self.backbone)  # the copy's own state
            spec = state.spec if state is not None else RopeSpec.from_config(self.backbone.config)
            ctx = PatchContext(self.backbone, self.backbone, spec, state.applied.get("rope") if state else None)
            extra = self.__dict__.setdefault("_extra", self.impl.prepare(self.params, ctx))  # one winner per thread race
        return extra

    def __getstate__(self):
        state = dict(vars(self))
        state.pop("_extra", None)
        return state

    def __call__(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        cache = compat.take_cache(kwargs, self.name)
        position_ids = kwargs.pop("position_ids", None)
        compat.check_unhandled(kwargs, self.name)
        if cache is not None:
            self.impl.check_cache(cache, self.module.layer_idx)
        out = self.impl.attend(self, self.module, hidden_states, attention_mask, cache, position_ids)
        return out, None


class AttentionMethod:
    #: attention implementations (`config._attn_implementation`) this method works with
    attn_implementations: tuple[str, ...] = ("eager", "sdpa")
    #: set by `register` through the registry: the method's name, for errors
    name: str = "attention method"
    #: the callable `apply` puts on each attention module
    forward_class: type = PatchedForward

    def validate(self, params, ctx) -> None:
        """Raise a `LlamaCtxError` if `params` cannot work on this model. Must not change anything."""
        impl = ctx.config._attn_implementation
        if impl not in self.attn_implementations:
            raise UnsupportedModelError(
                f"attention implementation {impl!r} is not supported by this method; load the model with "
                f"attn_implementation in {self.attn_implementations} (e.g. "
                f"from_pretrained(..., attn_implementation={self.attn_implementations[-1]!r}))."
            )
        # the forward we replace must take nothing we do not handle (a future transformers rename fails here)
        for attn in {type(a): a for a in ctx.attention_modules}.values():
            compat.check_signature(type(attn).forward, self.name)

    def check_cache(self, cache, layer_idx: int) -> None:
        """Raise if this method cannot use `cache` (called on every forward that gets one).

        The methods place keys by their index in what `cache.update` returns (past + new, in order). A static
        layer (`cache_implementation="static"`, a `StaticCache`) returns its whole preallocated buffer, unfilled
        slots included, so every position would be off: refuse any layer that is not a growing `DynamicLayer`.
        """
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", None)
        layer = layers[layer_idx] if layers is not None and layer_idx < len(layers) else None
        if layer is not None and not isinstance(layer, DynamicLayer):
            raise UnsupportedModelError(
                f"{self.name} needs a growing cache (the default DynamicCache), got a {type(cache).__name__} whose "
                f"layer {layer_idx} is a {type(layer).__name__}, which returns its whole preallocated buffer; do not "
                "pass cache_implementation='static' (or a StaticCache) to a patched model."
            )

    def rope_conflict(self, params, rope_method) -> str | None:
        """Why `rope_method` cannot be combined with this method, or None if it can."""
        return None

    def apply(self, params, ctx, patcher) -> None:
        """Patch the model; by default put a `PatchedForward` on each attention module."""
        extra = self.prepare(params, ctx)
        for attn in ctx.attention_modules:
            patcher.set(attn, "forward", self.forward_class(self.name, self, params, attn, ctx.backbone, extra))

    def prepare(self, params, ctx):
        """Anything the forwards share, computed once at patch time (stored as `PatchedForward.extra`).

        It must depend on `params` and the model only (`ctx.spec`, `ctx.config`): a deep copy or an unpickled model
        calls it again on first use.
        """
        return None

    def attend(self, fwd: PatchedForward, attn, hidden_states, attention_mask, cache, position_ids):
        """The attention block of `attn` (projections included): (B, L, hidden)."""
        raise NotImplementedError
