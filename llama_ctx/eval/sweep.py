"""Choosing a method's parameters: a small grid per method, scored by the loss beyond the trained window.

Each candidate is evaluated like `perplexity(model, text[:target], [target])`; candidates are ranked by the mean
loss of the tokens at positions >= the trained window (where methods differ; inside it a good method should
match the stock model, which `loss_within` shows). The grid of each method is derived from r = target / trained
window (T) and lives in `GRID`, the one place to edit it. Beside stock, `stock@window` (the stock model scoring the
same tokens with at most T tokens of context) is ranked too: a candidate below it used the long context. `goal`
marks the candidates that are at or below it in every bucket past T while within `EQUAL_INSIDE` nats of the stock
model inside T: long context that helps without changing what the model does inside its window.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from .. import registry
from ..errors import ConfigError, LlamaCtxError
from .perplexity import PerplexityResult, as_token_ids, bucket_edges, check_enough, perplexity, trained_window
from .results import Result, line_style
from .specs import STOCK, STOCK_WINDOW, MethodSpec, parse_method_spec


EQUAL_INSIDE = 0.001  # nats: a candidate's loss inside the window this close to stock's counts as equal


def _factors(r: float, T: int, L: int) -> list[dict]:
    factors = sorted({round(x, 3) for x in (r / 2, r, 2 * r) if x > 1})
    return [{"factor": int(f) if f == int(f) else f} for f in factors]


def _cover(L: int, T: int, w: int) -> float:
    # smallest factor (to 0.1) with w + (L - w) / factor <= T: every distance maps inside the trained window
    return max(math.ceil((L - w) / (T - w) * 10) / 10, 1.1)


def covering_group_size(L: int, T: int, w: int) -> int:
    # Self-Extend covers (T - window) * group_size + window positions
    return math.ceil((L - w) / (T - w))


def _windows(T: int) -> list[int]:
    return sorted({max(T // 4, 1), max(T // 2, 1)})


GRID = {
    "pi": _factors,
    "ntk": _factors,
    "yarn": _factors,
    "llama3": _factors,
    "dynamic-ntk": _factors,
    "rerope": lambda r, T, L: [{"window": w, "log_scale": log} for w in _windows(T) for log in (True, False)],
    # the smallest covering factor, and twice it: a larger factor can keep the window intact (on SmolLM2, T = 8K, at
    # 14K with window T/2, the covering factor 2.5 moved the loss at 6-8K by +0.06 nats, factor 7 by -0.0025: closer
    # to ReRoPE)
    "leaky-rerope": lambda r, T, L: [{"window": w, "factor": f} for w in _windows(T)
                                     for f in (_cover(L, T, w), round(2 * _cover(L, T, w), 1))],
    # Self-Extend: the smallest covering group_size, and twice it
    "self-extend": lambda r, T, L: [{"window": w, "group_size": g} for w in _windows(T)
                                    for g in (covering_group_size(L, T, w), 2 * covering_group_size(L, T, w))],
    "lambda": lambda r, T, L: [{"local_window": T}, {"local_window": max(T // 2, 1)}],
    # the paper's point (chunk 3T/4, local window T/16), a longer local window, shorter and longer chunks
    "dca": lambda r, T, L: [{"chunk_size": c, "local_window": w}
                            for c, w in [(3 * T // 4, T // 16), (3 * T // 4, T // 4), (T // 2, T // 16),
                                         (7 * T // 8, T // 16)]],
    # the largest window the 4 default sinks allow: positions reach sink_tokens + window, which must stay < T
    "streaming": lambda r, T, L: [{"window": max(T - 5, 1)}],
    "topk": lambda r, T, L: [{"k": max(T // 8, 1)}, {"k": max(T // 4, 1)}],
    "block-topk": lambda r, T, L: [{"block_size": 64, "k_blocks": max(T // 4 // 64, 1)}],
}


def candidates(model, target: int, methods=None) -> list[MethodSpec]:
    """Stock and stock@window first, then the grid of every method in `methods` (names or MethodSpecs whose
    parameters are kept fixed in every grid point; default: every registered method of `GRID`). Unregistered names
    are skipped. A composed spec (`yarn+dca`, `yarn:factor=2+dca`) gives the product of its parts' grids."""
    T = trained_window(model)
    if T is None:
        raise ConfigError("sweep needs a LLaMA-layout model whose config gives its trained window")
    if target <= T:
        raise ConfigError(f"target ({target}) must exceed the trained window ({T}): there is nothing to extend")
    registry._load_all()
    specs = [MethodSpec(STOCK), MethodSpec(STOCK_WINDOW)]
    for m in (GRID if methods is None else methods):
        spec = m if isinstance(m, MethodSpec) else parse_method_spec(m) if ":" in m or "+" in m else MethodSpec(m)
        if spec.name in (STOCK, STOCK_WINDOW):
            continue
        parts = spec.parts
        if missing := [p.name for p in parts if p.name not in GRID]:
            raise ConfigError(f"sweep has no grid for {missing[0]!r}; grids exist for {', '.join(GRID)}")
        if any(p.name not in registry._METHODS for p in parts):
            continue  # not registered in this installation
        grids = [[MethodSpec(p.name, {**point, **p.params}) for point in GRID[p.name](target / T, T, target)]
                 for p in parts]
        specs += [MethodSpec(last.name, last.params, tuple(first)) for *first, last in itertools.product(*grids)]
    return list({s.label: s for s in specs}.values())


