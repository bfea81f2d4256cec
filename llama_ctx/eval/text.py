"""Evaluation text: local files and folders (txt / jsonl / json / parquet / csv), a hub dataset where one is
reachable, and `builtin_long_text`, an offline default made of English that ships with Python itself."""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

from ..errors import ConfigError

TEXT_SUFFIXES = (".txt", ".md", ".rst")
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SEPARATOR = "\n\n"


def load_text(source: str | Path, text_field: str = "text") -> str:
    """All the text in `source`, documents joined by a blank line.

    Args:
        source: a text file (.txt/.md/.rst, read as UTF-8), a table file (.jsonl/.json/.parquet/.csv, read with
            `datasets`, column `text_field`), a folder (every such file in it, recursively, in sorted order), or
            the name of a hub dataset (its "train" split; needs network access).
        text_field: column holding the text in table files and datasets.

    Raises:
        ConfigError: nothing readable is there, the column is missing, or the text is empty.
    """
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (*TEXT_SUFFIXES, *TABLE_SUFFIXES))
        if not files:
            raise ConfigError(f"folder {str(path)!r} has no text files; expected any of "
                              f"{', '.join((*TEXT_SUFFIXES, *TABLE_SUFFIXES))}")
        text = SEPARATOR.join(_read_file(p, text_field) for p in files)
    elif path.is_file():
        text = _read_file(path, text_field)
    elif path.suffix or Path(str(source)).is_absolute() or str(source).startswith("."):
        raise ConfigError(f"text file {str(source)!r} does not exist; give a local file or folder "
                          "(txt, jsonl, json, parquet, csv) or omit --text to use the built-in text")
    else:
        text = _load_dataset(str(source), None, text_field)
    if not text.strip():
        raise ConfigError(f"{str(source)!r} contains no text")
    return text


def _read_file(path: Path, text_field: str) -> str:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return path.read_text(encoding="utf-8", errors="replace")
    if suffix in TABLE_SUFFIXES:
        return _load_dataset(TABLE_SUFFIXES[suffix], str(path), text_field)
    raise ConfigError(f"cannot read {str(path)!r}: use a {', '.join((*TEXT_SUFFIXES, *TABLE_SUFFIXES))} file")


def _load_dataset(name: str, data_file: str | None, text_field: str) -> str:
    import datasets

    what = data_file or f"dataset {name!r}"
    try:
        ds = datasets.load_dataset(name, data_files=data_file, split="train") if data_file else \
            datasets.load_dataset(name, split="train")
    except Exception as e:  # noqa: BLE001 - any failure (no network, no such dataset) becomes one clear error
        raise ConfigError(f"could not load {what}: {type(e).__name__}: {e}. Give a local file or folder instead "
                          "(txt, jsonl, json, parquet, csv)") from e
    if text_field not in ds.column_names:
        raise ConfigError(f"{what} has no column {text_field!r}; its columns are {ds.column_names}: "
                          "choose one with --text-field")
    return SEPARATOR.join(str(t) for t in ds[text_field] if t)


def builtin_long_text(min_chars: int = 200_000) -> str:
    """At least `min_chars` characters of plain English that ship with Python, always the same for one Python.

    First the reference-manual topics of `pydoc_data.topics` (about 450K characters, sorted by topic name), then,
    if more is asked for, the docstrings of the standard library's modules, classes and functions (files in
    sorted order).

    Raises:
        ConfigError: the installation holds fewer than `min_chars` characters.
    """
    from pydoc_data.topics import topics

    parts = [topics[k] for k in sorted(topics)]
    size = sum(map(len, parts))
    if size < min_chars:
        for doc in _stdlib_docstrings():
            parts.append(doc)
            size += len(doc) + len(SEPARATOR)
            if size >= min_chars:
                break
    text = SEPARATOR.join(parts)
    if len(text) < min_chars:
        raise ConfigError(f"the built-in text has only {len(text)} characters, {min_chars} asked for; "
                          "give a longer text with --text")
    return text


def _stdlib_docstrings():
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    yield doc
