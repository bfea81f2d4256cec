"""Review of composed method specs, the sweep of compositions and passkey's share_prefix."""

import sys
from pathlib import Path

import pytest
from conftest import ids, tiny_model
from test_eval import char_tokenizer

import llama_ctx
from llama_ctx.errors import ConfigError
from llama_ctx.eval.passkey import passkey, shareable
from llama_ctx.eval.sweep import sweep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import long_context_quality as lcq  # noqa: E402


@pytest.mark.parametrize("setting,value,named", [("cache_implementation", "static", "cache_implementation='static'"),
                                                 ("use_cache", False, "use_cache=False"),
                                                 ("prompt_lookup_num_tokens", 3, "assisted_generation decoding"),
                                                 ("num_beams", 2, "beam_search decoding"),
                                                 ("prefill_chunk_size", 16, "prefill_chunk_size=16")])
def test_share_prefix_refuses_generation_settings_that_do_not_continue_from_the_cache(setting, value, named):
    # shareable() said yes to these: use_cache=False (a checkpoint saved with "use_cache": false) and prompt lookup
    # gave other outputs silently, as did prefill_chunk_size on transformers 5.18; a cache_implementation
    # (ValueError) or beams (RuntimeError) crashed eval passkey --share-prefix instead of running the prompts whole
    tok, model = char_tokenizer(), tiny_model(max_position_embeddings=64)
    setattr(model.generation_config, setting, value)
    assert not shareable(model)
    with pytest.raises(ConfigError, match=f"generation_config \\({named}\\)"):
        passkey(model, tok, [300], [0.5], trials=2, seed=0, share_prefix=True)
    assert passkey(model, tok, [300], [0.5], trials=2, seed=0).cells[0]["outputs"]  # whole prompts still run


def test_a_composed_sweep_row_names_every_part():
    # the row's method / params were the last part's alone (method 'dca'), so sweep.json described the winner
    # "yarn:factor=4+dca:..." as DCA without YaRN
    res = sweep(tiny_model(), ids(128)[0], 128, methods=["yarn:factor=4+dca:chunk_size=48:local_window=4"],
                buckets=32)
    row = next(x for x in res.ranking if x["label"].startswith("yarn"))
    assert row["method"] == "yarn+dca"
    assert row["params"] == {"yarn": {"factor": 4}, "dca": {"chunk_size": 48, "local_window": 4}}
    plain = sweep(tiny_model(), ids(128)[0], 128, methods=["lambda:local_window=64"], buckets=32)
    assert next(x for x in plain.ranking if x["method"] == "lambda")["params"] == {"local_window": 64}


def test_quality_benchmark_passkey_runs_whole_prompts_for_methods_that_cannot_share(tmp_path):
    # run_passkey asked for share_prefix=True unconditionally: a --methods configuration such as dynamic-ntk that
    # ranked among --best crashed the run at its passkey stage
    tok, model = char_tokenizer(), tiny_model(max_position_embeddings=64)
    cache = lcq.Cache(tmp_path, "x")
    lcq.run_passkey(model, tok, cache, "dynamic-ntk:factor=4", [300], [0.5], 2, 0, lambda msg: None)
    cell = cache.passkey("dynamic-ntk:factor=4", 300, 0.5, 2, 0, "float32")
    with llama_ctx.patched(model, "dynamic-ntk", factor=4):
        assert cell["outputs"] == passkey(model, tok, [300], [0.5], trials=2, seed=0).cells[0]["outputs"]
    assert llama_ctx.state(model) is None
