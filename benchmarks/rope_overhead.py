"""Forward time of a rope-patched model / the stock model, same weights and input, side by side.

    python benchmarks/rope_overhead.py [--length 4096] [--repeats 5]

Target: <= 1.03x for every rope method (the frequency work is O(length * d/2) once per forward).
"""

import argparse

import torch

import llama_ctx
from _util import best_times, small_llama

METHODS = {
    "pi": dict(factor=4.0), "ntk": dict(factor=4.0), "dynamic-ntk": dict(factor=4.0), "yarn": dict(factor=4.0),
    "llama3": dict(factor=4.0), "base-truncation": dict(a=1e-4, b=1e-2, rho=1e-5),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=14)
    args = ap.parse_args()
    # One model object for all: patch, time, unpatch. Separate copies would put the weights at different
    # addresses, which alone moves the forward time by a few percent on CPU.
    model = small_llama()
    x = torch.randint(0, model.config.vocab_size, (1, args.length))

    def timed(name, params):
        def run():
            with llama_ctx.patched(model, name, **params):
                model(x)
        return run

    fns = {"stock": lambda: model(x), **{name: timed(name, params) for name, params in METHODS.items()}}
    with torch.inference_mode():
        t = best_times(fns, repeats=args.repeats)
    print(f"rope overhead at {args.length} tokens (best of {args.repeats}, interleaved; stock {t['stock']:.3f}s)")
    worst = 0.0
    for name in METHODS:
        ratio = t[name] / t["stock"]
        worst = max(worst, ratio)
        print(f"  {name:<16} {ratio:5.3f}x stock  {'ok' if ratio <= 1.03 else 'OVER 1.03x'}")
    print(f"worst {worst:.3f}x (target <= 1.03x)")


if __name__ == "__main__":
    main()
