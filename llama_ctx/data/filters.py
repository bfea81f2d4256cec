"""Document filters: pure, deterministic functions of the text, plus exact deduplication.

Definitions (each measured on one raw document, before grouping):

- symbol share = (# non-whitespace characters that are neither letters, digits nor '_') / (# non-whitespace
  characters). Unicode-aware (regex `\\w`), so accented and non-Latin letters are text. A control character,
  U+FFFD (undecodable bytes) or a box-drawing character counts as a symbol: binary junk and ASCII tables score
  high, prose about 0.03-0.1, source code about 0.2-0.35.
- repeated-line share = (N - U) / N over the N non-empty lines (stripped) of which U are distinct: the share of
  lines that repeat an earlier line of the same document (Gopher's duplicate-line fraction; menus, cookie
  banners, log spam). A document with one line scores 0.
- duplicate: the same text (byte for byte) as an earlier document of the same source in this pass, by a 128-bit
  BLAKE2b digest (collisions: ~1e-20 for a billion documents).

The length filter (`min_chars`) runs after grouping, in `mixture.py`: a short file of a long repository is kept
when the repository is long.
"""

from __future__ import annotations

import hashlib
import re

from .config import FiltersConfig

# reasons, in the order they are checked (a document is counted under the first that removes it)
EMPTY, SYMBOLS, REPEATED, DUPLICATE, TOO_SHORT, KEPT = (
    "empty", "symbols", "repeated_lines", "duplicate", "too_short", "kept")
REASONS = (EMPTY, SYMBOLS, REPEATED, DUPLICATE, TOO_SHORT)

_SPACE = re.compile(r"\s+")
_TEXT = re.compile(r"\w+")


def symbol_share(text: str) -> float:
    """Share of non-whitespace characters that are not word characters (letters, digits, '_')."""
    visible = len(text) - sum(len(m) for m in _SPACE.findall(text))
    if visible == 0:
        return 0.0
    word = sum(len(m) for m in _TEXT.findall(text))
    return (visible - word) / visible


def repeated_line_share(text: str) -> float:
    """(N - U) / N over the N non-empty stripped lines, U of them distinct."""
    lines = [s for s in (line.strip() for line in text.splitlines()) if s]
    return (len(lines) - len(set(lines))) / len(lines) if lines else 0.0


class DocFilter:
    """The raw-document filters of one pass over one source (the dedup memory is per pass, so a source read
    again, e.g. to repeat its long documents, gives the same decisions in the same order)."""

    def __init__(self, cfg: FiltersConfig):
        self.cfg = cfg
        self.seen: set[bytes] = set()

    def __call__(self, text: str) -> str:
        """The reason `text` is removed, or KEPT."""
        cfg = self.cfg
        if not text.strip():
            return EMPTY
        if cfg.max_symbol_share is not None and symbol_share(text) > cfg.max_symbol_share:
            return SYMBOLS
        if cfg.max_repeated_line_share is not None and repeated_line_share(text) > cfg.max_repeated_line_share:
            return REPEATED
        if cfg.dedup:
            digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if digest in self.seen:
                return DUPLICATE
            self.seen.add(digest)
        return KEPT
