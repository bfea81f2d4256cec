"""`build`: sources -> filters -> mixture -> packing -> a `datasets.IterableDataset` of training examples.

Determinism and resuming: nothing depends on time, threads or global random state; every shuffle is seeded from
`data.seed`, the source, the kind and the pass. Each iteration of the dataset starts a fresh `Pipeline`, so the
same config and tokenizer give the same examples, and `ds.skip(n)` yields exactly examples n, n+1, ... of the full
stream (it recomputes and discards the first n; `Trainer` does the same with consumed batches when it resumes from
a checkpoint, and `ds.state_dict()` / `ds.load_state_dict()` count examples the same way).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import ConfigError
from .config import DataConfig, as_config
from .mixture import DocTokenizer, Source, make_streams, mix
from .pack import Unit, example, examples_for_budget, pack, split
from .sources import resolve

FIELDS = ("input_ids", "labels", "position_ids")


@dataclass
class Packed:
    """One packed sequence: its units (documents and pieces, with their origin) and its training example."""

    units: list[Unit]
    example: dict[str, list[int]]


class Pipeline:
    """One run through the data: holds the per-run state (read positions, dedup memory, counts)."""

    def __init__(self, data_config, tokenizer, seq_len: int):
        self.cfg: DataConfig = as_config(data_config)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ConfigError(f"seq_len must be an integer >= 2, got {seq_len!r}")
        if not callable(tokenizer) or not hasattr(tokenizer, "eos_token_id"):
            raise ConfigError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        self.seq_len = seq_len
        self.tok = DocTokenizer(tokenizer)
        resolved = [resolve(s, f"data.sources[{i}]") for i, s in enumerate(self.cfg.sources)]
        self.sources = [Source(i, r, self.cfg, self.tok) for i, r in enumerate(resolved)]
        self.streams = make_streams(self.cfg, self.sources)
        self.drawn = [0] * len(self.streams)
        self.max_examples = examples_for_budget(self.cfg.tokens, seq_len)
        self.docs = 0
        self.split_docs = 0
        self.pieces = 0

    def _units(self, docs) -> Iterator[Unit]:
        for doc in docs:
            units = split(doc, self.docs, self.seq_len)
            self.docs += 1
            if len(units) > 1:
                self.split_docs += 1
                self.pieces += len(units)
            yield from units

    def __iter__(self) -> Iterator[Packed]:
        docs = mix(self.streams, self.drawn, until_all_read=self.cfg.tokens is None)
        for n, units in enumerate(pack(self._units(docs), self.seq_len, self.cfg.pack_buffer)):
            if self.max_examples is not None and n >= self.max_examples:
                return
            yield Packed(units, example(units, self.seq_len, self.tok.pad))


def _generate(cfg: DataConfig, tokenizer, seq_len: int):
    for packed in Pipeline(cfg, tokenizer, seq_len):
        yield packed.example


def build(data_config, tokenizer, seq_len: int):
    """The training stream of the `data:` section.

    Args:
        data_config: a `DataConfig` or the plain dict of a YAML `data:` section.
        tokenizer: a transformers tokenizer (fast ones are much quicker); its BOS/EOS separate documents.
        seq_len: training sequence length; every example has exactly this many positions.

    Returns:
        `datasets.IterableDataset` of dicts `input_ids`, `labels`, `position_ids` (int64 lists of `seq_len`;
        format in `llama_ctx.data.pack`), ceil(data.tokens / seq_len) of them (one pass when tokens is None).

    Raises:
        ConfigError: a bad config, a missing file or folder, a bad seq_len (checked here, before training starts).
    """
    from datasets import Features, IterableDataset, List, Value

    cfg = as_config(data_config)
    Pipeline(cfg, tokenizer, seq_len)  # validates paths, seq_len and tokenizer now rather than mid-training
    features = Features({k: List(Value("int64")) for k in FIELDS})
    return IterableDataset.from_generator(_generate, features=features,
                                          gen_kwargs=dict(cfg=cfg, tokenizer=tokenizer, seq_len=seq_len))