def split_buckets(target: int, buckets, window: int) -> list[int]:
    """Inner bucket boundaries for a sweep: those of `bucket_edges` plus the trained window itself, so that every
    bucket lies entirely before or entirely past it and `region_loss` is exact."""
    return sorted({*bucket_edges(target, buckets, window)[1:-1], window} - {0, target})


def region_loss(r: PerplexityResult, length: int, window: int, beyond: bool) -> float:
    """Token-weighted mean loss of the tokens at positions >= `window` (beyond) or < `window`.

    Exact: buckets must not straddle `window` (`split_buckets` makes sure of it); one that does raises.
    """
    straddling = [(s, e) for s, e, _ in r.bucket_loss[length] if s < window < e]
    if straddling:
        raise ConfigError(f"bucket {straddling[0]} straddles the trained window {window}, so the loss before and "
                          "past it cannot be separated; measure with split_buckets(...) as buckets")
    pairs = [(loss, c) for (s, e, loss), c in zip(r.bucket_loss[length], r.bucket_tokens[length])
             if c and ((s >= window) if beyond else (e <= window))]
    total = sum(c for _, c in pairs)
    return sum(loss * c for loss, c in pairs) / total if total else float("nan")


@dataclass
class SweepResult(Result):
    """Args:
    target: evaluation length; trained_window: the model's.
    ranking: one dict per candidate, best first: rank, method, params (a composition: method "yarn+dca", params
        {"yarn": {...}, "dca": {...}}), label, ppl, loss_within, loss_beyond,
        delta_vs_window (loss_beyond minus stock@window's: negative = the long context helped; NaN without that
        row), delta_vs_stock (loss_beyond minus stock's), bucket_loss, patch (the call that applies it), error,
        goal (at or below stock@window in every bucket past the window and loss_within within EQUAL_INSIDE of
        stock's; None for stock, stock@window, errors, or without those rows).
    """

    target: int
    trained_window: int
    ranking: list[dict] = field(default_factory=list)

    @classmethod
    def from_runs(cls, target: int, window: int, runs: list[tuple[MethodSpec, PerplexityResult | str]]) -> "SweepResult":
        """Rank `runs` (a result, or an error message) by loss beyond the trained window."""
        rows = []
        for spec, r in runs:
            parts = spec.parts
            # a composition names every part: its last part's name and parameters alone would read as that method
            method = "+".join(p.name for p in parts) if spec.before else spec.name
            params = {p.name: dict(p.params) for p in parts} if spec.before else dict(spec.params)
            row = dict(method=method, params=params, label=spec.label, patch=spec.patch_call())
            if isinstance(r, str):
                row.update(ppl=float("nan"), loss_within=float("nan"), loss_beyond=float("nan"), bucket_loss=[],
                           error=r)
            else:
                row.update(ppl=r.ppl[target], loss_within=region_loss(r, target, window, False),
                           loss_beyond=region_loss(r, target, window, True), bucket_loss=r.bucket_loss[target],
                           error="")
            rows.append(row)
        stock, windowed = (next((x["loss_beyond"] for x in rows if x["method"] == name), float("nan"))
                           for name in (STOCK, STOCK_WINDOW))
        rows.sort(key=lambda x: (math.isnan(x["loss_beyond"]), x["loss_beyond"]))
        for i, x in enumerate(rows, 1):
            x.update(rank=i, delta_vs_window=x["loss_beyond"] - windowed, delta_vs_stock=x["loss_beyond"] - stock,
                     goal=_goal(x, rows, window))
        return cls(target, window, rows)

    @property
    def goal(self) -> list[dict]:
        """The candidates that meet the goal (see the module docstring), best first."""
        return [x for x in self.ranking if x.get("goal")]

    @property
    def best(self) -> dict:
        return self.ranking[0]

    def rows(self) -> list[dict]:
        keys = ("rank", "label", "ppl", "loss_within", "loss_beyond", "goal", "delta_vs_window", "delta_vs_stock",
                "patch", "error")
        return [{k: x[k] for k in keys} for x in self.ranking]

    @classmethod
    def _from_dict(cls, d: dict) -> "SweepResult":
        nan = lambda v: float("nan") if v is None else v  # noqa: E731
        rows = [{k: nan(v) if k in ("ppl", "loss_within", "loss_beyond", "delta_vs_window", "delta_vs_stock") else v
                 for k, v in {"delta_vs_window": None, "goal": None, **x}.items()} for x in d["ranking"]]  # older files
        return cls(d["target"], d["trained_window"], rows)

    def table(self) -> str:
        """The ranked table as text, then the call that applies the winner."""
        width = max(len(x["label"]) for x in self.ranking)
        lines = [f"sweep at {self.target} tokens (trained window {self.trained_window}); ranked by mean loss at "
                 f"positions >= {self.trained_window}",
                 f"{'rank':>4}  {'method':<{width}}  {'ppl':>9}  {'loss<T':>7}  {'loss>=T':>7}  {'goal':>4}  "
                 f"{'vs window':>9}  {'vs stock':>8}"]
        yes = {True: "yes", False: "no", None: "-"}
        for x in self.ranking:
            if x["error"]:
                lines.append(f"{x['rank']:>4}  {x['label']:<{width}}  error: {x['error']}")
            else:
                lines.append(f"{x['rank']:>4}  {x['label']:<{width}}  {x['ppl']:>9.3f}  {x['loss_within']:>7.3f}  "
                             f"{x['loss_beyond']:>7.3f}  {yes[x.get('goal')]:>4}  {x['delta_vs_window']:>+9.3f}  "
                             f"{x['delta_vs_stock']:>+8.3f}")
        lines.append(f"goal (at or below {STOCK_WINDOW} in every bucket past {self.trained_window}, loss<T within "
                     f"{EQUAL_INSIDE} of stock): " + (", ".join(x["label"] for x in self.goal) or "none"))
        lines.append(f"best: {self.best['patch']}")
        return "\n".join(lines)

    def _draw(self, ax) -> None:
        # the best 8, and the yardstick wherever it ranks
        shown = [x for i, x in enumerate(self.ranking) if i < 8 or x["method"] == STOCK_WINDOW]
        for x in shown:
            if not x["error"]:
                ax.plot([(s + e) / 2 for s, e, _ in x["bucket_loss"]], [v for _, _, v in x["bucket_loss"]],
                        label=x["label"], **line_style(x["label"]))
        ax.axvline(self.trained_window, color="grey", ls="--", lw=1, label="trained window")
        ax.set_xlabel("position in window (tokens)")
        ax.set_ylabel("mean loss (nats / token)")
        ax.set_title(f"sweep at {self.target} tokens (best 8)")
        ax.legend(fontsize=7)


