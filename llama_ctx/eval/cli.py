"""`llama-ctx eval ppl|passkey|needle` and `llama-ctx sweep`.

Several methods are measured in one run on one loaded model (patch, measure, unpatch). Each finished cell
(method x length [x depth]) is stored at once under `--out/<task>/cells/`, so re-running with the same `--out`
skips it; `--out/<task>/run.json` records the settings, and a run whose settings differ is refused instead of
mixing or overwriting results. Summaries (`results.json`, `results.csv`, PNGs) are rebuilt from every stored cell.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ..errors import ConfigError
from ..io import DTYPES
from .needle import NeedleResult, needle
from .passkey import PasskeyResult, passkey, shareable
from .perplexity import PerplexityResult, as_token_ids, check_enough, forward_count, perplexity
from .progress import layer_progress
from .results import line_style, new_figure, save_figure, write_atomic
from .specs import STOCK_WINDOW, MethodSpec, parse_depths, parse_length, parse_lengths, parse_methods, \
    with_window_baseline
from .sweep import SweepResult, candidates, split_buckets

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco? Answer: The best thing to do in San Francisco is"
ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
RESULT_TYPES = {"ppl": PerplexityResult, "passkey": PasskeyResult, "needle": NeedleResult}


def add_parser(sub) -> None:
    """Register `eval` and `sweep` (each only once, so listing this module for both subcommands is fine)."""
    if "eval" not in sub.choices:
        add_eval_parser(sub)
    if "sweep" not in sub.choices:
        add_sweep_parser(sub)


def _common(p) -> None:
    p.add_argument("--model", default=None, help="local HF folder or .gguf file (default: the shipped SmolLM2)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--attn-implementation", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--text", default=None, help="file, folder or dataset name (default: built-in Python docs)")
    p.add_argument("--text-field", default="text", help="column of table files / datasets holding the text")
    p.add_argument("--buckets", type=int, default=None, help="position bucket width (default: trained window / 4)")


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity vs length, passkey or needle for several methods side by side")
    p.add_argument("task", choices=tuple(RESULT_TYPES))
    _common(p)
    p.add_argument("--methods", default="stock", help="e.g. stock,pi:factor=4,yarn:factor=4 ('stock' = no patch; "
                   "'stock@window' = no patch, every token scored with at most the trained window of context)")
    p.add_argument("--no-window-baseline", action="store_true",
                   help="ppl: do not add stock@window beside stock (added by default: the yardstick past the window)")
    p.add_argument("--lengths", required=True, help="e.g. 8k,16k,32k (k = 1024)")
    p.add_argument("--out", required=True, help="results folder; re-running with it skips finished cells")
    p.add_argument("--stride", default=None, help="ppl: tokens between window starts (default: the length)")
    p.add_argument("--windows", type=int, default=1, help="ppl: windows per length (0 = the whole text)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey/needle: relative depths")
    p.add_argument("--trials", type=int, default=3, help="passkey: prompts per cell")
    p.add_argument("--seed", type=int, default=0, help="passkey: key seed")
    p.add_argument("--share-prefix", action="store_true",
                   help="passkey: prefill the common prompt prefix of a cell's trials once (same outputs, 2/3 of the "
                   "prefill at depths 0.1,0.5,0.9) where that is exact; other methods run each prompt whole")
    p.add_argument("--needle", default=NEEDLE)
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--answer", default=ANSWER)
    p.set_defaults(func=run_eval)


def add_sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="rank a small parameter grid per method at a target length")
    _common(p)
    p.add_argument("--target", required=True, help="length to reach, e.g. 32k")
    p.add_argument("--methods", default=None, help="names or specs to sweep (default: every method with a grid)")
    p.add_argument("--out", default="llama-ctx-sweep", help="results folder (resumable)")
    p.set_defaults(func=run_sweep)


class CellStore:
    """`root/run.json` (the settings) and `root/cells/*.json` (one finished cell each)."""

    def __init__(self, root, settings: dict):
        self.root = Path(root)
        settings = json.loads(json.dumps(settings))
        run = self.root / "run.json"
        if run.is_file():
            old = json.loads(run.read_text())
            diff = sorted(k for k in {*old, *settings} if old.get(k) != settings.get(k))
            if diff:
                raise ConfigError(f"{str(self.root)!r} holds results of a run with other settings ({', '.join(diff)} "
                                  "differ); use another --out, or delete that folder to start over")
        elif self.root.exists() and any(self.root.iterdir()):
            raise ConfigError(f"{str(self.root)!r} exists and was not written by llama-ctx; use another --out")
        write_atomic(run, json.dumps(settings, indent=1) + "\n")

    def _path(self, key: str) -> Path:
        slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", key)[:80]
        return self.root / "cells" / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:8]}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        return json.loads(path.read_text())["data"] if path.is_file() else None

    def put(self, key: str, label: str, data: dict) -> None:
        write_atomic(self._path(key), json.dumps(dict(key=key, label=label, data=data)) + "\n")

    def all(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((self.root / "cells").glob("*.json"))]


def load_model(args):
    from ..io import load

    return load(args.model, args.gguf_file, args.dtype, args.attn_implementation, args.device)


def model_settings(args) -> dict:
    return dict(model=str(Path(args.model).resolve()) if args.model else "smollm2", gguf_file=args.gguf_file,
                dtype=args.dtype, attn_implementation=args.attn_implementation)


def load_token_ids(args, tokenizer, needed: int, whole: bool = False):
    """(token ids, text digest) of `--text` (or the built-in text), at least `needed` ids; only the start of the
    text that `needed` tokens can come from is tokenized unless `whole`."""
    from .text import builtin_long_text, load_text

    text = load_text(args.text, args.text_field) if args.text else builtin_long_text(max(needed * 6, 200_000))
    ids = as_token_ids(tokenizer(text if whole else text[:needed * 24])["input_ids"])
    check_enough(len(ids), needed, f"the text ({args.text or 'built-in'})")
    return ids, text_hash(text)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_methods(model, specs: list[MethodSpec]) -> None:
    """Patch and unpatch each method once, so a bad parameter fails before any measurement."""
    for spec in specs:
        spec.max_context(model)  # stock@window: the trained window must be known
        with spec.applied(model):
            pass


def run_eval(args) -> None:
    from tqdm.auto import tqdm

    specs, lengths = parse_methods(args.methods), parse_lengths(args.lengths)
    if args.task != "ppl" and STOCK_WINDOW in [s.name for s in specs]:
        raise ConfigError(f"{STOCK_WINDOW} is a perplexity yardstick (losses scored through windows); {args.task} "
                          f"generates from one prompt, so leave it out of --methods (use 'stock')")
    if args.task == "ppl" and not args.no_window_baseline:
        specs = with_window_baseline(specs)
    depths = parse_depths(args.depths) if args.task != "ppl" else [None]
    stride = parse_length(args.stride) if args.stride else None
    if args.windows < 0:
        raise ConfigError("--windows must be >= 0 (0 = the whole text)")
    model, tokenizer = load_model(args)
    check_methods(model, specs)
    settings = dict(task=args.task, **model_settings(args))
    if args.task == "ppl":
        def used(n):  # tokens read by the windows of length n (None: the whole text)
            return n + (args.windows - 1) * (stride or n) if args.windows else None
        ids, digest = load_token_ids(args, tokenizer, max(used(n) or n for n in lengths), whole=not args.windows)
        settings.update(text=digest, stride=stride, windows=args.windows, buckets=args.buckets)
    elif args.task == "passkey":
        settings.update(trials=args.trials, seed=args.seed)
    else:
        from .text import builtin_long_text, load_text

        haystack = load_text(args.text, args.text_field) if args.text else builtin_long_text(max(max(lengths) * 6, 200_000))
        settings.update(text=text_hash(haystack), needle=args.needle, question=args.question,
                        answer=args.answer)
    store = CellStore(Path(args.out) / args.task, settings)
    cells = [(s, n, d) for s in specs for n in lengths for d in depths]
    key = lambda s, n, d: f"{s.label}|{n}" + ("" if d is None else f"|{d}")  # noqa: E731
    todo = [c for c in cells if store.get(key(*c)) is None]
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=f"eval {args.task}", unit="cell")
    inner = tqdm(unit="layer", leave=False)  # moves within a cell: one step per decoder layer of every forward
    with layer_progress(model, lambda: inner.update(1)) as n_layers:
        for spec in specs:
            mine = [c for c in todo if c[0] is spec]
            if not mine:
                continue
            with spec.applied(model):
                for _, n, d in mine:
                    inner.set_description(key(spec, n, d))
                    if args.task == "ppl":
                        end = used(n)
                        tokens = ids[:end] if end else ids
                        inner.reset(total=n_layers * forward_count(len(tokens), n, stride, spec.max_context(model)))
                        data = perplexity(model, tokens, [n], stride, args.buckets,
                                          max_context=spec.max_context(model)).to_dict()
                    elif args.task == "passkey":
                        inner.reset(total=None)  # generation: as many forwards as tokens generated
                        data = passkey(model, tokenizer, [n], [d], args.trials, args.seed,
                                       share_prefix=args.share_prefix and shareable(model)).cells[0]
                    else:
                        inner.reset(total=None)
                        data = needle(model, tokenizer, haystack, args.needle, args.question, args.answer, [n],
                                      [d]).cells[0]
                    store.put(key(spec, n, d), spec.label, data)
                    bar.update()
    inner.close()
    bar.close()
    results = collect(args.task, store, [s.label for s in specs])
    write_summary(args.task, results, Path(args.out) / args.task)
    print(format_table(args.task, results))
    print(f"results in {Path(args.out) / args.task}")


def collect(task: str, store: CellStore, order=()) -> dict:
    """label -> result object, from every stored cell (this run's and earlier ones'); labels in `order` first, in
    that order (stock, stock@window, the methods as given), then the others sorted."""
    grouped: dict[str, list] = {label: [] for label in order}
    for cell in store.all():
        grouped.setdefault(cell["label"], []).append(cell["data"])
    grouped = {k: v for k, v in grouped.items() if v}
    if task == "ppl":
        return {k: PerplexityResult.merge([PerplexityResult.from_dict(d) for d in v]) for k, v in grouped.items()}
    cls = RESULT_TYPES[task]
    return {k: cls(cells=sorted(v, key=lambda c: (c["length"], c["depth"]))) for k, v in grouped.items()}


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", label)


def write_summary(task: str, results: dict, root: Path) -> None:
    write_atomic(root / "results.json", json.dumps({k: r.to_dict() for k, r in results.items()}, indent=1) + "\n")
    rows = [dict(method=k, **row) for k, r in results.items() for row in r.rows()]
    header = list(dict.fromkeys(k for r in rows for k in r))
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(root / "results.csv", buf.getvalue())
    for label, r in results.items():
        r.plot(root / f"{task}-{_slug(label)}.png", title=f"{task}: {label}")
    fig, ax = new_figure()
    for label, r in results.items():
        if task == "ppl":
            n = max(r.ppl)
            ax.plot([(s + e) / 2 for s, e, _ in r.bucket_loss[n]], [x for _, _, x in r.bucket_loss[n]],
                    label=f"{label} (length {n})", **line_style(label))
            ax.set_ylabel("mean loss (nats / token)")
            ax.set_xlabel("position in window (tokens)")
        else:
            means = mean_by_length(r.cells, "accuracy" if task == "passkey" else "score")
            ax.plot(list(means), list(means.values()), marker="o", label=label)
            ax.set_ylabel("mean over depths")
            ax.set_xlabel("context length (tokens)")
    ax.legend(fontsize=8)
    save_figure(fig, root / f"{task}-compare.png")


def mean_by_length(cells: list[dict], value: str) -> dict[int, float]:
    lengths = sorted({c["length"] for c in cells})
    return {n: sum(c[value] for c in cells if c["length"] == n) / sum(c["length"] == n for c in cells)
            for n in lengths}


def format_table(task: str, results: dict) -> str:
    """Methods as rows, lengths as columns (ppl, or the mean accuracy / score over depths); for ppl also the mean
    loss per position bucket at the longest length."""
    width = max(len(k) for k in results)
    if task == "ppl":
        per = {k: r.ppl for k, r in results.items()}
        title = "perplexity"
    else:
        per = {k: mean_by_length(r.cells, "accuracy" if task == "passkey" else "score") for k, r in results.items()}
        title = "passkey accuracy" if task == "passkey" else "needle score"
    lengths = sorted({n for v in per.values() for n in v})
    cell = lambda v: f"{v:>9.3f}" if v is not None else f"{'-':>9}"  # noqa: E731
    lines = [f"{title} (rows: method, columns: length)", f"{'method':<{width}}  " +
             "  ".join(f"{n:>9}" for n in lengths)]
    lines += [f"{k:<{width}}  " + "  ".join(cell(v.get(n)) for n in lengths) for k, v in per.items()]
    if task == "ppl":
        n = max(lengths)
        have = {k: r for k, r in results.items() if n in r.bucket_loss}
        edges = next(iter(have.values())).bucket_loss[n]
        window = next(iter(have.values())).trained_window
        lines += ["", f"mean loss per position bucket at length {n} (trained window {window})",
                  f"{'method':<{width}}  " + "  ".join(f"{f'{s}-{e}':>11}" for s, e, _ in edges)]
        lines += [f"{k:<{width}}  " + "  ".join(f"{x:>11.3f}" for _, _, x in r.bucket_loss[n]) for k, r in have.items()]
    return "\n".join(lines)


def run_sweep(args) -> None:
    from tqdm.auto import tqdm

    from ..errors import LlamaCtxError

    target = parse_length(args.target)
    chosen = parse_methods(args.methods) if args.methods else None
    model, tokenizer = load_model(args)
    specs = candidates(model, target, chosen)
    ids, digest = load_token_ids(args, tokenizer, target)
    ids = ids[:target]
    from .perplexity import trained_window

    buckets = split_buckets(target, args.buckets, trained_window(model))  # split at the window: exact regions
    store = CellStore(Path(args.out) / "sweep", dict(task="sweep", target=target, text=digest,
                                                     buckets=buckets, **model_settings(args)))
    runs = []
    for spec in tqdm(specs, desc="sweep", unit="candidate"):
        data = store.get(spec.label)
        if data is None:
            try:
                with spec.applied(model):
                    data = perplexity(model, ids, [target], buckets=buckets,
                                      max_context=spec.max_context(model)).to_dict()
            except LlamaCtxError as e:
                data = {"error": f"{type(e).__name__}: {e}"}
            store.put(spec.label, spec.label, data)
        runs.append((spec, data["error"] if "error" in data else PerplexityResult.from_dict(data)))
    result = SweepResult.from_runs(target, trained_window(model), runs)
    root = Path(args.out) / "sweep"
    result.to_json(root / "sweep.json")
    result.to_csv(root / "sweep.csv")
    result.plot(root / "sweep.png")
    print(result.table())
    print(f"results in {root}")
