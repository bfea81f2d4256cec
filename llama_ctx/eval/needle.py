"""Needle in a haystack (Kamradt 2023, "LLMTest_NeedleInAHaystack") over a real text.

For each (length, depth) the haystack is cut to fit `length` tokens, the needle sentence is inserted at the
sentence or line end just before `depth` of the way in, and the question is appended verbatim (end it with an answer
prefix such as "... Answer:" for base models). The model continues greedily; the score is 1 when the answer appears
in the continuation as a run of whole words (case and punctuation ignored), otherwise the fraction of the
answer's words that appear.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..registry import check_int, check_number
from .passkey import count_tokens, generate, heatmap
from .perplexity import check_enough
from .results import Result

SNAP_CHARS = 500  # how far back from the exact depth a sentence boundary is looked for


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def needle_score(continuation: str, answer: str) -> float:
    """1.0 if the words of `answer` appear in `continuation` as a run of whole words (case and punctuation
    ignored: "42" is not found in "1421"), else the fraction of the answer's distinct words found in it."""
    want, got = _words(answer), _words(continuation)
    if not want:
        raise ConfigError("the answer must contain at least one word")
    n = len(want)
    if any(got[i:i + n] == want for i in range(len(got) - n + 1)):
        return 1.0
    return len(set(want) & set(got)) / len(set(want))


def needle_prompt(tokenizer, hay_ids: list[int], needle: str, question: str, length: int, depth: float):
    """(prompt, its token count, character depth of the needle) for one cell."""
    plain = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    overhead = plain(" " + needle + " ") + plain("\n\n" + question) + count_tokens(tokenizer, "")
    budget = length - overhead
    if budget <= 0:
        raise ConfigError(f"needle length {length} is too short: needle and question alone take {overhead} tokens")
    check_enough(len(hay_ids), budget, "the haystack")
    context = tokenizer.decode(hay_ids[:budget], skip_special_tokens=True)
    cut = len(tokenizer.decode(hay_ids[:round(depth * budget)], skip_special_tokens=True))
    start = max(cut - SNAP_CHARS, 0)
    boundary = max(context.rfind(". ", start, cut) + 2, context.rfind("\n", start, cut) + 1)
    if boundary > start and 0 < depth < 1:  # the end of the last sentence or line before the exact depth
        cut = boundary
    prompt = context[:cut] + (" " if cut and not context[cut - 1].isspace() else "") + needle + " " + \
        context[cut:] + "\n\n" + question
    return prompt, count_tokens(tokenizer, prompt), cut / max(len(context), 1)


@dataclass
class NeedleResult(Result):
    """Args:
    cells: one dict per (length, depth): length, depth, tokens (prompt length), needle_at (character fraction
        where the needle was inserted), score in [0, 1] and output (the generated text).
    """

    cells: list[dict] = field(default_factory=list)

    @property
    def score(self) -> dict[tuple[int, float], float]:
        return {(c["length"], c["depth"]): c["score"] for c in self.cells}

    def rows(self) -> list[dict]:
        return [dict(c) for c in self.cells]

    @classmethod
    def _from_dict(cls, d: dict) -> "NeedleResult":
        return cls(cells=list(d["cells"]))

    def _draw(self, ax) -> None:
        heatmap(ax, self.cells, "score", "needle score")


def needle(model, tokenizer, haystack, needle, question, answer, lengths, depths, max_new_tokens=None) -> NeedleResult:
    """Needle-in-a-haystack score per (length, depth).

    Args:
        model: a causal LM with `generate` (patched or not).
        tokenizer: its tokenizer.
        haystack: the real text the needle is hidden in (at least max(lengths) tokens).
        needle: the sentence to hide.
        question: appended after the haystack, verbatim.
        answer: what a correct continuation contains.
        lengths: prompt lengths in tokens; depths: relative needle depths in [0, 1].
        max_new_tokens: generation budget; default the answer's token count + 16.
    """
    lengths = [check_int("length", n) for n in lengths]
    depths = [check_number("depth", d, ge=0) for d in depths]
    if any(d > 1 for d in depths):
        raise ConfigError(f"depths must lie in [0, 1], got {depths}")
    for name, text in (("haystack", haystack), ("needle", needle), ("question", question), ("answer", answer)):
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{name} must be a non-empty string")
    max_new_tokens = max_new_tokens or count_tokens(tokenizer, answer) + 16
    # NOTE: only as much haystack as the longest prompt can use is tokenized (a book can be megabytes long).
    hay_ids = tokenizer(haystack[:max(lengths) * 20], add_special_tokens=False)["input_ids"]
    result = NeedleResult()
    for length in lengths:
        for depth in depths:
            prompt, tokens, at = needle_prompt(tokenizer, hay_ids, needle, question, length, depth)
            output = generate(model, tokenizer, prompt, max_new_tokens)
            result.cells.append(dict(length=length, depth=depth, tokens=tokens, needle_at=round(at, 4),
                                     score=needle_score(output, answer), output=output))
    return result
