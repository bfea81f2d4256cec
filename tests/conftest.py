"""Tiny random LLaMA models (the same ones `llama-ctx check` uses) and small helpers shared by the tests."""

import pytest
from transformers import LlamaConfig

from llama_ctx.check import TINY, clone_with, ids, logits, tiny_model  # noqa: F401


def tiny_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **overrides})


@pytest.fixture
def model():
    return tiny_model()
