"""The synthetic passkey test (Mohtashami & Jaggi 2023, "Landmark Attention"; used by PI, YaRN, LongLoRA).

A random 5-digit key is hidden at a relative depth inside repeated filler sentences, and the prompt ends by asking
for it. The model continues greedily for a few tokens; a trial is correct if the key appears in the continuation as
a whole number.
The prompt is fitted to the requested length: it has at most `length` tokens and less than one filler sentence
group fewer. `depth` is the fraction of the filler placed before the key (0 = right after the instructions,
1 = right before the question).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..registry import check_int, check_number
from .results import Result

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize "
         "it. I will quiz you about it.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
MAX_NEW_TOKENS = 10


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> tuple[str, int]:
    """(prompt, its token count) with `key` at `depth` and at most `length` tokens, filled as close as possible."""

    def build(units: int) -> str:
        before = round(depth * units)
        return INTRO + FILLER * before + KEY_SENTENCE.format(key=key) + FILLER * (units - before) + QUESTION

    fixed = count_tokens(tokenizer, build(0))
    if fixed > length:
        raise ConfigError(f"passkey length {length} is too short: the prompt without filler already has {fixed} "
                          "tokens; ask for a longer length")
    per_unit = max((count_tokens(tokenizer, build(8)) - fixed) / 8, 1.0)
    units = int((length - fixed) // per_unit)
    n = count_tokens(tokenizer, build(units))
    while n > length:  # tokenizers merge across sentence boundaries a little differently: correct the estimate
        units = max(units - max(1, int((n - length) // per_unit)), 0)
        n = count_tokens(tokenizer, build(units))
    while (m := count_tokens(tokenizer, build(units + 1))) <= length:
        units, n = units + 1, m
    return build(units), n


def passkey_correct(continuation: str, key: int) -> bool:
    """A trial is correct when the key appears in the generated continuation as a whole number (not inside a longer
    run of digits: "912345" does not answer 12345)."""
    return re.search(rf"(?<!\d){key}(?!\d)", continuation) is not None


def trial_key(seed: int, length: int, depth: float, trial: int) -> int:
    """The 5-digit key of one trial; depends only on its arguments, so any subset of cells reproduces."""
    return random.Random(f"{seed}/{length}/{depth}/{trial}").randint(10000, 99999)


def generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` (the new text only)."""
    enc = tokenizer(prompt, return_tensors="pt")
    device = next(model.parameters()).device
    input_ids = enc["input_ids"].to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


@dataclass
class PasskeyResult(Result):
    """Args:
    cells: one dict per (length, depth): length, depth, tokens (prompt length), trials, correct, accuracy,
        keys and outputs (the generated text of each trial).
    """

    cells: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> dict[tuple[int, float], float]:
        return {(c["length"], c["depth"]): c["accuracy"] for c in self.cells}

    def rows(self) -> list[dict]:
        return [{k: v for k, v in c.items() if k not in ("keys", "outputs")} for c in self.cells]

    @classmethod
    def _from_dict(cls, d: dict) -> "PasskeyResult":
        return cls(cells=list(d["cells"]))

    def _draw(self, ax) -> None:
        heatmap(ax, self.cells, "accuracy", "passkey accuracy")


def heatmap(ax, cells: list[dict], value: str, label: str) -> None:
    """Depth (rows) x length (columns) image of `cells[value]` in [0, 1]."""
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    grid = torch.full((len(depths), len(lengths)), float("nan"))
    for c in cells:
        grid[depths.index(c["depth"]), lengths.index(c["length"])] = c[value]
    im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth")
    ax.figure.colorbar(im, ax=ax, label=label)


def passkey(model, tokenizer, lengths, depths, trials, seed) -> PasskeyResult:
    """Passkey retrieval accuracy per (length, depth).

    Args:
        model: a causal LM with `generate` (patched or not).
        tokenizer: its tokenizer.
        lengths: prompt lengths in tokens.
        depths: relative key depths in [0, 1].
        trials: prompts per cell, each with its own key.
        seed: keys are drawn from (seed, length, depth, trial).
    """
    lengths = [check_int("length", n) for n in lengths]
    depths = [check_number("depth", d, ge=0) for d in depths]
    if any(d > 1 for d in depths):
        raise ConfigError(f"depths must lie in [0, 1], got {depths}")
    trials = check_int("trials", trials)
    result = PasskeyResult()
    for length in lengths:
        for depth in depths:
            keys, outputs, tokens = [], [], 0
            for t in range(trials):
                key = trial_key(seed, length, depth, t)
                prompt, tokens = passkey_prompt(tokenizer, length, depth, key)
                keys.append(key)
                outputs.append(generate(model, tokenizer, prompt, MAX_NEW_TOKENS))
            correct = sum(passkey_correct(o, k) for o, k in zip(outputs, keys))
            result.cells.append(dict(length=length, depth=depth, tokens=tokens, trials=trials, correct=correct,
                                     accuracy=correct / trials, keys=keys, outputs=outputs))
    return result
