"""The OpenVINO backend against ONNX Runtime on the same exported graphs (FP32, FP16, our INT8 Q/DQ), through
the Detector and the whole `mrkd run` loop; its precision explicit and recorded; its errors one line.

Tolerances (stated here, measured on a random-weight resnet18 MRKD at 64 px): OpenVINO f32 vs ONNX Runtime
FP32 on the same graph differ by ~1e-6 in maps and ~2e-7 in scores; the test allows 1e-4 times the map's
magnitude (at least 1), the FP32 parity tolerance of the export (export.parity.FP32_TOLERANCE). The INT8
graph runs different integer kernels in each runtime (~1e-2 apart on the map), so for it the test checks the
decision agreement against the FP32 graph as the export reports it, brute-forced here from raw scores.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

ov = pytest.importorskip("openvino", reason="the OpenVINO backend needs openvino: pip install 'mrkd[openvino]' "
                                            "(it is in the dev extra)")

from mrkd.export.parity import FP32_TOLERANCE  # noqa: E402
from mrkd.runtime.backends import BackendError, open_backend, usable_cpus  # noqa: E402
from mrkd.runtime.backends.openvino_backend import cpu_capabilities, inference_precision, shared_core  # noqa: E402
from mrkd.runtime.detector import Detector  # noqa: E402
from runtime_fixtures import (THRESHOLD, build_tiny_model, defective_frame, export_tiny_model,  # noqa: E402
                              normal_frame, reference_map)

HAS_BF16 = "BF16" in cpu_capabilities()
THREADS = min(2, usable_cpus())     # more than the CPUs is refused (mrkd.runtime.backends.check_threads)


def _frames(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [defective_frame(rng) if i % 2 else normal_frame(rng) for i in range(n)]


def _assert_same(a, b, what):
    tolerance = FP32_TOLERANCE * max(1.0, float(np.abs(a.maps).max()))
    assert np.abs(a.maps - b.maps).max() <= tolerance, what
    assert np.abs(a.scores - b.scores).max() <= tolerance, what
    assert (a.decisions == b.decisions).all(), what


@pytest.mark.parametrize("layout", [{}, {"per_scale": True}, {"uint8_input": True}])
def test_tiny_model_openvino_f32_equals_onnxruntime_and_the_numpy_reference(tmp_path, layout):
    model = build_tiny_model(tmp_path / "m.onnx", **layout)
    frames = _frames()
    ort_det, ov_det = Detector(model, backend="onnxruntime"), Detector(model, backend="openvino", threads=THREADS)
    try:
        a, b = ort_det(frames), ov_det(frames)
        _assert_same(a, b, layout)
        assert list(b.decisions) == [bool(i % 2) for i in range(6)]     # the defective frames, no others
        if not layout:   # the full-map layout: the graph's map is the reference map of the resized frames
            squares = np.stack([cv2.resize(f, (32, 32), interpolation=cv2.INTER_AREA) for f in frames])
            assert np.abs(b.maps - reference_map(squares)).max() < 0.02
        assert ov_det.backend.name == "openvino" and ov_det.backend.precision == "fp32"
        assert ov_det.precision == "fp32" and "openvino CPU precision fp32" in ov_det.describe()
        assert ov_det.backend.threads == 2 and ov_det.backend.cuda_context() is None
    finally:
        ort_det.close()
        ov_det.close()


def test_openvino_reads_the_embedded_metadata_and_checks_the_sidecar_against_it(tmp_path):
    model = export_tiny_model(tmp_path / "m.onnx")
    backend = open_backend(model, "openvino")
    try:
        assert "mrkd.metadata" in backend.model_metadata_props
    finally:
        backend.close()
    # Without the sidecar the Detector reads the graph's own metadata through OpenVINO, as through ONNX Runtime.
    (tmp_path / "m.onnx.json").unlink()
    detector = Detector(model, backend="openvino")
    try:
        assert detector.threshold == pytest.approx(THRESHOLD) and "embedded metadata" in detector.threshold_source
    finally:
        detector.close()


def test_precision_is_explicit_and_refused_where_the_cpu_lacks_it(tmp_path):
    model = build_tiny_model(tmp_path / "m.onnx")
    caps = ("FP32", "INT8")
    assert inference_precision(None, caps, "m") == "fp32" and inference_precision("auto", caps, "m") == "fp32"
    assert inference_precision("auto", caps + ("BF16",), "m") == "bf16"
    with pytest.raises(BackendError, match="openvino:bf16 needs a CPU with native bf16"):
        inference_precision("bf16", caps, "m.onnx")
    auto = Detector(model, backend="openvino:auto")
    try:
        assert auto.backend.precision == ("bf16" if HAS_BF16 else "fp32")
        assert auto.precision == ("bf16" if HAS_BF16 else "fp32")
    finally:
        auto.close()
    if HAS_BF16:
        bf16 = Detector(model, backend="openvino:bf16")
        try:
            assert bf16.backend.precision == "bf16" and "precision bf16" in bf16.describe()
            assert (bf16(_frames()).decisions == [bool(i % 2) for i in range(6)]).all()
        finally:
            bf16.close()
    else:
        with pytest.raises(BackendError, match=r"m\.onnx: openvino:bf16 needs a CPU with native bf16"):
            Detector(model, backend="openvino:bf16")


def test_openvino_errors_are_one_line(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage that is not a protobuf")
    with pytest.raises(BackendError, match=r"broken\.onnx: OpenVINO cannot read the model"):
        open_backend(broken, "openvino")
    backend = open_backend(build_tiny_model(tmp_path / "m.onnx"), "openvino")
    with pytest.raises(BackendError, match="keeps no outputs on a GPU"):
        backend.infer(np.zeros((1, 3, 32, 32), np.float32), device_outputs=True)
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.infer(np.zeros((1, 3, 32, 32), np.float32))


# --- the real graphs: a random-weight resnet18 MRKD at 64 px, exported FP32, FP16 and INT8 -----------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from export_fixtures import small_model
    from mrkd.export import ExportOptions, export_onnx, fp16_options, quantize_int8
    folder = tmp_path_factory.mktemp("ov")
    good = folder / "good"
    good.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        cv2.imwrite(str(good / f"g{i}.png"), cv2.GaussianBlur(rng.integers(0, 256, (70 + i, 90, 3), np.uint8), (7, 7), 2))
    model = small_model()
    fp32 = export_onnx(model, folder / "model.onnx", ExportOptions(), simplify="never")
    fp16 = export_onnx(model, folder / "model_fp16.onnx", fp16_options(ExportOptions()), simplify="never")
    int8 = quantize_int8(fp32.path, folder / "model_int8.onnx", good, target="cpu", keep_fp32="none")
    frames = [cv2.GaussianBlur(rng.integers(0, 256, (60, 80, 3), np.uint8), (5, 5), 2) for _ in range(8)]
    return {"fp32": fp32.path, "fp16": fp16.path, "int8": int8.path, "good": good, "frames": frames}


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["fp32", "fp16"])
def test_mrkd_graphs_on_openvino_f32_equal_onnxruntime(exported, graph):
    ort_det = Detector(exported[graph], backend="onnxruntime")
    ov_det = Detector(exported[graph], backend="openvino")
    try:
        a, b = ort_det(exported["frames"]), ov_det(exported["frames"])
        _assert_same(a, b, graph)
        assert ov_det.precision == graph and ov_det.backend.precision == "fp32"
    finally:
        ort_det.close()
        ov_det.close()


@pytest.mark.slow
def test_int8_graph_on_openvino_agreement_against_fp32(exported):
    from mrkd.export.int8 import int8_agreement_report, int8_image_paths, load_images
    from mrkd.runtime.metadata import ModelMetadata, sidecar_path
    meta = ModelMetadata.load(sidecar_path(exported["int8"]))
    images = load_images(int8_image_paths(exported["good"]), meta)
    report = int8_agreement_report(exported["fp32"], exported["int8"], images, threshold=None, backend="openvino")
    assert report.name == "INT8 graph on openvino fp32 vs FP32 graph (ONNX Runtime CPU)"
    # Brute force from raw outputs: the FP32 graph on ONNX Runtime, the INT8 graph on OpenVINO.
    fp32 = open_backend(exported["fp32"], "onnxruntime", providers=["cpu"])
    int8 = open_backend(exported["int8"], "openvino")
    ref, cand = fp32.infer(images)["score"].astype(np.float64), int8.infer(images)["score"].astype(np.float64)
    fp32.close()
    int8.close()
    assert report.threshold == pytest.approx(np.median(ref))
    assert report.decision_agreement == pytest.approx(np.mean((ref >= report.threshold) == (cand >= report.threshold)))
    assert report.score_max_abs_diff == pytest.approx(np.max(np.abs(ref - cand)), abs=1e-6)
    assert report.finite and 0 < report.score_max_abs_diff < 0.1
    detector = Detector(exported["int8"], backend="openvino")
    try:
        assert detector.precision == "int8" and detector.backend.precision == "fp32"
    finally:
        detector.close()


@pytest.mark.slow
def test_mrkd_run_with_openvino_scores_as_onnxruntime(exported, tmp_path):
    from mrkd.cli import main
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(exported["frames"]):
        cv2.imwrite(str(folder / f"f{i:02d}.png"), frame)
    reference = Detector(exported["fp32"], backend="onnxruntime")
    ref = reference([cv2.imread(str(p)) for p in sorted(folder.iterdir())])
    reference.close()
    threshold = float(np.median(ref.scores))        # half the frames alarm
    runs = {}
    for backend in ("onnxruntime", "openvino"):
        events = tmp_path / f"{backend}.jsonl"
        result = CliRunner().invoke(main, ["run", str(exported["fp32"]), "--source", str(folder), "--backend", backend,
                                           "--threads", str(THREADS), "--threshold", repr(threshold), "--cooldown", "0",
                                           "--events", str(events), "--status-every", "0",
                                           "--summary", str(tmp_path / f"{backend}.json")])
        assert result.exit_code == 0, result.output
        runs[backend] = [json.loads(line) for line in events.read_text().splitlines()]
        summary = json.loads((tmp_path / f"{backend}.json").read_text())
        assert summary["frames"] == len(exported["frames"])
    assert "openvino CPU precision fp32" in result.output
    expected = [i for i, s in enumerate(ref.scores) if s >= threshold]
    for backend, events in runs.items():
        assert [e["frame_index"] for e in events] == expected, backend
    tolerance = FP32_TOLERANCE * max(1.0, float(ref.maps.max()))
    assert np.abs(np.array([e["score"] for e in runs["openvino"]]) - [e["score"] for e in runs["onnxruntime"]]).max() \
        <= tolerance


# --- bf16 under --backend auto: only where the export's check passed --------------------------------

def _check(agreement=1.0, diff=0.001, threshold=1.0):
    from mrkd.runtime.metadata import PrecisionCheck
    return PrecisionCheck(backend="openvino:bf16", precision="bf16", images=8, decision_agreement=agreement,
                          score_max_abs_diff=diff, threshold=threshold, cpu="test cpu")


def test_checked_precision_runs_bf16_only_after_a_passing_check():
    import dataclasses

    from mrkd.runtime.backends.openvino_backend import checked_precision
    from mrkd.runtime.calibration import Calibration
    from mrkd.runtime.metadata import ModelMetadata
    base = ModelMetadata(backbone="resnet18", image_size=64,
                         calibration=Calibration(threshold=1.0, method="quantile", quantile=0.99))
    bf16, plain = ("FP32", "INT8", "BF16"), ("FP32", "INT8")
    cases = [(plain, (_check(),), "fp32", "no native bf16"),
             (bf16, (), "fp32", "not checked"),
             (bf16, (_check(diff=0.02),), "fp32", "check failed"),        # 2 % of the threshold: over 1 %
             (bf16, (_check(),), "bf16", "checked against FP32 (score max |diff| 0.001 at threshold 1, 100.0% of 8"),
             # A checked image 0.5 % from the threshold flipped: reported, the rule is the score error.
             (bf16, (_check(agreement=0.875, diff=0.005),), "bf16", "87.5% of 8 decisions equal"),
             (bf16, (_check(diff=0.5), _check()), "bf16", "checked against FP32")]   # the newest counts
    for capabilities, checks, hint, why in cases:
        got, reason = checked_precision(capabilities, dataclasses.replace(base, precision_checks=checks))
        assert (got, why in reason) == (hint, True), (capabilities, checks, reason)
    # mrkd calibrate lowered the threshold after the check: 0.001 is over 1 % of 0.05.
    moved = dataclasses.replace(base, precision_checks=(_check(),),
                                calibration=Calibration(threshold=0.05, method="quantile", quantile=0.99))
    assert checked_precision(bf16, moved)[0] == "fp32"
    assert checked_precision(bf16, None)[0] == "fp32"          # embedded metadata only, no sidecar checks
    # An INT8 graph's sidecar never carries a bf16 check (export checks model.onnx): the reason says so,
    # instead of pointing at --check-images, which cannot record one for it.
    from mrkd.runtime.metadata import Int8Info
    hint, why = checked_precision(bf16, dataclasses.replace(base, precision="int8", int8=Int8Info(images=8)))
    assert hint == "fp32" and "checked on the FP32 graph (model.onnx) only" in why and "--check-images" not in why


def test_precision_checks_round_trip_and_bad_ones_are_one_line_errors():
    import dataclasses

    from mrkd.runtime.metadata import MetadataError, ModelMetadata
    meta = dataclasses.replace(ModelMetadata(backbone="resnet18", image_size=64), precision_checks=(_check(),))
    again = ModelMetadata.from_dict(json.loads(meta.to_json()))
    assert again.precision_checks == meta.precision_checks and again.precision_checks[0].passed
    for broken, message in [("nope", "precision_checks='nope' must be a list"),
                            ([{"backend": "openvino:bf16"}], r"precision_checks\[0\]\.precision is missing"),
                            ([dict(_check().to_dict(), decision_agreement=1.5)], r"decision_agreement=1\.5 must be in"),
                            ([dict(_check().to_dict(), score_max_abs_diff=float("nan"))], "must be finite"),
                            ([dict(_check().to_dict(), images=0)], r"images=0 must lie in")]:
        data = json.loads(meta.to_json())
        data["precision_checks"] = broken
        with pytest.raises(MetadataError, match=message):
            ModelMetadata.from_dict(data, "side.json")


@pytest.mark.parametrize("threshold, passes", [(1e4, True), (1e-6, False)])
def test_export_records_the_bf16_check_and_auto_runs_what_it_allows(tmp_path, threshold, passes):
    """The export's check is recomputed here from raw outputs (ONNX Runtime FP32 vs OpenVINO compiled at
    bf16 by hand); a threshold far above every score passes (1 % of it dwarfs bf16's error), one below
    every score fails on the score tolerance, and --backend auto runs what the sidecar allows."""
    import onnxruntime as ort

    from export_fixtures import small_model
    from mrkd.export.int8 import int8_image_paths, load_images
    from mrkd.export.pipeline import export_checkpoint
    from mrkd.export import ExportOptions
    from mrkd.runtime.metadata import ModelMetadata, sidecar_path
    good = tmp_path / "good"
    good.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        cv2.imwrite(str(good / f"g{i}.png"), cv2.GaussianBlur(rng.integers(0, 256, (70, 90, 3), np.uint8), (7, 7), 2))
    ckpt = tmp_path / "ck.pt"
    small_model(threshold=threshold).save(ckpt)
    lines = []
    result = export_checkpoint(ckpt, tmp_path / "out", ExportOptions(batch_range=(1, 1, 8)), engine=False,
                               int8_images=good if passes else None, int8_target="cpu",
                               check_images=good, simplify="never", echo=lines.append)
    model = result.files["onnx"]
    meta = ModelMetadata.load(sidecar_path(model))
    if passes:     # the INT8 graph is another graph: the FP32 graph's bf16 check is not carried over to it
        assert ModelMetadata.load(sidecar_path(result.files["onnx_int8"])).precision_checks == ()
    if not HAS_BF16:
        assert meta.precision_checks == () and "bf16" not in result.reports
        assert any("bf16 not checked: this CPU has no native bf16" in line for line in lines)
        detector = Detector(model, backend="auto")
        assert detector.backend.precision == "fp32"
        detector.close()
        return
    (check,) = meta.precision_checks
    images = load_images(int8_image_paths(good), meta)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ref = session.run(["score"], {session.get_inputs()[0].name: images})[0].astype(np.float64)
    compiled = shared_core().compile_model(str(model), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    cand = np.array(compiled({0: images})[compiled.output("score")], dtype=np.float64)
    assert check.images == 5 and check.threshold == threshold and check.precision == "bf16"
    assert check.score_max_abs_diff == pytest.approx(np.abs(ref - cand).max(), rel=1e-3, abs=1e-6)
    assert check.decision_agreement == np.mean((ref >= threshold) == (cand >= threshold))
    assert check.passed is passes and 0 < check.score_max_abs_diff
    assert any(f"bf16 check {'passed' if passes else 'FAILED'}" in line for line in lines)
    from mrkd.runtime.backends import X86_VENDORS, machine_facts
    detector = Detector(model, backend="auto")
    try:
        if "openvino" in str(detector.backend.name):
            assert detector.backend.precision == ("bf16" if passes else "fp32")
            assert ("checked against FP32" if passes else "the bf16 check failed") in detector.describe()
        else:     # auto chose another backend here (not an auto-OpenVINO vendor, or a GPU): the check is unused
            assert machine_facts().cpu_vendor not in X86_VENDORS or machine_facts().nvidia_gpu
    finally:
        detector.close()


def test_a_truncated_onnx_is_one_line_without_openvinos_tensorflow_noise(tmp_path):
    """OpenVINO's read_model tries every frontend on a file it cannot parse, and TensorFlow's printed
    C++ log lines ("Error parsing text-format tensorflow.GraphDef") before our error: the ONNX frontend
    is asked directly, so the error is the one line."""
    import subprocess
    import sys
    model = build_tiny_model(tmp_path / "tiny.onnx")
    cut = tmp_path / "cut.onnx"
    data = model.read_bytes()
    cut.write_bytes(data[:len(data) // 2])          # no sidecar: the backend itself meets the file
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "a.png"), _frames(1)[0])
    done = subprocess.run([sys.executable, "-m", "mrkd.cli", "run", str(cut), "--backend", "openvino", "--source",
                           str(frames)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "GraphDef" not in done.stderr and "tensorflow" not in done.stderr.lower(), done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "OpenVINO cannot read the model" in errors[0], done.stderr


def test_checked_precision_judges_bf16_at_the_thresholds_the_cameras_decide_at():
    """The bf16 check passed at the model's threshold and a camera given a lower one (--threshold, a line
    file's threshold) still ran bf16 under auto, its score error over 1 % of where that camera decides."""
    import dataclasses

    from mrkd.runtime.backends.openvino_backend import checked_precision
    from mrkd.runtime.calibration import Calibration
    from mrkd.runtime.metadata import ModelMetadata
    meta = dataclasses.replace(ModelMetadata(backbone="resnet18", image_size=64,
                                             calibration=Calibration(threshold=1.0, method="quantile", quantile=0.99)),
                               precision_checks=(_check(diff=0.005),))
    bf16 = ("FP32", "INT8", "BF16")
    assert checked_precision(bf16, meta, (None,))[0] == "bf16"
    assert checked_precision(bf16, meta, (None, 2.0))[0] == "bf16"        # 0.005 is 0.25 % of 2
    hint, why = checked_precision(bf16, meta, (None, 0.1))                  # 5 % of 0.1
    assert hint == "fp32" and "over 1 % of the threshold 0.1 given for a camera" in why


@pytest.mark.skipif(not HAS_BF16, reason="bf16 under auto needs a CPU with native bf16")
def test_a_camera_threshold_below_what_the_bf16_check_allows_runs_f32(tmp_path):
    """Through `mrkd run --threshold` and a line file whose cameras share one model: auto ran bf16 at a
    threshold where bf16's recorded score error is 5 % of it."""
    from mrkd.cli import main
    from mrkd.runtime.backends import machine_facts, choose_auto_backend
    from mrkd.runtime.line.linefile import parse_line
    from mrkd.runtime.line.loop import open_detectors
    model = build_tiny_model(tmp_path / "m.onnx", metadata_overrides={
        "precision_checks": (_check(diff=0.0005, threshold=THRESHOLD),)})     # 0.5 % of the model's 0.1
    if choose_auto_backend(model, machine_facts()) != "openvino":
        pytest.skip("auto runs another backend than OpenVINO on this machine")
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "a.png"), normal_frame(np.random.default_rng(0)))

    def first_line(*args):
        result = CliRunner().invoke(main, ["run", str(model), "--source", str(frames), *args])
        assert result.exit_code == 0, result.output
        return result.output.splitlines()[0]
    assert "precision bf16" in first_line() and "precision bf16" in first_line("--threshold", "0.2")
    lowered = first_line("--threshold", "0.01")
    assert "precision fp32" in lowered and "threshold 0.01 given for a camera" in lowered
    line_file = (f'[[camera]]\nname = "a"\nsource = "{frames}"\nmodel = "{model}"\n'
                 f'[[camera]]\nname = "b"\nsource = "{frames}"\nmodel = "{model}"\nthreshold = 0.01\n')
    detectors = open_detectors(parse_line(line_file, str(tmp_path / "line.toml")))
    try:
        (detector,) = detectors.values()
        assert detector.backend.precision == "fp32" and detector.precision == "fp32"
    finally:
        for detector in detectors.values():
            detector.close()


