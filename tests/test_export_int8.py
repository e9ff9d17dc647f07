"""INT8 export: Q/DQ on the backbone only, calibrated on images, head inputs FP32, agreement report."""

from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import onnx
import pytest

from mrkd.export import ExportError, ExportOptions, export_onnx, int8_agreement_report, quantize_int8
from mrkd.export.int8 import QUANTISED_SCOPES, int8_image_paths, first_tap_ancestors, load_images
from export_fixtures import run_onnx, small_model


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8")
    calib = folder / "good"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):   # smooth "textures" of different sizes (resize_square brings them to 64 px)
        base = cv2.GaussianBlur(rng.integers(0, 256, (70 + i, 90, 3), dtype=np.uint8), (7, 7), 2)
        cv2.imwrite(str(calib / f"good_{i}.png"), base)
    (calib / "notes.txt").write_text("not an image")
    model = small_model()
    fp32 = export_onnx(model, folder / "model.onnx", ExportOptions(), simplify="never")
    int8 = quantize_int8(fp32.path, folder / "model_int8.onnx", calib, keep_fp32="front")
    return model, fp32, int8, calib


def test_first_tap_ancestors_are_the_stem_and_first_stage(int8_export):
    _, fp32, _, _ = int8_export
    kept = first_tap_ancestors(onnx.load(str(fp32.path)))
    # resnet18: the stem and layer1 feed the first feature tap; nothing deeper is kept.
    assert any(name.startswith("/teacher/conv1") for name in kept)
    assert any(name.startswith("/teacher/layer1/") for name in kept)
    assert not any(name.startswith(("/teacher/layer2/", "/teacher/layer3/", "/bottleneck/", "/student/"))
                   for name in kept)


def test_qdq_graph_quantises_backbone_only(int8_export):
    _, fp32, int8, _ = int8_export
    proto = onnx.load(str(int8.path))
    producers = {o: n for n in proto.graph.node for o in n.output}
    quantize = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize, "no Q/DQ nodes"
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    kept_fp32 = first_tap_ancestors(onnx.load(str(fp32.path)))
    backbone = [n for n in convs if n.name.startswith(QUANTISED_SCOPES) and n.name not in kept_fp32]
    stem = [n for n in convs if n.name in kept_fp32]
    assert backbone and stem
    # Every quantised backbone Conv reads a dequantised activation and a dequantised per-channel weight.
    for node in backbone:
        assert producers[node.input[0]].op_type == "DequantizeLinear"
        assert producers[node.input[1]].op_type == "DequantizeLinear"
    # The layers in front of the first feature tap keep FP32 weights (their error reaches every scale).
    for node in stem:
        assert node.input[1] not in producers or producers[node.input[1]].op_type != "DequantizeLinear"
    # The head reads FP32 tensors: no head node consumes a DequantizeLinear output.
    for node in proto.graph.node:
        if not node.name.startswith(QUANTISED_SCOPES) and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            for name in node.input:
                assert name not in producers or producers[name].op_type != "DequantizeLinear", node.name
    assert int8.metadata.precision == "int8" and int8.metadata.int8.images == 6


def test_int8_agreement_report(int8_export):
    model, fp32, int8, calib = int8_export
    images = load_images(int8_image_paths(calib), int8.metadata)
    assert images.shape == (6, 3, 64, 64)
    report = int8_agreement_report(fp32.path, int8.path, images, threshold=None)
    print(report.format())
    # Brute-force the decision agreement here from both graphs' raw scores.
    ref = run_onnx(fp32.path, images)["score"]
    cand = run_onnx(int8.path, images)["score"]
    assert report.decision_agreement == pytest.approx(np.mean((ref >= report.threshold) == (cand >= report.threshold)))
    assert report.finite and 0 < report.map_max_abs_diff < 0.5
    assert report.score_max_abs_diff == pytest.approx(np.max(np.abs(ref.astype(np.float64) - cand)), abs=1e-6)


