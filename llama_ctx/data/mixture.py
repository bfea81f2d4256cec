"""The mixture: documents from every source, drawn so that each gets exactly its share of tokens.

Streams. Each source is read as one stream of documents, or, when its domain has a long share L (see
`DataConfig.long_shares`), as two: its long documents (> `upsample.threshold` tokens) and its short ones. A stream
that reaches its end starts over (a new pass, reshuffled): that is how a domain with too few long documents
reaches its long share (long documents are repeated whole, never cut), and how a small source keeps its weight.
Stream i has the requested token share t_i = w_s * L_d (long), w_s * (1 - L_d) (short) or w_s (natural), where w_s
is the source's normalised weight.

Why not `datasets.interleave_datasets`: its probabilities are per *document*, so a source of 100K-token books
and a source of 1K-token web pages at probability 0.5 each give 99% book tokens; correcting by the mean document
length only holds in expectation, and that mean is unknown for a stream. Instead a deficit scheduler draws the
next document from the stream furthest below its share,

    i* = argmax_i (t_i * T - n_i)        (T: tokens drawn so far, n_i: tokens drawn from stream i; ties: lowest i)

which is deterministic and keeps every |n_i - t_i T| below the longest document, so the realised shares converge
to the requested ones at rate 1/T with no randomness at all.

A document's tokens are its token ids plus the separators (BOS/EOS, see `DocTokenizer`): exactly the positions it
occupies in the packed sequences.
"""

from __future__ import annotations

import random
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .config import DataConfig
from .filters import KEPT, TOO_SHORT, DocFilter
from .sources import Resolved, iter_raw

SEPARATOR = "\n\n"  # between the documents of one group
LONG, SHORT, ALL = "long", "short", "all"
_BATCH_CHARS = 1 << 20  # texts tokenized per call (fast tokenizers batch in Rust)


@dataclass
class Doc:
    """One document of the mixture."""

    ids: np.ndarray  # int64 token ids, separators included
    stream: int      # index into Pipeline.streams
    origin: str      # file:row (or file) of its first raw document


class DocTokenizer:
    """Text -> token ids with the separators the tokenizer defines: BOS first (if the tokenizer has one, and it
    is not also its EOS), EOS last (if it has one). With position ids restarting per document the model never
    sees across a document anyway; the separators teach it where documents start and end, as in pretraining."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.head = [] if bos is None or bos == eos else [bos]
        self.tail = [] if eos is None else [eos]
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else eos if eos is not None else 0

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        enc = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        return [np.array(self.head + ids + self.tail, dtype=np.int64) for ids in enc]


class OnceCounter:
    """Counts events by their index in the pass order, each index once, however many readers pass over it."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.next = 0

    def add(self, index: int, what: str) -> None:
        if index == self.next:
            self.counts[what] += 1
            self.next += 1


class Source:
    """One source: raw documents -> filters -> groups -> min_chars -> token ids, for any number of readers.

    Shared by the readers of one source: `lengths`, the token length of each grouped document in pass order
    (filled by whichever reader tokenizes it first; a reader of long documents skips a known short document
    without tokenizing it again), and the filter counts (each raw document and each group counted once).
    """

    def __init__(self, index: int, src: Resolved, cfg: DataConfig, tok: DocTokenizer):
        self.index, self.src, self.cfg, self.tok = index, src, cfg, tok
        self.lengths = array("q")
        self.raw_counts, self.group_counts = OnceCounter(), OnceCounter()

    def counts(self) -> dict[str, int]:
        """Documents read, removed per reason and kept (groups, after grouping), over what was read so far."""
        raw = self.raw_counts.counts
        return dict(documents=self.raw_counts.next, **{k: v for k, v in raw.items() if k != KEPT},
                    groups=self.group_counts.next, too_short=self.group_counts.counts[TOO_SHORT],
                    kept=self.group_counts.counts[KEPT])

    def _groups(self) -> Iterator[tuple[str, str]]:
        """(text, origin) of each group that passes the raw filters, consecutive equal keys joined."""
        keep = DocFilter(self.cfg.filters)
        parts, origin, key = [], "", None
        for r, (text, k, where) in enumerate(iter_raw(self.src)):
            reason = keep(text)
            self.raw_counts.add(r, reason)
            if reason != KEPT:
                continue
            if parts and (k is None or k != key):
                yield SEPARATOR.join(parts), origin
                parts = []
            if not parts:
                origin = where
            parts.append(text)
            key = k
        if parts:
            yield SEPARATOR.join(parts), origin

    def documents(self, kind: str) -> Iterator[tuple[int, str, np.ndarray | None]]:
        """One pass: (group index, origin, ids) of each kept group of `kind`, in reading order. `ids` is None for
        a group whose kind was known from `lengths` to differ (skipped without tokenizing)."""
        threshold = self.cfg.upsample.threshold if self.cfg.upsample else None
        batch: list[tuple[int, str, str]] = []

        def flush():
            for (g, where, _), ids in zip(batch, self.tok([t for _, _, t in batch])):
                if g == len(self.lengths):
                    self.lengths.append(len(ids))
                if kind == ALL or (len(ids) > threshold) == (kind == LONG):
                    yield g, where, ids
            batch.clear()

        size, g = 0, -1
        for j, (text, where) in enumerate(self._groups()):
            if len(text) < self.cfg.filters.min_chars:
                self.group_counts.add(j, TOO_SHORT)
                continue
            self.group_counts.add(j, KEPT)
            g += 1  # index among kept groups, in `lengths`
            if kind != ALL and g < len(self.lengths) and (self.lengths[g] > threshold) != (kind == LONG):
                continue
            batch.append((g, where, text))
            size += len(text)
            if size >= _BATCH_CHARS or len(batch) >= 64:
                yield from flush()
                size = 0
        yield from flush()


