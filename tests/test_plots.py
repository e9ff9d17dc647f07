"""PNG plots (size, validity, atomic write) and the heat-map overlay colours."""

import struct

import cv2
import numpy as np
import pytest

from mrkd.runtime.outputs.overlay import heatmap_overlay
from mrkd.train import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_plot_roc_writes_png_of_requested_size(tmp_path):
    path = tmp_path / "sub" / "roc.png"
    curves = {"image": ([0, 0.2, 1], [0, 0.8, 1], 0.8), "pixel": (np.linspace(0, 1, 50), np.linspace(0, 1, 50) ** 0.3, 0.9)}
    plots.plot_roc(curves, path, figsize=(4, 3), dpi=50)
    assert png_size(path) == (200, 150)
    assert cv2.imread(str(path)) is not None  # decodes as an image
    assert [p.name for p in path.parent.iterdir()] == ["roc.png"]  # no temporary file left


def test_plot_score_histogram(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "hist.png"
    plots.plot_score_histogram(rng.normal(0, 1, 100), rng.normal(3, 1, 20), 1.5, path, dpi=40)
    assert png_size(path) == (240, 160)
    with pytest.raises(ValueError, match="finite"):
        plots.plot_score_histogram([0.1, np.nan], [0.3], 0.2, tmp_path / "bad.png")


def test_plot_roc_rejects_mismatched_curve(tmp_path):
    with pytest.raises(ValueError, match="'broken'"):
        plots.plot_roc({"broken": ([0, 1], [0, 0.5, 1], 0.5)}, tmp_path / "x.png")


def test_overlay_shape_dtype_and_hot_pixel():
    image = np.full((60, 80, 3), 40, dtype=np.uint8)
    amap = np.zeros((30, 40), dtype=np.float32)  # half size: stretched over the image
    amap[10, 20] = 5.0
    out = heatmap_overlay(image, amap, alpha=1.0)
    assert out.shape == (60, 80, 3) and out.dtype == np.uint8
    hottest = np.unravel_index(np.argmax(out[..., 2].astype(int) - out[..., 0]), out.shape[:2])
    assert abs(hottest[0] - 20.5) <= 1.5 and abs(hottest[1] - 40.5) <= 1.5  # where the map peak lands
    assert tuple(out[hottest]) == (0, 0, 128)  # top of JET in BGR: dark red
    assert tuple(out[0, 0]) == (128, 0, 0)  # bottom of JET: dark blue


def test_overlay_blends_and_respects_vmin_vmax():
    image = np.full((8, 8, 3), 200, dtype=np.uint8)
    amap = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    np.testing.assert_array_equal(heatmap_overlay(image, amap, alpha=0.0), image)
    half = heatmap_overlay(image, amap, alpha=0.5)
    np.testing.assert_allclose(half[-1, -1], [100, 100, 164], atol=1)  # 0.5·(0,0,128) + 0.5·200
    clipped = heatmap_overlay(image, amap, vmin=0.0, vmax=0.5, alpha=1.0)
    assert tuple(clipped[4, 0]) == tuple(clipped[-1, -1]) == (0, 0, 128)  # everything >= vmax is hottest
    with pytest.raises(ValueError, match="uint8"):
        heatmap_overlay(image.astype(np.float32), amap)