def test_calibration_folder_errors(tmp_path):
    with pytest.raises(ExportError, match="not found"):
        int8_image_paths(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no images"):
        int8_image_paths(tmp_path / "empty")


def test_cli_int8_needs_calib(tmp_path):
    from click.testing import CliRunner
    from mrkd.export.cli import export_command
    checkpoint = tmp_path / "ck.pt"
    checkpoint.write_bytes(b"")        # CHECKPOINT must exist (click checks it first); never read here
    result = CliRunner().invoke(export_command, [str(checkpoint), "--int8"])
    assert result.exit_code == 2 and "--calib" in result.output


def test_cli_int8_images_option_and_its_hidden_old_name(tmp_path):
    from click.testing import CliRunner
    from mrkd.export.cli import export_command
    help_text = CliRunner().invoke(export_command, ["--help"]).output
    assert "--int8-images" in help_text and "--calib" not in help_text
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "ck.pt").write_bytes(b"")  # the option check comes before the checkpoint is read
    result = CliRunner().invoke(export_command, [str(tmp_path / "ck.pt"), "--int8", "--int8-images", str(tmp_path / "a"),
                                                 "--calib", str(tmp_path / "b")])
    assert result.exit_code == 2 and "different folders" in result.output


def test_int8_images_are_listed_by_the_one_image_rule(tmp_path):
    """Sub-folders included (a category's train/ holds good/), hidden files and non-images left out."""
    for name in ("good/b.png", "good/a.JPG", "good/.c.png", "good/notes.txt", "extra/d.bmp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert int8_image_paths(tmp_path) == [tmp_path / "extra/d.bmp", tmp_path / "good/a.JPG", tmp_path / "good/b.png"]
    assert int8_image_paths(tmp_path, limit=1) == [tmp_path / "extra/d.bmp"]


@pytest.mark.slow
@pytest.mark.parametrize("target, keep", [("tensorrt", "front"), ("cpu", "none"), (None, "front")])
def test_cli_int8_writes_qdq_graph_and_report(int8_export, tmp_path, target, keep, caplog):
    """--int8 alone never fails for want of TensorRT: exit 0, the files it wrote, and a note saying why no
    engine was built; the default target is the form that runs fast where the engine is not built."""
    from click.testing import CliRunner
    from mrkd.export.cli import export_command
    from mrkd.export.tensorrt_build import tensorrt_unavailable_reason
    model, _, _, calib = int8_export
    ckpt = tmp_path / "ck.pt"
    model.save(ckpt)
    out = tmp_path / "out"
    result = CliRunner().invoke(export_command, [str(ckpt), "-o", str(out), "--int8", "--int8-images", str(calib),
                                                 "--int8-keep-fp32", keep, "--simplify", "never"]
                                + (["--int8-target", target] if target else []))
    assert "INT8 graph vs FP32 graph" in result.output and "decisions agree" in result.output
    # ONNX Runtime's advice to pre-process (the graph is slimmed already) stays out of the report, and
    # each report names the map and the score once
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()], caplog.text
    assert "anomaly_map      max |diff|" not in result.output and "score            max |diff|" not in result.output
    assert f"INT8 ({keep}):" in result.output and "teacher nodes in front of the first feature tap" in result.output
    assert (out / "model_int8.onnx").is_file() and (out / "model.onnx").is_file()
    from mrkd.runtime.metadata import ModelMetadata, sidecar_path
    info = ModelMetadata.load(sidecar_path(out / "model_int8.onnx")).int8
    reason = tensorrt_unavailable_reason()
    expected_target = target or ("tensorrt" if reason is None else "cpu")
    assert info.target == expected_target and info.keep_fp32_chosen == keep
    assert f"(INT8 target {expected_target})" in result.output
    if reason is not None:
        assert result.exit_code == 0, result.output
        assert "Error" not in result.output and not (out / "model.engine").exists()
        assert f"done: {out / 'model.onnx'}, {out / 'model_int8.onnx'}" in result.output
        assert f"TensorRT engines were not built because {reason}" in result.output
        if reason == "TensorRT is not installed here":
            assert "TensorRT engines were not built because TensorRT is not installed here" in result.output
    if importlib.util.find_spec("openvino"):   # the same agreement, on the OpenVINO backend
        assert "INT8 graph on openvino fp32 vs FP32 graph (ONNX Runtime CPU)" in result.output
    # the folder holds no more images than quantisation read: each INT8 report says its check flatters, and so
    # does the bf16 check, which runs on the same images (where this CPU has bf16)
    from mrkd.export.precision_check import bf16_unavailable_reason
    bf16_checked = bf16_unavailable_reason() is None
    assert result.output.count("note: flattering: measured on the INT8 calibration images") == \
        result.output.count("INT8 graph") + bf16_checked, result.output
    # the checkpoint records no training data: no defect image was checked, and each INT8 report says so
    assert result.output.count("note: agreement measured on good images only; defects not checked") == \
        result.output.count("INT8 graph") and "defect image(s)" not in result.output


