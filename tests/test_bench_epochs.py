"""bench_epochs: a run resumed to each epoch count scores as a run trained to that count from the start
(what lets one run stand for every count), on real ELPV cells."""

import pytest

pytest.importorskip("elpv_dataset")

from mrkd.benchmarks.bench_epochs import EpochsSettings, run_epochs  # noqa: E402


def _tiny(epochs_at):
    return EpochsSettings(epochs_at=epochs_at, seeds=(0,), categories=("elpv_mono",), image_size=64,
                          max_train=12, max_per_class=12)


def test_resumed_counts_equal_fresh_runs(tmp_path):
    resumed = run_epochs(_tiny((2, 1)), tmp_path / "resumed", log=lambda _: None)["rows"]
    fresh = run_epochs(_tiny((2,)), tmp_path / "fresh", log=lambda _: None)["rows"]
    assert [row["epochs"] for row in resumed] == [1, 2]          # sorted, each count once
    assert resumed[0]["loss"] != resumed[1]["loss"]              # the second count trained on
    for key in ("mrkd_auroc", "both_auroc", "loss"):
        assert resumed[1][key] == fresh[0][key], key


def test_settings_refuse_a_count_below_one():
    with pytest.raises(ValueError, match="positive"):
        EpochsSettings(epochs_at=(0, 5))
