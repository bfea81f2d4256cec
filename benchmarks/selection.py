"""Decode speed of "block-topk" and "topk" against stock full attention, at a long context, side by side.

    PYTHONPATH=. python benchmarks/selection.py                 # 32K context, small random LLaMA, fp32, CPU
    PYTHONPATH=. python benchmarks/selection.py --context 8192 --steps 10

The caches are prefilled once from the models' own key/value projections of random hidden states (a long
prefill is not what is measured): the stock cache holds keys rotated at positions 0..L-1, the selection cache
the same keys unrotated (what llama_ctx stores). Then each model decodes one token at a time, the three
models taking turns step by step, and the median time per token is compared.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import llama_ctx
from llama_ctx.compat import cache_kwargs

CONFIG = dict(hidden_size=896, num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2,
              intermediate_size=4864, vocab_size=1000, max_position_embeddings=4096)


def model_copy(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()  # attention shapes of Qwen2-0.5B, 2 layers
    model.config._attn_implementation = "sdpa"
    return model


@torch.no_grad()
def prefill(model, length: int, rotated: bool) -> DynamicCache:
    """A cache of `length` positions from each layer's k/v projections of random normalised hidden states."""
    cache = DynamicCache()
    g = torch.Generator().manual_seed(1)
    cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(length)[None])
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(torch.randn(1, length, CONFIG["hidden_size"], generator=g))
        shape = (1, length, -1, attn.head_dim)
        k = attn.k_proj(h).view(shape).transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        if rotated:
            k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        cache.update(k, v, i)
    return cache


def time_attention(model) -> list[float]:
    """Hooks that add up the time spent inside the attention modules (cache update included)."""
    spent, start = [0.0], [0.0]
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(lambda *_: start.__setitem__(0, time.perf_counter()))
        layer.self_attn.register_forward_hook(
            lambda *_: spent.__setitem__(0, spent[0] + time.perf_counter() - start[0]))
    return spent


@torch.no_grad()
def step(model, cache, token, position, spent) -> tuple[float, float]:
    """(whole step, attention modules) seconds for one decoded token."""
    spent[0] = 0.0
    t0 = time.perf_counter()
    model(token, **cache_kwargs(cache), position_ids=torch.tensor([[position]]), use_cache=True)
    return time.perf_counter() - t0, spent[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-heads", type=int, default=CONFIG["num_key_value_heads"],
                    help="a divisor of 14; fewer KV heads = more query heads per cached key")
    args = ap.parse_args()
    CONFIG["num_key_value_heads"] = args.kv_heads
    torch.set_num_threads(args.threads)
    L = args.context
    runs = {
        "stock": (model_copy(), True),
        "block-topk": (llama_ctx.patch(model_copy(), "block-topk", block_size=64, k_blocks=8, local_window=1024),
                       False),
        "topk": (llama_ctx.patch(model_copy(), "topk", k=512, local_window=1024), False),
    }
    caches = {name: prefill(m, L, rotated) for name, (m, rotated) in runs.items()}
    spent = {name: time_attention(m) for name, (m, _) in runs.items()}
    times = {name: [] for name in runs}
    token = torch.tensor([[7]])
    for s in range(args.steps + 1):  # step 0 warms up (and builds block-topk's block sums once)
        for name, (m, _) in runs.items():
            t = step(m, caches[name], token, L + s, spent[name])
            if s:
                times[name].append(t)
    tok = {name: statistics.median(t[0] for t in ts) for name, ts in times.items()}
    att = {name: statistics.median(t[1] for t in ts) for name, ts in times.items()}
    cfg = ", ".join(f"{k}={v}" for k, v in CONFIG.items() if k != "vocab_size")
    print(f"decode at {L} tokens of context, fp32, {args.threads} threads, median of {args.steps} steps; {cfg}")
    print(f"  {'stock':<11} {tok['stock'] * 1e3:8.2f} ms/token  (attention modules {att['stock'] * 1e3:7.2f} ms)")
    for name in ("block-topk", "topk"):
        print(f"  {name:<11} {tok[name] * 1e3:8.2f} ms/token  (attention modules {att[name] * 1e3:7.2f} ms)   "
              f"stock/{name}: per token {tok['stock'] / tok[name]:.2f}x, attention {att['stock'] / att[name]:.2f}x")


if __name__ == "__main__":
    main()