def test_int8_is_checked_on_images_quantisation_did_not_read_where_there_are_any(tmp_path):
    from mrkd.export.int8 import int8_check_paths
    for index in range(7):
        (tmp_path / "good" / f"{index}.png").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "good" / f"{index}.png").write_bytes(b"x")
        (tmp_path / "other" / f"{index}.png").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "other" / f"{index}.png").write_bytes(b"x")
    quantised = set(int8_image_paths(tmp_path / "good", limit=4))
    paths, note = int8_check_paths(tmp_path / "good", None, limit=4)
    assert note is None and len(paths) == 3 and not quantised & set(paths)      # the 3 past the first 4
    paths, note = int8_check_paths(tmp_path / "good", tmp_path / "other", limit=4)
    assert note is None and paths == int8_image_paths(tmp_path / "other", limit=4)
    paths, note = int8_check_paths(tmp_path / "good", tmp_path / "good", limit=10)   # only what it read
    assert set(paths) == set(int8_image_paths(tmp_path / "good", limit=10)) and "flattering" in note


@pytest.mark.slow
def test_cli_engine_asked_for_without_tensorrt_is_an_error_after_writing_the_rest(int8_export, tmp_path):
    from click.testing import CliRunner
    from mrkd.export.cli import EXIT_NO_TENSORRT, export_command
    from mrkd.export.tensorrt_build import tensorrt_unavailable_reason
    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are here: the missing-TensorRT path cannot be shown")
    model, _, _, calib = int8_export
    ckpt = tmp_path / "ck.pt"
    model.save(ckpt)
    out = tmp_path / "out"
    result = CliRunner().invoke(export_command, [str(ckpt), "-o", str(out), "--int8", "--int8-images", str(calib),
                                                 "--int8-keep-fp32", "front", "--engine", "--simplify", "never"])
    assert result.exit_code == EXIT_NO_TENSORRT and "Error:" in result.output and "pip install" in result.output
    assert (out / "model_int8.onnx").is_file() and not (out / "model.engine").exists()
    # An engine asked for from the cpu INT8 form is refused before any work, in one line.
    refused = CliRunner().invoke(export_command, [str(ckpt), "-o", str(tmp_path / "x"), "--int8", "--int8-images",
                                                  str(calib), "--int8-target", "cpu", "--engine"])
    assert refused.exit_code == 1 and "TensorRT cannot build the cpu INT8 form" in refused.output
    assert "Traceback" not in refused.output and not (tmp_path / "x" / "model.onnx").exists()


