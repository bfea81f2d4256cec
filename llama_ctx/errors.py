"""Error types. Every error llama_ctx raises on bad input is a `LlamaCtxError`."""


class LlamaCtxError(Exception):
    """Base class of every llama_ctx error."""


class ConfigError(LlamaCtxError, ValueError):
    """A method name or parameter is wrong; the message says which and how to fix it."""


class UnsupportedModelError(LlamaCtxError, TypeError):
    """The model (class, attention implementation or library version) cannot be patched."""


class PatchStateError(LlamaCtxError, ValueError):
    """The requested patch conflicts with what is already applied to the model."""
