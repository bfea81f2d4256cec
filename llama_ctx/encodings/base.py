"""What a position method (kind "position") provides to the patch layer, and the pieces they share.

A position method replaces LLaMA's rotary encoding with another one. `patch()` calls `impl.apply(patcher, model,
backbone, params)`, which makes every change through `patcher.set(obj, name, value)` so that `unpatch()` reverts
it exactly. The pieces here:

* `rotary_off`: the stock attention runs unrotated (cos = 1, sin = 0), so a position method never combines
  with a rope method;
* `encode_embeddings`: the decoder stack's forward adds (or multiplies) an encoding into the input embeddings
  at the positions given by `position_ids` (as transformers fills them in when they are not passed: the cache
  length onwards), then runs the stock forward;
* `attach`: trainable tensors live in one `nn.Module` at `backbone.llama_ctx_position`, so they are in
  `model.parameters()` and `state_dict()`, move with `.to()`, and go away with `unpatch()`.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import compat
from ..errors import ConfigError, PatchStateError

MODULE_ATTR = "llama_ctx_position"  # where a method's trainable tensors live on the backbone
# S2-attn attends within groups with the rotation the decoder hands it (here none): it composes with any encoding
# that only changes the input embeddings (tested against llama_ctx.reference.s2)
EMBEDDING_SIDE_ATTENTION = frozenset({"s2-attn"})


class PositionMethod:
    """Base of every position method; subclasses implement `apply` (and `encode` if they use `encode_embeddings`)."""

    #: set by `register`: the method's name, for errors
    name: str = "position method"
    #: attention methods that make sense with this encoding; patch() refuses every other one
    compatible_attention: frozenset[str] = frozenset()

    def apply(self, patcher, model, backbone, params) -> None:
        raise NotImplementedError

    def encode(self, fwd: "EmbeddingForward", embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings `[B, L, H]` with the encoding at `position_ids` `[B or 1, L]` applied."""
        raise NotImplementedError


class IdentityRotary(nn.Module):
    """A rotary module that rotates by nothing: cos = 1, sin = 0, shaped and typed as the stock one returns them.

    `inv_freq` is zero and `attention_scaling` 1, so code that reads the frequencies (`rotary_frequencies`) sees
    the same identity rotation.
    """

    def __init__(self, original: nn.Module, head_dim: int):
        super().__init__()
        self.config = getattr(original, "config", None)
        self.rope_type = "llama_ctx-none"
        self.attention_scaling = 1.0
        self._inv_freq = torch.zeros(head_dim // 2, dtype=torch.float32)

    @property
    def inv_freq(self) -> torch.Tensor:
        return self._inv_freq

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        shape = (*position_ids.shape, 2 * self._inv_freq.numel())
        return (torch.ones(shape, dtype=x.dtype, device=x.device), torch.zeros(shape, dtype=x.dtype, device=x.device))


def rotary_off(patcher, backbone) -> None:
    """Replace `backbone.rotary_emb` by `IdentityRotary`: the stock attention forward then runs unrotated."""
    config = backbone.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    patcher.set(backbone, "rotary_emb", IdentityRotary(backbone.rotary_emb, head_dim))


def sinusoidal_width(backbone, name: str) -> int:
    """The hidden size, which a sinusoidal table must match; a `ConfigError` (before any change) if it is odd."""
    hidden = backbone.embed_tokens.weight.shape[-1]
    if hidden % 2:
        raise ConfigError(f"{name}: the sinusoidal table needs an even hidden size (sin and cos pairs); this "
                          f"model's is {hidden}")
    return hidden


def attach(patcher, backbone, module: nn.Module) -> None:
    """Put the method's trainable `module` at `backbone.llama_ctx_position`, on the embeddings' device."""
    weight = backbone.embed_tokens.weight
    patcher.set(backbone, MODULE_ATTR, module.to(weight.device))


def encode_embeddings(patcher, backbone, impl: PositionMethod, params) -> None:
    """Make `backbone`'s forward apply `impl.encode` to the input embeddings before the stock forward runs."""
    slot = patcher.slot(backbone, "forward")
    here = vars(backbone).get(slot)
    if here is not None and getattr(here, "__func__", None) is not type(backbone).forward:
        raise PatchStateError(
            f"{type(backbone).__name__}.forward was already replaced on this model (by a {type(here).__name__}); "
            f"{impl.name!r} wraps the stock forward. Remove the other patch first."
        )
    patcher.set(backbone, "forward", EmbeddingForward(impl, params, backbone))


class EmbeddingForward:
    """The decoder stack's `forward` while an embedding-side encoding is applied.

    No closures and no per-call state, so the model can be deep-copied (the copy's forward refers to the copy's
    backbone) and pickled. It runs the class's forward, as accelerate's hook (which calls `_old_forward`) would.
    """

    def __init__(self, impl: PositionMethod, params, backbone):
        self.impl, self.params, self.backbone = impl, params, backbone

    @property
    def module(self) -> nn.Module | None:
        """The method's trainable tensors (`backbone.llama_ctx_position`), if it has any; in training, PEFT's
        `modules_to_save` wrapper around them (methods call it, so the trained copy answers)."""
        return self.backbone._modules.get(MODULE_ATTR)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, *args, **kwargs):
        if args:
            raise TypeError(f"{self.impl.name}: pass the decoder's arguments after position_ids by name")
        backbone = self.backbone
        cache = compat.take_cache(kwargs, self.impl.name)
        embeds = kwargs.pop("inputs_embeds", None)
        if (input_ids is None) == (embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if embeds is None:
            embeds = backbone.embed_tokens(input_ids)
        if position_ids is None:
            _refuse_left_padding(attention_mask, self.impl.name)
            # what the stock forward would fill in: the positions after those already in the cache
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(embeds.shape[1], device=embeds.device) + past)[None]
        if position_ids.ndim != 2 or position_ids.shape[-1] != embeds.shape[1]:
            raise ValueError(f"{self.impl.name}: position_ids must be [batch, {embeds.shape[1]}], got "
                             f"{tuple(position_ids.shape)}")
        embeds = self.impl.encode(self, embeds, position_ids)
        return type(backbone).forward(backbone, input_ids=None, attention_mask=attention_mask,
                                      position_ids=position_ids, inputs_embeds=embeds,
                                      **compat.cache_kwargs(cache), **kwargs)


def _refuse_left_padding(attention_mask, name: str) -> None:
    """Without position_ids transformers numbers a left-padded row from its padding: absolute encodings would put
    every real token at the wrong position. Refuse (generate() passes position_ids and is unaffected)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim not in (2, 4):
        return
    if attention_mask.ndim == 2:
        mask = attention_mask.bool()
    else:  # a 4D mask [B, 1, queries, keys] (bool or additive float): the keys the last query may see
        last = attention_mask[:, 0, -1]
        mask = last > torch.finfo(last.dtype).min / 2 if last.is_floating_point() else last.bool()
    # a hidden slot before a visible one in some row (left padding; with a 4D mask also packed documents)
    if bool((~mask[:, :-1] & mask[:, 1:]).any()):
        raise ConfigError(
            f"{name}: this batch is left-padded and no position_ids were given, so its rows would be numbered "
            "from their padding (or, with a 4D mask of packed documents, from the first document); pass "
            "position_ids, e.g. (attention_mask.cumsum(-1) - 1).clamp(min=0)."
        )
