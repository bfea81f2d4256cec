"""Shared helpers for the benchmark scripts: a small random LLaMA and interleaved best-of-N timing."""

from __future__ import annotations

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024)


def small_llama(seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL, **overrides}))
    model.config._attn_implementation = attn_implementation
    return model.eval()


def best_times(fns: dict, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Best wall time of each callable, run interleaved in a rotating order so machine noise and position in the
    round (caches, clock ramps) hit all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best = {name: float("inf") for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def _status_bytes(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024


def peak_rss_growth(fn) -> int:
    """Growth of this process's peak resident set while `fn` runs (Linux: VmHWM reset through clear_refs), so
    kernel-internal buffers count too."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - base
