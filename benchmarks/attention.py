"""Speed and memory of the position-rewriting attention methods, as ratios measured side by side in one run.

    nice python benchmarks/attention.py            # all sections, ~15 minutes on 2 CPU cores
    nice python benchmarks/attention.py rerope     # one section: rerope, leaky-rerope, self-extend, lambda, dca
    nice python benchmarks/attention.py --cpu-time dca   # CPU time of the process instead of wall time

A small random LLaMA (hidden 256, 4 layers, 4 heads, trained window 2048), float32, CPU. Times are the best of
a few runs, in this process with the allocator as a user has it; "peak memory" is the growth of the peak resident
set (Linux VmHWM, reset through /proc/self/clear_refs) during one layer's attention step, so kernel-internal buffers
count too, measured in a child process started with MALLOC_MMAP_THRESHOLD_=65536 (freed large blocks go back to the
OS, so the peak is the step's own). That setting must not apply to the timings: every allocation above 64 KiB then
maps and faults in fresh pages, which cost the chunked engine's many mid-sized buffers 15-30% more than one SDPA call.
"""

import json
import os
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llama_ctx
from llama_ctx.compat import cache_kwargs, output_cache
from llama_ctx.attention.engine import rotate
from llama_ctx.rope.module import cos_sin

sys.path.insert(0, os.path.dirname(__file__))
from _util import peak_rss_growth  # noqa: E402

TRAINED = 2048
clock = time.perf_counter  # `--cpu-time`: time.process_time
METHODS = {
    "rerope": dict(window=512),
    "leaky-rerope": dict(window=512, factor=16.0),
    "self-extend": dict(group_size=16, window=512),  # covers (2048 - 512) * 16 + 512 = 25088 positions
    "lambda": dict(global_tokens=10),
    "dca": dict(chunk_size=1536, local_window=128),  # the paper's defaults: 3T/4 and T/16
}


def model_for_bench():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=688, vocab_size=512, max_position_embeddings=TRAINED)
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "sdpa"
    return model


