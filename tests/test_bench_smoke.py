"""CI runs every benchmark once in its seconds-long smoke mode: they must run and report, not be fast."""

import json
import subprocess
import sys

import pytest
from peers import require_gige_simulator, require_loopback_address, require_program

from mrkd.benchmarks import bench_parts
from mrkd.benchmarks.cli import BENCHES, OPT_IN


@pytest.mark.slow
def test_bench_quick_runs_every_benchmark_and_writes_reports(tmp_path):
    # The peers the default benchmarks run: parts and plc a GigE Vision simulator, line_outputs a broker.
    # (Required here too: on a new machine nothing else may have installed them yet.)
    require_gige_simulator()
    require_loopback_address(bench_parts.ADDRESS)     # ip addr add: root's right (CAP_NET_ADMIN)
    require_program("mosquitto", ["mosquitto"])
    result = subprocess.run([sys.executable, "-m", "mrkd.cli", "bench", "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    default = set(BENCHES) - set(OPT_IN)     # the opt-in peer benchmark needs its own venv: not by default
    assert default <= set(results) and not set(OPT_IN) & set(results)
    for name in default:
        assert "error" not in results[name], (name, results[name])
    assert results["machine"]["cores"] >= 1
    assert results["line_outputs"]["mqtt"] == "Mosquitto on loopback"     # the broker was in the run
    # Every ratio is measured against a baseline in the same run, so it is a positive finite number.
    ratios = [row["speedup_vs_baseline"] for name in ("model", "end_to_end") for row in results[name]["rows"]
              if "speedup_vs_baseline" in row]
    assert ratios and all(0 < r < 1e4 for r in ratios)
    # Speed-ups that must not change a bit of the trained weights (each variant trains in its own process).
    assert results["train"]["feature_cache_bit_identical"] and results["train"]["keep_memory_bit_identical"]
    assert results["score_cost"]["both_ms"] > 0 and results["score_cost"]["graph_mb_both"] > results["score_cost"]["graph_mb_mrkd"]
    assert (tmp_path / "RESULTS.md").read_text().startswith("# mrkd benchmark results")
    assert (tmp_path / "speedups.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
