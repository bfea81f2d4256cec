"""The RoPE inspector (critical dimensions) and the `llama-ctx methods|inspect` commands."""

import math

import pytest

import llama_ctx
from llama_ctx.cli import main, parse_params
from conftest import tiny_config, tiny_model


def test_inspect_rows_mark_pairs_that_never_turned_in_the_window():
    rows = llama_ctx.inspect_rope(tiny_config())  # d = 16, base 1e4, window 64
    assert len(rows) == 8
    for i, r in enumerate(rows):
        wavelength = 2 * math.pi * 10000.0 ** (2 * i / 16)
        assert math.isclose(r["wavelength"], wavelength, rel_tol=1e-5)
        assert r["critical"] == (wavelength > 64) and r["theta_after"] == r["theta"]
    assert [r["critical"] for r in rows] == [False] * 3 + [True] * 5  # 2*pi*1e4^(i/8) > 64 from i = 3


def test_inspect_with_method_reports_after_values():
    rows = llama_ctx.inspect_rope(tiny_model(), "pi", factor=4)
    assert all(math.isclose(r["wavelength_after"], 4 * r["wavelength"], rel_tol=1e-5) for r in rows)
    with pytest.raises(llama_ctx.ConfigError, match="needs parameter"):
        llama_ctx.inspect_rope(tiny_config(), "yarn")


def test_cli_methods_and_inspect(tmp_path, capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "yarn" in out and "base-truncation" in out and "rope methods" in out
    tiny_model().save_pretrained(tmp_path)
    png = tmp_path / "w.png"
    assert main(["inspect", str(tmp_path), "--method", "yarn", "--factor", "4", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "5 of 8 pairs never completed a turn" in out and png.stat().st_size > 1000
    assert main(["inspect", str(tmp_path), "--method", "yarn"]) == 2  # missing factor: clean error, exit 2
    assert "needs parameter" in capsys.readouterr().err


def test_parse_params():
    assert parse_params(["--factor", "4", "--beta-fast=16", "--log-scale", "false"]) == dict(
        factor=4, beta_fast=16, log_scale=False)
