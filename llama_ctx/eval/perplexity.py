"""Sliding-window perplexity at several lengths, with the mean loss per position bucket.

The windowing is that of the transformers guide "Perplexity of fixed-length models": windows of `length` tokens
start every `stride` tokens; each window scores only the tokens not scored by the previous one (its last
`end - previous_end` tokens; the first window scores all of its tokens), so with `stride < length` every scored
token has at least `length - stride` tokens of context. As in the guide, the first token of a window is never a
target (no logit predicts it) and the last window may be shorter than `length`.

    ppl(length) = exp(sum of scored token losses / number of scored tokens)

A token's *position* is its index inside its window (0 .. length-1). Averaging the loss per position bucket shows
where a model breaks: a stock model's loss jumps right after its trained window, which a single perplexity hides.

`max_context` = M gives the honest yardstick for a long-context method: the same windows, positions and targets,
but every token predicted from at most M - 1 tokens before it (sub-windows of M tokens inside each window, the
same guide windowing one level down, see `token_losses`). With M = the trained window this is what the model can
do without long context; a method whose loss past the window is not below it has not used the extra context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError, UnsupportedModelError
from ..patch import backbone_of
from ..patch import trained_window as patch_trained_window
from ..registry import check_int
from .results import Result, nan_if_none

CE_CHUNK = 4096  # positions whose float32 logits are upcast at once


@dataclass
class PerplexityResult(Result):
    """Args:
    ppl: length -> perplexity over every scored token.
    bucket_loss: length -> [(start, end, mean loss of the tokens at positions start <= p < end)]; NaN if none.
    bucket_tokens: length -> number of scored tokens in each bucket.
    tokens: length -> number of scored tokens.
    stride: length -> stride used.
    trained_window: the model's trained context length (None if unknown), for plots and tables.
    max_context, context_stride: the sub-windowing of `perplexity(..., max_context=...)`; None without it.
    """

    ppl: dict[int, float] = field(default_factory=dict)
    bucket_loss: dict[int, list[tuple[int, int, float]]] = field(default_factory=dict)
    bucket_tokens: dict[int, list[int]] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    stride: dict[int, int] = field(default_factory=dict)
    trained_window: int | None = None
    max_context: int | None = None
    context_stride: int | None = None

    def rows(self) -> list[dict]:
        return [dict(length=n, ppl=self.ppl[n], tokens=self.tokens[n], stride=self.stride[n], bucket_start=s,
                     bucket_end=e, bucket_loss=loss, bucket_tokens=c)
                for n in self.ppl for (s, e, loss), c in zip(self.bucket_loss[n], self.bucket_tokens[n])]

    @classmethod
    def _from_dict(cls, d: dict) -> "PerplexityResult":
        ints = lambda m: {int(k): v for k, v in m.items()}  # noqa: E731 - JSON object keys are strings
        return cls(ppl={int(k): nan_if_none(v) for k, v in d["ppl"].items()},
                   bucket_loss={int(k): [(s, e, nan_if_none(x)) for s, e, x in v] for k, v in d["bucket_loss"].items()},
                   bucket_tokens=ints(d["bucket_tokens"]), tokens=ints(d["tokens"]), stride=ints(d["stride"]),
                   trained_window=d.get("trained_window"), max_context=d.get("max_context"),
                   context_stride=d.get("context_stride"))

    @classmethod
    def merge(cls, results: Sequence["PerplexityResult"]) -> "PerplexityResult":
        """One result holding the lengths of all `results` (later ones win on a repeated length)."""
        out = cls()
        for r in results:
            for name in ("ppl", "bucket_loss", "bucket_tokens", "tokens", "stride"):
                getattr(out, name).update(getattr(r, name))
            out.trained_window = r.trained_window or out.trained_window
            out.max_context, out.context_stride = r.max_context, r.context_stride
        return out

    def _draw(self, ax, label: str = "") -> None:
        for n in sorted(self.ppl):
            mids = [(s + e) / 2 for s, e, _ in self.bucket_loss[n]]
            ax.plot(mids, [x for _, _, x in self.bucket_loss[n]], marker="o",
                    label=f"{label + ' ' if label else ''}length {n}: ppl {self.ppl[n]:.2f}")
        if self.trained_window:
            ax.axvline(self.trained_window, color="grey", ls="--", lw=1, label="trained window")
        ax.set_xlabel("position in window (tokens)")
        ax.set_ylabel("mean loss (nats / token)")
        ax.legend(fontsize=8)


def scored_losses(model, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Per-token cross-entropy of the last `k` tokens of the 1-D `ids`, in float32.

    The decoder runs once; the output layer (length x vocabulary floats: 6 GB for 32K tokens of a 49K vocabulary)
    is applied `CE_CHUNK` positions at a time. Models whose decoder stack llama_ctx cannot find fall back to
    `logits_to_keep`.
    """
    targets = ids[-k:]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    try:
        backbone = backbone_of(model)
    except UnsupportedModelError:
        backbone = None
    if head is not None and backbone is not None:
        hidden = backbone(input_ids=ids[None], use_cache=False).last_hidden_state[0, -k - 1:-1]
        logits = lambda i: head(hidden[i:i + CE_CHUNK])  # noqa: E731
    else:
        keep = torch.arange(len(ids) - k - 1, len(ids) - 1, device=ids.device)
        all_logits = model(input_ids=ids[None], logits_to_keep=keep, use_cache=False).logits[0]
        logits = lambda i: all_logits[i:i + CE_CHUNK]  # noqa: E731
    return torch.cat([F.cross_entropy(logits(i).float(), targets[i:i + CE_CHUNK], reduction="none")
                      for i in range(0, k, CE_CHUNK)])


