"""Reading one source as a stream of raw documents (text, group key, origin), never all at once.

Local files are read lazily, file by file in sorted path order (jsonl line by line, parquet batch by batch), so a
source of any size streams in constant memory; the order is the same on every pass, which the token-length cache
and the filter counts of `mixture.py` rely on. A hub dataset is streamed with `datasets` (`streaming=True`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..eval.text import TABLE_SUFFIXES, TEXT_SUFFIXES
from .config import SourceConfig

SUFFIXES = (*TEXT_SUFFIXES, *TABLE_SUFFIXES)


@dataclass(frozen=True)
class Resolved:
    """Where one source's documents come from: sorted local files under `root`, or a hub dataset (`files=None`)."""

    cfg: SourceConfig
    where: str  # the config key, e.g. "data.sources[2]"
    root: Path | None
    files: tuple[Path, ...] | None


def resolve(cfg: SourceConfig, where: str) -> Resolved:
    """Check that the source exists and its `group_by` fits it; list its files.

    A path that exists locally is a file or folder; a path that does not exist is an error when it looks like a
    path (has a suffix, a '/', or starts with '.'), else it is taken as a hub dataset name.

    Raises:
        ConfigError: naming `where.path` or `where.group_by`.
    """
    path = Path(cfg.path).expanduser()
    field = cfg.group_field
    if path.is_dir():
        files = tuple(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES))
        if not files:
            raise ConfigError(f"{where}.path: folder {cfg.path!r} has no readable files; expected any of "
                              f"{', '.join(SUFFIXES)}")
        root = path
    elif path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise ConfigError(f"{where}.path: cannot read {cfg.path!r}; use a {', '.join(SUFFIXES)} file or a folder")
        if cfg.group_by in ("dir", "parent"):
            raise ConfigError(f"{where}.group_by: {cfg.group_by!r} groups the files of a folder, but {cfg.path!r} "
                              "is one file; use 'file', a column name, or point path at the folder")
        files, root = (path,), path.parent
    elif path.suffix or "/" in cfg.path or cfg.path.startswith(".") or path.is_absolute():
        raise ConfigError(f"{where}.path: {cfg.path!r} does not exist; give an existing file or folder "
                          f"({', '.join(SUFFIXES)}) or a hub dataset name")
    else:
        if cfg.group_by in ("file", "dir", "parent"):
            raise ConfigError(f"{where}.group_by: {cfg.group_by!r} needs local files; for the hub dataset "
                              f"{cfg.path!r} group by a column instead")
        return Resolved(cfg, where, None, None)
    if field is not None:
        text_files = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES]
        if text_files:
            raise ConfigError(f"{where}.group_by: column {field!r} needs table files, but {str(text_files[0])!r} is "
                              "plain text; use a path rule ('file', 'dir', 'parent') or table files")
    return Resolved(cfg, where, root, files)


def iter_raw(src: Resolved) -> Iterator[tuple[str, object, str]]:
    """(text, group key, origin) of every row or text file, in the same order on every call.

    The group key is None when `group_by` is unset or the row has no value in the group column (the document
    stands alone); consecutive documents with the same non-None key form one group (`mixture.py`), across file
    boundaries too for a column.
    """
    cfg = src.cfg
    if src.files is None:
        yield from _hub_rows(src)
        return
    field = cfg.group_field
    for path in src.files:
        rule = _path_key(path, src.root, cfg.group_by)
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            yield path.read_text(encoding="utf-8", errors="replace"), rule, str(path)
            continue
        rows = _jsonl_rows(path, src.where, cfg) if suffix == ".jsonl" else \
            _parquet_rows(path, src.where, cfg) if suffix == ".parquet" else _table_rows(path, src.where, cfg)
        for n, text, key in rows:
            yield text, key if field is not None else rule, f"{path}:{n}"


def _path_key(path: Path, root: Path, rule: str | None):
    if rule == "file":
        return path
    if rule == "parent":
        return path.parent
    if rule == "dir":
        rel = path.relative_to(root)
        return root / rel.parts[0] if len(rel.parts) > 1 else path
    return None


def _text(value) -> str:
    return "" if value is None else str(value)


def _check_columns(names, path, where: str, cfg: SourceConfig) -> None:
    for key, col in (("text_field", cfg.text_field), ("group_by", cfg.group_field)):
        if col is not None and col not in names:
            raise ConfigError(f"{where}.{key}: {str(path)!r} has no column {col!r}; its columns are {sorted(names)}")


def _jsonl_rows(path: Path, where: str, cfg: SourceConfig):
    field = cfg.group_field
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}.path: {path}:{n} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or cfg.text_field not in row or (field is not None and field not in row):
                _check_columns(row if isinstance(row, dict) else {}, f"{path}:{n}", where, cfg)
            yield n, _text(row[cfg.text_field]), row[field] if field is not None else None


def _parquet_rows(path: Path, where: str, cfg: SourceConfig):
    import pyarrow.parquet as pq

    field = cfg.group_field
    pf = pq.ParquetFile(path)
    _check_columns(pf.schema_arrow.names, path, where, cfg)
    cols = [cfg.text_field] + ([field] if field is not None and field != cfg.text_field else [])
    n = 0
    for batch in pf.iter_batches(batch_size=256, columns=cols):
        texts = batch.column(cfg.text_field).to_pylist()
        keys = batch.column(field).to_pylist() if field is not None else [None] * len(texts)
        for text, key in zip(texts, keys):
            n += 1
            yield n, _text(text), key


def _table_rows(path: Path, where: str, cfg: SourceConfig):
    import datasets

    ds = datasets.load_dataset(TABLE_SUFFIXES[path.suffix.lower()], data_files=str(path), split="train",
                               streaming=True)
    field = cfg.group_field
    for n, row in enumerate(ds, 1):
        if n == 1:
            _check_columns(row, path, where, cfg)
        yield n, _text(row[cfg.text_field]), row[field] if field is not None else None


def _hub_rows(src: Resolved):
    import datasets

    cfg = src.cfg
    try:
        ds = datasets.load_dataset(cfg.path, cfg.name, split=cfg.split, streaming=True)
        it = iter(ds)
        first = next(it, None)
    except Exception as e:  # noqa: BLE001 - no network, no such dataset: one clear error
        raise ConfigError(f"{src.where}.path: {cfg.path!r} is not a local file or folder and could not be streamed "
                          f"as a hub dataset ({type(e).__name__}: {e}); give a local path") from None
    if first is None:
        return
    _check_columns(first, cfg.path, src.where, cfg)
    field = cfg.group_field
    for n, row in enumerate(_chain(first, it), 1):
        yield _text(row[cfg.text_field]), row[field] if field is not None else None, f"{cfg.path}[{n}]"


def _chain(first, rest):
    yield first
    yield from rest