def _goal(x: dict, rows: list[dict], window: int) -> bool | None:
    """Whether candidate `x` meets the goal; None where it cannot be told (see SweepResult)."""
    ref = {r["method"]: r for r in rows if r["method"] in (STOCK, STOCK_WINDOW) and not r["error"]}
    if x["error"] or x["method"] in (STOCK, STOCK_WINDOW) or len(ref) < 2:
        return None
    past = [(v, b) for (s, _, v), (_, _, b) in zip(x["bucket_loss"], ref[STOCK_WINDOW]["bucket_loss"]) if s >= window]
    inside = abs(x["loss_within"] - ref[STOCK]["loss_within"]) < EQUAL_INSIDE
    return bool(past) and all(v <= b for v, b in past) and inside


def sweep(model, token_ids, target: int, methods=None, buckets=None, progress: bool = False) -> SweepResult:
    """Evaluate the grid of each method (and the stock model) on the first `target` tokens of `token_ids`.

    Args:
        model: an unpatched LLaMA-layout model.
        token_ids: one tokenized text of at least `target` tokens.
        target: the context length you want to reach (> trained window).
        methods: names or MethodSpecs to sweep (default: every registered method that has a grid).
        buckets: position buckets, as in `perplexity`; the trained window is always added as a boundary.
        progress: show a tqdm bar.

    Returns:
        SweepResult; `.table()` prints the ranking and the winner's `llama_ctx.patch(...)` call.
    """
    from ..patch import state

    if state(model) is not None:
        raise ConfigError("sweep needs an unpatched model; call llama_ctx.unpatch(model) first")
    ids = as_token_ids(token_ids)
    check_enough(len(ids), target)
    specs = candidates(model, target, methods)
    inner = split_buckets(target, buckets, trained_window(model))
    runs = []
    from tqdm.auto import tqdm

    for spec in tqdm(specs, desc="sweep", disable=not progress):
        try:
            with spec.applied(model):
                runs.append((spec, perplexity(model, ids[:target], [target], buckets=inner,
                                              max_context=spec.max_context(model))))
        except LlamaCtxError as e:
            runs.append((spec, f"{type(e).__name__}: {e}"))
    return SweepResult.from_runs(target, trained_window(model), runs)
