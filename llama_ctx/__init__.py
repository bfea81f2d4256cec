"""llama_ctx: extend the context window of LLaMA-family models in Hugging Face Transformers.

    import llama_ctx
    llama_ctx.patch(model, "yarn", factor=4)     # per instance, in place
    llama_ctx.unpatch(model)                     # bit-exact restore
    with llama_ctx.patched(model, "ntk", factor=2): ...
"""

from . import pcw  # noqa: F401  (llama_ctx.pcw.prepare / generate / score)
from .errors import ConfigError, LlamaCtxError, PatchStateError, UnsupportedModelError
from .patch import patch, patched, state, unpatch
from .persistence import from_pretrained
from .registry import methods, register
from .rope.inspect import inspect_rope

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "LlamaCtxError", "PatchStateError", "UnsupportedModelError",
    "patch", "unpatch", "patched", "state", "methods", "register", "from_pretrained", "inspect_rope",
    "__version__",
]
