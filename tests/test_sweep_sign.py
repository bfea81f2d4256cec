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
    rows = {line.split()[1]: line.split()[-1] for line in res.table().splitlines()[2:-2]}
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
    rows = {line.split()[1]: line.split()[-2] for line in res.table().splitlines()[2:-2]}
    assert rows == {"rerope:window=16": "-0.500", "stock@window": "+0.000", "yarn:factor=2": "+0.500",
                    "stock": "+2.500"}


def two_buckets(inside: float, past: tuple[float, float]) -> PerplexityResult:
    """Mean loss `inside` the trained window, then one value per bucket of 32 positions past it."""
    q = WINDOW + (TARGET - WINDOW) // 2
    return PerplexityResult(ppl={TARGET: 1.0}, bucket_tokens={TARGET: [63, 32, 32]}, tokens={TARGET: 127},
                            bucket_loss={TARGET: [(0, WINDOW, inside), (WINDOW, q, past[0]), (q, TARGET, past[1])]},
                            stride={TARGET: TARGET})


def test_goal_needs_every_bucket_past_the_window_at_or_below_the_yardstick_and_stock_inside(tmp_path):
    runs = [(MethodSpec("stock"), two_buckets(2.0, (5.0, 6.0))), (MethodSpec("stock@window"), two_buckets(2.0, (2.5, 2.5))),
            (MethodSpec("rerope", {"window": 32}), two_buckets(2.0005, (2.4, 2.5))),  # level in one bucket: still met
            (MethodSpec("rerope", {"window": 16}), two_buckets(2.0, (2.0, 2.6))),  # lowest mean, one bucket above
            (MethodSpec("yarn", {"factor": 2}), two_buckets(2.01, (2.0, 2.0)))]  # below everywhere, not stock inside
    res = SweepResult.from_runs(TARGET, WINDOW, runs)
    goal = {x["label"]: x["goal"] for x in res.ranking}
    assert goal == {"rerope:window=32": True, "rerope:window=16": False, "yarn:factor=2": False, "stock": None,
                    "stock@window": None}
    assert [x["label"] for x in res.goal] == ["rerope:window=32"]
    assert res.ranking[0]["label"] == "yarn:factor=2"  # the ranking itself stays by loss past the window
    assert res.table().splitlines()[-2].endswith("): rerope:window=32")
    assert {r["label"]: r["goal"] for r in res.rows()} == goal
    assert {x["label"]: x["goal"] for x in SweepResult.from_json(res.to_json(tmp_path / "s.json")).ranking} == goal
    # without the yardstick the goal cannot be told
    assert all(x["goal"] is None for x in SweepResult.from_runs(TARGET, WINDOW, runs[:1] + runs[2:]).ranking)
