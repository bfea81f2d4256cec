"""The sinusoidal table against an independent float64 computation, its rotation property, and RoPE's relative
property on the stock rotary embedding."""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import tiny_model
from llama_ctx.encodings import sinusoidal
from llama_ctx.encodings.tables import sinusoidal_at
from llama_ctx.errors import ConfigError


@pytest.mark.parametrize("n,dim,base", [(50, 16, 10000.0), (7, 2, 10000.0), (33, 10, 123.0)])
def test_sinusoidal_formula_against_math_loop(n, dim, base):
    want = torch.tensor([[math.sin(pos / base ** (2 * (c // 2) / dim)) if c % 2 == 0 else
                          math.cos(pos / base ** (2 * (c // 2) / dim)) for c in range(dim)] for pos in range(n)],
                        dtype=torch.float64)
    got = sinusoidal(n, dim, base, dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(sinusoidal(n, dim, base), want.float(), atol=1e-6, rtol=0)  # float32 by default
    assert torch.equal(got[:, 0], torch.arange(n).double().sin())  # i = 0: the angle is pos itself (no 0 division)
    pos = torch.tensor([[3, n + 100], [0, n - 1]])
    torch.testing.assert_close(sinusoidal_at(pos, dim, base)[1, 1], want[n - 1], atol=1e-12, rtol=0)


def test_sinusoidal_refuses_odd_dim_and_bad_values():
    with pytest.raises(ConfigError, match="dim must be even.*dim=8"):
        sinusoidal(4, 7)
    for args in [(4, 0), (-1, 8), (4, 8, 1.0), (4.5, 8)]:
        with pytest.raises(ConfigError):
            sinusoidal(*args)


def best_linear_map(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The least-squares M with b[pos] ~ M a[pos] for all rows, and the largest residual."""
    m = torch.linalg.lstsq(a, b).solution.T
    return m, float((a @ m.T - b).abs().max())


@pytest.mark.parametrize("base", [10000.0, 100.0])
@pytest.mark.parametrize("k", [1, 5, 37])
def test_sinusoidal_rotation_property(k, base):
    """For each k ONE linear map M_k gives PE(pos + k) = M_k PE(pos) at every pos: a 2x2 rotation per frequency."""
    dim, n = 16, 400
    pe = sinusoidal(n + k, dim, base, dtype=torch.float64)
    rotation = torch.zeros(dim, dim, dtype=torch.float64)
    for i in range(dim // 2):  # (sin a, cos a) -> (sin(a + kw), cos(a + kw))
        w = k / base ** (2 * i / dim)
        rotation[2 * i:2 * i + 2, 2 * i:2 * i + 2] = torch.tensor([[math.cos(w), math.sin(w)],
                                                                   [-math.sin(w), math.cos(w)]], dtype=torch.float64)
    assert float((pe[:n] @ rotation.T - pe[k:]).abs().max()) < 1e-9  # this M_k works for every pos
    m, residual = best_linear_map(pe[:n], pe[k:])  # and the best map over all pos is that one (base 10000's slowest
    assert residual < 1e-9  # pairs barely turn in 400 positions, which leaves least squares ill-conditioned there)
    if base == 100.0:
        torch.testing.assert_close(m, rotation, atol=1e-8, rtol=0)
    # the check can fail: a table whose angle is not linear in pos has no such map
    bent = torch.tensor([[math.sin(p * p / 97 / (1 + c)) for c in range(dim)] for p in range(n + k)]).double()
    assert best_linear_map(bent[:n], bent[k:])[1] > 1e-2


def test_rope_scores_depend_only_on_relative_position():
    """q.k after the stock rotary embedding at positions (m, n) equals that at (m + s, n + s)."""
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    d = model.config.hidden_size // model.config.num_attention_heads
    q, k = torch.randn(1, 1, 1, d, generator=g), torch.randn(1, 1, 1, d, generator=g)

    def score(m, n):
        x = torch.zeros(1, 2, d)
        cos, sin = model.model.rotary_emb(x, torch.tensor([[m, n]]))
        qr, _ = apply_rotary_pos_emb(q, q, cos[:, :1], sin[:, :1])
        _, kr = apply_rotary_pos_emb(k, k, cos[:, 1:], sin[:, 1:])
        return float((qr * kr).sum())

    for m, n in [(5, 2), (40, 40), (9, 30)]:
        for shift in (1, 17, 500):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # and it does depend on the distance
