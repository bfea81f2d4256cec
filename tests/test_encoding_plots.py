"""`llama-ctx plot ...`: the data each picture draws, against closed forms computed here, and the PNG files."""

import math
import re

import pytest
import torch

from llama_ctx.cli import main
from llama_ctx.encodings.plots import plot_rope, plot_similarity, plot_sinusoidal, similarity
from llama_ctx.errors import ConfigError
from conftest import tiny_config, tiny_model


def test_sinusoidal_heatmap_draws_the_textbook_table(tmp_path):
    png = tmp_path / "s.png"
    table = plot_sinusoidal(png, positions=30, dim=10, base=100.0)
    expected = [[(math.sin if j % 2 == 0 else math.cos)(pos / 100.0 ** ((j - j % 2) / 10)) for j in range(10)]
                for pos in range(30)]
    assert torch.allclose(table, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("starts", [1, 5])
def test_sinusoidal_similarity_is_the_sum_of_cosines_of_the_distance(tmp_path, starts):
    # PE(p) . PE(p+d) = sum_i sin(a p) sin(a (p+d)) + cos(a p) cos(a (p+d)) = sum_i cos(a d): no p in it
    d, values = plot_similarity(tmp_path / "sim.png", "sinusoidal", max_distance=300, dim=64, starts=starts)
    expected = [sum(math.cos(k / 10000.0 ** (2 * i / 64)) for i in range(32)) for k in range(301)]
    assert d.tolist() == list(range(301))
    assert torch.allclose(values, torch.tensor(expected, dtype=torch.float64), atol=1e-9)
    assert values[0] == pytest.approx(32) and values[1:].max() < 32  # the largest at distance 0


def test_rope_similarity_is_q_dot_k_of_rotated_all_ones_vectors(tmp_path):
    # each rotated pair of ones: (1, 1) . R(d theta) (1, 1) = 2 cos(d theta)
    d, values = similarity("rope", max_distance=2000, dim=16, base=500.0, starts=3)
    expected = [2 * sum(math.cos(k * 500.0 ** (-2 * i / 16)) for i in range(8)) for k in range(2001)]
    assert torch.allclose(values, torch.tensor(expected, dtype=torch.float64), atol=1e-9)
    # a model's frequencies: the tiny model's head (dim 16, base 1e4, float32 as the model computes them)
    from llama_ctx.rope.base import RopeSpec, model_inv_freq

    config = tiny_config()
    _, from_model = similarity("rope", 200, inv_freq=model_inv_freq(config, RopeSpec.from_config(config)))
    _, default = similarity("rope", 200, dim=16, base=10000.0)
    assert torch.allclose(from_model, default, atol=1e-3)


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown encoding 'alibi'"):
        similarity("alibi")
    with pytest.raises(ConfigError, match="dim must be even"):
        similarity("rope", dim=15)
    with pytest.raises(ConfigError, match="dim must be even"):
        plot_sinusoidal(tmp_path / "x.png", dim=7)
    with pytest.raises(ConfigError, match="only applies to encoding='rope'"):
        similarity("sinusoidal", inv_freq=torch.ones(4))


def test_plot_rope_marks_the_model_window(tmp_path):
    rows = plot_rope(tiny_config(), tmp_path / "r.png")
    assert [r["wavelength"] for r in rows] == pytest.approx([2 * math.pi * 1e4 ** (2 * i / 16) for i in range(8)],
                                                            rel=1e-5)
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_cli_plot_commands(tmp_path, capsys):
    tiny_model().save_pretrained(tmp_path / "m")
    for argv, png in [(["plot", "rope", str(tmp_path / "m")], "r.png"),
                      (["plot", "sinusoidal", "--positions", "20", "--dim", "32"], "s.png"),
                      (["plot", "similarity", "--encoding", "rope", "--model", str(tmp_path / "m")], "q.png")]:
        assert main([*argv, "--out", str(tmp_path / png)]) == 0
        assert capsys.readouterr().out.strip() == f"plot written to {tmp_path / png}"
        assert (tmp_path / png).stat().st_size > 1000
    # a name without a suffix: matplotlib writes NAME.png, and that is the path printed
    assert main(["plot", "sinusoidal", "--positions", "20", "--dim", "32", "--out", str(tmp_path / "bare")]) == 0
    assert capsys.readouterr().out.strip() == f"plot written to {tmp_path / 'bare.png'}"
    assert (tmp_path / "bare.png").exists() and not (tmp_path / "bare").exists()
    for argv, message in [(["plot", "similarity", "--encoding", "learned"], "unknown encoding 'learned'"),
                          (["plot", "sinusoidal", "--dim", "7"], "dim must be even"),
                          (["plot", "similarity", "--model", str(tmp_path / "m")], "--model only applies to"),
                          (["plot", "rope", str(tmp_path / "missing")], "model path .* does not exist")]:
        assert main([*argv, "--out", str(tmp_path / "bad.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("llama-ctx: error: ") and re.search(
            message, err[0]), err
    assert not (tmp_path / "bad.png").exists()
