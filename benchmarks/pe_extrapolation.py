"""Positional-encoding extrapolation study: one tiny LLaMA trained from scratch per encoding, evaluated at 1x-8x.

    nice python benchmarks/pe_extrapolation.py              # trains what is not cached, evaluates, writes results
    python benchmarks/pe_extrapolation.py --steps 20 --eval-tokens 4096 --out /tmp/pe   # smoke run

The ALiBi paper's comparison (Press et al. 2022, fig. 1) at toy scale on CPU: the SAME LlamaForCausalLM (same
seed, same initial weights, same batches, same optimizer and schedule) is trained at a WINDOW-token window with
each encoding: "rope" is the stock model; every other one is `llama_ctx.patch(model, name)` applied BEFORE
training, so the tables it adds (learned-absolute, t5-bias, recursive) are trained with the rest. Each model is
then scored with `llama_ctx.eval.perplexity` (disjoint windows) at 1x, 2x, 4x and 8x the window on held-out text,
and the project's extension methods are applied, without any training, to the rope model at the same lengths.

Data: `llama_ctx.eval.text.builtin_long_text()` (Python's reference-manual topics, English, offline), UTF-8
bytes as tokens (vocabulary 256: no tokenizer, no download); the first 90% trains, the last 10% is held out.
Checkpoints are cached in benchmarks/results/pe-extrapolation-ckpt/ (keyed by the training settings), so a
re-run only trains the encodings that are missing, e.g. once a method gets registered. Writes
benchmarks/results/pe_extrapolation.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llama_ctx
from llama_ctx.eval import perplexity
from llama_ctx.eval.results import new_figure, save_figure, write_atomic

sys.path.insert(0, str(Path(__file__).parent))
from _util import train_slices  # noqa: E402
from llama_ctx.eval.text import builtin_long_text

HERE = Path(__file__).parent
RESULTS = HERE / "results"
WINDOW = 64
MULTIPLES = (1, 2, 4, 8)

CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=WINDOW, tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})

# The encodings, all by name: a rerun trains the ones registered since. "rope" = the stock model.
ENCODINGS = ("rope", "nope", "sinusoidal", "learned-absolute", "alibi", "t5-bias", "multiplicative", "recursive")
# Parameters an encoding needs for the study; learned tables must cover the longest evaluated length.
ENCODING_PARAMS = {"learned-absolute": dict(max_positions=WINDOW * MULTIPLES[-1])}
# Extra rows: the additive tables at the default scale 1.0 are +-1 next to token embeddings initialised with
# std 0.02 (`initializer_range`), so they also run at the embeddings' own scale; likewise recursive's positions.
VARIANTS = {
    "sinusoidal:scale=0.02": ("sinusoidal", dict(scale=0.02)),
    "learned-absolute:scale=0.02": ("learned-absolute", dict(max_positions=WINDOW * MULTIPLES[-1], scale=0.02)),
    # at the default step 0.01 the unrolled positions start ~16x the embeddings' norm by position 63 (measured);
    # this variant trained no better (see benchmarks/README.md)
    "recursive:step=0.0005": ("recursive", dict(step=0.0005)),
}
STUDY = {**{e: (e, ENCODING_PARAMS.get(e, {})) for e in ENCODINGS}, **VARIANTS}  # label -> (method, params)

# Extension methods applied to the trained rope model, each set for the largest evaluated length (8x); dynamic NTK
# grows with the input by itself, so its usual factor 2.
EXTENSIONS = {
    "pi:factor=8": ("pi", dict(factor=8)),
    "ntk:factor=8": ("ntk", dict(factor=8)),
    "dynamic-ntk:factor=2": ("dynamic-ntk", dict(factor=2)),
    "yarn:factor=8": ("yarn", dict(factor=8)),
    "rerope:window=32": ("rerope", dict(window=32)),
    # coverage window + (T - window) * group_size = 32 + 32 * 16 = 544 >= 8 * 64
    "self-extend:group_size=16,window=32": ("self-extend", dict(group_size=16, window=32)),
    "dca": ("dca", dict()),  # chunk 3T/4 = 48, local window T/16 = 4
    "streaming:window=59": ("streaming", dict(window=59, sink_tokens=4)),  # 4 + 59 + 1 = 64 keys
}


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 byte ids of the built-in text: (first 90% for training, last 10% held out)."""
    data = torch.frombuffer(bytearray(builtin_long_text().encode("utf-8")), dtype=torch.uint8).long()
    cut = int(len(data) * 0.9)
    return data[:cut], data[cut:]


