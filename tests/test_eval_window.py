"""The `stock@window` yardstick: perplexity / token_losses with `max_context`, against a brute-force reference that
scores each target with a separate forward over exactly the context the definition allows."""

import math

import pytest
import torch
from conftest import ids

from llama_ctx import ConfigError
from llama_ctx.eval.perplexity import forward_count, perplexity, token_losses, windows


def allowed_begin(t: int, m: int, step: int) -> int:
    """Start of the context of target t (index in its sequence) under the definition: sub-windows [i*step, i*step+m)
    each score the tokens the previous one did not, so t belongs to the first one that ends after it."""
    return 0 if t < m else ((t - m) // step + 1) * step


@torch.no_grad()
def brute_loss(model, seq: torch.Tensor, begin: int, t: int) -> float:
    """Loss of seq[t] from one stock forward over exactly seq[begin:t] (+ the target, whose logit is not used)."""
    logits = model(seq[begin:t + 1][None]).logits[0, -2].float()
    return torch.nn.functional.cross_entropy(logits[None], seq[t:t + 1]).item()


@pytest.mark.parametrize("n,m,step", [(100, 40, 16), (64, 24, 23), (50, 64, 32)])
def test_token_losses_match_one_forward_per_token(model, n, m, step):
    seq = ids(n)[0]
    got = token_losses(model, seq, max_context=m, context_stride=step)
    assert got.shape == (n - 1,) and got.dtype == torch.float32
    ref = []
    for t in range(1, n):
        begin = allowed_begin(t, m, step)
        assert t - begin <= m - 1 and (t < m or t - begin >= m - step)  # the bounds the docstring promises
        ref.append(brute_loss(model, seq, begin, t))
    torch.testing.assert_close(got, torch.tensor(ref), rtol=0, atol=1e-5)
    full = token_losses(model, seq)
    torch.testing.assert_close(full, torch.tensor([brute_loss(model, seq, 0, t) for t in range(1, n)]), rtol=0,
                               atol=1e-5)
    if n > m:  # the reference can tell the two apart: limiting the context changes the losses past m
        assert (got - full)[m:].abs().max() > 1e-3


def test_perplexity_with_max_context_keeps_windows_positions_and_targets(model):
    n, length, stride, m, step = 150, 96, 48, 40, 16
    seq = ids(n)[0]
    res = perplexity(model, seq, [length], stride=stride, buckets=[32, 64], max_context=m, context_stride=step)
    plain = perplexity(model, seq, [length], stride=stride, buckets=[32, 64])
    scored = []  # (position in its window, brute-force loss), targets as the guide's windowing picks them
    for begin, end, n_new in windows(n, length, stride):
        for p in range(end - begin - min(n_new, end - begin - 1), end - begin):
            scored.append((p, brute_loss(model, seq, begin + allowed_begin(p, m, step), begin + p)))
    assert res.tokens == plain.tokens and res.bucket_tokens == plain.bucket_tokens
    assert res.ppl[length] == pytest.approx(math.exp(sum(x for _, x in scored) / len(scored)), abs=1e-5)
    for (s, e, loss), c in zip(res.bucket_loss[length], res.bucket_tokens[length]):
        inside = [x for p, x in scored if s <= p < e]
        assert c == len(inside) and loss == pytest.approx(sum(inside) / len(inside), abs=1e-5)
    assert (res.max_context, res.context_stride) == (m, step) and plain.max_context is None
    assert abs(res.bucket_loss[length][2][2] - plain.bucket_loss[length][2][2]) > 1e-3  # past m they differ


def test_max_context_at_least_the_length_is_the_plain_forward(model):
    seq = ids(80)[0]
    assert perplexity(model, seq, [64], max_context=64).bucket_loss == perplexity(model, seq, [64]).bucket_loss
    assert forward_count(80, 64, max_context=64) == forward_count(80, 64) == 2


def test_forward_count_counts_the_forwards(model):
    calls = []
    hook = model.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        for kw in (dict(), dict(stride=32), dict(max_context=40), dict(stride=24, max_context=30, context_stride=7)):
            calls.clear()
            perplexity(model, ids(130)[0], [96], **kw)
            assert len(calls) == forward_count(130, 96, **kw) > 0, kw
        calls.clear()  # a last window of one token scores nothing and runs no forward
        perplexity(model, ids(21)[0], [10])
        assert len(calls) == forward_count(21, 10) == 2
    finally:
        hook.remove()


def test_bad_max_context(model):
    seq = ids(80)[0]
    with pytest.raises(ConfigError, match=r"context_stride \(40\) must be < max_context \(40\)"):
        perplexity(model, seq, [64], max_context=40, context_stride=40)
    with pytest.raises(ConfigError, match="max_context must be >= 2"):
        token_losses(model, seq, max_context=1)
    with pytest.raises(ConfigError, match="give max_context too"):
        token_losses(model, seq, context_stride=8)
