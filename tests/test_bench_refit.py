"""bench_refit's tuner options: --tune-radius/--tune-keep given without values ask for the whole grid
(an empty list, which once read as "not asked" and sent the run to the test split)."""

from __future__ import annotations

from mrkd.benchmarks.bench_refit import KEEP_GRID, RADIUS_GRID, _grid


def test_tuner_grids_from_the_options():
    assert _grid([], RADIUS_GRID) == RADIUS_GRID                  # `--tune-radius` alone
    assert _grid(True, KEEP_GRID) == KEEP_GRID
    assert _grid([0.9, 0.97], RADIUS_GRID) == (0.9, 0.97)
    assert _grid(None, RADIUS_GRID) is None and _grid(False, KEEP_GRID) is None   # not asked: the test run


def test_augment_grid_from_the_option_and_an_unknown_preset_is_refused():
    import pytest

    from mrkd.benchmarks.bench_refit import AUGMENT_GRID, _augment_grid
    from mrkd.train.refit import RefitError
    assert _augment_grid([]) == AUGMENT_GRID == ("none", "flips", "flips+rot90")
    assert _augment_grid(["flips"]) == ("flips",) and _augment_grid(None) is None
    with pytest.raises(RefitError, match="'mirror'"):
        _augment_grid(["mirror"])


def _setting(augment, far, missed=0, still=0, still_whole=0):
    return {"radius_quantile": 0.99, "guard_keep": 0.9, "augment": augment, "far_same_catch": far,
            "missed_whole_line": missed, "reviewed_still_flagged": still, "still_flagged_whole_line": still_whole}


def test_tune_table_means_per_category_and_counts_over_models():
    from mrkd.benchmarks.bench_refit import tune_table
    mono = [(0.10, [_setting("none", 0.08), _setting("flips", 0.12, 1, 2, 3)]),
            (0.20, [_setting("none", 0.20), _setting("flips", 0.10)])]
    poly = [(0.05, [_setting("none", 0.04, 0, 1), _setting("flips", 0.05)]),
            (0.30, [])]                                                 # nothing reviewed: left out
    runs = [{"category": category, "far_before": far, "settings": settings}
            for category, models in (("elpv_mono", mono), ("elpv_poly", poly)) for far, settings in models]
    lines = tune_table(runs)
    assert lines[0].startswith("| stop (quantile) / guard keep / augment | elpv_mono (2 models) | "
                               "elpv_poly (1 models) |")
    assert lines[2] == ("| 0.99 / 0.9 / none | 0.150 -> 0.140 (\u22127 %) | 0.050 -> 0.040 (\u221220 %) "
                        "| 0 / 2 | 0 | 1; 0 |")
    assert lines[3] == ("| 0.99 / 0.9 / flips | 0.150 -> 0.110 (\u221227 %) | 0.050 -> 0.050 (+0 %) "
                        "| 1 / 1 | 1 | 2; 3 |")


def test_review_counts_below_one_are_refused_before_any_work(capsys):
    import pytest

    from mrkd.benchmarks.bench_refit import main
    with pytest.raises(SystemExit) as stop:
        main(["--review-counts", "20", "0", "--work", "/nonexistent/never-made"])
    assert stop.value.code == 2
    assert "Error: --review-counts takes counts of 1 or more" in capsys.readouterr().err
