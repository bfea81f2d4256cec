"""Review of composed method specs, the sweep of compositions and passkey's share_prefix."""

import pytest
from conftest import tiny_model
from test_eval import char_tokenizer

from llama_ctx.errors import ConfigError
from llama_ctx.eval.passkey import passkey, shareable


def test_share_prefix_refuses_a_model_whose_generation_config_names_a_cache():
    # generate() builds that cache itself and refuses the prefilled DynamicCache with a transformers ValueError,
    # after `shareable` said yes (so `eval passkey --share-prefix` crashed instead of running the prompts whole)
    tok, model = char_tokenizer(), tiny_model(max_position_embeddings=64)
    model.generation_config.cache_implementation = "static"
    assert not shareable(model)
    with pytest.raises(ConfigError, match="cache_implementation='static'"):
        passkey(model, tok, [300], [0.5], trials=2, seed=0, share_prefix=True)
    assert passkey(model, tok, [300], [0.5], trials=2, seed=0).cells[0]["outputs"]  # whole prompts still run