def best_time(fn, runs=2):
    fn()
    times = []
    for _ in range(runs):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def side_by_side(fns, rounds=3):
    """Best time of each function, runs interleaved so that load changes on a shared machine hit all alike."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], best_time(fn, runs=1))
    return best


def peak_bytes(what: str, length: int) -> int:
    """Peak RSS growth of one layer's attention step, in a fresh child process (see the module docstring): `what` is
    "stock", a method of METHODS, or "naive:<method>" (the two-score-map reference at that method's window)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, "--peak", what, str(length)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def peak_child(what: str, length: int) -> None:
    model = model_for_bench()
    hidden, pos = torch.randn(1, length, 256), torch.arange(length)[None]
    if what.startswith("naive:"):
        window = METHODS[what.removeprefix("naive:")]["window"]
        fn = lambda: naive_rerope_attention(model.model.layers[0].self_attn, hidden, window)  # noqa: E731
    else:
        if what != "stock":
            llama_ctx.patch(model, what, **METHODS[what])
        fn = lambda: layer_step(model, hidden, pos)  # noqa: E731
    fn()  # warm-up: lazily built state (the flash check, rotary tables) is not the step's peak
    print(json.dumps({"peak": peak_rss_growth(fn)}))


@torch.no_grad()
def naive_rerope_attention(attn, hidden, window):
    """bojone's reference layout: two full L x L score maps (inner RoPE, outer truncated), merged by a mask."""
    B, L, _ = hidden.shape
    q = attn.q_proj(hidden).view(B, L, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(hidden).view(B, L, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(hidden).view(B, L, -1, attn.head_dim).transpose(1, 2)
    pos = torch.arange(L, dtype=torch.float32)[None]
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, attn.head_dim, 2).float() / attn.head_dim)
    q1, k1 = rotate(q, *cos_sin(inv_freq, 1.0, pos, q)), rotate(k, *cos_sin(inv_freq, 1.0, pos, k))
    q2 = rotate(q, *cos_sin(inv_freq, 1.0, torch.full_like(pos, window), q))
    s1 = q1 @ k1.transpose(-1, -2)
    s2 = q2 @ k.transpose(-1, -2)
    rel = pos[0, :, None] - pos[0, None, :]
    s = torch.where(rel < window, s1, s2) * attn.scaling
    s = s.masked_fill(rel < 0, float("-inf"))
    return attn.o_proj((s.softmax(-1) @ v).transpose(1, 2).reshape(B, L, -1))


@torch.no_grad()
def layer_step(model, hidden, position_ids):
    attn = model.model.layers[0].self_attn
    cos_sin_ = model.model.rotary_emb(hidden, position_ids)
    return attn(hidden, position_embeddings=cos_sin_, attention_mask=None, position_ids=position_ids)


@torch.no_grad()
def forward_section(method, length=8192):
    model, stock_model = model_for_bench(), model_for_bench()
    x = torch.randint(0, 512, (1, length))
    llama_ctx.patch(model, method, **METHODS[method])
    stock, ours = side_by_side([lambda: stock_model(x), lambda: model(x)], rounds=4)
    print(f"{method:13s} forward {length // 1024}K: {ours:6.2f}s vs stock SDPA {stock:6.2f}s -> {ours / stock:.2f}x")
    mine, sdpa = peak_bytes(method, length), peak_bytes("stock", length)
    if method in ("rerope", "leaky-rerope", "self-extend"):
        naive = peak_bytes(f"naive:{method}", length)
        print(f"{method:13s} attention-step peak memory {length // 1024}K: {mine / 2**20:7.1f} MiB vs naive "
              f"two-score {naive / 2**20:7.1f} MiB -> {mine / naive:.3f}x  (stock SDPA {sdpa / 2**20:.1f} MiB)")


@torch.no_grad()
def decode_section(method, context=16384, steps=8):
    model, stock_model = model_for_bench(), model_for_bench()
    llama_ctx.patch(model, method, **METHODS[method])
    x = torch.randint(0, 512, (1, context))

    def decoder(model):
        out = model(x, use_cache=True)
        cache, first = output_cache(out), out.logits[:, -1:].argmax(-1)

        def decode():
            token = first
            for i in range(steps):
                pos = torch.tensor([[context + i]])
                token = model(token, **cache_kwargs(cache), position_ids=pos, use_cache=True).logits.argmax(-1)
            cache.crop(-steps)  # the next repetition decodes the same steps again
        return decode

    stock, ours = (t / steps for t in side_by_side([decoder(stock_model), decoder(model)], rounds=3))
    print(f"{method:13s} decode at {context // 1024}K context: {ours * 1e3:6.1f} ms/token vs stock "
          f"{stock * 1e3:6.1f} ms/token -> {ours / stock:.2f}x")


@torch.no_grad()
def lambda_memory_section(lengths=(8192, 16384, 32768)):
    model = model_for_bench()
    llama_ctx.patch(model, "lambda", **METHODS["lambda"])
    peaks = []
    for n in lengths:
        hidden = torch.randn(1, n, 256)
        peaks.append(peak_bytes("lambda", n))
        t = best_time(lambda: layer_step(model, hidden, torch.arange(n)[None]), runs=1)
        print(f"lambda        attention-step peak memory at {n // 1024:2d}K: {peaks[-1] / 2**20:7.1f} MiB "
              f"(x{peaks[-1] / peaks[0]:.2f} of 8K; length x{n // lengths[0]}), {t:.2f}s")


@torch.no_grad()
def dca_section(lengths=(8192, 16384, 32768)):
    """DCA beside stock SDPA and ReRoPE: whole-model forward time and one layer's attention-step peak memory."""
    models = {"stock": model_for_bench(), "rerope": model_for_bench(), "dca": model_for_bench()}
    for name in ("rerope", "dca"):
        llama_ctx.patch(models[name], name, **METHODS[name])
    for n in lengths:
        x = torch.randint(0, 512, (1, n))
        rounds = 2 if n <= 8192 else 1
        times = dict(zip(models, side_by_side([lambda m=m: m(x) for m in models.values()], rounds=rounds)))
        peaks = {name: peak_bytes(name, n) / 2**20 for name in models}
        print(f"dca           forward {n // 1024:2d}K: stock SDPA {times['stock']:6.2f}s, rerope "
              f"{times['rerope'] / times['stock']:.2f}x, dca {times['dca'] / times['stock']:.2f}x | attention-step "
              f"peak memory: stock {peaks['stock']:6.1f} MiB, rerope {peaks['rerope']:6.1f} MiB, dca "
              f"{peaks['dca']:6.1f} MiB")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    args = sys.argv[1:]
    if args[:1] == ["--peak"]:
        peak_child(args[1], int(args[2]))
        sys.exit()
    if "--cpu-time" in args:  # CPU time of this process (all threads): less sensitive to other jobs than wall time
        args.remove("--cpu-time")
        clock = time.process_time
    for m in args or list(METHODS):
        if m == "lambda":
            lambda_memory_section()
            continue
        if m == "dca":
            dca_section()
            decode_section(m)
            continue
        forward_section(m)
        if m != "leaky-rerope":
            decode_section(m)
