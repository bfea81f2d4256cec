"""Parsing what users type: method specs (`yarn:factor=4:beta_fast=16`, `stock`, `stock@window`, and
compositions such as `yarn:factor=2+dca`) and lengths (`8k`, `32768`)."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

from ..errors import ConfigError

STOCK = "stock"
# the yardstick: the stock model scoring the same tokens with at most its trained window of context (sliding
# sub-windows, `perplexity(..., max_context=trained window)`); a method that does not beat it past the window
# has not used the long context
STOCK_WINDOW = "stock@window"


@dataclass(frozen=True)
class MethodSpec:
    """A method and its parameters; `name == "stock"` means no patch, `"stock@window"` no patch and every token
    scored with at most the trained window of context. `before`: methods of other kinds patched first (a rope
    method under an attention method, `yarn:factor=2+dca`)."""

    name: str
    params: dict = field(default_factory=dict)
    before: tuple["MethodSpec", ...] = ()

    @property
    def parts(self) -> tuple["MethodSpec", ...]:
        """The methods applied, in order: `before`, then this one."""
        return (*self.before, self)

    @property
    def label(self) -> str:
        """Canonical text form, e.g. "yarn:factor=4" or "yarn:factor=2+dca"; used in tables, file names and
        result keys."""
        own = ":".join([self.name, *(f"{k}={v}" for k, v in self.params.items())])
        return "+".join([*(b.label for b in self.before), own])

    def patch_call(self, model: str = "model") -> str:
        """The Python call(s) that apply this method."""
        if self.name == STOCK:
            return f"llama_ctx.unpatch({model})  # stock: no method"
        if self.name == STOCK_WINDOW:
            return f"llama_ctx.unpatch({model})  # stock, scored through windows of its trained length"
        args = "".join(f", {k}={v!r}" for k, v in self.params.items())
        own = f"llama_ctx.patch({model}, {self.name!r}{args})"
        return "; ".join([*(b.patch_call(model) for b in self.before), own])

    @contextlib.contextmanager
    def applied(self, model):
        """Context manager: the model patched with this method (nothing for stock), unpatched on exit."""
        from ..patch import patch, unpatch

        if self.name in (STOCK, STOCK_WINDOW):
            yield model
            return
        try:
            for part in self.parts:
                patch(model, part.name, **part.params)
            yield model
        finally:
            unpatch(model)  # also after a failed patch: unpatch restores whatever was applied

    def max_context(self, model) -> int | None:
        """The `max_context` to measure this spec's perplexity with: the trained window for stock@window, else None."""
        if self.name != STOCK_WINDOW:
            return None
        from .perplexity import trained_window

        window = trained_window(model)
        if window is None:
            raise ConfigError(f"{STOCK_WINDOW} needs the model's trained window, and its config does not give it "
                              "(max_position_embeddings); leave stock@window out of --methods")
        return window


def parse_method_spec(text: str) -> MethodSpec:
    """`name[:k=v[:k=v...]]` -> MethodSpec; values parsed as int / float / bool / str; the name must be registered.
    `spec+spec` composes methods of different kinds, patched left to right (`yarn:factor=2+dca`)."""
    from ..registry import get

    parts = [_parse_one(t, text) for t in re.split(r"\+(?![0-9])", text)]  # not the + of 1e+5
    if len(parts) == 1:
        return parts[0]
    if any(p.name in (STOCK, STOCK_WINDOW) for p in parts):
        raise ConfigError(f"method spec {text!r}: stock and stock@window cannot be composed with other methods")
    kinds = [get(p.name).kind for p in parts]
    if len(set(kinds)) < len(kinds):
        raise ConfigError(f"method spec {text!r} composes two {max(kinds, key=kinds.count)} methods; compose at most "
                          "one method of each kind, e.g. yarn:factor=2+dca")
    return MethodSpec(parts[-1].name, parts[-1].params, tuple(parts[:-1]))


def _parse_one(part: str, text: str) -> MethodSpec:
    from ..cli import parse_value
    from ..registry import get

    name, *pairs = part.strip().split(":")
    if "@" in name and name != STOCK_WINDOW:
        raise ConfigError(f"method spec {text!r}: '@' is only used in {STOCK_WINDOW!r} (the stock model through "
                          "windows of its trained length); write stock@window, or a method name without '@'")
    if not name:
        raise ConfigError(f"method spec {text!r} has no method name; write name[:key=value...], e.g. yarn:factor=4")
    params = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key or not value:
            raise ConfigError(f"method spec {text!r}: {pair!r} is not key=value; write e.g. {name}:factor=4")
        if key in params:
            raise ConfigError(f"method spec {text!r} gives {key!r} twice")
        params[key] = parse_value(value.strip())
    if name in (STOCK, STOCK_WINDOW):
        if params:
            raise ConfigError(f"{name!r} takes no parameters, got {text!r}")
        return MethodSpec(name)
    return MethodSpec(get(name).name, params)


def parse_methods(text: str) -> list[MethodSpec]:
    """Comma-separated method specs; a repeated spec is an error."""
    specs = [parse_method_spec(t) for t in text.split(",") if t.strip()]
    if not specs:
        raise ConfigError("no method given; e.g. --methods stock,yarn:factor=4")
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"method(s) {', '.join(dup)} given more than once")
    return specs


def with_window_baseline(specs: list[MethodSpec]) -> list[MethodSpec]:
    """`specs` with stock@window inserted right after stock, where stock is there and stock@window is not."""
    names = [s.name for s in specs]
    if STOCK not in names or STOCK_WINDOW in names:
        return list(specs)
    i = names.index(STOCK) + 1
    return [*specs[:i], MethodSpec(STOCK_WINDOW), *specs[i:]]


def parse_length(text) -> int:
    """'8k' -> 8192, '1.5k' -> 1536, '32768' -> 32768; anything else, or a length < 2, is a ConfigError."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", str(text))
    if not m:
        raise ConfigError(f"bad length {text!r}; write a token count such as 8192 or 8k (= 8192) or 1m")
    value = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2).lower()]
    if value != int(value) or value < 2:
        raise ConfigError(f"bad length {text!r}: it must be a whole number of tokens >= 2")
    return int(value)


def parse_lengths(text: str) -> list[int]:
    lengths = [parse_length(t) for t in str(text).split(",") if t.strip()]
    if not lengths:
        raise ConfigError("no length given; e.g. --lengths 8k,16k,32k")
    return sorted(set(lengths))


def parse_depths(text: str) -> list[float]:
    try:
        depths = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"bad depths {text!r}; write fractions in [0, 1], e.g. 0,0.25,0.5,0.75,1") from None
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise ConfigError(f"bad depths {text!r}; write fractions in [0, 1], e.g. 0,0.25,0.5,0.75,1")
    return depths
