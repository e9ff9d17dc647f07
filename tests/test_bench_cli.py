"""`mrkd bench`'s options and output folder: checked before anything is measured, never written over."""

import pytest
import torch
from click.testing import CliRunner

from mrkd.benchmarks import bench_anomalib, bench_backends, bench_end_to_end, bench_line_outputs, bench_model
from mrkd.benchmarks.report import write_all
from mrkd.cli import main


def bench(*args):
    return CliRunner().invoke(main, ["bench", *args])


def test_a_folder_with_earlier_results_is_refused_and_kept(tmp_path):
    # A second run into the same --out used to replace the first run's results.json and RESULTS.md.
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{\"earlier\": true}\n")
    result = bench("--only", "aupro", "--quick", "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "[bench]" not in result.output                    # refused before measuring anything
    assert str(out) in result.stderr and "earlier benchmark results" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert (out / "results.json").read_text() == "{\"earlier\": true}\n"
    assert not (out / "RESULTS.md").exists()


@pytest.mark.parametrize("args, says", [
    (["--threads", "0"], "--threads"),
    (["--out", "{file}/sub"], "Not a directory"),
    (["--only", "model", "--backbone", "no_such_net"], "unknown backbone 'no_such_net'"),
    (["--only", "model", "--image-size", "100"], "multiple of 32"),
    (["--only", "aupro", "--threads", "2"], "--threads is used by none of the chosen benchmarks (aupro)"),
    (["--only", "aupro", "--backbone", "resnet18"], "--backbone is used by none"),
])
def test_every_option_is_checked_before_anything_is_measured(tmp_path, args, says):
    # --out and --threads used to be found wrong only after every benchmark had run (minutes), and
    # --backbone/--image-size only by the benchmark that used them; an option no chosen benchmark
    # takes was ignored without a word.
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    args = [arg.replace("{file}", str(a_file)) for arg in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    if "--only" not in args:
        args += ["--only", "aupro"]
    result = bench(*args)
    assert result.exit_code != 0, result.output
    assert "[bench]" not in result.output, result.output     # nothing ran
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output


def test_only_the_files_written_are_named(tmp_path):
    # "Wrote .../speedups.png" was printed when no plot was written (no row with a speed-up here).
    out = tmp_path / "out"
    result = bench("--only", "aupro", "--quick", "--out", str(out))
    assert result.exit_code == 0, result.output
    wrote = [line for line in result.stdout.splitlines() if line.startswith("Wrote ")]
    assert len(wrote) == 1
    named = wrote[0][len("Wrote "):].split(", ")
    assert sorted(p.rsplit("/", 1)[-1] for p in named) == ["RESULTS.md", "results.json"]
    assert not (out / "speedups.png").exists()
    assert "speedups.png not written: no row has a speed-up" in result.stderr


def test_without_matplotlib_the_plot_is_reported_as_not_written(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)         # import matplotlib now fails
    results = {"model": {"rows": [{"backend": "x", "batch": 1, "speedup_vs_baseline": 2.0}]}}
    paths, skipped = write_all(results, tmp_path)
    assert set(paths) == {"json", "markdown"} and all(path.is_file() for path in paths.values())
    assert not (tmp_path / "speedups.png").exists()
    assert len(skipped) == 1 and "speedups.png not written" in skipped[0] and "matplotlib" in skipped[0]


def test_with_a_row_to_plot_the_plot_is_written_and_named(tmp_path):
    pytest.importorskip("matplotlib")
    results = {"model": {"rows": [{"backend": "x", "batch": 1, "speedup_vs_baseline": 2.0}]}}
    paths, skipped = write_all(results, tmp_path)
    assert paths["plot"] == tmp_path / "speedups.png" and not skipped
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class Reached(Exception):
    """Raised where a benchmark builds its model: the arguments show what it would have measured."""


@pytest.fixture
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _stop(*args, **kwargs):
    raise Reached(*args)


@pytest.mark.parametrize("module, patch", [
    (bench_model, (bench_model, "load_or_build")),
    (bench_end_to_end, (bench_model, "load_or_build")),
    (bench_line_outputs, (bench_model, "load_or_build")),
    (bench_backends, (bench_backends, "_graphs")),
])
def test_quick_keeps_the_backbone_and_image_size_given(module, patch, monkeypatch, keep_torch_threads):
    # --quick used to replace --backbone and --image-size with resnet18 at 64 px without a word.
    monkeypatch.setattr(*patch, _stop)
    with pytest.raises(Reached) as given:
        module.run(quick=True, backbone="efficientnet_lite0", image_size=96)
    assert "efficientnet_lite0" in given.value.args and 96 in given.value.args
    with pytest.raises(Reached) as defaults:                      # not given: the quick sizes
        module.run(quick=True)
    assert "resnet18" in defaults.value.args and 64 in defaults.value.args


def test_quick_keeps_the_image_size_given_to_the_anomalib_peer(monkeypatch, keep_torch_threads):
    monkeypatch.setattr(bench_anomalib, "anomalib_python", lambda: "python")
    monkeypatch.setattr(bench_model, "bench_data", _stop)
    with pytest.raises(Reached) as given:
        bench_anomalib.run(quick=True, image_size=96, backbone="resnet50")
    assert given.value.args[0] == 96


@pytest.mark.parametrize("stop, status, by", [("KeyboardInterrupt", 130, "Ctrl-C"), ("Terminated", 143, "SIGTERM")])
def test_a_bench_stopped_mid_measurement_says_so_in_one_line_and_exits_as_the_signal(tmp_path, monkeypatch, stop,
                                                                                   status, by):
    # Ctrl-C used to print click's "Aborted!" with exit 1 (SIGTERM ended it without a word); now as
    # `mrkd train` and `mrkd refit`: one line, 128 + the signal's number, no results written
    import mrkd.benchmarks.cli as bench_cli
    from mrkd.stopping import Terminated
    raised = {"KeyboardInterrupt": KeyboardInterrupt, "Terminated": Terminated}[stop]

    def stopped(*_args, **_kwargs):
        raise raised()
    monkeypatch.setattr(bench_cli, "run_benches", stopped)
    out = tmp_path / "out"
    result = bench("--only", "aupro", "--quick", "--out", str(out))
    assert result.exit_code == status, result.output
    assert result.stderr.splitlines() == [f"bench stopped ({by}); no results written to {out}"]
    assert "Aborted" not in result.output and not any(out.iterdir())


@pytest.mark.parametrize("args, names", [
    (["--validation", "--categories", "mono"], "'mono': expected comma-separated names of elpv_mono, elpv_poly"),
    (["--validation", "--categories", "elpv_mono,poly"], "'poly': expected"),
    (["--validation", "--sides", "before,aftre"], "'aftre': expected comma-separated names of before, after,"),
])
def test_bench_memory_bank_refuses_an_unknown_name_in_one_line_before_anything_runs(args, names, capsys,
                                                                                    monkeypatch):
    # `--categories mono` wrote the ELPV layout, then ended in a DataError traceback (the folders are
    # elpv_mono / elpv_poly); a misspelt --sides name in a KeyError after a category was trained
    from mrkd.benchmarks import bench_memory_bank

    def ran(*_args, **_kwargs):
        raise AssertionError("the benchmark ran")
    monkeypatch.setattr(bench_memory_bank, "validation", ran)
    with pytest.raises(SystemExit) as stopped:
        bench_memory_bank.main(args)
    assert stopped.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("bench_memory_bank") or "error:" in last
    assert names in last, last
