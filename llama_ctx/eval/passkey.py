"""The synthetic passkey test (Mohtashami & Jaggi 2023, "Landmark Attention"; used by PI, YaRN, LongLoRA).

A random 5-digit key is hidden at a relative depth inside repeated filler sentences, and the prompt ends by asking
for it. The model continues greedily for a few tokens; a trial is correct if the key appears in the continuation as
a whole number.
The prompt is fitted to the requested length: it has at most `length` tokens and less than one filler sentence
group fewer. `depth` is the fraction of the filler placed before the key (0 = right after the instructions,
1 = right before the question).
With `share_prefix=True` the trials of a cell, whose prompts differ only from the key on, prefill their common
token prefix once and continue from a copy of its cache: the same greedy outputs with 2/3 of the tokens
prefilled at depths 0.1, 0.5, 0.9. That is exact wherever a prompt prefilled in pieces equals one forward: the
stock model, the static rope methods and the position-rewriting attention methods (`shareable_methods`);
anything else is refused rather than answered differently.
"""

from __future__ import annotations

import copy
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
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")  # native rope types that rescale with the current length


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
    return _greedy(model, tokenizer, _ids(model, tokenizer, prompt), max_new_tokens)


def _ids(model, tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)


def _greedy(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int, **cache) -> str:
    """The new text of a greedy `generate` from `input_ids` (optionally continuing a prefilled cache)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, **cache)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def shareable_methods() -> list[str]:
    """The registered methods whose prefill in pieces equals one forward: rope methods whose frequencies do not
    follow the length, and the position-rewriting engine's methods (each tested by tests/test_attention_engine.py
    test_prefill_in_pieces_equals_one_forward)."""
    from ..attention.engine import PositionalAttention
    from ..registry import get, methods

    found = [get(row["name"]) for row in methods()]
    return [m.name for m in found if m.kind == "rope" and not m.dynamic or isinstance(m.impl, PositionalAttention)]


def check_shareable(model) -> None:
    """A `ConfigError` unless prefilling a prompt in pieces is exact for `model` as patched (`shareable_methods`)."""
    from ..patch import backbone_of, state

    applied = state(model) or {}
    allowed = shareable_methods()
    bad = [a["method"] for a in applied.values() if a["method"] not in allowed]
    rope_type = (getattr(backbone_of(model).config, "rope_parameters", None) or {}).get("rope_type")
    if "rope" not in applied and rope_type in LENGTH_DEPENDENT_ROPE:
        bad.append(f"native rope_type {rope_type!r}")
    # generation settings under which generate() does not continue from the prefilled cache as given: use_cache=False,
    # prompt lookup (assisted decoding) and prefill_chunk_size on 5.18 give other outputs silently; a
    # cache_implementation or beams raise in generate
    gen = getattr(model, "generation_config", None)
    odd = [f"{k}={v!r}" for k, v, ok in [("cache_implementation", getattr(gen, "cache_implementation", None), (None,)),
                                         ("use_cache", getattr(gen, "use_cache", None), (None, True)),
                                         ("prefill_chunk_size", getattr(gen, "prefill_chunk_size", None), (None,))]
           if v not in ok]
    if gen is not None:
        greedy = copy.deepcopy(gen)
        greedy.update(do_sample=False)  # as `generate` calls it
        if (mode := greedy.get_generation_mode()).name != "GREEDY_SEARCH":
            odd.append(f"{mode.value} decoding")
    if odd:
        raise ConfigError(f"share_prefix=True continues each trial from a prefilled DynamicCache, which this model's "
                          f"generation_config ({', '.join(odd)}) does not do; use share_prefix=False (or reset those "
                          f"in model.generation_config)")
    if bad:
        raise ConfigError(f"share_prefix=True needs a prompt prefilled in pieces to equal one forward, which "
                          f"{', '.join(bad)} does not guarantee (frequencies or kept keys depend on the length "
                          f"seen); use share_prefix=False (methods allowed: {', '.join(allowed)})")


def shareable(model) -> bool:
    """Whether `check_shareable(model)` passes."""
    try:
        check_shareable(model)
    except ConfigError:
        return False
    return True


def generate_shared(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """`generate` of each prompt, with their common token prefix prefilled once and its cache copied per prompt."""
    from ..compat import cache_kwargs, output_cache

    ids = [_ids(model, tokenizer, p) for p in prompts]
    common = min(len(x[0]) for x in ids) - 1  # every prompt keeps at least one token to feed
    for x in ids[1:]:
        same = (x[0, :common] != ids[0][0, :common]).nonzero()
        common = int(same[0]) if len(same) else common
    with torch.inference_mode():
        # logits_to_keep=1: the prefix's logits are not used (all of them: 3 GB at 30K tokens of a 49K vocabulary)
        prefix = output_cache(model(ids[0][:, :common], use_cache=True, logits_to_keep=1)) if common else None
    return [_greedy(model, tokenizer, x, max_new_tokens,
                    **(cache_kwargs(copy.deepcopy(prefix)) if prefix is not None else {})) for x in ids]


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


def passkey(model, tokenizer, lengths, depths, trials, seed, share_prefix: bool = False) -> PasskeyResult:
    """Passkey retrieval accuracy per (length, depth).

    Args:
        model: a causal LM with `generate` (patched or not).
        tokenizer: its tokenizer.
        lengths: prompt lengths in tokens.
        depths: relative key depths in [0, 1].
        trials: prompts per cell, each with its own key.
        seed: keys are drawn from (seed, length, depth, trial).
        share_prefix: prefill the trials' common prefix once per cell (same outputs, less compute; refused for
            methods where that is not exact, see `check_shareable`).
    """
    lengths = [check_int("length", n) for n in lengths]
    depths = [check_number("depth", d, ge=0) for d in depths]
    if any(d > 1 for d in depths):
        raise ConfigError(f"depths must lie in [0, 1], got {depths}")
    trials = check_int("trials", trials)
    if share_prefix:
        check_shareable(model)
    result = PasskeyResult()
    for length in lengths:
        for depth in depths:
            keys = [trial_key(seed, length, depth, t) for t in range(trials)]
            prompts = [passkey_prompt(tokenizer, length, depth, key) for key in keys]
            tokens = prompts[-1][1]
            if share_prefix:
                outputs = generate_shared(model, tokenizer, [p for p, _ in prompts], MAX_NEW_TOKENS)
            else:
                outputs = [generate(model, tokenizer, p, MAX_NEW_TOKENS) for p, _ in prompts]
            correct = sum(passkey_correct(o, k) for o, k in zip(outputs, keys))
            result.cells.append(dict(length=length, depth=depth, tokens=tokens, trials=trials, correct=correct,
                                     accuracy=correct / trials, keys=keys, outputs=outputs))
    return result
