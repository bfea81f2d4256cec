"""S2-attn training step against full causal attention, side by side.

    nice python benchmarks/s2attn.py                     # 8K tokens, about 5 minutes on 2 CPU cores
    nice python benchmarks/s2attn.py --length 4096 --packed

A small random LLaMA (hidden 256, 4 layers, 8 heads of 32, vocab 1024), float32, CPU, sdpa, train mode,
use_cache=False. One step is forward + loss + backward on one sequence. Time: one model object, patched with
"s2-attn" and unpatched in turn around each timed step, best of `--repeats`, interleaved. Memory: the
peak of the bytes torch's allocator holds during one step (torch profiler memory events); the bytes autograd saves
for backward over one forward (deterministic); and the growth of the peak resident set (Linux VmHWM, reset through
/proc/self/clear_refs) over one step after a warm-up step, each variant in a fresh subprocess, which also counts
kernel buffers and glibc's fragmentation. Also timed: one attention layer alone, forward + backward.
`--packed` feeds documents of 300-2000 tokens (position_ids restarting per document): the stock path then gets an
L x L mask from transformers, S2-attn a G x G mask per group.
"""

import argparse
import json
import os
import subprocess
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
import llama_ctx  # noqa: E402
from _util import best_times, peak_rss_growth  # noqa: E402


def model_for_bench(length):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=1024, max_position_embeddings=length)
    model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    return model.train()


def batch(length, packed):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 1024, (1, length), generator=g)
    if not packed:
        return dict(input_ids=x, labels=x)
    pos, n = [], 0
    while n < length:
        doc = min(int(torch.randint(300, 2000, (), generator=g)), length - n)
        pos += range(doc)
        n += doc
    return dict(input_ids=x, labels=x, position_ids=torch.tensor([pos]))


def step(model, inputs):
    model.zero_grad(set_to_none=True)
    model(**inputs, use_cache=False).loss.backward()


def child(args):
    """One variant in this fresh process: warm-up step, then the peak RSS growth of one step (printed as JSON)."""
    model, inputs = model_for_bench(args.length), batch(args.length, args.packed)
    if args.child == "s2":
        llama_ctx.patch(model, "s2-attn", group_size_ratio=args.ratio)
    step(model, inputs)
    model.zero_grad(set_to_none=True)
    print(json.dumps({"peak": peak_rss_growth(lambda: step(model, inputs))}))


def saved_bytes(model, inputs):
    """Bytes of the distinct storages autograd keeps for backward over one forward (deterministic, unlike RSS)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs, use_cache=False).loss
    del loss
    return sum(seen.values())


def allocator_peak(fn):
    """Peak of the bytes held by torch's allocator while `fn` runs (torch profiler memory events)."""
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = top = 0
    for e in events:
        held += e.nbytes()
        top = max(top, held)
    return top


def attention_layer(model, length):
    """Forward + backward of the first attention module alone, on random hidden states."""
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, length, model.config.hidden_size, requires_grad=True)
    pos = torch.arange(length)[None]
    pe = model.model.rotary_emb(x, pos)
    return lambda: attn(x, position_embeddings=pe, attention_mask=None, position_ids=pos)[0].sum().backward()


def peak(variant, args):
    cmd = [sys.executable, __file__, "--child", variant, "--length", str(args.length), "--ratio", str(args.ratio)]
    out = subprocess.run(cmd + (["--packed"] if args.packed else []), check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--ratio", type=float, default=0.25, help="group_size_ratio")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--packed", action="store_true", help="documents packed by position_ids")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--child", choices=["full", "s2"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, inputs = model_for_bench(args.length), batch(args.length, args.packed)

    def s2():
        with llama_ctx.patched(model, "s2-attn", group_size_ratio=args.ratio):
            step(model, inputs)

    t = best_times({"full": lambda: step(model, inputs), "s2": s2}, repeats=args.repeats, warmup=1)
    what = f"{args.length} tokens{', packed documents' if args.packed else ''}, group_size_ratio={args.ratio:g}"
    print(f"training step (forward + backward), {what}")
    print(f"  full attention {t['full']:.2f} s   s2-attn {t['s2']:.2f} s   "
          f"s2/full time {t['s2'] / t['full']:.2f}x  ({t['full'] / t['s2']:.2f}x faster)")
    layer = attention_layer(model, args.length)

    def s2_layer():
        with llama_ctx.patched(model, "s2-attn", group_size_ratio=args.ratio):
            layer()

    t = best_times({"full": layer, "s2": s2_layer}, repeats=3, warmup=1)
    print(f"  one attention layer alone (one document): s2/full time {t['s2'] / t['full']:.2f}x  "
          f"({t['full'] / t['s2']:.2f}x faster)")
    if not args.no_memory:
        full = allocator_peak(lambda: step(model, inputs))
        with llama_ctx.patched(model, "s2-attn", group_size_ratio=args.ratio):
            s2_peak = allocator_peak(lambda: step(model, inputs))
        print(f"  torch allocator peak: full {full / 2**20:.0f} MiB   s2-attn {s2_peak / 2**20:.0f} MiB   "
              f"s2/full {s2_peak / full:.2f}x")
        full = saved_bytes(model, inputs)
        with llama_ctx.patched(model, "s2-attn", group_size_ratio=args.ratio):
            s2_saved = saved_bytes(model, inputs)
        print(f"  saved for backward: full {full / 2**20:.0f} MiB   s2-attn {s2_saved / 2**20:.0f} MiB   "
              f"s2/full {s2_saved / full:.2f}x")
        full, s2_peak = peak("full", args), peak("s2", args)
        print(f"  peak RSS growth (fresh processes): full {full / 2**20:.0f} MiB   s2-attn {s2_peak / 2**20:.0f} MiB   "
              f"s2/full {s2_peak / full:.2f}x")


if __name__ == "__main__":
    main()
