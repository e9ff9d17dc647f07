"""bench_refit's tuner options: --tune-radius/--tune-keep given without values ask for the whole grid
(an empty list, which once read as "not asked" and sent the run to the test split)."""

from __future__ import annotations

from mrkd.benchmarks.bench_refit import KEEP_GRID, RADIUS_GRID, _grid


def test_tuner_grids_from_the_options():
    assert _grid([], RADIUS_GRID) == RADIUS_GRID                  # `--tune-radius` alone
    assert _grid(True, KEEP_GRID) == KEEP_GRID
    assert _grid([0.9, 0.97], RADIUS_GRID) == (0.9, 0.97)
    assert _grid(None, RADIUS_GRID) is None and _grid(False, KEEP_GRID) is None   # not asked: the test run
