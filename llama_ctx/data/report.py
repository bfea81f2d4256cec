"""What a mixture actually gives: `summary` (shares, lengths, filters, packing) and `preview` (packed examples).

Both run the real pipeline (the same code `build` runs) over a sample, so what they report is what training sees.
Shares are of real tokens (document tokens with their separators, no padding) in the emitted examples.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from .mixture import LONG
from .pipeline import Pipeline

DEFAULT_SAMPLE = 10_000_000


def summary(data_config, tokenizer, seq_len: int, sample_tokens: int | None = None, out=None,
            progress: bool = True) -> dict:
    """Run the pipeline over a sample and measure it.

    Args:
        sample_tokens: packed positions to sample (default: the budget `data.tokens`, at most 10M; one pass when
            there is no budget and this is 0).
        out: folder for `summary.json` and `doc_lengths.png` (the latter needs matplotlib); None: write nothing.

    Returns:
        dict with `domains` and `sources` (requested vs realised token shares, long-document shares, filter counts,
        passes per stream), `packing_efficiency` (real tokens / positions), `split_documents`, `pieces`, and
        `histogram` (document lengths in tokens per domain, power-of-2 bins).
    """
    from tqdm.auto import tqdm

    pipe = Pipeline(data_config, tokenizer, seq_len)
    cfg = pipe.cfg
    if sample_tokens is None:
        sample_tokens = min(cfg.tokens or DEFAULT_SAMPLE, DEFAULT_SAMPLE)
    limit = math.ceil(sample_tokens / seq_len) if sample_tokens else None
    if pipe.max_examples is not None:
        limit = pipe.max_examples if limit is None else min(limit, pipe.max_examples)
    threshold = cfg.upsample.threshold if cfg.upsample else seq_len
    tokens, long_tokens, doc_lens = Counter(), Counter(), defaultdict(list)
    examples = 0
    bar = tqdm(total=limit, desc="data summary", unit="seq", disable=not progress)
    for packed in pipe:
        for unit in packed.units:
            stream = pipe.streams[unit.doc.stream]
            source = stream.source.index
            n, whole = len(unit.ids), len(unit.doc.ids)
            tokens[source] += n
            if whole > threshold:
                long_tokens[source] += n
            if unit.piece == 0:
                doc_lens[cfg.sources[source].domain].append(whole)
        examples += 1
        bar.update()
        if limit is not None and examples >= limit:
            break
    bar.close()
    real = sum(tokens.values())
    shares = cfg.source_shares()
    long_req = cfg.long_shares()
    sources, domains = [], {}
    for i, (src, share) in enumerate(zip(cfg.sources, shares)):
        passes = {s.kind: s.passes for s in pipe.streams if s.source.index == i}
        sources.append(dict(path=src.path, domain=src.domain, requested_share=share,
                            realised_share=tokens[i] / real if real else 0.0, tokens=tokens[i],
                            long_share=long_tokens[i] / tokens[i] if tokens[i] else 0.0,
                            filters=pipe.sources[i].counts(), completed_passes=passes))
    for d, share in cfg.domain_shares().items():
        idx = [i for i, s in enumerate(cfg.sources) if s.domain == d]
        t, lt = sum(tokens[i] for i in idx), sum(long_tokens[i] for i in idx)
        domains[d] = dict(requested_share=share, realised_share=t / real if real else 0.0, tokens=t,
                          long_share_requested=long_req[d], long_share_realised=lt / t if t else 0.0,
                          documents=len(doc_lens[d]))
    top = max((max(v) for v in doc_lens.values() if v), default=1)
    edges = [2 ** k for k in range(0, max(1, math.ceil(math.log2(top + 1))) + 1)]
    hist = {d: np.histogram(v, bins=edges)[0].tolist() for d, v in doc_lens.items()}
    result = dict(seq_len=seq_len, examples=examples, positions=examples * seq_len, real_tokens=real,
                  packing_efficiency=real / (examples * seq_len) if examples else 0.0, long_threshold=threshold,
                  long_share=sum(long_tokens.values()) / real if real else 0.0, documents=pipe.docs,
                  split_documents=pipe.split_docs, pieces=pipe.pieces, domains=domains, sources=sources,
                  histogram=dict(edges=edges, counts=hist))
    if out is not None:
        from ..eval.results import write_atomic

        write_atomic(Path(out) / "summary.json", json.dumps(result, indent=1) + "\n")
        try:
            plot_lengths(result, Path(out) / "doc_lengths.png")
        except ImportError:
            result["plot"] = "not written: pip install matplotlib"
    return result


def plot_lengths(result: dict, path) -> Path:
    """Histogram of document lengths (tokens, log2 bins) per domain, with the long threshold and seq_len."""
    from ..eval.results import new_figure, save_figure

    fig, ax = new_figure()
    edges = result["histogram"]["edges"]
    for d, counts in result["histogram"]["counts"].items():
        ax.stairs(counts, edges, label=d)
    ax.set_xscale("log", base=2)
    ax.axvline(result["long_threshold"], color="k", ls="--", lw=1, label="long threshold")
    ax.axvline(result["seq_len"], color="r", ls=":", lw=1, label="seq_len")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("documents")
    ax.set_title("document lengths drawn by the mixture")
    ax.legend()
    return save_figure(fig, path)


def format_summary(r: dict) -> str:
    """The summary as text tables."""
    lines = [f"{r['examples']} examples x {r['seq_len']} = {r['positions']} positions, {r['real_tokens']} real tokens, "
             f"packing efficiency {r['packing_efficiency']:.2%}",
             f"{r['documents']} documents, {r['split_documents']} longer than seq_len split into {r['pieces']} "
             f"pieces; long (> {r['long_threshold']} tokens): {r['long_share']:.1%} of tokens", "",
             f"{'domain':<16}{'requested':>10}{'realised':>10}{'long req':>10}{'long real':>10}{'docs':>9}"]
    for d, v in r["domains"].items():
        req = "natural" if v["long_share_requested"] is None else f"{v['long_share_requested']:.1%}"
        lines.append(f"{d:<16}{v['requested_share']:>10.1%}{v['realised_share']:>10.1%}{req:>10}"
                     f"{v['long_share_realised']:>10.1%}{v['documents']:>9}")
    lines += ["", f"{'source':<36}{'requested':>10}{'realised':>10}  filters (documents read; removed; kept groups)"]
    for s in r["sources"]:
        f = dict(s["filters"])
        read, kept = f.pop("documents"), f.pop("kept")
        groups = f.pop("groups")
        removed = ", ".join(f"{k} {v}" for k, v in f.items() if v) or "none"
        passes = ", ".join(f"{k} {v}" for k, v in s["completed_passes"].items())
        lines.append(f"{s['path'][-35:]:<36}{s['requested_share']:>10.1%}{s['realised_share']:>10.1%}  "
                     f"read {read}; removed {removed}; kept {kept}/{groups}; passes: {passes}")
    return "\n".join(lines)


def preview(data_config, tokenizer, seq_len: int, n: int = 3, chars: int = 160) -> str:
    """The first `n` packed examples as text, each document or piece under a header line (its place in the
    sequence, source, domain, length, piece), its text shortened to about `chars` characters."""
    pipe = Pipeline(data_config, tokenizer, seq_len)
    out = []
    for k, packed in enumerate(pipe):
        if k >= n:
            break
        used = sum(len(u.ids) for u in packed.units)
        out.append(f"=== example {k}: {len(packed.units)} document(s), {used}/{seq_len} tokens, "
                   f"{seq_len - used} padding")
        at = 0
        for j, u in enumerate(packed.units):
            stream = pipe.streams[u.doc.stream]
            piece = f", piece {u.piece + 1}/{u.pieces}" if u.pieces > 1 else ""
            kind = "" if stream.kind not in (LONG, "short") else f" {stream.kind}"
            out.append(f"--- [{at}:{at + len(u.ids)}] doc {j + 1}: {stream.source.src.cfg.domain}{kind}, "
                       f"{u.doc.origin}, {len(u.doc.ids)} tokens{piece}")
            text = tokenizer.decode(u.ids.tolist(), skip_special_tokens=False)
            if len(text) > chars:
                text = f"{text[:chars // 2]} [...] {text[-(chars // 2):]}"
            out.append(text)
            at += len(u.ids)
        if at < seq_len:
            out.append(f"--- [{at}:{seq_len}] padding")
    return "\n".join(out)
