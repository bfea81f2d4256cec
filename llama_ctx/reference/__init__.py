"""Dense, obviously-correct definitions of the attention methods, written independently of their implementations.

Each module computes a method from its definition (explicit position matrices and visibility, full softmax, often
in float64) on small inputs. The tests compare the patched models against them, and `llama-ctx check` runs the same
comparisons on the installed torch/transformers, so both use exactly these definitions.
"""

import contextlib
import types


@contextlib.contextmanager
def attention_replaced(model, forward):
    """Inside, every attention module of `model` (a stock, unpatched LLaMA) runs `forward(attn, hidden_states,
    position_embeddings=None, attention_mask=None, **kw)` instead of its own."""
    layers = [layer.self_attn for layer in model.model.layers]
    for attn in layers:
        attn.forward = types.MethodType(forward, attn)
    try:
        yield model
    finally:
        for attn in layers:
            del attn.forward
