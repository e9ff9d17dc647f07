"""Calibrating an exported model on frames from a source: thresholds checked against scores computed
here with PyTorch, the sidecar rewritten and the model file untouched."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mrkd.export import ExportOptions, export_onnx
from mrkd.runtime import Detector
from mrkd.runtime.calibrate import CalibrationError, calibrate_exported
from mrkd.runtime.metadata import ModelMetadata, sidecar_path
from mrkd.runtime.preprocess import model_input
from export_fixtures import small_model
from runtime_fixtures import MjpegServer, write_video


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _textures(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return [cv2.GaussianBlur(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), (5, 5), 1.5) for _ in range(n)]


def _texture_folder(folder, n: int, seed: int, suffix: str = ".png"):
    folder.mkdir(parents=True)
    for i, image in enumerate(_textures(n, seed)):
        cv2.imwrite(str(folder / f"{i}{suffix}"), image)
    return folder


def _torch_scores(model, frames, metadata) -> np.ndarray:
    with torch.no_grad():
        return model.scores(torch.from_numpy(model_input(frames, metadata))).double().numpy()


@pytest.fixture()
def exported(tmp_path):
    model = small_model()
    path = export_onnx(model, tmp_path / "model.onnx", ExportOptions(batch_range=(1, 1, 4)), simplify="never").path
    return model, path


def test_calibrate_on_a_video_sets_the_quantile_of_its_frames(exported, tmp_path):
    model, path = exported
    frames = _textures(14, seed=1)
    video = write_video(tmp_path / "good.avi", frames, fps=10)
    model_bytes = _sha(path)
    before = ModelMetadata.load(sidecar_path(path)).threshold

    result = calibrate_exported(path, str(video), progress=False)
    # Reference: decode the same video here and score its frames with the PyTorch model.
    capture, decoded = cv2.VideoCapture(str(video)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        decoded.append(frame)
    reference = _torch_scores(model, decoded, ModelMetadata.load(sidecar_path(path)))
    assert result.n_good == len(decoded) == 14 and result.method == "quantile"
    assert result.threshold == pytest.approx(np.quantile(reference, 0.99), rel=1e-4)
    assert result.good_mean == pytest.approx(reference.mean(), rel=1e-4)

    meta = ModelMetadata.load(sidecar_path(path))
    assert meta.threshold == pytest.approx(result.threshold)
    assert meta.calibration.previous_threshold == before == 3.0
    assert meta.score_norm["good_min"] == pytest.approx(reference.min(), rel=1e-4)
    assert _sha(path) == model_bytes                       # only the sidecar changed
    assert Detector(path).threshold == pytest.approx(result.threshold)


def test_calibrate_skips_bad_files_and_scores_labelled_images(exported, tmp_path):
    from sklearn.metrics import f1_score
    model, path = exported
    good = _texture_folder(tmp_path / "good", 5, seed=2)
    (good / "broken.png").write_bytes(b"not a png")
    test = tmp_path / "test"
    for name, images in (("good", _textures(3, seed=3)), ("spot", _textures(3, seed=4))):
        (test / name).mkdir(parents=True)
        for i, image in enumerate(images):
            if name == "spot":
                image = image.copy()
                image[10:30, 20:40] = 255
            cv2.imwrite(str(test / name / f"{i}.png"), image)

    result = calibrate_exported(path, str(good), labelled=str(test), progress=False)
    assert result.n_good == 5 and result.bad_frames == 1      # the broken file: skipped, counted
    assert result.method == "f1"
    labelled = sorted((test / "good").glob("*.png")) + sorted((test / "spot").glob("*.png"))
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = _torch_scores(model, [cv2.imread(str(p)) for p in labelled], ModelMetadata.load(sidecar_path(path)))
    assert result.f1_at_threshold == pytest.approx(f1_score(labels, scores >= result.threshold), abs=1e-6)


def test_calibrate_errors_name_the_source(exported, tmp_path):
    _, path = exported
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(CalibrationError, match=r"empty: no usable frames .*1 bad frame.*broken\.jpg"):
        calibrate_exported(path, str(empty), progress=False)
    assert ModelMetadata.load(sidecar_path(path)).threshold == 3.0     # nothing written on failure


def test_calibrate_cli_on_an_exported_model(exported, tmp_path):
    from mrkd.calibrate_cli import calibrate_command
    _, path = exported
    folder = _texture_folder(tmp_path / "line", 6, seed=5, suffix=".jpg")
    result = CliRunner().invoke(calibrate_command, [str(path), str(folder), "--method", "tolerance"])
    assert result.exit_code == 0, result.output
    assert "(tolerance, k " in result.output and "sidecar; was 3.0" in result.output
    assert ModelMetadata.load(sidecar_path(path)).calibration.method == "tolerance"
    refused = CliRunner().invoke(calibrate_command, [str(path), str(folder), "-o", str(tmp_path / "x.onnx")])
    assert refused.exit_code != 0 and "--out is for checkpoints" in refused.output
    missing = CliRunner().invoke(calibrate_command, [str(path), str(tmp_path / "nowhere")])
    assert missing.exit_code != 0 and "nowhere" in missing.output


def test_calibrate_cli_leaves_a_hidden_thumbnail_folder_out_of_the_labelled_images(exported, tmp_path):
    # test/.thumbs/ (thumbnails of good parts) was read as a defect type: its good images labelled defective
    # moved the F1-optimal threshold down to the good scores. Checked against sklearn on the visible images.
    import shutil
    from sklearn.metrics import f1_score
    from mrkd.calibrate_cli import calibrate_command
    model, path = exported
    good = _texture_folder(tmp_path / "good", 5, seed=2)
    test = tmp_path / "test"
    spots = [image.copy() for image in _textures(3, seed=4)]
    for image in spots:
        image[10:30, 20:40] = 255
    for name, images in (("good", _textures(3, seed=3)), ("spot", spots)):
        (test / name).mkdir(parents=True)
        for i, image in enumerate(images):
            cv2.imwrite(str(test / name / f"{i}.png"), image)
    shutil.copytree(test / "good", test / ".thumbs")
    result = CliRunner().invoke(calibrate_command, [str(path), str(good), "--labelled", str(test)])
    assert result.exit_code == 0, result.output
    calibration = ModelMetadata.load(sidecar_path(path)).calibration
    visible = sorted((test / "good").glob("*.png")) + sorted((test / "spot").glob("*.png"))
    scores = _torch_scores(model, [cv2.imread(str(p)) for p in visible], ModelMetadata.load(sidecar_path(path)))
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert calibration.f1_at_threshold == pytest.approx(f1_score(labels, scores >= calibration.threshold), abs=1e-6)
    assert f"F1 {calibration.f1_at_threshold:.3f} on the labelled images" in result.output


def test_calibrate_on_a_live_stream_needs_a_frame_limit(exported):
    """A camera or network stream never ends: calibration asks for a frame limit, then scores that
    many frames (the MJPEG server on loopback stands in for an IP camera)."""
    _, path = exported
    server = MjpegServer(frames_per_connection=400, interval=0.005)
    try:
        with pytest.raises(CalibrationError, match="live source never ends"):
            calibrate_exported(path, server.url, progress=False)
        result = calibrate_exported(path, server.url, max_frames=12, progress=False)
    finally:
        server.close()
    assert result.n_good == 12 and result.source == server.url
    assert ModelMetadata.load(sidecar_path(path)).threshold == pytest.approx(result.threshold)


def test_calibrating_an_exported_model_imports_neither_mrkd_train_nor_scipy(tmp_path):
    """The runtime never imports mrkd.train; the tolerance rule needs no SciPy (mrkd.runtime.calibration)."""
    import subprocess
    import sys
    from runtime_fixtures import export_tiny_model, normal_then_defective
    model = export_tiny_model(tmp_path / "m.onnx")
    video = write_video(tmp_path / "good.avi", normal_then_defective(12, 0), fps=10)
    code = ("import sys\nfrom mrkd.cli import main\n"
            f"try:\n    main(['calibrate', {str(model)!r}, {str(video)!r}, '--method', 'tolerance'])\n"
            "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('mrkd.train', 'scipy', 'torch')))\n"
            "assert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ModelMetadata.load(sidecar_path(model)).calibration.method == "tolerance"


def test_export_keeps_a_threshold_set_on_the_line(tmp_path):
    """`mrkd calibrate model.onnx SOURCE` writes a threshold that exists only in that sidecar: exporting the
    checkpoint again into the same folder is refused (one line), even with --overwrite, and changes nothing
    there; another folder is fine, and a folder whose sidecar holds the checkpoint's own calibration is
    exported over (--overwrite) as before."""
    from mrkd.calibrate_cli import calibrate_command
    from mrkd.export.cli import export_command
    from train_fixtures import trained_run
    checkpoint = str(trained_run()["out_dir"]) + "/last.ckpt"
    out = tmp_path / "deploy"
    first = CliRunner().invoke(export_command, [checkpoint, "-o", str(out), "--simplify", "never"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(export_command, [checkpoint, "-o", str(out), "--simplify", "never", "--overwrite"])
    assert again.exit_code == 0, again.output                     # nothing set on the line yet: rebuilt
    folder = _texture_folder(tmp_path / "line", 6, seed=5)
    done = CliRunner().invoke(calibrate_command, [str(out / "model.onnx"), str(folder), "--accept-shift"])
    assert done.exit_code == 0, done.output
    sidecar = sidecar_path(out / "model.onnx")
    before = {p.name: _sha(p) for p in out.iterdir()}
    refused = CliRunner().invoke(export_command, [checkpoint, "-o", str(out), "--simplify", "never", "--overwrite"])
    assert refused.exit_code != 0 and "set on the line" in refused.output and str(folder) in refused.output
    assert "Traceback" not in refused.output
    assert {p.name: _sha(p) for p in out.iterdir()} == before
    assert ModelMetadata.load(sidecar).calibration.source == str(folder)
    other = CliRunner().invoke(export_command, [checkpoint, "-o", str(tmp_path / "fresh"), "--simplify", "never"])
    assert other.exit_code == 0, other.output
    # the demo, which calibrates its own export on its clip again, replaces it when it is run a second time
    from mrkd.export.pipeline import export_checkpoint
    export_checkpoint(checkpoint, out, simplify="never", overwrite=True, replace_line_calibration=True,
                      echo=lambda line: None)
    assert ModelMetadata.load(sidecar).calibration.source is None


def test_export_keeps_a_threshold_set_on_the_line_for_the_int8_graph(tmp_path):
    """Only model.onnx's sidecar was guarded: `mrkd calibrate model_int8.onnx SOURCE` (the graph the README
    says to run on an x86 line PC) and the same export with --int8 again silently put the checkpoint's
    threshold back in model_int8.onnx.json. Now refused like model.onnx's, nothing changed."""
    from mrkd.calibrate_cli import calibrate_command
    from mrkd.export.cli import export_command
    checkpoint = tmp_path / "ck.pt"
    small_model().save(checkpoint)
    good = _texture_folder(tmp_path / "good", 6, seed=3)
    out = tmp_path / "deploy"
    args = [str(checkpoint), "-o", str(out), "--simplify", "never", "--batch", "1:1:2", "--int8", "--int8-images",
            str(good), "--int8-keep-fp32", "front"]
    first = CliRunner().invoke(export_command, args)
    assert first.exit_code == 0, first.output
    line = _texture_folder(tmp_path / "line", 6, seed=5)
    done = CliRunner().invoke(calibrate_command, [str(out / "model_int8.onnx"), str(line), "--accept-shift"])
    assert done.exit_code == 0, done.output
    before = {p.name: _sha(p) for p in out.iterdir()}
    refused = CliRunner().invoke(export_command, args + ["--overwrite"])
    errors = [text for text in refused.output.splitlines() if text.startswith("Error:")]
    assert refused.exit_code == 1 and len(errors) == 1 and "Traceback" not in refused.output, refused.output
    assert str(sidecar_path(out / "model_int8.onnx")) in errors[0] and "set on the line" in errors[0]
    assert {p.name: _sha(p) for p in out.iterdir()} == before
    # an FP32-only --overwrite would remove model_int8.onnx and its threshold with it: refused the same way
    fp32_only = CliRunner().invoke(export_command, args[:7] + ["--overwrite"])
    assert fp32_only.exit_code == 1 and str(sidecar_path(out / "model_int8.onnx")) in fp32_only.output, fp32_only.output
    assert {p.name: _sha(p) for p in out.iterdir()} == before
    assert ModelMetadata.load(sidecar_path(out / "model_int8.onnx")).calibration.source == str(line)
