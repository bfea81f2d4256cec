"""Parallel Context Windows (Ratner et al. 2023, "Parallel Context Windows for Large Language Models").

Long context is split into windows that are encoded side by side with the same positions: window w (n_w tokens)
gets positions 0 .. n_w - 1 and attends only to itself, causally, so each window is encoded exactly as if it were
run alone. The task tokens that follow attend to every window and to themselves causally, and continue the
positions from the longest window: task token j sits at position max_w(n_w) + j. With k windows the model reads
about k times its trained window while no position ever exceeds max_w(n_w) + len(task).

This is not a patch: a stock model gets the layout through a 4D additive `attention_mask` and `position_ids`
(honoured by the "sdpa" and "eager" attention implementations). `prepare` builds them from token ids;
`generate` and `score` work on strings with a tokenizer, encoding the windows once into a KV cache.

Tokenization: each context is tokenized with the tokenizer's special tokens (so with a BOS if it adds one, each
window then reads like a fresh document, exactly as when run alone); the prompt and the choices are tokenized
without them. The reference implementation drops the BOS of all windows but one; we keep them.
"""

from __future__ import annotations

import numbers

import torch
from transformers import DynamicCache

from .compat import cache_kwargs
from .errors import ConfigError

__all__ = ["prepare", "generate", "score"]


def _token_list(name: str, tokens) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        if tokens.ndim != 1:
            raise ConfigError(f"{name} must be a 1D tensor or a list of token ids, got shape {tuple(tokens.shape)}")
        tokens = tokens.tolist()
    if isinstance(tokens, (str, bytes)) or not all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in tokens):
        raise ConfigError(f"{name} must be a list of non-negative token ids; tokenize strings first "
                          "(or use llama_ctx.pcw.generate / score, which take strings).")
    return [int(t) for t in tokens]


