"""What a run leaves beside its adapter: perplexity per position bucket (llama_ctx.eval), the loss curve, a summary.

Files in `output_dir`: `log.jsonl` (one record per log step), `loss.png`, `eval/step-N.{json,csv}` and
`eval_buckets.png` (mean loss per position bucket at each evaluated step, so the effect of training beyond the
original window is visible), `summary.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

EVAL_DIR = "eval"


def eval_tokens(tokenizer, ev) -> list[int]:
    """Token ids of the `eval:` text (the built-in Python documentation when `text` is None), cut to `tokens`."""
    from ..eval.text import builtin_long_text, load_text

    need = max(ev.lengths) if ev.lengths else 0
    text = load_text(ev.text, ev.text_field) if ev.text else builtin_long_text(max(200_000, 6 * need))
    if ev.tokens:  # tokenize only what is needed (no tokenizer packs more than 16 characters per token here)
        ids = tokenizer(text[:16 * ev.tokens], add_special_tokens=False).input_ids
        if len(ids) < ev.tokens:
            ids = tokenizer(text, add_special_tokens=False).input_ids
        return ids[:ev.tokens]
    return tokenizer(text, add_special_tokens=False).input_ids


def evaluate(model, ids, ev, out_dir, step: int, write: bool = True):
    """Perplexity of `model` at each `ev.lengths` with per-bucket losses; written to `out_dir/eval/step-N.*`."""
    from ..eval import perplexity

    was_training = model.training
    model.eval()  # S2-attn is a training-time method: evaluation uses full attention
    try:
        result = perplexity(model, ids, ev.lengths, stride=ev.stride)
    finally:
        model.train(was_training)
    if write:
        folder = Path(out_dir) / EVAL_DIR
        folder.mkdir(parents=True, exist_ok=True)
        result.to_json(folder / f"step-{step}.json")
        result.to_csv(folder / f"step-{step}.csv")
    return result


def plot_loss(records: list[dict], path) -> Path | None:
    """Training loss (and learning rate, right axis) against the optimizer step."""
    from ..eval.results import new_figure, save_figure

    rows = [r for r in records if "loss" in r]
    if not rows:
        return None
    fig, ax = new_figure()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".", label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    lr = [r for r in rows if "learning_rate" in r]
    if lr:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in lr], [r["learning_rate"] for r in lr], color="grey", ls="--", lw=1)
        ax2.set_ylabel("learning rate (dashed)")
    ax.legend(fontsize=8)
    ax.set_title("fine-tuning loss")
    return save_figure(fig, path)


def plot_buckets(out_dir, path) -> Path | None:
    """Mean eval loss per position bucket, one line per (evaluated step, length)."""
    from ..eval import PerplexityResult
    from ..eval.results import new_figure, save_figure

    files = sorted((Path(out_dir) / EVAL_DIR).glob("step-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if not files:
        return None
    fig, ax = new_figure()
    for f in files:
        PerplexityResult.from_json(f)._draw(ax, label=f.stem)
    ax.set_title("eval loss per position bucket")
    return save_figure(fig, path)


def write_summary(out_dir, data: dict) -> Path:
    path = Path(out_dir) / "summary.json"
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path
