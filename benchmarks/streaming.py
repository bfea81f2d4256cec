"""Stream 100K tokens through a small random LLaMA patched with "streaming": bounded cache, flat latency.

    PYTHONPATH=. nice python benchmarks/streaming.py [--tokens 100000] [--chunk 8] [--window 508] [--sinks 4]
    PYTHONPATH=. nice python benchmarks/streaming.py prefill [--lengths 8k,16k,32k]

Feeds the stream in chunks through the model with its `StreamingCache` (the path `generate()` uses) and prints
the cache size and the per-token latency of the last 10% over the first 10% (medians of per-chunk times). The
machine is shared, so the ratio is also measured load-fairly: the cache as it was at 5% of the stream and the final
one are stepped alternately (`probe`). For contrast the same ratios for the stock model with its growing
`DynamicCache` over a shorter stream (it has no bound, so it is not run to 100K).

`prefill`: peak memory of one prefill (`model(x, use_cache=True)`, what `generate()` starts with) of the streaming
model and of the stock model (SDPA, `DynamicCache`), as the growth of the process's peak resident set (Linux
VmHWM, reset through /proc/self/clear_refs), so kernel-internal buffers count too.
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llama_ctx
from llama_ctx.compat import cache_kwargs, output_cache

sys.path.insert(0, os.path.dirname(__file__))
from _util import peak_rss_growth  # noqa: E402


def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=256, vocab_size=1000, max_position_embeddings=1024)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def stream(m, tokens, chunk, cache=None):
    """Per-chunk seconds while feeding `tokens` random ids through `m`; the cache at 5% and at the end."""
    g = torch.Generator().manual_seed(1)
    times, steps, early = [], tokens // chunk, None
    for i in range(steps):
        x = torch.randint(0, 1000, (1, chunk), generator=g)
        t0 = time.perf_counter()
        cache = output_cache(m(x, **cache_kwargs(cache), use_cache=True))
        times.append(time.perf_counter() - t0)
        if i == steps // 20:
            early = copy.deepcopy(cache)
    return times, early, cache


@torch.no_grad()
def probe(m, early, late, chunk, steps=200):
    """Median per-chunk time of the late cache over the early one, stepping both alternately."""
    x, t = torch.randint(0, 1000, (1, chunk)), {"early": [], "late": []}
    caches = {"early": early, "late": late}
    for _ in range(steps):
        for name in t:
            t0 = time.perf_counter()
            caches[name] = output_cache(m(x, **cache_kwargs(caches[name]), use_cache=True))
            t[name].append(time.perf_counter() - t0)
    return statistics.median(t["late"]) / statistics.median(t["early"])


def tail_over_head(times):
    k = max(len(times) // 10, 1)
    return statistics.median(times[-k:]) / statistics.median(times[:k])


def peak_bytes(fn):
    """(growth of peak RSS while `fn` runs (Linux), its wall time)."""
    t0 = time.perf_counter()
    grown = peak_rss_growth(fn)
    return grown, time.perf_counter() - t0


@torch.no_grad()
def prefill(lengths, window, sinks):
    """Peak memory of one prefill of each length: streaming vs stock, and how it grows with the length."""
    m, stock = llama_ctx.patch(model(), "streaming", sink_tokens=sinks, window=window), model()
    warm = torch.randint(0, 1000, (1, 2 * (sinks + window)))
    m(warm, use_cache=True), stock(warm, use_cache=True)  # one-time allocations (thread pools, kernels) not counted
    first = None
    for n in lengths:
        x = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(n))
        ours, t_ours = peak_bytes(lambda: m(x, use_cache=True))
        base, t_base = peak_bytes(lambda: stock(x, use_cache=True))
        first = first or ours
        print(f"streaming prefill {n // 1024:3d}K: peak memory {ours / 2**20:8.1f} MiB (x{ours / first:.2f} of the "
              f"first length), stock SDPA {base / 2**20:7.1f} MiB -> {ours / base:.2f}x stock; time "
              f"{t_ours:.2f}s vs {t_base:.2f}s -> {t_ours / t_base:.2f}x")


def main():
    if sys.argv[1:2] == ["prefill"]:
        ap = argparse.ArgumentParser()
        ap.add_argument("cmd")
        ap.add_argument("--lengths", default="8192,16384,32768")
        ap.add_argument("--window", type=int, default=508)
        ap.add_argument("--sinks", type=int, default=4)
        a = ap.parse_args()
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # freed large blocks go back to the OS: honest peak RSS
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        torch.set_num_threads(1)
        prefill([int(n) for n in a.lengths.split(",")], a.window, a.sinks)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--window", type=int, default=508)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--stock-tokens", type=int, default=8_000)
    a = ap.parse_args()
    torch.set_num_threads(1)

    m = llama_ctx.patch(model(), "streaming", sink_tokens=a.sinks, window=a.window)
    t0 = time.perf_counter()
    times, early, cache = stream(m, a.tokens, a.chunk)
    total = time.perf_counter() - t0
    sizes = {layer.keys.shape[-2] for layer in cache.layers}
    print(f"streaming: {cache.get_seq_length()} tokens in {total:.0f}s ({1e3 * total / a.tokens:.3f} ms/token, "
          f"chunks of {a.chunk}); cache size per layer {sorted(sizes)} (sinks+window = {a.sinks + a.window})")
    print(f"streaming per-token latency last10%/first10% {tail_over_head(times):.2f}x, "
          f"end/5% alternating probe {probe(m, early, cache, a.chunk):.2f}x")

    stock = model()
    stock_times, stock_early, stock_cache = stream(stock, a.stock_tokens, a.chunk)
    print(f"stock DynamicCache over {a.stock_tokens} tokens: cache size {stock_cache.get_seq_length()}, per-token "
          f"latency last10%/first10% {tail_over_head(stock_times):.2f}x, end/5% alternating probe "
          f"{probe(stock, stock_early, stock_cache, a.chunk):.2f}x; streaming/stock per-token time at the end "
          f"{statistics.median(times[-100:]) / statistics.median(stock_times[-100:]):.2f}x")


if __name__ == "__main__":
    main()
