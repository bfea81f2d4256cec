"""Shared helpers for the benchmark scripts: a small random LLaMA, interleaved best-of-N timing, the tiny training
loop of the extrapolation studies and peak-RSS measurement."""

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


def train_slices(model, data: torch.Tensor, steps: int, batch: int, window: int, lr: float, high: int,
                 generator: torch.Generator | None = None, indent: str = "") -> list[float]:
    """AdamW (weight decay 0.1, betas 0.9 / 0.95) with a one-cycle schedule on `batch` random `window`-token slices of
    `data` per step, starting below `high` (drawn from `generator`, or torch's global generator); returns the losses.
    The extrapolation studies' checkpoints were trained by exactly this loop: the same draws give the same model."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.05, 2 / steps))
    model.train()
    cpu0, losses = time.process_time(), []
    for step in range(steps):
        starts = torch.randint(0, high, (batch,), generator=generator)
        x = torch.stack([data[s:s + window] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"{indent}step {step:5d}  loss {losses[-1]:.3f}  cpu {time.process_time() - cpu0:6.1f}s", flush=True)
    return losses
