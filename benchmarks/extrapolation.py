"""Extrapolation study: a tiny LLaMA trained at a short window, every method evaluated at 1x-8x that window.

    python benchmarks/extrapolation.py            # trains (~5 min on 2 cores, cached) then evaluates
    python benchmarks/extrapolation.py --steps 50 --quick   # smoke run

Data: CPython's own standard library sources (ship with every Python), byte-level tokens (vocab 256), so the
study needs no tokenizer and no download. Files are split by name: 90% train, 10% held out for evaluation.
Writes benchmarks/results/extrapolation.{json,png} and prints a markdown table for README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llama_ctx

sys.path.insert(0, str(Path(__file__).parent))
from _util import train_slices  # noqa: E402

HERE = Path(__file__).parent
RESULTS = HERE / "results"
WINDOW = 128

CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=WINDOW, rope_parameters={"rope_type": "default",
                                                                                         "rope_theta": 10000.0})

# Each method at the setting its own rule of thumb gives for the largest evaluated length (8x); `None` = stock.
METHODS = {
    "stock": None,
    "pi:factor=8": ("pi", dict(factor=8)),
    "ntk:factor=8": ("ntk", dict(factor=8)),
    "dynamic-ntk:factor=2": ("dynamic-ntk", dict(factor=2)),
    "yarn:factor=8": ("yarn", dict(factor=8)),
    "llama3:factor=8": ("llama3", dict(factor=8)),
    "base-truncation": ("base-truncation", dict(a=2 * math.pi / (8 * WINDOW), b=2 * math.pi / WINDOW * 4,
                                                 rho=2 * math.pi / (16 * WINDOW))),
    "rerope:window=64": ("rerope", dict(window=64)),
    "leaky-rerope:window=64,factor=16": ("leaky-rerope", dict(window=64, factor=16)),
    "self-extend:group_size=16,window=64": ("self-extend", dict(group_size=16, window=64)),
    "lambda:global_tokens=8": ("lambda", dict(global_tokens=8, local_window=WINDOW)),
    "streaming:window=123": ("streaming", dict(window=123, sink_tokens=4)),  # 4 + 123 + 1 = 128
    "topk:k=32": ("topk", dict(k=32, local_window=WINDOW)),
    "block-topk:block_size=16,k_blocks=2": ("block-topk", dict(block_size=16, k_blocks=2, local_window=WINDOW)),
}


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """Byte tokens of the stdlib's top-level modules: (train, held-out), split by file name."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    cut = int(len(files) * 0.9)
    to_ids = lambda fs: torch.frombuffer(bytearray(b"\n".join(f.read_bytes() for f in fs)), dtype=torch.uint8)  # noqa
    return to_ids(files[:cut]).long(), to_ids(files[cut:]).long()


def train(steps: int, batch: int, path: Path, seed: int = 0, config: dict | None = None,
          window: int = WINDOW) -> LlamaForCausalLM:
    """Train a byte-level LLaMA from scratch on random `window`-byte slices of the training split; save it to `path`."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**(config or CONFIG)))
    data, _ = corpus()
    train_slices(model, data, steps, batch, window, lr=2e-3, high=len(data) - window - 1)
    model.eval().save_pretrained(path)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--checkpoint", default=str(RESULTS / "tiny-llama-128"))
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--quick", action="store_true", help="few methods, short eval (smoke test)")
    ap.add_argument("--only", default=None, help="comma-separated labels to (re)evaluate; the others are kept from "
                                                 "an earlier results/extrapolation.json")
    args = ap.parse_args()
    ckpt = Path(args.checkpoint)
    if args.retrain or not (ckpt / "config.json").exists():
        train(args.steps, args.batch, ckpt)
    from llama_ctx.eval import perplexity

    model = LlamaForCausalLM.from_pretrained(ckpt).eval()
    _, heldout = corpus()
    lengths = [WINDOW * m for m in (1, 2, 4, 8)]
    tokens = heldout[: (20_000 if args.quick else 200_000)]
    registered = {r["name"] for r in llama_ctx.methods()}
    only = set(args.only.split(",")) if args.only else None
    previous = RESULTS / "extrapolation.json"
    rows = json.loads(previous.read_text())["perplexity"] if only and previous.exists() else {}
    for label, spec in METHODS.items():
        if only is not None and label not in only:
            continue
        if spec is not None and spec[0] not in registered:
            print(f"skip {label}: method not registered")
            continue
        if args.quick and label not in ("stock", "yarn:factor=8"):
            continue
        if spec is not None:
            llama_ctx.patch(model, spec[0], **spec[1])
        try:
            res = perplexity(model, tokens, lengths, stride=None)
        except llama_ctx.LlamaCtxError as e:  # e.g. a method whose coverage is below 8x
            print(f"{label}: {e}")
            res = None
        finally:
            llama_ctx.unpatch(model)
        rows[label] = {str(n): (res.ppl[n] if res else None) for n in lengths}
        print(f"{label:<40}" + "".join(f"{rows[label][str(n)] or float('nan'):>10.3f}" for n in lengths), flush=True)
    rows = {label: rows[label] for label in METHODS if label in rows}  # table order = METHODS order
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "extrapolation.json").write_text(json.dumps(
        {"window": WINDOW, "lengths": lengths, "eval_tokens": len(tokens), "perplexity": rows}, indent=1))
    plot(rows, lengths, RESULTS / "extrapolation.png")
    print("\n| method | " + " | ".join(f"{n // WINDOW}x ({n})" for n in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for label, r in rows.items():
        print(f"| `{label}` | " + " | ".join("-" if r[str(n)] is None else f"{r[str(n)]:.2f}" for n in lengths) + " |")


def plot(rows, lengths, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, r in rows.items():
        xs = [n for n in lengths if r[str(n)] is not None]
        ax.plot(xs, [r[str(n)] for n in xs], "o-", label=label, lw=2.5 if label == "stock" else 1.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.axvline(WINDOW, color="k", ls="--", lw=1)
    ax.set_xlabel("evaluation length (tokens); dashed: trained window")
    ax.set_ylabel("perplexity (bytes, held-out stdlib sources)")
    ax.set_title(f"Tiny LLaMA trained at {WINDOW} tokens: extrapolation by method")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