# --- one OpenVINO Core per process: signals survive models released in any order ---------------------

RELEASED_IN_MAKING_ORDER = """
import gc, os, signal, sys
from mrkd.runtime.backends.openvino_backend import OpenVinoBackend
older, newer = OpenVinoBackend(sys.argv[1]), OpenVinoBackend(sys.argv[1])
for backend in (older, newer):        # the older first, as a hot swap releases them
    backend.close()
del older, newer, backend
gc.collect()
got = []
signal.signal(signal.SIGUSR1, lambda number, frame: got.append(number))
os.kill(os.getpid(), signal.SIGUSR1)
print("delivered", got)
"""


def test_a_signal_after_models_released_oldest_first_is_delivered(exported):
    """Each ov.Core's CPU plugin gave the thread that made it a signal stack of its own and put back the one it
    found when released; two Cores released oldest first left the thread on a freed stack, and the next
    signal (SIGHUP for a hot swap, SIGTERM, Ctrl-C) ended the process with SIGSEGV. Run in a process of its
    own: in this one it would take the test run down."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", RELEASED_IN_MAKING_ORDER, str(exported["fp32"])],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "delivered [10]" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_without_openvino_the_export_does_not_say_auto_runs_openvino(monkeypatch, tmp_path):
    """Where OpenVINO is not installed `--backend auto` runs ONNX Runtime, but the export's note said
    "--backend auto runs OpenVINO at f32" (a probe with openvino hidden)."""
    import mrkd.export.precision_check as precision_check
    from mrkd.runtime.metadata import ModelMetadata as Metadata, sidecar_path
    monkeypatch.setattr(precision_check, "bf16_unavailable_reason",
                        lambda: "OpenVINO is not installed (pip install 'mrkd[openvino]')")
    lines = []
    metadata = Metadata.load(sidecar_path(export_tiny_model(tmp_path / "tiny.onnx")))
    returned, report = precision_check.check_bf16(tmp_path / "tiny.onnx", metadata, tmp_path, echo=lines.append)
    assert report is None and returned is metadata
    assert lines == ["bf16 not checked: OpenVINO is not installed (pip install 'mrkd[openvino]'); "
                     "--backend auto runs this model at fp32"], lines


def test_the_startup_line_names_the_precision_its_events_and_metrics_do(tmp_path):
    """One run, one word per precision: the startup line said OpenVINO 'f32' (twice, with 'fp32' beside it)
    while the events, part lines and /metrics said 'fp32'. The alias openvino:f32 is still taken as input."""
    import re

    from mrkd.cli import main
    model = build_tiny_model(tmp_path / "m.onnx")
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "a.png"), defective_frame(np.random.default_rng(0)))
    for spec in ("openvino", "openvino:fp32", "openvino:f32"):
        events = tmp_path / f"{spec.replace(':', '_')}.jsonl"
        result = CliRunner().invoke(main, ["run", str(model), "--source", str(frames), "--backend", spec,
                                           "--threads", str(THREADS), "--threshold", "1e-9", "--status-every", "0",
                                           "--events", str(events)])
        assert result.exit_code == 0, result.output
        (event,) = [json.loads(line) for line in events.read_text().splitlines()]
        startup = next(line for line in result.output.splitlines() if "openvino CPU" in line)
        assert event["precision"] == "fp32" and f"precision {event['precision']}" in startup, startup
        assert set(re.findall(r"\b(?:b?f|fp)\d\d\b", startup)) == {event["precision"]}, startup


TELEMETRY_PROBE = r"""
import os, sys
forks = []
sys.addaudithook(lambda event, args: forks.append(event) if event == "os.fork" else None)
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import numpy as np
from runtime_fixtures import build_tiny_model
from mrkd.runtime.detector import Detector
model = build_tiny_model(Path(sys.argv[2]))
detector = Detector(str(model), backend="openvino")
detector([np.zeros((48, 64, 3), np.uint8)])
import openvino_telemetry
consent = openvino_telemetry.Telemetry().consent
print(f"forks={len(forks)} consent={consent}")
"""


@pytest.mark.parametrize("consent_file, consent", [(None, False), ("0", False)])
def test_opening_an_openvino_model_sends_no_usage_telemetry_unless_opted_in(tmp_path, consent_file, consent):
    """`import openvino` imports its model converter, which sends a usage event to Google Analytics by
    default (no consent file counts as yes) from a process forked off a thread pool in the line's process:
    seen under libfaketime, where that child hung. A real Detector on the OpenVINO backend in a fresh
    process, its home without a consent file (or one saying no), CI unset: no fork, consent False. On the
    old code: one fork and consent True where no file existed."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    home = tmp_path / "home"
    home.mkdir()
    if consent_file is not None:
        (home / "intel").mkdir()
        (home / "intel" / "openvino_telemetry").write_text(consent_file)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    env["HOME"] = str(home)
    done = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE, str(Path(__file__).parent), str(tmp_path / "m.onnx")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"forks=0 consent={consent}", done.stdout + done.stderr[-1000:]


def test_a_user_who_opted_in_to_openvino_telemetry_is_taken_at_their_word(tmp_path, monkeypatch):
    """The consent check itself (no import, nothing sent): a file saying 1 stays ACCEPTED, none is DECLINED."""
    from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker

    from mrkd.runtime.backends.openvino_import import _no_file_means_declined
    for name in ("CI", "TF_BUILD", "JENKINS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    _no_file_means_declined()
    assert OptInChecker().check(False, True) == ConsentCheckResult.DECLINED       # no file
    (tmp_path / "intel").mkdir()
    (tmp_path / "intel" / "openvino_telemetry").write_text("1")
    assert OptInChecker().check(False, True) == ConsentCheckResult.ACCEPTED
