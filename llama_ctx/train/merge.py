"""`llama-ctx merge`: base + adapter -> one standalone model that stock transformers loads correctly.

The two failures users report after LongLoRA-style training are a merged model whose config lost the rope scaling
(it then runs at the trained positions only and outputs garbage past them) and one that lost the trained embeddings
or norms. Here the rope method recorded in the adapter folder is applied to the base with `llama_ctx.patch` before
the adapter is loaded, so the merged model's config carries native `rope_parameters`; LoRA and the fully trained
modules (`modules_to_save`, tied `lm_head` included) are merged by PEFT's `merge_and_unload`. Before the result
replaces anything, it is reloaded from disk and its logits compared with the in-memory base + adapter + patch.
A position method (e.g. learned-absolute) is applied the same way; its trained table is one of the
`modules_to_save`, so the merged model holds it, and the merge is reloaded with `llama_ctx.from_pretrained` (stock
transformers refuses such a folder instead of loading it without its encoding).

The output is written to a temporary folder next to `--out` and renamed into place; an existing `--out` is replaced
only with `--force`, and only once the new model is complete and verified.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ConfigError
from .builtin import resolve_model_path
from .model import adapter_context, apply_recorded, load_base

VERIFY_TOKENS = 64


def merge(base, adapter, out, force: bool = False, dtype: str | None = None, gguf_file: str | None = None,
          verify: bool = True) -> Path:
    """Merge `adapter` into `base` and save a standalone model (safetensors + tokenizer) at `out`.

    Args:
        base: the model the adapter was trained on (folder, .gguf file, hub name or `tiny-random`).
        adapter: the training output folder (or one of its checkpoint-N folders).
        out: destination folder; must not exist unless `force`.
        dtype: dtype of the merged weights; None: the base model's own.
        verify: reload the saved model and check its logits against base + adapter + patch (<= 1e-4 in float32).

    Raises:
        ConfigError: a missing/invalid adapter, an existing `out` without `force`, or a failed verification (the
            destination is then left as it was).
    """
    from peft import PeftModel

    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"--out: {str(out)!r} already exists; pass --force to replace it")
    entry = adapter_context(adapter)
    base_path, gguf_file = resolve_model_path(str(base), gguf_file)
    model, tokenizer = load_base(base_path, gguf_file, dtype or _base_dtype(base_path, gguf_file))
    model.eval()
    apply_recorded(model, entry)
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    probe = _probe_ids(model.config.vocab_size)
    with torch.no_grad():
        expected = peft_model(probe).logits if verify else None
    merged = peft_model.merge_and_unload()
    if (Path(adapter) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adapter, local_files_only=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if verify:
            native = "position" not in entry and entry.get("rope", {}).get("native", True)
            _verify(tmp, probe, expected, native=native)
        _swap(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _base_dtype(path: str, gguf_file: str | None) -> str:
    from .checks import model_config

    dtype = getattr(model_config(path, gguf_file, key="--base"), "dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _probe_ids(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (1, VERIFY_TOKENS), generator=g)


def _verify(folder: Path, probe, expected, native: bool) -> None:
    """Reload `folder` as a user would (stock transformers when the rope type is native) and compare logits."""
    from transformers import AutoModelForCausalLM

    from ..persistence import from_pretrained

    loader = AutoModelForCausalLM.from_pretrained if native else from_pretrained
    reloaded = loader(folder, dtype=expected.dtype).eval()
    with torch.no_grad():
        got = reloaded(probe).logits
    tol = 1e-4 if expected.dtype == torch.float32 else 5e-2
    err = (got.float() - expected.float()).abs().max().item()
    if not err <= tol * max(1.0, expected.float().abs().max().item()):
        raise ConfigError(f"merge verification failed: the saved model's logits differ from base + adapter by "
                          f"{err:.3g}; nothing was written to the destination")


def _swap(tmp: Path, out: Path) -> None:
    """Put the finished `tmp` at `out`, moving any old `out` aside first and deleting it only afterwards."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