def prepare(contexts, task, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Model inputs for parallel context windows (batch 1).

    Args:
        contexts: list of windows, each a non-empty list (or 1D tensor) of token ids.
        task: token ids that follow all windows (may be empty).
        dtype: dtype of the additive mask; use the model's dtype.

    Returns:
        `input_ids` `[1, N]` (windows in order, then the task), `position_ids` `[1, N]` (each window 0 .. n_w - 1,
        the task L .. L + len(task) - 1 with L the longest window's length) and `attention_mask` `[1, 1, N, N]`:
        0 where a token may attend, the dtype's minimum elsewhere. Pass all three to the model's forward.
    """
    if isinstance(contexts, (str, bytes, torch.Tensor)) or not hasattr(contexts, "__len__") or len(contexts) == 0:
        raise ConfigError("contexts must be a non-empty list of windows (each a list of token ids).")
    windows = [_token_list(f"contexts[{i}]", c) for i, c in enumerate(contexts)]
    if any(len(w) == 0 for w in windows):
        raise ConfigError("every context window needs at least one token; drop the empty ones.")
    task = _token_list("task", task)
    longest = max(map(len, windows))
    window_id = torch.tensor([i for i, w in enumerate(windows) for _ in w] + [-1] * len(task))
    positions = torch.cat([torch.arange(len(w)) for w in windows] + [longest + torch.arange(len(task))])
    n = len(window_id)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    visible = causal & ((window_id[:, None] == window_id[None, :]) | (window_id[:, None] == -1))
    mask = torch.zeros(n, n, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    ids = torch.tensor([t for w in windows for t in w] + task, dtype=torch.long)
    return {"input_ids": ids[None], "position_ids": positions[None], "attention_mask": mask[None, None]}


def _encode(model, tokenizer, contexts, prompt):
    if isinstance(contexts, str) or not all(isinstance(c, str) for c in contexts):
        raise ConfigError("contexts must be a list of strings (use llama_ctx.pcw.prepare for token ids).")
    if not isinstance(prompt, str) or not prompt:
        raise ConfigError("prompt must be a non-empty string: the task tokens that read all the windows.")
    windows = [tokenizer(c)["input_ids"] for c in contexts]
    _check_patches(model)
    return windows, tokenizer(prompt, add_special_tokens=False)["input_ids"]


def _check_patches(model) -> None:
    """Refuse a llama_ctx method that places cached keys by count: the position-rewriting attention methods and the
    bias encodings put the cached keys at the positions just before the call's first query, but PCW's windows
    restart their positions, so every step after the windows' cache would be silently wrong (prepare + one forward,
    with no cache, is exact)."""
    from .encodings.bias import BiasPosition
    from .errors import UnsupportedModelError
    from .patch import state
    from .registry import get

    try:
        applied = state(model) or {}
    except UnsupportedModelError:
        return
    for kind, entry in applied.items():
        name = entry["method"]
        if (kind == "attention" and name != "s2-attn") or isinstance(get(name).impl, BiasPosition):
            raise ConfigError(
                f"{name!r} places cached keys at the positions just before each call, which parallel context windows "
                "(positions restarting per window) break; generate/score would be silently wrong. Unpatch it, or "
                "use pcw.prepare and one full forward (no cache)."
            )


def _device_dtype(model):
    p = next(model.parameters())
    return p.device, p.dtype


@torch.no_grad()
def generate(model, tokenizer, contexts: list[str], prompt: str, **generate_kwargs) -> str:
    """Generate a continuation of `prompt` that reads every context window.

    All but the last prompt token are encoded into a `DynamicCache` with the PCW mask; `model.generate` then runs
    from the last prompt token with `position_ids` continuing from the longest window, and every new token sees
    all windows, the prompt and the tokens before it. Greedy, sampling and every other `generate` option work.

    Args:
        model: a causal LM (LLaMA, Mistral, Qwen2, ...) with "sdpa" or "eager" attention.
        tokenizer: its tokenizer.
        contexts: the windows, as strings; each should fit in the model's trained window.
        prompt: non-empty task text that follows the windows.
        **generate_kwargs: passed to `model.generate` (e.g. `max_new_tokens=50`, `do_sample=True`);
            `max_new_tokens` defaults to 20 when neither it nor `max_length` is given.

    Returns:
        The generated text only (new tokens, special tokens skipped), not the prompt.
    """
    windows, task = _encode(model, tokenizer, contexts, prompt)
    if "max_length" not in generate_kwargs:
        generate_kwargs.setdefault("max_new_tokens", 20)
    device, dtype = _device_dtype(model)
    x = {k: v.to(device) for k, v in prepare(windows, task, dtype).items()}
    cache = DynamicCache(config=model.config)
    model(input_ids=x["input_ids"][:, :-1], position_ids=x["position_ids"][:, :-1],
          attention_mask=x["attention_mask"][..., :-1, :-1], **cache_kwargs(cache), use_cache=True)
    n = x["input_ids"].shape[1]
    # NOTE: with n - 1 tokens cached, generate() feeds only the last one; its 2D all-ones mask lets it and every
    # later token see the whole cache, which is exactly the PCW rule for task tokens.
    out = model.generate(input_ids=x["input_ids"], attention_mask=torch.ones_like(x["input_ids"]),
                         position_ids=x["position_ids"], **cache_kwargs(cache), **generate_kwargs)
    sequences = out.sequences if hasattr(out, "sequences") else out
    return tokenizer.decode(sequences[0, n:], skip_special_tokens=True)


@torch.no_grad()
def score(model, tokenizer, contexts: list[str], prompt: str, choices: list[str]) -> torch.Tensor:
    """Log-likelihood of each choice as the continuation of `prompt`, given the windows (the paper's
    many-shot in-context classification: put the demonstrations in the windows, pick the best-scoring label).

    The windows are encoded once; each choice is run on top of that cache and removed again.

    Args:
        model, tokenizer, contexts, prompt: as in `generate`.
        choices: non-empty candidate continuations (include a leading space where the tokenizer needs one).

    Returns:
        float32 tensor `[len(choices)]`: sum over the choice's tokens of log p(token | windows, prompt, earlier
        choice tokens). Divide by the token counts for a length-normalised score.
    """
    windows, task = _encode(model, tokenizer, contexts, prompt)
    if isinstance(choices, str) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise ConfigError("choices must be a non-empty list of non-empty strings.")
    device, dtype = _device_dtype(model)
    x = {k: v.to(device) for k, v in prepare(windows, [], dtype).items()}
    cache = DynamicCache(config=model.config)
    model(**x, **cache_kwargs(cache), use_cache=True)
    n, start = x["input_ids"].shape[1], int(x["position_ids"].max()) + 1
    scores = []
    for choice in choices:
        answer = tokenizer(choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([task + answer], device=device)
        t = ids.shape[1]
        mask = torch.zeros(t, n + t, dtype=dtype, device=device)  # every window, then the task causally
        mask[:, n:].masked_fill_(~torch.ones(t, t, dtype=torch.bool, device=device).tril(), torch.finfo(dtype).min)
        logits = model(input_ids=ids, position_ids=start + torch.arange(t, device=device)[None],
                       attention_mask=mask[None, None], **cache_kwargs(cache), use_cache=True).logits
        cache.crop(-t)
        logp = logits[0, len(task) - 1:-1].float().log_softmax(-1)
        scores.append(logp.gather(-1, ids[0, len(task):, None]).sum())
    return torch.stack(scores)
