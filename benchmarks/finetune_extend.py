"""Extending a trained tiny LLaMA 4x with PI + LoRA (+ embeddings, norms), with S2-attn and with full attention.

    python benchmarks/finetune_extend.py            # trains the base once (cached), fine-tunes twice, evaluates
    python benchmarks/finetune_extend.py --quick    # smoke run (few steps; numbers meaningless)

The base model is `benchmarks/extrapolation.py`'s byte-level LLaMA (4 layers, hidden 128, CPython's standard
library sources; its `train` and `corpus` are reused), here trained at a 64-byte window with the byte tokenizer's
end-of-text id in its vocabulary, and cached in benchmarks/results/. It is then fine-tuned to 256 bytes (4x) through
`llama_ctx.train.run`, exactly as scripts/finetune.py would (PI factor 4, LoRA r=8 on q/k/v/o, embed_tokens + norms
trained), once with S2-attn (groups of 64 = the original window) and once with full attention, on the same data
and steps. Perplexity per byte on held-out files at 64 (in-window) and 256 for: the base model, PI without
fine-tuning, PI + fine-tune (S2), PI + fine-tune (full). Writes benchmarks/results/finetune_extend.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import extrapolation  # noqa: E402

RESULTS = HERE / "results"
WINDOW, FACTOR = 64, 4
CONFIG = {**extrapolation.CONFIG, "vocab_size": 264, "max_position_embeddings": WINDOW, "bos_token_id": 256,
          "eos_token_id": 256, "pad_token_id": 256}


def base_model(steps: int, batch: int, path: Path) -> Path:
    """The trained base (cached): extrapolation.train at a 64-byte window, saved with the byte tokenizer."""
    from llama_ctx.train.builtin import byte_tokenizer

    if not (path / "config.json").exists():
        extrapolation.train(steps, batch, path, config=CONFIG, window=WINDOW)
        byte_tokenizer().save_pretrained(path)
    return path


def training_corpus(path: Path) -> Path:
    """The training split of extrapolation.corpus() as a jsonl of documents (one stdlib file each)."""
    import sysconfig

    if not path.exists():
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        files = files[:int(len(files) * 0.9)]  # the same split as extrapolation.corpus()
        path.write_text("".join(json.dumps({"text": f.read_text(encoding="utf-8", errors="replace")}) + "\n"
                                for f in files))
    return path


def finetune(base: Path, data: Path, out: Path, s2: bool, steps: int) -> float:
    from llama_ctx.train import run

    cfg = {"model": {"path": str(base)},
           "context": {"method": "pi", "params": {"factor": FACTOR}, "seq_len": WINDOW * FACTOR},
           "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                    "trainable": ["embed_tokens", "norm"]},
           "s2_attn": {"enabled": s2, "group_size_ratio": 1 / FACTOR},
           "data": {"sources": [{"path": str(data), "domain": "code", "weight": 1.0}], "seed": 0},
           "training": {"output_dir": str(out), "learning_rate": 2e-3, "lr_scheduler_type": "constant_with_warmup",
                        "warmup_steps": 10, "max_steps": steps, "per_device_train_batch_size": 4, "seed": 0,
                        "logging_steps": 10, "save_strategy": "no", "use_cpu": True, "disable_tqdm": True,
                        "resume_from_checkpoint": "auto"}}
    if (out / "adapter_config.json").exists():
        return json.loads((out / "summary.json").read_text())["seconds_this_run"]
    return run(cfg).seconds


def evaluate(model, tokens) -> dict[int, float]:
    from llama_ctx.eval import perplexity

    model.eval()
    res = perplexity(model, tokens, [WINDOW, WINDOW * FACTOR])
    return {n: res.ppl[n] for n in res.ppl}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-steps", type=int, default=600)
    ap.add_argument("--base-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps (batch 4 x 256 bytes)")
    ap.add_argument("--eval-bytes", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.base_steps, args.steps, args.eval_bytes = 20, 4, 5_000
    import llama_ctx
    from llama_ctx.train.model import load_adapter

    tag = "quick" if args.quick else f"{args.base_steps}x{args.base_batch}"
    RESULTS.mkdir(exist_ok=True)
    base = base_model(args.base_steps, args.base_batch, RESULTS / f"tiny-llama-{WINDOW}-{tag}")
    data = training_corpus(RESULTS / "tiny-llama-stdlib-train.jsonl")
    _, heldout = extrapolation.corpus()
    tokens = heldout[:args.eval_bytes]
    rows, seconds = {}, {}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    rows["base (no method)"] = evaluate(model, tokens)
    with llama_ctx.patched(model, "pi", factor=FACTOR):
        rows["PI x4, no fine-tuning"] = evaluate(model, tokens)
    for s2, label in ((True, "PI x4 + fine-tune, S2-attn"), (False, "PI x4 + fine-tune, full attention")):
        out = RESULTS / f"tiny-llama-{WINDOW}-{tag}-ft-{'s2' if s2 else 'full'}-{args.steps}"
        t = time.perf_counter()
        seconds[label] = finetune(base, data, out, s2, args.steps)
        tuned, _ = load_adapter(base, out)
        rows[label] = evaluate(tuned, tokens)
        print(f"{label}: {rows[label]} ({time.perf_counter() - t:.0f} s)", flush=True)
    in_window = rows["base (no method)"][WINDOW]
    table = {k: {**{str(n): v for n, v in r.items()}, "ratio_4x_to_base_in_window": r[WINDOW * FACTOR] / in_window}
             for k, r in rows.items()}
    s2, full = rows["PI x4 + fine-tune, S2-attn"], rows["PI x4 + fine-tune, full attention"]
    summary = {"window": WINDOW, "factor": FACTOR, "base_steps": args.base_steps, "finetune_steps": args.steps,
               "eval_bytes": len(tokens), "perplexity": table, "finetune_seconds": seconds,
               "s2_over_full_at_4x": s2[WINDOW * FACTOR] / full[WINDOW * FACTOR]}
    (RESULTS / "finetune_extend.json").write_text(json.dumps(summary, indent=1))
    print(f"\n| model | ppl at {WINDOW} | ppl at {WINDOW * FACTOR} | {WINDOW * FACTOR} / base in-window |")
    print("|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r[WINDOW]:.3f} | {r[WINDOW * FACTOR]:.3f} | {r[WINDOW * FACTOR] / in_window:.3f}x |")
    print(f"\nS2 / full at {WINDOW * FACTOR}: {summary['s2_over_full_at_4x']:.4f}")
    plot(rows, RESULTS / "finetune_extend.png")


def plot(rows, path):
    from llama_ctx.eval.results import new_figure, save_figure

    fig, ax = new_figure()
    xs = [WINDOW, WINDOW * FACTOR]
    for label, r in rows.items():
        ax.plot(xs, [r[n] for n in xs], "o-", label=label)
    ax.axvline(WINDOW, color="grey", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length (bytes); dashed: the base model's trained window")
    ax.set_ylabel("perplexity per byte")
    ax.legend(fontsize=8)
    ax.set_title("4x context extension: PI + LoRA (+ embed, norm), S2-attn vs full attention")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
