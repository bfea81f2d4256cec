"""`llama-ctx` command line: methods, inspect, check, demo, eval, sweep, data, merge, plan, plot.

Each subcommand lives with the code it drives and exposes `add_parser(subparsers)`, which sets `func`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import ConfigError, LlamaCtxError

# module that provides `add_parser` for each subcommand (imported lazily: `llama-ctx methods` stays fast)
SUBCOMMANDS = {
    "methods": "llama_ctx.cli",
    "inspect": "llama_ctx.cli",
    "check": "llama_ctx.check",
    "demo": "llama_ctx.demo",
    "eval": "llama_ctx.eval.cli",
    "sweep": "llama_ctx.eval.cli",
    "data": "llama_ctx.data.cli",
    "merge": "llama_ctx.train.cli",
    "plan": "llama_ctx.train.cli",
    "plot": "llama_ctx.encodings.plots",
}


def _methods_parser(sub):
    p = sub.add_parser("methods", help="list every method, its kind and parameters")
    p.set_defaults(func=_methods)


def _methods(args) -> None:
    from .registry import KINDS, methods

    rows = methods()
    width = max(len(r["name"]) for r in rows)
    for kind in KINDS:
        print(f"{kind} methods")
        for r in (r for r in rows if r["kind"] == kind):
            alias = f" (alias {', '.join(r['aliases'])})" if r["aliases"] else ""
            params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "(none)"
            print(f"  {r['name']:<{width}}  {r['description']}{alias}\n  {'':<{width}}  params: {params}")
        print()


def _inspect_parser(sub):
    p = sub.add_parser("inspect", help="per-dimension RoPE wavelengths before/after a rope method")
    p.add_argument("model", nargs="?", default=None, help="local model folder or .gguf file (default: SmolLM2)")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--method", default=None, help="rope method name; omitted: the model's own frequencies")
    p.add_argument("--plot", default=None, help="write a PNG of the wavelengths here")
    p.set_defaults(func=_inspect)


def load_config(model: str | None, gguf_file: str | None = None):
    """(config, name) of a local model folder or .gguf file; None: the shipped SmolLM2. A `ConfigError` otherwise."""
    from pathlib import Path

    from transformers import AutoConfig

    from .io import SMOLLM2_GGUF, check_model_path, smollm2_dir

    path, gguf = (model, gguf_file) if model else (smollm2_dir(), SMOLLM2_GGUF)
    path = Path(path)
    if path.suffix == ".gguf":
        path, gguf = path.parent, path.name
    check_model_path(path, gguf)
    try:
        config = AutoConfig.from_pretrained(path, gguf_file=gguf, local_files_only=True) if gguf else \
            AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read a model config from {str(path)!r}: {e}") from e
    return config, gguf or path.name


def _inspect(args, extra: list[str]) -> None:
    from .rope.base import RopeSpec
    from .rope.inspect import format_table, inspect_rope, plot

    config, _ = load_config(args.model, args.gguf_file)
    params = parse_params(extra)
    rows = inspect_rope(config, args.method, **params)
    spec = RopeSpec.from_config(config)
    # with replace_native the rows are computed from the unscaled frequencies and the pre-training window
    window = (spec.unscaled() if params.get("replace_native") else spec).trained_window
    print(format_table(rows, window))
    if args.plot:
        from .encodings.plots import png_path

        path = png_path(args.plot)
        plot(rows, window, path, title=f"{args.method or 'stock'} {params or ''}")
        print(f"plot written to {path}")


def parse_value(text: str):
    """'4' -> 4, '0.5' -> 0.5, 'true' -> True, anything else stays a string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_params(extra: list[str]) -> dict:
    """`--factor 4 --beta-fast 16` (or `--factor=4`) -> {"factor": 4, "beta_fast": 16}."""
    params, key = {}, None
    for tok in extra:
        if tok.startswith("--"):
            key, _, val = tok[2:].replace("-", "_").partition("=")
            if val:
                params[key], key = parse_value(val), None
        elif key is not None:
            params[key], key = parse_value(tok), None
        else:
            raise LlamaCtxError(f"unexpected argument {tok!r}; method parameters are given as --name value")
    if key is not None:
        raise LlamaCtxError(f"--{key} needs a value")
    return params


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-ctx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        if module == "llama_ctx.cli":  # not `__name__`, which is "__main__" under `python -m llama_ctx.cli`
            {"methods": _methods_parser, "inspect": _inspect_parser}[name](sub)
        else:
            importlib.import_module(module).add_parser(sub)
    return parser


def split_method_params(argv: list[str], known: set[str]) -> tuple[list[str], list[str]]:
    """Separate `--name value` pairs that are not options of the command (method parameters) from the rest."""
    rest, extra, i = [], [], 0
    while i < len(argv):
        tok = argv[i]
        name = tok.split("=", 1)[0]
        if tok.startswith("--") and name not in known:
            takes_value = "=" not in tok and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            extra += argv[i:i + 1 + takes_value]
            i += 1 + takes_value
        else:
            rest.append(tok)
            i += 1
    return rest, extra


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if argv[:1] == ["inspect"]:
        argv, extra = split_method_params(argv, {"--gguf-file", "--method", "--plot", "--help", "-h"})
    args, unknown = parser.parse_known_args(argv)
    extra += unknown
    try:
        if args.command == "inspect":
            code = args.func(args, extra)
        else:
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            code = args.func(args)
    except (LlamaCtxError, OSError) as e:  # bad input, or a file that cannot be read or written: one line
        print(f"llama-ctx: error: {e}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
