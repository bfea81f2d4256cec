"""benchmarks/pe_extrapolation.py: every encoding of the issue is in the study, and a cached checkpoint is the model
that was trained (re-runs skip training only when the settings match)."""

import argparse
import sys
from pathlib import Path

import pytest
import torch

import llama_ctx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pe_extrapolation as pe  # noqa: E402


def test_the_study_names_every_encoding_and_they_are_registered():
    position = {r["name"] for r in llama_ctx.methods() if r["kind"] == "position"}
    assert set(pe.ENCODINGS) == {"rope"} | {"nope", "sinusoidal", "learned-absolute", "alibi", "t5-bias",
                                            "multiplicative", "recursive"}
    assert set(pe.ENCODINGS) - {"rope"} <= position


@pytest.mark.parametrize("encoding", ["learned-absolute", "recursive"])
def test_cached_checkpoint_reloads_the_trained_model(tmp_path, capsys, encoding):
    args = argparse.Namespace(steps=3, batch=2, lr=1e-2, seed=0, retrain=False)
    data = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1))
    first, info = pe.trained(encoding, data, args, tmp_path)
    assert f"training {encoding}" in capsys.readouterr().out
    x = torch.randint(0, 256, (1, 2 * pe.WINDOW))
    with torch.no_grad():
        expected = first(input_ids=x).logits
        untrained = pe.build(encoding, args.seed).eval()(input_ids=x).logits
        again, info_again = pe.trained(encoding, data, args, tmp_path)
        assert "training" not in capsys.readouterr().out and info_again == info
        assert torch.equal(again(input_ids=x).logits, expected)
        assert not torch.allclose(untrained, expected)  # training changed it, so the equality above means something
    args.steps = 4  # other settings: trained again, not reused
    pe.trained(encoding, data, args, tmp_path)
    assert f"training {encoding}" in capsys.readouterr().out
