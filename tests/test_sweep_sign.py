"""`delta_vs_stock` in the sweep ranking: its sign on runs whose losses are known.

Documented as loss_beyond minus the stock model's, so a method that does better than stock past the trained
window has a negative delta (and is printed with a minus sign), a worse one a positive delta.
"""

import math

import pytest

from llama_ctx.eval.perplexity import PerplexityResult
from llama_ctx.eval.specs import MethodSpec
from llama_ctx.eval.sweep import SweepResult

TARGET, WINDOW = 128, 64


def run(beyond: float) -> PerplexityResult:
    """A result whose mean loss is 2.0 inside the trained window and `beyond` past it."""
    return PerplexityResult(ppl={TARGET: 1.0}, bucket_loss={TARGET: [(0, WINDOW, 2.0), (WINDOW, TARGET, beyond)]},
                            bucket_tokens={TARGET: [63, 64]}, tokens={TARGET: 127}, stride={TARGET: TARGET})


def test_delta_vs_stock_is_negative_for_a_method_better_than_stock(tmp_path):
    runs = [(MethodSpec("stock"), run(5.0)), (MethodSpec("pi", {"factor": 2}), run(6.0)),
            (MethodSpec("yarn", {"factor": 2}), run(3.0))]
    res = SweepResult.from_runs(TARGET, WINDOW, runs)
    delta = {x["label"]: x["delta_vs_stock"] for x in res.ranking}
    assert delta == {"yarn:factor=2": pytest.approx(-2.0), "stock": 0.0, "pi:factor=2": pytest.approx(1.0)}
    assert [x["label"] for x in res.ranking] == ["yarn:factor=2", "stock", "pi:factor=2"]
    rows = {line.split()[1]: line.split()[-1] for line in res.table().splitlines()[2:-1]}
    assert rows == {"yarn:factor=2": "-2.000", "stock": "+0.000", "pi:factor=2": "+1.000"}
    assert all(math.isnan(x["delta_vs_window"]) for x in res.ranking)  # no stock@window row: unknown, not 0
    back = SweepResult.from_json(res.to_json(tmp_path / "s.json"))
    assert {x["label"]: x["delta_vs_stock"] for x in back.ranking} == delta


def test_delta_vs_window_is_negative_for_a_method_that_beats_the_windowed_stock_model():
    runs = [(MethodSpec("stock"), run(5.0)), (MethodSpec("stock@window"), run(2.5)),
            (MethodSpec("yarn", {"factor": 2}), run(3.0)), (MethodSpec("rerope", {"window": 16}), run(2.0))]
    res = SweepResult.from_runs(TARGET, WINDOW, runs)
    delta = {x["label"]: x["delta_vs_window"] for x in res.ranking}
    assert delta == {"rerope:window=16": pytest.approx(-0.5), "stock@window": 0.0, "yarn:factor=2": pytest.approx(0.5),
                     "stock": pytest.approx(2.5)}
    rows = {line.split()[1]: line.split()[-2] for line in res.table().splitlines()[2:-1]}
    assert rows == {"rerope:window=16": "-0.500", "stock@window": "+0.000", "yarn:factor=2": "+0.500",
                    "stock": "+2.500"}
