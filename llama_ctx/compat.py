"""Everything llama_ctx depends on that changes between transformers 5.x releases, in one place.

Names are read from the installed source (signatures), not from version numbers, so a release that renames an
argument is either handled or refused loudly. Known moves:

* 5.24 renamed the decoder's cache argument and output field `past_key_values` -> `cache`
  (`@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")`).
* 5.0 - 5.2 pass `cache_position` to every attention forward; later releases do not.

A patched forward receives whatever the decoder layer passes. `take_cache` reads the cache under either name and
`check_unhandled` raises for any other argument the method does not handle, so nothing is dropped silently.
`check_signature` refuses, at `patch()` time, a forward whose parameters (or whose `TransformersKwargs`) include a
name llama_ctx has never seen: a future rename fails there, before the model is touched.
"""

from __future__ import annotations

import functools
import inspect

from .errors import UnsupportedModelError

FLOOR = "5.18.0"  # the oldest release the whole test suite passes on (also in pyproject.toml and .ci/run)
CACHE_NAMES = ("cache", "past_key_values")  # newest first

# Arguments a patched attention forward may receive and safely not read:
#   use_cache: the cache object (or its absence) is what counts; output_hidden_states / output_router_logits:
#   collected by the model, not the attention; num_items_in_batch: loss normalisation; cache_position (<= 5.2):
#   the cache length gives the same offsets for the dynamic caches the methods support.
IGNORED = frozenset({"use_cache", "output_hidden_states", "output_router_logits", "num_items_in_batch",
                     "cache_position", "position_embeddings"})
# Arguments that are fine only with these values (anything else changes the result the method computes).
ONLY = {"output_attentions": (None, False), "is_causal": (None, True)}
# Arguments a patched forward reads itself (besides hidden_states, attention_mask and the cache).
USED = frozenset({"hidden_states", "attention_mask", "position_ids", *CACHE_NAMES})
# Named for a clearer error: packed (varlen) flash-attention inputs.
VARLEN = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"})
KNOWN = IGNORED | USED | VARLEN | set(ONLY)


class UnhandledArgumentError(UnsupportedModelError):
    """A patched forward received an argument that it would otherwise ignore."""


def version() -> str:
    import transformers  # the module object in sys.modules now (transformers may re-register its lazy module)

    return transformers.__version__


def check_version() -> None:
    """Refuse a transformers outside [FLOOR, 6)."""
    from packaging.version import Version

    if not Version(FLOOR) <= Version(version()) < Version("6"):
        raise UnsupportedModelError(
            f"llama_ctx needs transformers >= {FLOOR}, < 6, found {version()}; install a supported version with "
            f"`pip install 'transformers>={FLOOR},<6'`."
        )


def _parameters(fn) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)  # follows __wrapped__ through the deprecation decorators


@functools.cache
def model_cache_name() -> str:
    """The name under which this transformers takes the cache in model calls and `generate` ("cache" or
    "past_key_values"), read from `LlamaModel.forward`."""
    from transformers.models.llama.modeling_llama import LlamaModel

    return cache_name(LlamaModel.forward)


def cache_name(fn) -> str:
    """Which of `CACHE_NAMES` `fn` takes; an `UnsupportedModelError` if it takes neither."""
    params = _parameters(fn)
    for name in CACHE_NAMES:
        if name in params:
            return name
    raise UnsupportedModelError(
        f"{getattr(fn, '__qualname__', fn)} in transformers {version()} takes no cache argument "
        f"(neither of {CACHE_NAMES}); llama_ctx does not know this version: see README 'transformers versions'."
    )


def cache_kwargs(cache) -> dict:
    """`{name: cache}` for calling a model (or `generate`) of the installed transformers."""
    return {model_cache_name(): cache}


def output_cache(output):
    """The cache a model output carries (`.cache` since 5.24, `.past_key_values` before)."""
    for name in CACHE_NAMES:
        if name in output:
            return output[name]
    return None


def take_cache(kwargs: dict, method: str):
    """Pop the cache from `kwargs` under either name and return it (None if absent)."""
    found = {n: kwargs.pop(n) for n in CACHE_NAMES if n in kwargs}
    given = {n: c for n, c in found.items() if c is not None}
    if len(given) > 1 and len({id(c) for c in given.values()}) > 1:
        raise UnhandledArgumentError(
            f"{method}: received two different caches ({' and '.join(given)}); pass one, under "
            f"{model_cache_name()!r} (transformers {version()})."
        )
    return next(iter(given.values()), None)


def check_unhandled(kwargs: dict, method: str, supports_varlen: bool = False) -> None:
    """Raise for any argument left in `kwargs` that the patched forward does not handle."""
    for name, value in kwargs.items():
        if value is None or name in IGNORED or (name in VARLEN and supports_varlen):
            continue
        if name in ONLY and any(value is ok for ok in ONLY[name]):
            continue
        if name in ONLY:
            why = f"{name}={value!r} is not supported (llama_ctx attention methods compute no attention weights " \
                  "and are causal)"
        elif name in VARLEN:
            why = f"{name!r} means packed variable-length sequences, which this method does not handle; pass " \
                  "one sequence per row (or position_ids + the default sdpa/eager attention)"
        else:
            why = f"it received an argument it does not know, {name!r} ({type(value).__name__}), and would ignore it"
        raise UnhandledArgumentError(
            f"{method}: {why}. Installed transformers {version()}; run `llama-ctx check` and see README "
            "'transformers versions'."
        )


def transformers_kwargs() -> set[str]:
    """The keys of `TransformersKwargs`, which every decoder forward passes through `**kwargs`."""
    from transformers.utils.generic import TransformersKwargs

    keys: set[str] = set()
    for klass in TransformersKwargs.__mro__:  # annotations as written (no evaluation of forward references)
        keys |= set(getattr(klass, "__annotations__", {}))
    return keys


def check_signature(fn, method: str, handled: frozenset[str] = KNOWN) -> None:
    """Refuse to replace `fn` when it takes (or is passed, through `TransformersKwargs`) a name not in `handled`."""
    params = _parameters(fn)
    names = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        names |= transformers_kwargs()
    unknown = sorted(names - handled)
    if unknown:
        raise UnsupportedModelError(
            f"{method}: {getattr(fn, '__qualname__', fn)} in transformers {version()} takes {', '.join(map(repr, unknown))}, "
            "which llama_ctx does not handle, so patching it could silently change results. Install a tested "
            "transformers version (README 'transformers versions') or report this."
        )
