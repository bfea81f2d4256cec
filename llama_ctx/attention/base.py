"""What an attention method provides to the patch layer.

An attention method is registered with kind "attention" and an `impl` that subclasses `AttentionMethod`.
`patch()` calls, in order: `validate` (model-dependent checks, before anything changes), `rope_conflict`
(composition with the active or requested rope method) and `apply`, which must make every change through
`patcher.set(obj, name, value)` so that `unpatch()` can revert it exactly.
"""

from __future__ import annotations

import types

from ..errors import UnsupportedModelError


class AttentionMethod:
    #: attention implementations (`config._attn_implementation`) this method works with
    attn_implementations: tuple[str, ...] = ("eager", "sdpa")

    def validate(self, params, ctx) -> None:
        """Raise a `LlamaCtxError` if `params` cannot work on this model. Must not change anything."""
        impl = ctx.config._attn_implementation
        if impl not in self.attn_implementations:
            raise UnsupportedModelError(
                f"attention implementation {impl!r} is not supported by this method; load the model with "
                f"attn_implementation in {self.attn_implementations} (e.g. "
                f"from_pretrained(..., attn_implementation={self.attn_implementations[-1]!r}))."
            )

    def rope_conflict(self, params, rope_method) -> str | None:
        """Why `rope_method` cannot be combined with this method, or None if it can."""
        return None

    def apply(self, params, ctx, patcher) -> None:
        """Patch the model; by default replace each attention module's `forward` with `self.forward`."""
        for attn in ctx.attention_modules:
            bound = types.MethodType(self.make_forward(params, ctx, attn), attn)
            patcher.set(attn, "forward", bound)

    def make_forward(self, params, ctx, attn):
        """A function `(self_attn, hidden_states, position_embeddings, attention_mask, past_key_values, **kw)`."""
        raise NotImplementedError
