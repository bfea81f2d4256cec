"""The `data:` section of a training YAML, as a strict pydantic v2 model.

Every key is documented on its field; an unknown key is an error that names the closest known one (pydantic's own
`extra="forbid"` only says "extra inputs are not permitted"). `as_config` turns any validation failure into one
`ConfigError` whose lines name the offending key as a path, e.g. `data.sources[1].weight`.

How the knobs combine (details in `mixture.py`):

- `sources[i].weight` is a share of **tokens** (normalised over the sources), not of documents.
- `upsample.threshold` splits documents into long (> threshold tokens, separators included) and short ones.
- `upsample.long_share[domain]` is the share of that domain's tokens that comes from long documents; a domain
  without one keeps its natural mix.
- `short_share` is the share of *all* tokens that comes from short documents. The domain shares stay as
  weighted; domains with an explicit `long_share` keep it, and every other domain gets one common long share
  L* chosen so that the total short share is `short_share`:
  sum_explicit w_d (1 - L_d) + (1 - L*) sum_other w_d = short_share.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError

PATH_RULES = ("file", "dir", "parent")
_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_tokens(v) -> int | None:
    """1e9, '1e9', '2.5e8', '500M', '1B', 64000 -> int (suffixes k/M/B/T are powers of 1000); None stays None.

    Raises:
        ValueError: not a whole number >= 1.
    """
    if v is None:
        return None
    if isinstance(v, bool):
        raise ValueError(f"must be a number of tokens such as 1e9 or '500M', not {v!r}")
    if isinstance(v, str):
        s, mult = v.strip().lower().replace("_", ""), 1
        if s and s[-1] in _SUFFIXES:
            s, mult = s[:-1], _SUFFIXES[s[-1]]
        try:
            v = float(s) * mult
        except ValueError:
            raise ValueError(f"must be a number of tokens such as 1e9 or '500M', not {v!r}") from None
    if isinstance(v, float):
        if not math.isfinite(v) or v != int(v):
            raise ValueError(f"must be a whole number of tokens, not {v!r}")
        v = int(v)
    if not isinstance(v, int) or v < 1:
        raise ValueError(f"must be a whole number of tokens >= 1, got {v!r}")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = list(cls.model_fields)
            for key in data:
                if key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
                    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
                    raise ValueError(f"unknown key {key!r}; {hint}")
        return data


class SourceConfig(_Strict):
    """One source of documents: a local file or folder, or a hub dataset name (needs network access)."""

    path: str = Field(description="a .txt/.md/.rst file (one document), a .jsonl/.json/.parquet/.csv file (one "
                                  "document per row), a folder of such files (recursively, sorted by path), or a "
                                  "hub dataset name (streamed; needs network access)")
    domain: str = Field(description="domain name (e.g. code, books, web); `upsample.long_share` is set per domain, "
                                    "and several sources may share one")
    weight: float = Field(gt=0, description="share of the mixture's tokens, normalised over all sources")
    text_field: str = Field("text", description="column or JSON key holding the text (table files, datasets)")
    group_by: str | None = Field(
        None, description="join related documents, in reading order and separated by a blank line, into one long "
                          "document: 'file' (all rows of one file), 'dir' (all files under the same top-level "
                          "folder of the source folder, e.g. one repository or one book per folder), 'parent' (all "
                          "files in the same folder), or a column name (consecutive rows with the same value; "
                          "write 'field:NAME' for a column called file, dir or parent). None: every row or text "
                          "file is a document")
    name: str | None = Field(None, description="hub dataset configuration name")
    split: str = Field("train", description="hub dataset split")

    @field_validator("path", "domain", "text_field")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @property
    def group_field(self) -> str | None:
        """The column to group by, or None when `group_by` is a path rule or unset."""
        if self.group_by is None or self.group_by in PATH_RULES:
            return None
        return self.group_by.removeprefix("field:")


class FiltersConfig(_Strict):
    """Quality filters. Each removed document is counted per source under the first filter that removes it, in
    this order: empty, symbols, repeated lines, duplicate, then (after grouping) too short."""

    min_chars: int = Field(1, ge=0, description="drop documents (after grouping) with fewer characters")
    max_symbol_share: float | None = Field(
        None, ge=0, le=1, description="drop documents in which more than this share of the non-whitespace "
                                      "characters are neither letters nor digits nor '_' (markup, binary junk, "
                                      "tables of symbols); None: off. Code sits around 0.2-0.35, prose below 0.1")
    max_repeated_line_share: float | None = Field(
        None, ge=0, le=1, description="drop documents in which more than this share of the non-empty lines repeat "
                                      "an earlier line of the same document (boilerplate, menus, logs); None: off")
    dedup: bool = Field(True, description="drop exact duplicates (same text, by content hash) within a source, "
                                          "before grouping")


class UpsampleConfig(_Strict):
    """Length upsampling within each domain (Fu et al. 2024, per-source length upsampling)."""

    threshold: int = Field(gt=0, description="documents with more tokens than this (separators included) are long")
    long_share: float | dict[str, float] | None = Field(
        None, description="share of a domain's tokens drawn from its long documents: one value for every domain "
                          "or a mapping domain -> share; long documents are repeated (not cut) when a domain "
                          "has too few of them. A domain without a value keeps its natural mix")

    @field_validator("long_share")
    @classmethod
    def _shares(cls, v):
        for name, share in ({"long_share": v} if isinstance(v, float) else v or {}).items():
            if not 0 <= share <= 1:
                raise ValueError(f"long share of {name!r} must be between 0 and 1, got {share}")
        return v


class DataConfig(_Strict):
    """The `data:` section: what the fine-tuning script trains on."""

    sources: list[SourceConfig] = Field(min_length=1, description="the documents, with their token shares")
    tokens: int | None = Field(
        None, description="budget in packed positions (examples x seq_len): the stream stops after "
                          "ceil(tokens / seq_len) examples. Accepts 1e9, '1e9', '500M', '1B' (powers of 1000). "
                          "None: one pass, until every source (and kind) has been read through at least once")
    filters: FiltersConfig = Field(default_factory=FiltersConfig, description="quality filters")
    upsample: UpsampleConfig | None = Field(None, description="long-document share per domain")
    short_share: float | None = Field(
        None, ge=0, le=1, description="share of all tokens from short documents (<= upsample.threshold); sets the "
                                      "long share of every domain without an explicit one (see module docstring)")
    seed: int = Field(0, description="seeds the document shuffle; the same seed gives the same examples")
    shuffle_buffer: int = Field(256, ge=0, description="documents held per stream for a seeded shuffle (0: "
                                                       "reading order)")
    pack_buffer: int = Field(256, ge=1, description="documents held by the packer to find the best fit")

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens(cls, v):
        return parse_tokens(v)

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        domains = self.domains()
        long_share = self.upsample.long_share if self.upsample else None
        if isinstance(long_share, dict):
            for name in long_share:
                if name not in domains:
                    close = difflib.get_close_matches(name, domains, n=1, cutoff=0.5)
                    hint = f"did you mean {close[0]!r}?" if close else f"the domains are {', '.join(domains)}"
                    raise ValueError(f"upsample.long_share names domain {name!r}, which no source has; {hint}")
        if self.short_share is not None and self.upsample is None:
            raise ValueError("short_share needs upsample.threshold (what counts as short); add "
                             "`upsample: {threshold: N}`")
        self.long_shares()  # raises if short_share cannot be met
        return self

    def domains(self) -> list[str]:
        """Domain names in order of first appearance."""
        return list(dict.fromkeys(s.domain for s in self.sources))

    def source_shares(self) -> list[float]:
        """Requested token share of each source (weights normalised to sum to 1)."""
        total = sum(s.weight for s in self.sources)
        return [s.weight / total for s in self.sources]

    def domain_shares(self) -> dict[str, float]:
        out = dict.fromkeys(self.domains(), 0.0)
        for s, share in zip(self.sources, self.source_shares()):
            out[s.domain] += share
        return out

    def long_shares(self) -> dict[str, float | None]:
        """Long-document token share per domain (None: natural mix), with `short_share` resolved.

        Raises:
            ValueError: `short_share` cannot be reached with the explicit long shares.
        """
        spec = self.upsample.long_share if self.upsample else None
        w = self.domain_shares()
        explicit = {d: spec for d in w} if isinstance(spec, float) else dict(spec or {})
        out: dict[str, float | None] = {d: explicit.get(d) for d in w}
        if self.short_share is None:
            return out
        fixed = sum(w[d] * (1 - share) for d, share in explicit.items())
        free = sum(w[d] for d in w if d not in explicit)
        if free == 0:
            if abs(fixed - self.short_share) > 1e-6:
                raise ValueError(f"short_share {self.short_share} contradicts upsample.long_share, which gives a short "
                                 f"share of {fixed:.4f}; drop one of them")
            return out
        common = 1 - (self.short_share - fixed) / free
        if not -1e-9 <= common <= 1 + 1e-9:
            raise ValueError(f"short_share {self.short_share} cannot be reached: the domains with an explicit "
                             f"long_share already give {fixed:.4f} of short tokens and the others weigh {free:.4f}")
        for d in w:
            if d not in explicit:
                out[d] = min(1.0, max(0.0, common))
        return out


def _where(loc: tuple, prefix: str) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def as_config(data, prefix: str = "data") -> DataConfig:
    """A `DataConfig` from itself or a plain dict (e.g. the `data:` section of a YAML).

    Raises:
        ConfigError: one message, one line per problem, each naming the key, e.g.
            `data.sources[0].weight: Input should be greater than 0`.
    """
    if isinstance(data, DataConfig):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix} must be a mapping with at least `sources:`, not {type(data).__name__}")
    try:
        return DataConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, prefix)) from None


def format_errors(e: ValidationError, prefix: str = "data") -> str:
    """Pydantic's errors as `path: message` lines (pydantic's own text names the model class, not the key)."""
    lines = []
    for err in e.errors():
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{_where(err['loc'], prefix)}: {msg}")
    return "invalid data config:\n  " + "\n  ".join(dict.fromkeys(lines)) if len(lines) > 1 else \
        f"invalid data config: {lines[0]}"