def test_cpu_target_uses_uint8_activations_and_keeps_head_fp32(int8_export, tmp_path):
    model, fp32, _, calib = int8_export
    cpu = quantize_int8(fp32.path, tmp_path / "cpu.onnx", calib, target="cpu")
    proto = onnx.load(str(cpu.path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    activation_q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert activation_q and all(inits[n.input[2]].dtype == np.uint8 for n in activation_q)
    # Asymmetric: some activation zero-point is not the midpoint (post-ReLU maps are one-sided).
    assert any(int(inits[n.input[2]]) != 128 for n in activation_q)
    for node in proto.graph.node:
        if not node.name.startswith(QUANTISED_SCOPES) and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            assert all(name not in producers or producers[name].op_type != "DequantizeLinear" for name in node.input)
    assert cpu.metadata.int8.target == "cpu"
    # Every Relu survives: ORT's default for asymmetric activations deletes them (the U8 Q clips
    # instead), and the FP32 head, rewired to that Q's input, then read pre-ReLU features.
    relus = lambda graph: sum(n.op_type == "Relu" for n in graph.node)
    fp32_relus = relus(onnx.load(str(fp32.path)).graph)
    assert fp32_relus > 0 and relus(proto.graph) == fp32_relus
    images = load_images(int8_image_paths(calib), cpu.metadata)
    ref, cand = run_onnx(fp32.path, images)["score"], run_onnx(cpu.path, images)["score"]
    assert np.all(np.isfinite(cand)) and np.max(np.abs(ref - cand)) < 0.5


def test_unknown_int8_target(int8_export, tmp_path):
    _, fp32, _, calib = int8_export
    with pytest.raises(ExportError, match="target 'gpu'"):
        quantize_int8(fp32.path, tmp_path / "x.onnx", calib, target="gpu")


def _teacher_convs_with_int8_weights(proto):
    producers = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv" and n.name.startswith("/teacher/")]
    return convs, [n for n in convs if n.input[1] in producers and producers[n.input[1]].op_type == "DequantizeLinear"]


def test_keep_fp32_none_quantises_every_teacher_conv(int8_export, tmp_path):
    _, fp32, _, calib = int8_export
    none = quantize_int8(fp32.path, tmp_path / "none.onnx", calib, keep_fp32="none")
    convs, quantised = _teacher_convs_with_int8_weights(onnx.load(str(none.path)))
    assert convs and len(quantised) == len(convs)
    info = none.metadata.int8
    assert info.keep_fp32_chosen == "none" and info.teacher_nodes_kept_fp32 == 0
    assert list(info.score_error) == ["none"]


@pytest.mark.parametrize("tolerance, chosen", [(float("inf"), "none"), (-1.0, "front")])
def test_keep_fp32_auto_falls_back_on_measured_error(int8_export, tmp_path, monkeypatch, tolerance, chosen):
    import mrkd.export.int8 as int8_module
    _, fp32, _, calib = int8_export
    monkeypatch.setattr(int8_module, "AUTO_MAX_ERROR_VS_SPREAD", tolerance)
    lines = []
    auto = quantize_int8(fp32.path, tmp_path / "auto.onnx", calib, keep_fp32="auto", echo=lines.append)
    info = auto.metadata.int8
    assert info.keep_fp32 == "auto" and info.keep_fp32_chosen == chosen
    # "auto" always measures all-INT8 first; it only quantises again when that was too far off.
    assert list(info.score_error) == (["none"] if chosen == "none" else ["none", "front"])
    convs, quantised = _teacher_convs_with_int8_weights(onnx.load(str(auto.path)))
    assert (len(quantised) == len(convs)) == (chosen == "none")
    assert len(lines) == 1 and ("above" in lines[0]) == (chosen == "front")


def test_int8_image_score_error_against_brute_force(int8_export):
    from mrkd.export.int8 import int8_image_score_error
    model, fp32, int8, calib = int8_export
    images = load_images(int8_image_paths(calib), int8.metadata)
    error = int8_image_score_error(fp32.path, int8.path, images, int8.metadata)
    ref = run_onnx(fp32.path, images)["score"].astype(np.float64)
    cand = run_onnx(int8.path, images)["score"].astype(np.float64)
    assert error.mean_abs == pytest.approx(np.mean(np.abs(ref - cand)), rel=1e-6, abs=1e-9)
    assert error.max_abs == pytest.approx(np.max(np.abs(ref - cand)), rel=1e-6, abs=1e-9)
    assert error.fp32_spread == pytest.approx(np.std(ref), rel=1e-6)
    assert error.relative == pytest.approx(np.mean(np.abs(ref - cand)) / np.std(ref), rel=1e-6)


def test_decoder_convtransposes_become_int8_convs(int8_export):
    """ORT has no INT8 ConvTranspose: the INT8 graph carries none, and the 1×1 Convs that replace
    them read INT8 weights."""
    _, fp32, int8, _ = int8_export
    assert any(n.op_type == "ConvTranspose" for n in onnx.load(str(fp32.path)).graph.node)
    proto = onnx.load(str(int8.path))
    producers = {o: n for n in proto.graph.node for o in n.output}
    assert not any(n.op_type == "ConvTranspose" for n in proto.graph.node)
    replaced = [n for n in proto.graph.node if n.op_type == "Conv" and n.name.endswith("_as_conv")]
    assert replaced and len(replaced) == int8.metadata.int8.convtranspose_rewritten
    assert all(producers[n.input[1]].op_type == "DequantizeLinear" for n in replaced)


def test_unknown_keep_fp32_mode(int8_export, tmp_path):
    _, fp32, _, calib = int8_export
    with pytest.raises(ExportError, match="keep_fp32 'stem'"):
        quantize_int8(fp32.path, tmp_path / "x.onnx", calib, keep_fp32="stem")


def test_head_only_convs_stay_fp32_for_the_cpu_target_only(int8_export, tmp_path):
    """The student's last generation Convs feed only the head: the cpu form keeps them FP32 (ORT would
    dequantise their weights on every call), the tensorrt form quantises their inputs."""
    from mrkd.export.int8 import head_only_convs
    _, fp32, tensorrt_form, calib = int8_export
    names = head_only_convs(onnx.load(str(fp32.path)))
    assert sorted(names) == [f"/student/generation{i}/generation{i}.2/Conv" for i in (1, 2, 3)]
    cpu = quantize_int8(fp32.path, tmp_path / "cpu.onnx", calib, target="cpu", keep_fp32="front")
    for model, quantised in ((cpu, False), (tensorrt_form, True)):
        proto = onnx.load(str(model.path))
        producers = {o: n for n in proto.graph.node for o in n.output}
        convs = [n for n in proto.graph.node if n.name in names]
        assert len(convs) == 3
        assert all((n.input[1] in producers and producers[n.input[1]].op_type == "DequantizeLinear") == quantised
                   for n in convs), model.path.name
        assert model.metadata.int8.head_only_convs_fp32 == (0 if quantised else 3)


def test_held_out_defect_images_come_from_the_checkpoints_test_split(tmp_path):
    from mrkd.export.int8 import held_out_defect_paths
    # .thumbs/ (a viewer's thumbnails) is no defect type: hidden, as its files are to list_images
    for name in ("good/g0.png", "crack/c0.png", "crack/c1.png", "crack/c2.png", "spot/s0.png", "spot/notes.txt",
                 ".thumbs/t0.png"):
        (tmp_path / "cat" / "test" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cat" / "test" / name).write_bytes(b"x")
    record = {"data_root": str(tmp_path), "category": "cat", "layout": "mvtec"}
    paths, where = held_out_defect_paths(record, limit=3)
    test = tmp_path / "cat" / "test"
    # each defect type in turn, so a limit still sees every type; good images are not defects
    assert paths == [test / "crack/c0.png", test / "spot/s0.png", test / "crack/c1.png"] and str(test) in where
    assert held_out_defect_paths(None) == ([], "the checkpoint records no training data (no test/ split to take "
                                                "them from)")
    paths, where = held_out_defect_paths({**record, "category": "other"})
    assert paths == [] and "other/test is not here" in where
    paths, where = held_out_defect_paths({**record, "layout": "folder"})
    assert paths == [] and "plain folder" in where


@pytest.mark.slow
def test_int8_agreement_is_reported_apart_on_the_checkpoints_held_out_defect_images(int8_export, tmp_path):
    """The INT8 check measured agreement on good images only, while quantisation moves a defect's score
    further (up to 8.5 % of the threshold where good scores moved 1 %); the test/ split the checkpoint was
    trained on now gives a defect report of its own beside each good one (an unreadable file left out)."""
    from click.testing import CliRunner
    from mrkd.export.cli import export_command
    from mrkd.train.checkpoint import TRAINED_ON, save_checkpoint, trained_on
    model, _, _, calib = int8_export
    rng = np.random.default_rng(1)
    for kind, count in (("good", 2), ("crack", 3), ("spot", 2)):
        folder = tmp_path / "data" / "cat" / "test" / kind
        folder.mkdir(parents=True)
        for i in range(count):
            image = cv2.GaussianBlur(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), (7, 7), 2)
            if kind != "good":
                cv2.rectangle(image, (10, 10), (30, 30), (255, 255, 255), -1)
            cv2.imwrite(str(folder / f"{i}.png"), image)
    (tmp_path / "data" / "cat" / "test" / "spot" / "9.png").write_bytes(b"not a png")
    ckpt = tmp_path / "ck.pt"
    save_checkpoint(model, ckpt, extra={TRAINED_ON: trained_on(tmp_path / "data", "cat")})
    result = CliRunner().invoke(export_command, [str(ckpt), "-o", str(tmp_path / "out"), "--int8", "--int8-images",
                                                 str(calib), "--int8-target", "cpu", "--int8-keep-fp32", "front",
                                                 "--simplify", "never"])
    assert result.exit_code == 0, result.output
    reports = result.output.count("INT8 graph")
    assert reports >= 2 and result.output.count(": 5 defect image(s)") == reports / 2, result.output
    assert result.output.count(": 6 good image(s)") >= reports / 2
    assert result.output.count(f"note: defect images held out in {tmp_path / 'data' / 'cat' / 'test'}; 1 unreadable "
                               f"left out") == reports / 2
    assert "defects not checked" not in result.output


def test_a_check_images_folder_without_images_is_refused_before_anything_is_written(tmp_path):
    """It was said as 'no images found for INT8 quantisation' (of --check-images) after model.onnx was
    written, and only on a CPU with bf16 to check."""
    from click.testing import CliRunner
    from mrkd.export.cli import export_command
    small_model().save(tmp_path / "ck.pt")
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(export_command, [str(tmp_path / "ck.pt"), "-o", str(tmp_path / "out"),
                                                 "--check-images", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{tmp_path / 'empty'}: no images found for the precision checks (--check-images)" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--int8-images", "--check-images"])
def test_an_image_that_does_not_decode_is_refused_before_anything_is_written(tmp_path, option):
    """A corrupt file among the good images was said only when quantisation or the bf16 check read it,
    after model.onnx was written."""
    from click.testing import CliRunner
    from mrkd.export.cli import export_command
    small_model().save(tmp_path / "ck.pt")
    (tmp_path / "good").mkdir()
    for i in range(3):
        image = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / "good" / f"{i}.png"), image)
    (tmp_path / "good" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n half a file")
    args = ["--int8", "--int8-images"] if option == "--int8-images" else ["--check-images"]
    result = CliRunner().invoke(export_command, [str(tmp_path / "ck.pt"), "-o", str(tmp_path / "out"), *args,
                                                 str(tmp_path / "good")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"cannot read image '{tmp_path / 'good' / '1.png'}'" in result.output and f"(in {option};" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", ["auto", "none"])
def test_int8_on_one_image_records_no_infinite_ratio_and_ends_without_a_traceback(tmp_path, keep):
    """With one --int8-images image the FP32 scores have no spread, the score error's ratio to it was
    inf, and writing the INT8 sidecar ended in 'ValueError: Out of range float values are not JSON
    compliant' (a traceback, model_int8.onnx never written). Now the ratio is recorded as none."""
    from click.testing import CliRunner
    from mrkd.export.cli import export_command
    from mrkd.runtime.metadata import ModelMetadata, sidecar_path
    small_model().save(tmp_path / "ck.pt")
    (tmp_path / "one").mkdir()
    image = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), (7, 7), 2)
    cv2.imwrite(str(tmp_path / "one" / "good.png"), image)
    result = CliRunner().invoke(export_command, [str(tmp_path / "ck.pt"), "-o", str(tmp_path / "out"), "--simplify",
                                                 "never", "--batch", "1:1:2", "--int8", "--int8-images",
                                                 str(tmp_path / "one"), "--int8-keep-fp32", keep])
    assert result.exit_code == 0 and result.exception is None, result.output
    assert "no ratio to the FP32 score spread: the one image gave no spread" in result.output
    info = ModelMetadata.load(sidecar_path(tmp_path / "out" / "model_int8.onnx")).int8
    assert info.images == 1 and all(error["relative"] is None and error["fp32_spread"] == 0
                                    for error in info.score_error.values())
    assert info.keep_fp32_chosen == ("front" if keep == "auto" else "none")   # auto cannot judge: FP32 front kept


@pytest.mark.parametrize("target", ["cpu", "tensorrt"])
def test_int8_graphs_carry_no_unused_initializers(int8_export, tmp_path, target):
    """The scales and zero points of the Q/DQ pairs dropped for the FP32 head stayed in the graph, and
    ONNX Runtime printed 'Removing initializer ... It is not used by any node' (6 coloured lines) every
    time `mrkd run` opened model_int8.onnx."""
    import subprocess
    import sys
    _, fp32, _, calib = int8_export
    int8 = quantize_int8(fp32.path, tmp_path / "int8.onnx", calib, target=target, keep_fp32="front")
    proto = onnx.load(str(int8.path))
    read = {name for node in proto.graph.node for name in node.input}
    assert [init.name for init in proto.graph.initializer if init.name not in read] == []
    opened = subprocess.run([sys.executable, "-c", "import sys, onnxruntime as ort; ort.InferenceSession(sys.argv[1], "
                             "providers=['CPUExecutionProvider'])", str(int8.path)], capture_output=True, text=True)
    assert opened.returncode == 0 and "Removing initializer" not in opened.stderr, opened.stderr


def test_int8_images_warn_as_every_other_folder_reader(tmp_path):
    """INT8 calibration read its folder without the warnings training, calibration and mrkd run give: a GIF in
    a sub-folder was left out without a word, and 12-bit values in 16-bit files calibrated the ranges on
    nearly black images."""
    import warnings
    (tmp_path / "good").mkdir()
    twelve_bit = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096)
    for name in ("a.png", "b.png"):
        assert cv2.imwrite(str(tmp_path / "good" / name), twelve_bit)
    (tmp_path / "good" / "phone.gif").write_bytes(b"GIF89a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert int8_image_paths(tmp_path) == [tmp_path / "good/a.png", tmp_path / "good/b.png"]
    said = [str(w.message) for w in caught]
    assert any("skipped 1 image(s) in a format mrkd does not read (e.g. 'good/phone.gif')" in s for s in said), said
    assert any("--int8-images): 16-bit images use only 12 of their 16 bits" in s for s in said), said