def trained_window(model) -> int | None:
    """The context length `model` handles as it is, before any llama_ctx patch (see `llama_ctx.patch.trained_window`;
    the extended length for a natively scaled model), or None if the model does not say."""
    try:
        return patch_trained_window(model)
    except UnsupportedModelError:
        return None


def bucket_edges(length: int, buckets=None, window: int | None = None) -> list[int]:
    """Bucket boundaries `[0, ..., length]` for positions in a window of `length` tokens.

    `buckets` is a bucket width (int) or a list of inner boundaries. Default: width = trained window / 4,
    doubled (up to the trained window itself) while there are more than 16 buckets, so the trained window is
    always a boundary; length / 8 (rounded up) when the trained window is unknown.
    """
    if buckets is None:
        if window:
            width = max(window // 4, 1)
            while math.ceil(length / width) > 16 and 2 * width <= window:
                width *= 2
        else:
            width = max(math.ceil(length / 8), 1)
        buckets = width
    if isinstance(buckets, int) and not isinstance(buckets, bool):
        width = check_int("buckets", buckets)
        return [*range(0, length, width), length]
    inner = sorted({int(b) for b in buckets if 0 < int(b) < length})
    return [0, *inner, length]


def windows(n_tokens: int, length: int, stride: int):
    """(begin, end, n_new) of each window, as in the transformers perplexity guide; n_new = end - previous end."""
    previous_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + length, n_tokens)
        yield begin, end, end - previous_end
        previous_end = end
        if end == n_tokens:
            break


