"""Generated corpora and an in-code word tokenizer for the data tests (no hub, no network)."""

from __future__ import annotations

import json
import random
from pathlib import Path


def word_tokenizer(words, bos: bool = True, eos: bool = True):
    """A fast WordLevel tokenizer over `words` (split on whitespace): one token per word, so token counts are
    word counts. Ids: <unk> 0, <pad> 1, then <s>, </s> if asked, then the words in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1}
    special = {}
    if bos:
        vocab["<s>"] = len(vocab)
        special["bos_token"] = "<s>"
    if eos:
        vocab["</s>"] = len(vocab)
        special["eos_token"] = "</s>"
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", **special)


def vocab_words(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def text_of(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
