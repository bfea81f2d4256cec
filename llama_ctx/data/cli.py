"""`llama-ctx data summary|preview --config X.yaml`: measure the `data:` section of a training YAML.

Only the `data:` section is validated (other sections are the trainer's business). The tokenizer comes from
`--tokenizer` (a local folder or .gguf file), else from the YAML's `model.path` / `model.gguf_file`, else the
shipped SmolLM2; `seq_len` from `--seq-len`, else a `seq_len` key at the top of the YAML or in one of its sections.
Relative source paths are relative to the current directory.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .config import parse_tokens


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="summary or preview of the data mixture of a training YAML")
    cmds = p.add_subparsers(dest="data_command", required=True)
    for name, text in (("summary", "tokens per domain (requested vs realised), document lengths, filter counts, "
                                   "packing efficiency"),
                       ("preview", "the first packed examples, document boundaries marked")):
        q = cmds.add_parser(name, help=text)
        q.add_argument("--config", required=True, help="training YAML with a data: section")
        q.add_argument("--tokenizer", default=None, help="local tokenizer folder or .gguf file (default: model.path "
                                                        "of the YAML, else the shipped SmolLM2)")
        q.add_argument("--seq-len", type=int, default=None,
                       help="packed sequence length (default: seq_len in the YAML)")
        if name == "summary":
            q.add_argument("--sample-tokens", default=None,
                           help="packed positions to sample, e.g. 1e6 or 20M (default: the budget, at most 10M)")
            q.add_argument("--out", default="data_summary", help="folder for summary.json and doc_lengths.png")
            q.set_defaults(func=run_summary)
        else:
            q.add_argument("-n", type=int, default=3, help="examples to show")
            q.add_argument("--chars", type=int, default=160, help="characters of text shown per document")
            q.set_defaults(func=run_preview)


def read_yaml(path) -> dict:
    from ..train.config import read_yaml as read_sections  # the file, YAML and mapping checks of the training config

    doc = read_sections(path)
    if not isinstance(doc.get("data"), dict):
        raise ConfigError(f"--config: {str(path)!r} has no `data:` section (a mapping with `sources:`)")
    return doc


def find_seq_len(doc: dict, given: int | None) -> int:
    if given is not None:
        return given
    found = [doc["seq_len"]] if "seq_len" in doc else \
        [v["seq_len"] for v in doc.values() if isinstance(v, dict) and "seq_len" in v]
    if not found:
        raise ConfigError("no seq_len in the YAML; give --seq-len")
    if not isinstance(found[0], int) or isinstance(found[0], bool):
        raise ConfigError(f"seq_len in the YAML must be an integer, got {found[0]!r}")
    return found[0]


def load_tokenizer(path, gguf_file: str | None = None):
    """A tokenizer from a local folder or .gguf file (no hub access); None: the shipped SmolLM2's."""
    from transformers import AutoTokenizer

    from ..io import SMOLLM2_GGUF, smollm2_dir

    if path is None:
        path, gguf_file = smollm2_dir(), SMOLLM2_GGUF
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        path, gguf_file = path.parent, path.name
    if not path.exists():
        raise ConfigError(f"tokenizer path {str(path)!r} does not exist; give a local folder or .gguf file")
    kw = dict(gguf_file=gguf_file) if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, **kw)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load a tokenizer from {str(path)!r}: {e}") from None


def _setup(args):
    doc = read_yaml(args.config)
    model = doc.get("model") if isinstance(doc.get("model"), dict) else {}
    tokenizer = load_tokenizer(args.tokenizer, None) if args.tokenizer else \
        load_tokenizer(model.get("path"), model.get("gguf_file"))
    return doc["data"], tokenizer, find_seq_len(doc, args.seq_len)


def run_summary(args) -> None:
    from .report import format_summary, summary

    data, tokenizer, seq_len = _setup(args)
    try:
        sample = parse_tokens(args.sample_tokens)
    except ValueError as e:
        raise ConfigError(f"--sample-tokens {e}") from None
    result = summary(data, tokenizer, seq_len, sample, out=args.out)
    print(format_summary(result))
    print(f"\nsummary.json and doc_lengths.png in {args.out}")


def run_preview(args) -> None:
    from .report import preview

    data, tokenizer, seq_len = _setup(args)
    if args.n < 1:
        raise ConfigError("-n must be >= 1")
    print(preview(data, tokenizer, seq_len, args.n, args.chars))