def as_token_ids(token_ids) -> torch.Tensor:
    """A 1-D LongTensor from a list, a 1-D tensor or a (1, n) tensor."""
    ids = torch.as_tensor(token_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.dtype.is_floating_point:
        raise ConfigError(f"token_ids must be one sequence of integer ids (1-D or shape (1, n)), got shape "
                          f"{tuple(ids.shape)} {ids.dtype}")
    return ids.long()


def check_enough(n_tokens: int, needed: int, what: str = "the text") -> None:
    if n_tokens < needed:
        raise ConfigError(f"{what} is too short: it has {n_tokens} tokens and {needed} are needed; give a longer "
                          "text (--text) or a shorter length (--lengths)")


def check_context(max_context, context_stride) -> tuple[int | None, int | None]:
    """Validated (max_context, context_stride); context_stride defaults to max_context // 8.

    Why M // 8: past the first sub-window a token sees between M - context_stride and M - 1 tokens. At M // 2 the
    yardstick is weak (SmolLM2 at 8-10K of a 14K window: 1.98 nats against 1.84 at M // 8), which would credit a
    long-context method with gains that are only the baseline's missing context."""
    if max_context is None:
        if context_stride is not None:
            raise ConfigError("context_stride only applies with max_context; give max_context too, or drop it")
        return None, None
    m = check_int("max_context", max_context, ge=2)
    step = max(m // 8, 1) if context_stride is None else check_int("context_stride", context_stride)
    if step >= m:
        # a sub-window never scores its own first token, so a step of m would leave one token in m unscored
        raise ConfigError(f"context_stride ({step}) must be < max_context ({m}), or tokens go unscored; "
                          f"e.g. context_stride={max(m // 8, 1)}")
    return m, step


def sub_windows(n_tokens: int, k: int, max_context: int | None, context_stride: int | None):
    """(begin, end, k') of the forwards that score the last `k` tokens of a window of `n_tokens`: each scores the
    last k' tokens of ids[begin:end]. Without max_context one forward over the whole window; with it the guide's
    windowing of `windows(n_tokens, max_context, context_stride)`, anchored at the window's start (so a token gets
    the same context whatever `k` is), keeping only the sub-windows that score one of the last `k` tokens."""
    if max_context is None:
        yield 0, n_tokens, k
        return
    first = n_tokens - k  # index of the first wanted target
    for begin, end, n_new in windows(n_tokens, max_context, context_stride):
        scored = min(n_new, end - begin - 1)  # sub-window targets: ids[end - scored:end]
        if end > first and scored > 0:
            yield begin, end, min(scored, end - first)


def forward_count(n_tokens: int, length: int, stride: int | None = None, max_context=None,
                  context_stride=None) -> int:
    """How many model forwards `perplexity(model, ids[:n_tokens], [length], stride, max_context=...)` runs; for
    progress bars (`layer_progress` counts one step per decoder layer per forward)."""
    max_context, context_stride = check_context(max_context, context_stride)
    return sum(1 for begin, end, n_new in windows(n_tokens, length, stride or length)
               if min(n_new, end - begin - 1) > 0  # a last window of one token scores nothing: no forward
               for _ in sub_windows(end - begin, min(n_new, end - begin - 1), max_context, context_stride))


def window_losses(model, ids: torch.Tensor, k: int, max_context=None, context_stride=None) -> torch.Tensor:
    """Float32 losses of the last `k` tokens of the 1-D `ids`, each predicted from at most `max_context - 1`
    tokens before it (None: from everything before it in `ids`); see `sub_windows`."""
    return torch.cat([scored_losses(model, ids[begin:end], kk).float()
                      for begin, end, kk in sub_windows(len(ids), k, max_context, context_stride)])


@torch.inference_mode()
def token_losses(model, token_ids, max_context=None, context_stride=None) -> torch.Tensor:
    """Loss of every token of one sequence but the first: a 1-D float32 CPU tensor of len(token_ids) - 1, entry
    t - 1 the cross-entropy of token t.

    Args:
        model: a causal LM (patched or not).
        token_ids: one tokenized text (list, 1-D tensor or (1, n) tensor), at least 2 tokens.
        max_context: None = one forward over the whole sequence (token t sees all t tokens before it). M = token
            t is predicted inside a sub-window of M tokens ending at or after it: at most M - 1 tokens of context,
            and at least M - context_stride once t >= M. M >= the sequence length is the same as None.
        context_stride: tokens between sub-window starts, 1 <= context_stride < M; default M // 8.

    Cost: with max_context, about len / context_stride forwards of M tokens (twice the tokens of one pass at the
    default stride, and attention over M instead of len keys); without it, one forward.
    """
    ids = as_token_ids(token_ids)
    check_enough(len(ids), 2, "token_ids")
    max_context, context_stride = check_context(max_context, context_stride)
    device = next(model.parameters()).device
    return window_losses(model, ids.to(device), len(ids) - 1, max_context, context_stride).cpu()


@torch.inference_mode()
def perplexity(model, token_ids, lengths, stride=None, buckets=None, max_context=None,
               context_stride=None) -> PerplexityResult:
    """Sliding-window perplexity of `token_ids` at each of `lengths`, with the mean loss per position bucket.

    Args:
        model: a causal LM (patched or not).
        token_ids: one tokenized text (list, 1-D tensor or (1, n) tensor), at least max(lengths) tokens.
        lengths: window lengths in tokens.
        stride: tokens between window starts, 1 <= stride <= length; None = length (disjoint windows).
        buckets: bucket width (int) or inner boundaries (list); None = see `bucket_edges`.
        max_context: None, or M: the windows, targets and positions are unchanged, but each target is predicted
            from at most M - 1 tokens before it, through sub-windows of M tokens inside its window (see
            `token_losses`). M = the trained window gives the `stock@window` yardstick.
        context_stride: tokens between sub-window starts, 1 <= context_stride < M; default M // 8.

    Returns:
        PerplexityResult.

    Cost: one forward per window; with max_context about length / context_stride forwards of M tokens per window
    (`forward_count` says exactly). Logits are computed only at the positions that predict scored tokens, a chunk
    at a time (see `scored_losses`), so memory does not grow with length x vocabulary.
    """
    ids = as_token_ids(token_ids)
    lengths = [check_int("length", n, ge=2) for n in lengths]
    check_enough(len(ids), max(lengths))
    max_context, context_stride = check_context(max_context, context_stride)
    device = next(model.parameters()).device
    window = trained_window(model)
    result = PerplexityResult(trained_window=window, max_context=max_context, context_stride=context_stride)
    for length in lengths:
        step = length if stride is None else check_int("stride", stride)
        if step > length:
            raise ConfigError(f"stride ({step}) must be <= length ({length}), or every window skips tokens")
        edges = torch.tensor(bucket_edges(length, buckets, window))
        loss_sum = torch.zeros(len(edges) - 1, dtype=torch.float64)
        count = torch.zeros(len(edges) - 1, dtype=torch.float64)
        for begin, end, n_new in windows(len(ids), length, step):
            chunk = ids[begin:end].to(device)
            k = min(n_new, end - begin - 1)  # scored tokens: the last k of the window
            if k <= 0:
                continue
            losses = window_losses(model, chunk, k, max_context, context_stride).double().cpu()
            bucket = torch.bucketize(torch.arange(end - begin - k, end - begin), edges[1:-1], right=True)
            loss_sum += torch.bincount(bucket, weights=losses, minlength=len(count))
            count += torch.bincount(bucket, minlength=len(count)).double()
        total = int(count.sum())
        result.ppl[length] = math.exp(loss_sum.sum().item() / total)
        result.bucket_loss[length] = [(int(edges[i]), int(edges[i + 1]),
                                       (loss_sum[i] / count[i]).item() if count[i] else float("nan"))
                                      for i in range(len(count))]
        result.bucket_tokens[length] = [int(c) for c in count]
        result.tokens[length] = total
        result.stride[length] = step
    return result
