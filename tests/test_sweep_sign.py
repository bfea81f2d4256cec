"""`delta_vs_stock` in the sweep ranking: its sign on runs whose losses are known.

Documented as loss_beyond minus the stock model's, so a method that does better than stock past the trained
window has a negative delta (and is printed with a minus sign), a worse one a positive delta.
"""

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
    back = SweepResult.from_json(res.to_json(tmp_path / "s.json"))
    assert {x["label"]: x["delta_vs_stock"] for x in back.ranking} == delta
