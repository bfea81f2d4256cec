"""Packing whole documents into `seq_len` sequences, the example format, and the mask that keeps them apart.

Example format (every field a list of exactly `seq_len` ints; stack them, pass no attention_mask):

- `input_ids`: documents back to back, then padding (the tokenizer's pad id, else its EOS, else 0).
- `position_ids`: 0, 1, ... restarting at every document and at every piece of a split document; the padding is
  one more run starting at 0.
- `labels`: the input ids, except -100 on the padding and on the first token of every document/piece. HF models
  shift labels inside the loss (logits at t predict labels[t + 1]), so the last token of one document never
  predicts the first token of the next: no loss crosses a boundary.

Attention never crosses a document: with `attention_mask=None`, no cache (`use_cache=False`; `Trainer` sets
`config.use_cache = args.use_cache`, False by default) and sdpa / eager / flex, transformers 5
(`masking_utils.find_packed_sequence_indices`) starts a new block wherever position_ids[t] - position_ids[t-1] != 1,
which is exactly at our document starts (a document starts at 0 after a token at position >= 0, a difference
<= 0, one-token documents and the padding run included); flash-attention reads the same position ids. With a
cache (e.g. `model(ids, position_ids=p)` on a config with `use_cache=True`) transformers ignores the packing and
attends across documents: pass `use_cache=False`, or `attention_mask=block_mask(position_ids)`.

Packing is best fit: the packer holds up to `pack_buffer` documents; each sequence starts with the oldest one
(so nothing waits longer than `pack_buffer` sequences) and is filled by repeatedly adding the longest held
document that still fits (the best fit for the remaining gap; the oldest among equals). A document longer than
`seq_len` is cut into consecutive pieces of `seq_len` tokens (each a full sequence on its own) and a remainder
that is packed like any document; the pieces are counted. Nothing is dropped or truncated.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .mixture import Doc

IGNORE = -100


@dataclass
class Unit:
    """A whole document or one piece of a split one."""

    ids: np.ndarray
    doc: Doc
    doc_no: int   # serial number of the document in the mixture
    piece: int    # 0-based
    pieces: int   # pieces the document was cut into (1: whole)


def split(doc: Doc, doc_no: int, seq_len: int) -> list[Unit]:
    """The document as consecutive pieces of at most `seq_len` tokens (one piece if it fits)."""
    n = len(doc.ids)
    pieces = max(1, math.ceil(n / seq_len))
    return [Unit(doc.ids[k * seq_len:(k + 1) * seq_len], doc, doc_no, k, pieces) for k in range(pieces)]


class _Pool:
    """Held units by arrival and by length (sorted (length, serial) pairs; lists of a few hundred entries, so the
    O(n) list insert/delete is a memmove)."""

    def __init__(self):
        self.items: dict[int, Unit] = {}
        self.by_len: list[tuple[int, int]] = []
        self.order: deque[int] = deque()
        self.serial = 0

    def __len__(self) -> int:
        return len(self.items)

    def add(self, unit: Unit) -> None:
        self.items[self.serial] = unit
        insort(self.by_len, (len(unit.ids), self.serial))
        self.order.append(self.serial)
        self.serial += 1

    def _remove(self, serial: int) -> Unit:
        unit = self.items.pop(serial)
        del self.by_len[bisect_left(self.by_len, (len(unit.ids), serial))]
        return unit

    def take(self, seq_len: int) -> list[Unit]:
        while self.order[0] not in self.items:
            self.order.popleft()
        out = [self._remove(self.order.popleft())]
        space = seq_len - len(out[0].ids)
        while space > 0:
            k = bisect_right(self.by_len, (space, math.inf)) - 1
            if k < 0:
                break
            k = bisect_left(self.by_len, (self.by_len[k][0], -1))  # oldest of that length
            unit = self._remove(self.by_len[k][1])
            out.append(unit)
            space -= len(unit.ids)
        return out


def pack(units: Iterable[Unit], seq_len: int, buffer: int) -> Iterator[list[Unit]]:
    """Sequences of units whose lengths sum to at most `seq_len` (see the module docstring)."""
    pool = _Pool()
    for unit in units:
        if len(unit.ids) == seq_len:
            yield [unit]
            continue
        pool.add(unit)
        if len(pool) >= buffer:
            yield pool.take(seq_len)
    while pool:
        yield pool.take(seq_len)


def example(units: list[Unit], seq_len: int, pad_id: int) -> dict[str, list[int]]:
    """The training example of one packed sequence (format in the module docstring)."""
    input_ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    position_ids = np.empty(seq_len, dtype=np.int64)
    at = 0
    for unit in units:
        n = len(unit.ids)
        input_ids[at:at + n] = unit.ids
        labels[at + 1:at + n] = unit.ids[1:]
        position_ids[at:at + n] = np.arange(n)
        at += n
    position_ids[at:] = np.arange(seq_len - at)
    return dict(input_ids=input_ids.tolist(), labels=labels.tolist(), position_ids=position_ids.tolist())


def block_mask(position_ids, dtype=None):
    """The 4D additive attention mask of packed sequences: causal within each document, nothing across.

    Documents are found as transformers does: a new one starts wherever the position does not grow by exactly 1.
    Use it where transformers' own packing detection is off: a forward with a cache or `use_cache=True`, a
    custom attention function that ignores position ids, or a transformers version without the detection.
    Float (0 / dtype min), not bool: eager attention mis-applies a bool 4D mask.

    Args:
        position_ids: (batch, length) or (length,) integer tensor.
        dtype: the model's dtype (default float32).

    Returns:
        (batch, 1, length, length) tensor: 0 where query i may attend key j, the dtype's minimum elsewhere.
    """
    import torch

    dtype = dtype or torch.float32
    pos = torch.as_tensor(position_ids)
    pos = pos[None] if pos.ndim == 1 else pos
    starts = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1
    seg = starts.cumsum(-1)
    n = pos.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=pos.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=pos.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def examples_for_budget(tokens: int | None, seq_len: int) -> int | None:
    """Examples the stream yields for a budget of `tokens` packed positions: ceil(tokens / seq_len)."""
    return None if tokens is None else math.ceil(tokens / seq_len)


def steps_for_budget(tokens: int, seq_len: int, global_batch: int) -> int:
    """Optimizer steps for a token budget when `max_steps` is not given: floor(examples / global_batch).

    Rounded down so the trainer never asks for more examples than the stream holds (HF `Trainer` would restart an
    exhausted `IterableDataset` and repeat its start); at most `global_batch - 1` examples go unused.

    Raises:
        ConfigError: the budget is smaller than one global batch.
    """
    if tokens is None:
        raise ConfigError("data.tokens is not set: give training.max_steps, or a token budget in data.tokens")
    if seq_len < 1 or global_batch < 1:
        raise ConfigError(f"seq_len ({seq_len}) and the global batch ({global_batch}) must be >= 1")
    steps = examples_for_budget(tokens, seq_len) // global_batch
    if steps < 1:
        raise ConfigError(f"data.tokens = {tokens} is less than one global batch ({global_batch} x {seq_len} = "
                          f"{global_batch * seq_len} tokens); raise data.tokens or lower the batch size")
    return steps