def settings(label: str, args) -> dict:
    """Everything a checkpoint depends on; a cached one is reused only if these match."""
    return dict(method=STUDY[label], config=CONFIG, window=WINDOW, steps=args.steps, batch=args.batch, lr=args.lr,
                seed=args.seed, torch=str(torch.__version__))


def build(label: str, seed: int) -> LlamaForCausalLM:
    """The stock tiny model (same weights for every encoding: same seed), patched as `label` says unless rope."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    model.config._attn_implementation = "sdpa"
    name, params = STUDY[label]
    if name != "rope":
        torch.manual_seed(seed + 1)  # the encoding's own parameters, if any: seeded too
        llama_ctx.patch(model, name, **params)
    return model


def train(model, data: torch.Tensor, args) -> tuple[float, float]:
    """AdamW + one-cycle schedule on random WINDOW-byte slices, identical batches for every encoding.
    Returns (final training loss averaged over the last 10% of steps, CPU seconds)."""
    gen = torch.Generator().manual_seed(args.seed)
    cpu0 = time.process_time()
    losses = train_slices(model, data, args.steps, args.batch, WINDOW, args.lr, high=len(data) - WINDOW, generator=gen,
                          indent="  ")
    tail = losses[-max(1, args.steps // 10):]
    model.eval()
    return sum(tail) / len(tail), time.process_time() - cpu0


def trained(label: str, data, args, ckpt_dir: Path) -> tuple[LlamaForCausalLM, dict]:
    """The model trained as `label` says, from the cache when its settings match, else trained and cached."""
    path = ckpt_dir / f"{label.replace(':', '-').replace('=', '')}.pt"
    model = build(label, args.seed)
    if path.exists() and not args.retrain:
        saved = torch.load(path, weights_only=True)
        if saved["settings"] == json.loads(json.dumps(settings(label, args))):  # JSON: tuples read back as lists
            model.load_state_dict(saved["state"])  # strict: the patch's own tables are in the state dict too
            return model.eval(), saved["info"]
    print(f"training {label}", flush=True)
    loss, cpu = train(model, data, args)
    info = dict(train_loss=loss, train_cpu_s=cpu, params=sum(p.numel() for p in model.parameters()))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.save(dict(settings=json.loads(json.dumps(settings(label, args))), state=model.state_dict(), info=info), path)
    return model, info


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-tokens", type=int, default=16_384, help="held-out bytes scored at each length")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 was fastest per CPU second on 2 shared cores)")
    ap.add_argument("--retrain", action="store_true", help="ignore cached checkpoints")
    ap.add_argument("--out", default=str(RESULTS), help="folder for the results and the checkpoint cache")
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(args.threads)
    wall0, cpu0 = time.time(), time.process_time()
    train_data, heldout = corpus()
    tokens = heldout[:args.eval_tokens]
    lengths = [WINDOW * m for m in MULTIPLES]
    registered = {r["name"] for r in llama_ctx.methods()}
    rows, missing = {}, []

    def evaluate(label, model, kind, info=None):
        cpu = time.process_time()
        try:
            res = perplexity(model, tokens, lengths)
            ppl = {n: res.ppl[n] for n in lengths}
        except llama_ctx.LlamaCtxError as e:  # e.g. a method that refuses some length: recorded, not hidden
            print(f"{label}: {e}")
            ppl, info = {n: None for n in lengths}, {**(info or {}), "error": str(e)}
        rows[label] = dict(kind=kind, ppl={str(n): v for n, v in ppl.items()}, **(info or {}),
                           eval_cpu_s=time.process_time() - cpu)
        print(f"{label:<38}" + "".join(f"{v if v is not None else float('nan'):>9.2f}" for v in ppl.values()),
              flush=True)

    rope_model = None
    for label, (name, _) in STUDY.items():
        if name != "rope" and name not in registered:
            print(f"skip {label}: {name!r} is not registered in this checkout")
            missing.append(label)
            continue
        model, info = trained(label, train_data, args, out / "pe-extrapolation-ckpt")
        evaluate(label, model, "encoding", info)
        if name == "rope":
            rope_model = model
    for label, (name, params) in EXTENSIONS.items():
        if name not in registered:
            missing.append(label)
            continue
        llama_ctx.patch(rope_model, name, **params)
        try:
            evaluate(f"rope + {label}", rope_model, "extension")
        finally:
            llama_ctx.unpatch(rope_model)
    # what the whole study costs from scratch: every training (cached ones included) and every evaluation
    study_cpu = sum(r.get("train_cpu_s", 0) + r["eval_cpu_s"] for r in rows.values())
    report = dict(window=WINDOW, lengths=lengths, eval_tokens=len(tokens), config=CONFIG, steps=args.steps,
                  batch=args.batch, lr=args.lr, seed=args.seed, missing=missing, rows=rows,
                  study_cpu_s=study_cpu, threads=args.threads, run_wall_s=time.time() - wall0,
                  run_cpu_s=time.process_time() - cpu0)
    write_atomic(out / "pe_extrapolation.json", json.dumps(report, indent=1) + "\n")
    write_atomic(out / "pe_extrapolation.md", table(report))
    plot(report, out / "pe_extrapolation.png")
    print("\n" + table(report))
    print(f"wrote {out / 'pe_extrapolation.json'}, .md, .png; this run: {report['run_wall_s']:.0f} s wall, "
          f"{report['run_cpu_s']:.0f} s CPU (cached checkpoints are not retrained); the whole study from scratch: "
          f"{study_cpu:.0f} CPU s")


def table(report: dict) -> str:
    lengths = report["lengths"]
    head = "| model | " + " | ".join(f"{n // report['window']}x ({n})" for n in lengths) + \
        f" | {lengths[-1] // lengths[0]}x / 1x | train loss | train CPU s |"
    lines = [head, "|---|" + "---:|" * (len(lengths) + 3)]
    for label, r in report["rows"].items():
        ppl = [r["ppl"][str(n)] for n in lengths]
        cells = ["-" if v is None else f"{v:.2f}" for v in ppl]
        cells.append("-" if None in (ppl[0], ppl[-1]) else f"{ppl[-1] / ppl[0]:.2f}x")
        extra = [f"{r['train_loss']:.3f}", f"{r['train_cpu_s']:.0f}"] if "train_loss" in r else ["", ""]
        lines.append(f"| `{label}` | " + " | ".join(cells + extra) + " |")
    lines.append(f"\nPerplexity per byte on {report['eval_tokens']} held-out bytes per length; train loss: mean of the "
                 f"last 10% of steps. Training {report['steps']} steps x {report['batch']} x {report['window']} bytes per model; the whole "
                 f"study from scratch: {report['study_cpu_s'] / 60:.1f} CPU minutes ({report['threads']} thread).")
    if report["missing"]:
        lines.append(f"\nNot registered in this checkout (not run): {', '.join(report['missing'])}.")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Perplexity against evaluation length, one line per encoding (solid) and per extension of rope (dashed)."""
    fig, ax = new_figure(figsize=(11, 5.5))
    lengths = report["lengths"]
    import matplotlib

    colors = matplotlib.colormaps["tab20"].colors  # 20 distinct colours: every line its own
    for i, (label, r) in enumerate(report["rows"].items()):
        xs = [n for n in lengths if r["ppl"][str(n)] is not None]
        style = "o-" if r["kind"] == "encoding" else "s--"
        ax.plot(xs, [r["ppl"][str(n)] for n in xs], style, label=label, lw=2 if r["kind"] == "encoding" else 1, ms=4,
                color=colors[(2 * i + i // 10) % 20])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.axvline(report["window"], color="k", ls=":", lw=1)
    ax.set_xlabel(f"evaluation length (bytes); dotted: training window ({report['window']})")
    ax.set_ylabel("perplexity per byte (held-out text)")
    ax.set_title(f"Tiny LLaMA trained from scratch at {report['window']} tokens, per positional encoding")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: 19 lines
    save_figure(fig, path)


if __name__ == "__main__":
    main()
