"""Measured peak memory of one training step on CPU, next to `llama-ctx plan`'s estimate of the same step.

    python benchmarks/plan_check.py [--seq-len 2048] [--batch 2] [--checkpointing] [--no-s2] [--eager]

Runs the tiny random LLaMA through `llama_ctx.train.run` (3 steps) and measures the second step: before it,
freed memory is returned to the OS (`malloc_trim`) and the kernel's peak-RSS counter is reset (`/proc/self/clear_refs`
with 5); after it, the peak RSS (`VmHWM`) minus the RSS before is what the step needed on top of what was already
resident (weights, optimizer states). glibc serves allocations above `MALLOC_MMAP_THRESHOLD_` with their own mappings
and unmaps them on free, so RSS follows the live tensors; the script re-executes itself with a 64 KiB threshold.
The estimate compared is the plan's step-dependent terms (`llama_ctx.train.plan.step_terms`): saved activations,
the larger of the loss chunk and a layer's backward, the packed-row mask and S2-attn's window masks. The corpus is
Python's documentation cut into 500-character documents, so every row packs several (the masks exist), or with
--one-document left whole (rows without boundaries: no masks).
Linux only. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

THRESHOLD = "65536"


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(seq_len: int, batch: int, checkpointing: bool, s2: bool, eager: bool, packed: bool = True) -> dict:
    from transformers import TrainerCallback

    from llama_ctx.train import run
    from llama_ctx.train.builtin import tiny_random
    from llama_ctx.train.checks import model_config
    from llama_ctx.train.config import validate
    from llama_ctx.train.plan import GiB, plan, setup_from_config

    libc = ctypes.CDLL("libc.so.6")
    result = {}

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                gc.collect()
                libc.malloc_trim(0)
                result["before_kib"] = _rss_kib("VmRSS")
                Path("/proc/self/clear_refs").write_text("5")

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                result["peak_kib"] = _rss_kib("VmHWM")

    tmp = Path(tempfile.mkdtemp())
    out = tmp / "run"
    # documents of 500 characters: every row packs several (masks built); or one long document (no masks)
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    docs = [text[i:i + 500] for i in range(0, len(text), 500)] if packed else [text]
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = {"model": {"path": "tiny-random", "attn_implementation": "eager" if eager else "sdpa"},
           "context": {"method": "pi", "params": {"factor": seq_len / 64}, "seq_len": seq_len},
           "s2_attn": {"enabled": s2, "group_size_ratio": 0.25},
           "data": {"sources": [{"path": str(tmp / "docs.jsonl"), "domain": "docs", "weight": 1.0}]},
           "training": {"output_dir": str(out), "max_steps": 3, "per_device_train_batch_size": batch,
                        "save_strategy": "no", "use_cpu": True, "disable_tqdm": True, "logging_steps": 1,
                        "gradient_checkpointing": checkpointing}}
    run(cfg, callbacks=[Probe()])
    config = validate(cfg)
    setup = setup_from_config(config, model_config(str(tiny_random()), None))
    setup.packed = packed
    p = plan(setup, gpus=1)
    from llama_ctx.train.plan import step_terms
    step_terms = step_terms(p.setup)
    estimate = sum(step_terms.values())
    measured = (result["peak_kib"] - result["before_kib"]) * 1024
    return dict(seq_len=seq_len, batch=batch, checkpointing=checkpointing, s2=s2, eager=eager, packed=packed,
                resident_before_mib=result["before_kib"] / 1024,
                measured_mib=measured / 2**20, estimate_mib=estimate / 2**20, ratio=estimate / measured,
                terms_mib={k: v / 2**20 for k, v in step_terms.items()}, total_plan_gib=p.total("ddp") / GiB)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--no-s2", action="store_true")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--one-document", action="store_true", help="rows cut from one long document (no masks)")
    args = ap.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != THRESHOLD:  # must be set before the process starts
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": THRESHOLD}
        os.execve(sys.executable, [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env)
    res = measure(args.seq_len, args.batch, args.checkpointing, not args.no_s2, args.eager, not args.one_document)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