class Stream:
    """The documents of one kind of one source, pass after pass, each pass shuffled with its own seed."""

    def __init__(self, index: int, source: Source, kind: str, share: float, shuffle_buffer: int, seed: int):
        self.index, self.source, self.kind, self.share = index, source, kind, share
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.passes = 0  # completed passes
        self._it = self._forever()

    @property
    def label(self) -> str:
        cfg = self.source.src.cfg
        return f"{self.source.src.where} ({cfg.domain}, {self.kind})"

    def __next__(self) -> Doc:
        return next(self._it)

    def _forever(self) -> Iterator[Doc]:
        while True:
            rng = random.Random(f"{self.seed}:{self.source.index}:{self.kind}:{self.passes}")
            n = 0
            for ids, where in _shuffled(self._pass(), self.shuffle_buffer, rng):
                n += 1
                yield Doc(ids, self.index, where)
            if n == 0:
                self._empty()
            self.passes += 1

    def _pass(self):
        for _, where, ids in self.source.documents(self.kind):
            if ids is not None:
                yield ids, where

    def _empty(self):
        where, cfg = self.source.src.where, self.source.src.cfg
        if self.kind == ALL:
            raise ConfigError(f"{where}.path: {cfg.path!r} has no document left after the filters (data.filters); "
                              "relax them or remove the source")
        t = self.source.cfg.upsample.threshold
        what = f"no document longer than {t} tokens" if self.kind == LONG else f"no document of at most {t} tokens"
        fix = "0" if self.kind == LONG else "1"
        raise ConfigError(f"{where}: {cfg.path!r} has {what} after the filters, but domain {cfg.domain!r} asks for "
                          f"them; change data.upsample.threshold or set data.upsample.long_share for "
                          f"{cfg.domain!r} to {fix}")


def _shuffled(items, size: int, rng: random.Random):
    """A seeded shuffle buffer of `size` items (0: reading order): each new item replaces a random held one,
    which is emitted; the rest are emitted in random order at the end."""
    if size <= 0:
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


def make_streams(cfg: DataConfig, sources: list[Source]) -> list[Stream]:
    """One stream per (source, kind) with a non-zero share, in source order (long before short)."""
    streams: list[Stream] = []
    long_shares = cfg.long_shares()
    for source, w in zip(sources, cfg.source_shares()):
        L = long_shares[source.src.cfg.domain]
        parts = [(ALL, w)] if L is None else [(LONG, w * L), (SHORT, w * (1 - L))]
        for kind, share in parts:
            if share > 0:
                streams.append(Stream(len(streams), source, kind, share, cfg.shuffle_buffer, cfg.seed))
    return streams


def mix(streams: list[Stream], drawn: list[int], until_all_read: bool) -> Iterator[Doc]:
    """Documents by the deficit rule (module docstring). `drawn[i]` is updated in place.

    Args:
        until_all_read: stop once every stream has completed a pass (the document that would start a second pass
            of the last one is not used); otherwise never stop.
    """
    total = sum(drawn)
    while True:
        i = max(range(len(streams)), key=lambda j: (streams[j].share * total - drawn[j], -j))
        stream = streams[i]
        passes = stream.passes
        doc = next(stream)
        if until_all_read and stream.passes > passes and all(s.passes for s in streams):
            return
        drawn[i] += len(doc.ids)
        total += len(doc.ids)
        yield doc
