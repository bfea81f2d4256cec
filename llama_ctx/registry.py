"""One registry for every method: name -> `Method` (kind, parameter dataclass, implementation).

Method modules end with one `register(...)` call. Parameters are dataclasses that validate in
`__post_init__`; fields whose default depends on the model carry `metadata={"from_model": ...}`
and are filled by `make_params` from the model config before validation.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from .errors import ConfigError

Kind = Literal["rope", "attention", "position"]
KINDS = ("rope", "attention", "position")  # also the order `from_pretrained` re-applies them in
TRAINED_WINDOW = "trained_window"  # `from_model` key: the model's trained context length


@dataclass(frozen=True)
class Method:
    name: str
    kind: Kind
    params: type  # a dataclass
    description: str
    impl: Any  # rope: frequency function; attention: an `AttentionMethod`; position: a `PositionMethod`
    aliases: tuple[str, ...] = ()
    native: Callable | None = None  # (params, spec) -> native transformers `rope_parameters`, or None
    dynamic: bool = False  # rope: frequencies depend on the current sequence length


_METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, kind: Kind, params: type, impl: Any, description: str, aliases=(), native=None,
             dynamic=False) -> Method:
    """Add a method. Rejects duplicate names, unknown kinds and non-dataclass parameter types."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not dataclasses.is_dataclass(params):
        raise TypeError(f"params of {name!r} must be a dataclass")
    for n in (name, *aliases):
        if n in _METHODS or n in _ALIASES:
            raise ValueError(f"method name {n!r} is already registered")
    method = Method(name, kind, params, description.strip(), impl, tuple(aliases), native, dynamic)
    if kind in ("attention", "position"):
        impl.name = name  # for its error messages
    _METHODS[name] = method
    _ALIASES.update({a: name for a in aliases})
    return method


def _load_all() -> None:
    # Importing the subpackages runs their `register(...)` lines.
    from . import attention, encodings, rope  # noqa: F401


def get(name: str) -> Method:
    """The method called `name` (or one of its aliases); a `ConfigError` suggesting the closest name otherwise."""
    _load_all()
    if not isinstance(name, str):
        raise ConfigError(f"method must be a string, got {type(name).__name__}")
    name = _ALIASES.get(name, name)
    if name not in _METHODS:
        known = sorted([*_METHODS, *_ALIASES])
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown method {name!r}.{hint} Known methods: {', '.join(known)}.")
    return _METHODS[name]


def methods() -> list[dict]:
    """Every registered method: name, kind, aliases, parameters with defaults, one-line description."""
    _load_all()
    rows = []
    for m in _METHODS.values():
        params = {}
        for f in dataclasses.fields(m.params):
            if f.metadata.get("from_model"):
                params[f.name] = f"<{f.metadata['from_model']}>"
            elif f.default is not dataclasses.MISSING:
                params[f.name] = f.default
            else:
                params[f.name] = "<required>"
        rows.append(dict(name=m.name, kind=m.kind, aliases=list(m.aliases), params=params, description=m.description))
    return rows


def make_params(method: Method, model_defaults: dict[str, Any], **params):
    """Build and validate `method.params` from user `params`, filling model-derived defaults.

    Raises `ConfigError` for unknown or missing parameters (listing the accepted ones) and for values the
    dataclass rejects. `model_defaults` maps `from_model` keys (e.g. `TRAINED_WINDOW`) to values.
    """
    fields = {f.name: f for f in dataclasses.fields(method.params)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for method {method.name!r}; "
            f"accepted: {', '.join(fields) or '(none)'}."
        )
    for name, f in fields.items():
        if params.get(name) is None and f.metadata.get("from_model"):
            params[name] = model_defaults[f.metadata["from_model"]]
    missing = [n for n, f in fields.items() if n not in params and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(
            f"method {method.name!r} needs parameter(s) {', '.join(map(repr, missing))}; "
            f"accepted: {', '.join(fields)}. Example: patch(model, {method.name!r}, {missing[0]}=...)."
        )
    try:
        return method.params(**params)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # dataclass __post_init__ / constructor errors
        raise ConfigError(f"{method.name}: {e}") from e


# ---- validation helpers shared by the parameter dataclasses -------------------------------------------------


def check_number(name: str, value, *, gt: float | None = None, ge: float | None = None) -> float:
    """`value` as float; `ConfigError` naming `name` if it is not a finite real number or out of range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if gt is not None and not value > gt:
        raise ConfigError(f"{name} must be > {gt}, got {value!r}")
    if ge is not None and not value >= ge:
        raise ConfigError(f"{name} must be >= {ge}, got {value!r}")
    return float(value)


def check_int(name: str, value, *, ge: int = 1) -> int:
    """`value` as int; `ConfigError` naming `name` if it is not an integer >= `ge`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < ge:
        raise ConfigError(f"{name} must be >= {ge}, got {value!r}")
    return int(value)


def check_flag(name: str, value) -> bool:
    """`value` if it is a bool; `ConfigError` naming `name` otherwise (so "false" is not silently truthy)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")
    return value


def from_model(key: str = TRAINED_WINDOW, help: str = ""):
    """A dataclass field whose default (None) is filled from the model (see `make_params`)."""
    return field(default=None, metadata={"from_model": key, "help": help})
