"""benchmarks/long_context_quality.py: the goal column and the ranking that picks the passkey configurations."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import long_context_quality as lcq  # noqa: E402

T, N = 8, 32  # trained window, tokens: targets 1..31, buckets of 8 positions


def losses(inside: float, past: list[float]) -> dict:
    """Per-token losses: `inside` for targets < T, then one value per bucket of 8 positions past it."""
    pos = torch.arange(1, N)
    x = torch.full((N - 1,), inside)
    for b, v in enumerate(past):
        x[(pos >= T * (b + 1)) & (pos < T * (b + 2))] = v
    return dict(losses=x, wall_s=0.0, cpu_s=0.0)


def test_goal_needs_every_bucket_past_the_window_and_equality_inside_and_ranks_first():
    cached = {lcq.WINDOWED: losses(2.0, [2.0, 2.0, 2.0]),
              "stock": losses(2.0, [5.0, 6.0, 7.0]),
              "equal-inside-below-past": losses(2.0 + lcq.EQUAL_INSIDE / 2, [1.99, 2.0, 1.9]),
              "lowest-but-one-bucket-above": losses(2.0, [2.01, 1.0, 1.0]),
              "below-past-but-not-equal-inside": losses(2.0 + 2 * lcq.EQUAL_INSIDE, [1.5, 1.5, 1.5])}
    rows = {r["label"]: r for r in lcq.summarise(cached, T, T)}
    assert [rows[k]["goal"] for k in cached if k != lcq.WINDOWED] == [False, True, False, False]
    assert rows["below-past-but-not-equal-inside"]["beats_window_baseline"] is True
    assert abs(rows["equal-inside-below-past"]["within_minus_stock"] - lcq.EQUAL_INSIDE / 2) < 1e-6
    # the goal row first although two others have a lower loss past the window; the yardstick is never ranked
    assert lcq.best(list(rows.values()), 3) == ["equal-inside-below-past", "lowest-but-one-bucket-above",
                                                "below-past-but-not-equal-inside"]

