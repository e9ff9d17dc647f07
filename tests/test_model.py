"""The core MRKD model against independent references: head (numpy/scipy), loss (the official
definition with torch.nn.CosineSimilarity), feature-level masking statistics, the frozen teacher,
backbone-derived widths, checkpoints and teacher weight files. Tiny sizes, resnet18, random teachers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
scipy_ndimage = pytest.importorskip("scipy.ndimage")
torchvision = pytest.importorskip("torchvision")

from mrkd.train import CheckpointError, build_model, load_checkpoint, resnet18  # noqa: E402
from mrkd.train.head import AnomalyMapHead, distillation_loss, gaussian_kernel1d, symmetric_indices  # noqa: E402
from mrkd.train.student import random_spatial_mask  # noqa: E402
from mrkd.train.teachers import TeacherWeightsError  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return resnet18(teacher_weights="random", image_size=32).eval()


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --- independent references ------------------------------------------------------------------------
def reference_cosine_distance(t: np.ndarray, s: np.ndarray) -> np.ndarray:
    """1 − cos over channels (axis 1), per pixel, in float64."""
    dot = (t * s).sum(1)
    return 1.0 - dot / (np.sqrt((t * t).sum(1)) * np.sqrt((s * s).sum(1)))


def reference_upsample(amap: np.ndarray, size) -> np.ndarray:
    """Bilinear, align_corners=True: output pixel i samples input coordinate i·(h−1)/(H−1)."""
    (h, w), (out_h, out_w) = amap.shape, size
    rows = np.arange(out_h) * ((h - 1) / (out_h - 1) if out_h > 1 else 0.0)
    cols = np.arange(out_w) * ((w - 1) / (out_w - 1) if out_w > 1 else 0.0)
    grid = np.meshgrid(rows, cols, indexing="ij")
    return scipy_ndimage.map_coordinates(amap, grid, order=1, mode="nearest")


def reference_anomaly_map(teacher, student, size, sigma=4.0):
    per_scale = [reference_cosine_distance(t.double().numpy(), s.double().numpy()) for t, s in zip(teacher, student)]
    summed = sum(np.stack([reference_upsample(m, size) for m in maps]) for maps in per_scale)
    smoothed = np.stack([scipy_ndimage.gaussian_filter(m, sigma=sigma, mode="reflect", truncate=4.0) for m in summed])
    return per_scale, summed, smoothed


def random_features(shapes, channels=(8, 16, 32), n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda c, hw: torch.randn(n, c, *hw, generator=g)  # noqa: E731
    teacher = [make(c, hw) for c, hw in zip(channels, shapes)]
    # Correlated student so the maps are not all ≈ 1.
    student = [t + 0.8 * make(t.shape[1], t.shape[2:]) for t in teacher]
    return teacher, student


# --- head ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_size, shapes", [
    ((64, 64), [(16, 16), (8, 8), (4, 4)]),
    ((32, 32), [(8, 8), (4, 4), (2, 2)]),
    ((24, 40), [(6, 10), (3, 5), (2, 3)]),     # non-square
    ((12, 12), [(3, 3), (2, 2), (1, 1)]),     # smaller than the Gaussian radius 16
    ((8, 8), [(2, 2), (1, 1), (1, 1)]),
])
def test_head_matches_numpy_scipy_reference(image_size, shapes):
    teacher, student = random_features(shapes)
    head = AnomalyMapHead(image_size, sigma=4.0)
    ref_scales, ref_summed, ref_smoothed = reference_anomaly_map(teacher, student, image_size)
    for ours, ref in zip(head.per_scale_maps(teacher, student), ref_scales):
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(head(teacher, student, smooth=False)[:, 0].numpy(), ref_summed, atol=1e-5, rtol=0)
    maps = head(teacher, student)
    assert tuple(maps.shape) == (2, 1, *image_size)
    np.testing.assert_allclose(maps[:, 0].numpy(), ref_smoothed, atol=1e-5, rtol=0)
    np.testing.assert_allclose(head.scores(maps).numpy(), ref_smoothed.reshape(2, -1).max(1), atol=1e-5, rtol=0)


def test_head_cosine_is_fp32_for_half_inputs():
    # Sum of squares over many channels overflows float16 (max 65504); the head must not.
    t = torch.full((1, 1024, 2, 2), 20.0).half()
    s = torch.full((1, 1024, 2, 2), 10.0).half()
    maps = AnomalyMapHead(8).per_scale_maps([t], [s])[0]
    assert maps.dtype == torch.float32
    np.testing.assert_allclose(maps.numpy(), 0.0, atol=1e-6)


@pytest.mark.parametrize("length", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("radius", [0, 1, 4, 6, 16, 23])
def test_symmetric_indices_is_numpy_symmetric_pad(length, radius):
    expected = np.pad(np.arange(length), radius, mode="symmetric")
    np.testing.assert_array_equal(symmetric_indices(length, radius).numpy(), expected)


@pytest.mark.parametrize("sigma", [1.0, 2.5, 4.0])
def test_gaussian_kernel_is_scipys(sigma):
    # scipy's kernel is the impulse response of gaussian_filter1d.
    radius = int(4.0 * sigma + 0.5)
    impulse = np.zeros(4 * radius + 1)
    impulse[2 * radius] = 1.0
    expected = scipy_ndimage.gaussian_filter1d(impulse, sigma, truncate=4.0)[radius:3 * radius + 1]
    np.testing.assert_allclose(gaussian_kernel1d(sigma).numpy(), expected, atol=1e-7)


def test_distillation_loss_is_official_definition():
    teacher, student = random_features([(8, 8), (4, 4), (2, 2)], n=3)
    cosine = torch.nn.CosineSimilarity()
    expected = sum(torch.mean(1 - cosine(t.reshape(t.shape[0], -1), s.reshape(s.shape[0], -1)))
                   for t, s in zip(teacher, student))
    torch.testing.assert_close(distillation_loss(teacher, student), expected, atol=1e-6, rtol=1e-6)


# --- feature-level masking -------------------------------------------------------------------------
def _generation_inputs(decoder, embedding):
    """The (masked) features entering generation1..3 for one decoder call."""
    captured = []
    hooks = [getattr(decoder, f"generation{i}").register_forward_pre_hook(lambda m, args: captured.append(args[0]))
             for i in (1, 2, 3)]
    try:
        with torch.no_grad():
            decoder(embedding)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _zeroed_fraction(features):
    """Share of spatial positions where every channel is zero."""
    zero = torch.cat([(f == 0).all(1).flatten() for f in features])
    return zero.float().mean().item()


def test_random_spatial_mask_statistics():
    torch.manual_seed(3)
    feature = torch.ones(16, 5, 32, 32)
    mask = random_spatial_mask(feature, 0.2)
    assert tuple(mask.shape) == (16, 1, 32, 32)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert abs((mask == 0).float().mean().item() - 0.2) < 0.02     # 16384 draws: σ ≈ 0.003
    assert bool((random_spatial_mask(feature, 0.0) == 1).all())


def test_flm_masks_in_training_only(model):
    torch.manual_seed(4)
    decoder = model.student
    embedding = model.bottleneck(model.teacher(torch.randn(8, 3, 64, 64))).detach()
    try:
        decoder.eval()
        natural = _zeroed_fraction(_generation_inputs(decoder, embedding))
        with torch.no_grad():
            torch.testing.assert_close(decoder(embedding), decoder(embedding), rtol=0, atol=0)
        decoder.train()
        masked = _generation_inputs(decoder, embedding)
        # 8·(16² + 8² + 4²) = 2688 positions: σ of the share ≈ 0.008.
        assert abs(_zeroed_fraction(masked) - natural - decoder.mask_ratio) < 0.05
        assert natural < 0.02
    finally:
        decoder.eval()


def test_flm_off_and_test_time_mask(model, images):
    torch.manual_seed(5)
    embedding = model.bottleneck(model.teacher(images)).detach()
    flm_off = build_model("resnet18", "random", image_size=32, flm=False).student.train()
    assert _zeroed_fraction(_generation_inputs(flm_off, embedding)) < 0.02
    official_like = build_model("resnet18", "random", image_size=32, test_time_mask=True).eval()
    with torch.no_grad():
        first, second = official_like.anomaly_map(images), official_like.anomaly_map(images)
    assert not torch.equal(first, second)
    assert _zeroed_fraction(_generation_inputs(official_like.student, embedding)) > 0.1


# --- teacher, widths, training step -------------------------------------------------------------
def test_resnet18_trains_with_a_frozen_teacher(images):
    # The official code crashes on resnet18 (its generation blocks hard-code WRN50 widths).
    torch.manual_seed(6)
    model = resnet18(teacher_weights="random", image_size=32)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    model.train()
    assert not model.teacher.training and not any(m.training for m in model.teacher.modules())
    assert model.student.training and model.bottleneck.training
    assert not any(p.requires_grad for p in model.teacher.parameters())
    # All parameters handed to the optimizer: the teacher must still not move.
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = model.loss(images, images.flip(-1))
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.trainable_parameters())
        assert all(p.grad is None for p in model.teacher.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key          # weights and BN running stats


@pytest.mark.parametrize("backbone, widths", [("resnet18", (64, 128, 256)), ("wide_resnet50_2", (256, 512, 1024))])
def test_widths_are_derived_from_the_backbone(backbone, widths):
    model = build_model(backbone, "random", image_size=32).eval()
    teacher, student = model(torch.randn(1, 3, 32, 32))
    assert [t.shape[1] for t in teacher] == list(widths)
    assert [tuple(s.shape) for s in student] == [tuple(t.shape) for t in teacher]
    assert [t.shape[-1] for t in teacher] == [8, 4, 2]


# --- checkpoints -----------------------------------------------------------------------------------
def test_checkpoint_round_trip(model, images, tmp_path):
    path = tmp_path / "model.pt"
    model.calibration = {"threshold": 0.5}
    model.save(path)
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]          # no temporary file left behind
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == "mrkd-checkpoint" and "state_dict" in raw["teacher"]
    loaded = load_checkpoint(path)
    assert not loaded.training and loaded.calibration.threshold == 0.5 and loaded.calibration.method == "manual"
    assert loaded.config == model.config
    torch.testing.assert_close(loaded.anomaly_map(images), model.anomaly_map(images), rtol=0, atol=0)


@pytest.mark.slow   # a second Python process importing torch: several seconds on 2 busy cores
def test_checkpoint_reloads_identically_in_a_fresh_process(model, images, tmp_path):
    path, inputs, out = tmp_path / "model.pt", tmp_path / "x.npy", tmp_path / "maps.npy"
    model.save(path)
    np.save(inputs, images.numpy())
    script = textwrap.dedent(f"""
        import numpy as np, torch, warnings
        warnings.simplefilter("ignore")
        from mrkd.train import load_checkpoint
        model = load_checkpoint({str(path)!r})
        np.save({str(out)!r}, model.anomaly_map(torch.from_numpy(np.load({str(inputs)!r}))).numpy())
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    np.testing.assert_array_equal(np.load(out), model.anomaly_map(images).numpy())


