"""The anomalib peer benchmark's smoke run (tiny models, two rounds). anomalib lives in a virtual
environment of its own (scripts/setup_anomalib_venv.sh, about 6.6 GB), which the test setup does not
build: without it the test is skipped, saying how to get it."""

import sys

import pytest

from mrkd.benchmarks import bench_anomalib


def skip_peer_benchmark() -> None:
    """Skip loudly, as every test whose peer is missing does: anomalib's venv (6.6 GB) is opt-in, never in CI."""
    message = (f"SKIPPED, NOT TESTED: anomalib's venv is not set up: {bench_anomalib.SETUP_HINT} "
               "(or set MRKD_ANOMALIB_PYTHON to its python)")
    print(message, file=sys.stderr)
    pytest.skip(message)


@pytest.mark.slow
def test_peer_benchmark_smoke_runs_both_sides_alternated():
    if bench_anomalib.anomalib_python() is None:
        skip_peer_benchmark()
    result = bench_anomalib.run(quick=True, rounds=2)
    rows = {row["row"]: row for row in result["rows"]}
    anomalib_rows = [name for name in rows if name.startswith("anomalib ")]
    mrkd_rows = [name for name in rows if name.startswith("mrkd ")]
    # both deploy paths of both anomalib models, and our default, timed on the same number of frames
    assert len(anomalib_rows) == 4 and "mrkd default export, --backend auto" in mrkd_rows
    frames = {rows[name]["frames"] for name in anomalib_rows + ["mrkd default export, --backend auto"]}
    assert frames == {2 * bench_anomalib.FRAMES_PER_ROUND}
    for name in anomalib_rows + ["mrkd default export, --backend auto"]:
        row = rows[name]
        assert row["median_ms"] > 0 and row["cpu_s_per_frame"] > 0 and row["precision"]
    assert result["mrkd_run_end_to_end"]["frames"] == 16
    for goal in ("default", "same_backbone"):
        assert result["default_vs_default"][goal]["anomalib_default_over_ours"] > 0
