"""The report's "last 20 steps" statistics count steps, not logged points: a per-step series
and one measured every 10 steps (``kl/init``'s default) average over the same window."""

import math

from reclight.study.report import _tail_mean


def test_tail_mean_counts_steps_not_points():
    every_step = [(s, float(s)) for s in range(100)]
    assert _tail_mean(every_step) == sum(range(80, 100)) / 20  # steps 80..99: 89.5
    every_10 = [(s, float(s)) for s in range(0, 100, 10)]
    assert _tail_mean(every_10) == (80 + 90) / 2  # the points within steps 71..90
    assert math.isnan(_tail_mean([]))