@pytest.mark.parametrize("target", ["torch.save", "os.replace"])
def test_failed_checkpoint_write_keeps_the_old_file(model, tmp_path, monkeypatch, target):
    path = tmp_path / "model.pt"
    path.write_bytes(b"previous checkpoint")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    if target == "torch.save":
        monkeypatch.setattr(torch, "save", fail)
    else:
        import mrkd.atomic
        monkeypatch.setattr(mrkd.atomic.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert path.read_bytes() == b"previous checkpoint"
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


def test_checkpoint_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(CheckpointError, match="missing.pt.*not found"):
        load_checkpoint(missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt.*not an mrkd checkpoint"):
        load_checkpoint(foreign)
    official = tmp_path / "official.pt"
    torch.save({"bn": {}, "decoder": {}}, official)
    with pytest.raises(CheckpointError, match="official.pt.*from_official"):
        load_checkpoint(official)
    a_list = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], a_list)
    with pytest.raises(CheckpointError, match="list.pt.*expected a dict"):
        load_checkpoint(a_list)


def test_damaged_mrkd_checkpoints_name_the_file(model, tmp_path):
    good = tmp_path / "good.pt"
    model.save(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt.*not a readable"):
        load_checkpoint(truncated)
    raw = torch.load(good, map_location="cpu", weights_only=True)
    cases = {
        "no_config.pt": ({k: v for k, v in raw.items() if k != "config"}, "incomplete.*config"),
        "no_student.pt": ({k: v for k, v in raw.items() if k != "student"}, "incomplete.*student"),
        "unknown_backbone.pt": ({**raw, "config": {**raw["config"], "backbone": "vgg7"}}, "unknown backbone 'vgg7'"),
        "other_teacher.pt": ({**raw, "teacher": {**raw["teacher"], "sha256": "0" * 64}}, "teacher weights.*differ"),
        "wrong_student.pt": ({**raw, "config": {**raw["config"], "backbone": "resnet50"},
                              "teacher": {k: v for k, v in raw["teacher"].items() if k != "sha256"}},
                             "do not fit backbone resnet50"),
    }
    for name, (data, message) in cases.items():
        torch.save(data, tmp_path / name)
        with pytest.raises(CheckpointError, match=f"{name}.*{message}"):
            load_checkpoint(tmp_path / name)


@pytest.mark.parametrize("field, value", [
    ("image_size", -64), ("image_size", 0), ("image_size", 50), ("image_size", "64"), ("image_size", 64.0),
    ("image_size", 10 ** 9), ("sigma", -1.0), ("sigma", float("nan")), ("sigma", "4"), ("mean", "abc"),
    ("mean", [0.5]), ("std", [0.0, 0.0, 0.0]), ("resize_mode", "zzz"), ("scale_weights", [1, 1])])
def test_a_checkpoint_config_that_training_cannot_write_is_refused_naming_file_and_field(model, tmp_path, field,
                                                                                          value):
    """A hand-made or damaged config entry: a negative image_size ended `mrkd export` in a torch RuntimeError
    traceback, a float one in a TypeError, a negative sigma in another; a size of 50, a string size, one
    mean value or a zero std were taken, and the export or the runtime went wrong later, far from the file."""
    good = tmp_path / "good.pt"
    model.save(good)
    raw = torch.load(good, map_location="cpu", weights_only=True)
    path = tmp_path / "odd.pt"
    torch.save({**raw, "config": {**raw["config"], field: value}}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "odd.pt" in str(info.value) and field in str(info.value) and "\n" not in str(info.value)


def test_reloaded_model_saves_and_reloads_again(model, images, tmp_path):
    load_checkpoint(model.save(tmp_path / "first.pt") or tmp_path / "first.pt").save(tmp_path / "second.pt")
    again = load_checkpoint(tmp_path / "second.pt")
    assert again.teacher_source.kind == "random"
    torch.testing.assert_close(again.anomaly_map(images), model.anomaly_map(images), rtol=0, atol=0)


# --- teacher weights from a local file ------------------------------------------------------------
def test_teacher_weights_from_a_torchvision_file(tmp_path):
    torch.manual_seed(8)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(reference.state_dict(), path)          # full torchvision dict, layer4 and fc included
    model = build_model("resnet18", str(path), image_size=32)
    assert model.teacher_source.kind == "file" and model.teacher_source.name == str(path)
    expected = reference.state_dict()
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, expected[key]), key
    x = torch.randn(1, 3, 32, 32)
    reference.eval()
    with torch.no_grad():
        layer1 = reference.layer1(reference.maxpool(reference.relu(reference.bn1(reference.conv1(x)))))
    torch.testing.assert_close(model.teacher(x)[0], layer1, rtol=0, atol=0)


def test_teacher_file_for_the_wrong_backbone(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(TeacherWeightsError, match=r"resnet34.pth.*do not fit backbone resnet18.*unexpected"):
        build_model("resnet18", str(path), image_size=32)
    path50 = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path50)
    with pytest.raises(TeacherWeightsError, match=r"resnet50.pth.*do not fit backbone resnet18"):
        build_model("resnet18", str(path50), image_size=32)
    with pytest.raises(TeacherWeightsError, match="not found.*nowhere.pth"):
        build_model("resnet18", str(tmp_path / "nowhere.pth"), image_size=32)
