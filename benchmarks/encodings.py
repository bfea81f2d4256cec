"""Cost of the position methods / the stock (RoPE) model, same weights and input, side by side.

    python benchmarks/encodings.py [--lengths 1024,4096] [--repeats 5] [--cpu-time]

With --cpu-time, process CPU time instead of wall time (steadier on a loaded machine; run with OMP_NUM_THREADS=1).
The recurrence alone is timed too: microseconds per position unrolled, without gradients and forward + backward.

Inference: one forward without gradients. "recursive (unrolled)" clears the kept positions before every call, so
each call unrolls the recurrence over all positions (the cost of the first call, and of every call while training);
"recursive (kept)" reuses them. Training: forward + backward of the LM loss, where recursive backpropagates through
the whole unrolled recurrence.
"""

import argparse
import contextlib
import time

import torch

import llama_ctx
from _util import best_times, small_llama

METHODS = {"nope": {}, "sinusoidal": dict(scale=0.1), "learned-absolute": dict(scale=0.1),
           "multiplicative": dict(scale=0.1), "recursive": dict(width=64)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cpu-time", action="store_true")
    args = ap.parse_args()
    if args.cpu_time:
        time.perf_counter = time.process_time  # best_times reads perf_counter
    model = small_llama()  # one object for all: patch, time, unpatch (patching is timed too; it is cheap)

    def call(name, x, train=False):
        params = {**METHODS.get(name, {}), **({"max_positions": x.shape[1]} if name == "learned-absolute" else {})}

        def run():
            with llama_ctx.patched(model, name, **params) if name != "stock" else contextlib.nullcontext():
                if train:
                    model(input_ids=x, labels=x).loss.backward()
                else:
                    with torch.no_grad():
                        model(x)
        return run

    for length in [int(n) for n in args.lengths.split(",")]:
        x = torch.randint(0, model.config.vocab_size, (1, length))
        infer = {"stock": call("stock", x), **{n: call(n, x) for n in METHODS}}
        t = best_times(infer, repeats=args.repeats)
        print(f"inference forward, {length} tokens (best of {args.repeats}; stock {t['stock']:.3f}s; recursive "
              "unrolls every call here)")
        for name in METHODS:
            print(f"  {name:<22} {t[name] / t['stock']:6.2f}x stock")
        train = {n: call(n, x, train=True) for n in ("stock", "learned-absolute", "recursive")}
        t = best_times(train, repeats=max(2, args.repeats // 2))
        print(f"training step (forward + backward), {length} tokens (stock {t['stock']:.3f}s)")
        for name in list(train)[1:]:
            print(f"  {name:<22} {t[name] / t['stock']:6.2f}x stock")
        model.zero_grad(set_to_none=True)
        recurrence(model, x, args.repeats)


def recurrence(model, x, repeats):
    """Recursive patched once: a forward that unrolls again / one that reuses the kept positions, and the
    recurrence alone per position (without gradients, and forward + backward)."""
    n = x.shape[1]
    with llama_ctx.patched(model, "recursive", **METHODS["recursive"]):
        module = model.model.llama_ctx_position

        def forward(keep):
            def run():
                if not keep:
                    module._kept = None
                with torch.no_grad():
                    model(x)
            return run

        def unroll():
            module._kept = None
            with torch.no_grad():
                module.positions(n)

        def train():
            module.positions(n).sum().backward()

        t = best_times({"unrolled": forward(False), "kept": forward(True), "unroll": unroll, "train": train},
                       repeats=repeats)
    print(f"  recursive forward, unrolling / positions kept: {t['unrolled'] / t['kept']:.2f}x")
    print(f"  recurrence alone, {n} positions (hidden {model.config.hidden_size}, width "
          f"{METHODS['recursive']['width']}): {t['unroll'] / n * 1e6:.1f} us/position unrolled, "
          f"{t['train'] / n * 1e6:.1f} us/position forward + backward")


if __name__ == "__main__":
    main()
