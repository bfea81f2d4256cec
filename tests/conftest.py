import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, max_position_embeddings=64)


def tiny_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides))
    model.config._attn_implementation = attn_implementation
    return model.eval()


def clone_with(model, **config_overrides) -> LlamaForCausalLM:
    """A stock model with `model`'s weights and a changed config (e.g. native rope_parameters)."""
    cfg = model.config.to_dict()
    cfg.update(config_overrides)
    cfg = {k: v for k, v in cfg.items() if k in TINY or k in config_overrides or k in ("rope_parameters",)}
    other = LlamaForCausalLM(LlamaConfig(**cfg))
    other.load_state_dict(model.state_dict())
    other.config._attn_implementation = model.config._attn_implementation
    return other.eval()


@pytest.fixture
def model():
    return tiny_model()


def ids(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=g)


@torch.no_grad()
def logits(model, input_ids, **kw) -> torch.Tensor:
    return model(input_ids, **kw).logits
