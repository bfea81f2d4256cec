"""The RoPE inspector (critical dimensions) and the `llama-ctx methods|inspect` commands."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import llama_ctx
from llama_ctx.cli import main, parse_params
from llama_ctx.io import load
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


ROOT = Path(__file__).resolve().parents[1]


def python_m(module, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)


def test_python_dash_m_runs_the_command_line():
    done = python_m("llama_ctx.cli", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: llama-ctx") and "inspect" in done.stdout
    done = python_m("llama_ctx", "inspect", "/nonexistent/model")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "llama-ctx: error: model path '/nonexistent/model' does not exist; give a local model folder or a .gguf file"]


def test_bad_model_path_or_dtype_gives_one_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, message in [(["inspect", str(tmp_path / "missing")], "model path .* does not exist"),
                          (["inspect", str(empty)], "cannot read a model config from"),
                          (["eval", "ppl", "--model", str(empty), "--lengths", "8", "--out", str(tmp_path / "o")],
                           "cannot load a model and tokenizer from")]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.match(f"llama-ctx: error: {message}", err[0]), err
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "ppl", "--dtype", "nn", "--lengths", "8", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and "invalid choice: 'nn'" in capsys.readouterr().err
    with pytest.raises(llama_ctx.ConfigError, match="unknown dtype 'nn'; use one of float32"):
        load(empty, dtype="nn")
