"""Progress inside one long forward: a callback after every decoder layer, so a bar moves every few seconds even
when a single forward takes minutes (SmolLM2 at 14K tokens: about 90 s on 2 cores, 30 layers)."""

from __future__ import annotations

import contextlib

from ..errors import UnsupportedModelError
from ..patch import backbone_of


@contextlib.contextmanager
def layer_progress(model, callback):
    """Call `callback()` after each decoder layer's forward while inside the block; yields the number of layers
    (0 for a model whose decoder stack llama_ctx cannot find: then nothing is called). Forward hooks only observe:
    outputs are unchanged, and they are removed on exit."""
    try:
        layers = list(backbone_of(model).layers)
    except UnsupportedModelError:
        layers = []
    def hook(*_):
        callback()  # and return None: a forward hook that returns something replaces the layer's output

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield len(layers)
    finally:
        for h in handles:
            h.remove()
