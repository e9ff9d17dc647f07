"""resize_square and the centre-crop geometry, and normalize, against independent references."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from mrkd.runtime.preprocess import (IMAGENET_MEAN, IMAGENET_STD, center_crop_geometry, normalize, normalize_batch,
                                     resize_square)

RNG = np.random.default_rng(0)


def test_shrink_by_two_is_block_average():
    image = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = resize_square(image, 32)
    blocks = image.reshape(32, 2, 32, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(out.astype(np.float64) - blocks).max() <= 0.5 + 1e-9


def test_enlarge_is_bilinear():
    image = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = resize_square(image, 40)
    ref = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].double(), size=(40, 40),
                        mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    assert np.abs(out.astype(np.float64) - ref).max() <= 1.0


def test_resize_mode_keeps_edge_content_and_squashes():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 190:] = 255            # a defect at the right edge
    out = resize_square(image, 50)
    assert out.shape == (50, 50, 3)
    assert out[:, -2:].min() == 255          # cols 190..199 map to 47.5..50: fully bright at 48, 49
    assert out[:, :47].max() == 0


def test_center_crop_matches_torchvision_geometry():
    # Nearest-neighbour masks isolate the geometry: torchvision Resize(shorter side) + CenterCrop.
    mask = RNG.random((90, 150)) > 0.5
    (height, width), (top, left) = center_crop_geometry(90, 150, 60)
    out = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    out = out[top:top + 60, left:left + 60].astype(bool)
    tensor = torch.from_numpy(mask.astype(np.uint8))[None]
    resized = TF.resize(tensor, 60, interpolation=T.InterpolationMode.NEAREST)
    expected_shape = resized.shape[1:]
    ref = TF.center_crop(resized, 60)[0].numpy().astype(bool)
    assert expected_shape == (60, 100)
    # OpenCV and torchvision nearest pick the same source pixel (floor(dst*scale)) here.
    np.testing.assert_array_equal(out, ref)


def test_center_crop_image_is_crop_of_shorter_side_resize():
    image = RNG.integers(0, 256, (120, 90, 3), dtype=np.uint8)
    out = resize_square(image, 45, "center_crop")
    resized = cv2.resize(image, (45, 60), interpolation=cv2.INTER_AREA)   # 120x90 -> 60x45
    np.testing.assert_array_equal(out, resized[8:53])                      # round((60-45)/2) = 8


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        resize_square(np.zeros((4, 4, 3), np.uint8), 2, "stretch")
    with pytest.raises(ValueError, match="HxWx3"):
        resize_square(np.zeros((4, 4), np.uint8), 2)


def test_normalize_matches_torchvision():
    bgr = RNG.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    ref = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(
        np.ascontiguousarray(bgr[:, :, ::-1])).numpy()
    out = normalize(bgr)
    assert out.dtype == np.float32 and out.shape == (3, 24, 24)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_normalize_batch_list_and_array_agree():
    images = [RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    stacked = normalize_batch(np.stack(images), (0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    listed = normalize_batch(images, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    np.testing.assert_array_equal(stacked, listed)
    ref = (np.stack(images)[..., ::-1] / 255.0 - [0.5, 0.4, 0.3]) / [0.2, 0.3, 0.4]
    np.testing.assert_allclose(stacked, ref.transpose(0, 3, 1, 2), atol=1e-5)


def test_center_crop_of_a_line_scan_row_is_sampled_without_the_huge_intermediate():
    # A 1 x 16384 row's shorter side scaled to 64 made a 64 x 1048576 image (201 MB; 3.2 GB at 256)
    # to keep 64 x 64 of it. The window is now sampled directly: compared with an independent 1-D linear
    # resize of the row (every output row is that row), and the peak allocation stays small.
    from runtime_fixtures import traced_peak
    row = RNG.integers(0, 256, (1, 16384, 3), dtype=np.uint8)
    out, peak = traced_peak(lambda: resize_square(row, 64, "center_crop"))
    assert out.shape == (64, 64, 3) and peak < 8 * 2 ** 20
    wide = F.interpolate(torch.from_numpy(row[0].T.copy())[None].double(), size=64 * 16384,
                         mode="linear", align_corners=False)[0].T.numpy()
    left = round((64 * 16384 - 64) / 2)
    expected = np.broadcast_to(wide[left:left + 64], (64, 64, 3))
    assert np.abs(out.astype(np.float64) - expected).max() <= 1.0


@pytest.mark.parametrize("shape", [(20, 10000), (10000, 20)])
def test_center_crop_direct_sampling_is_within_one_level_of_resize_then_crop(shape):
    image = RNG.integers(0, 256, shape + (3,), dtype=np.uint8)
    out = resize_square(image, 256, "center_crop")
    height, width = (256, 128000) if shape[0] < shape[1] else (128000, 256)
    top, left = round((height - 256) / 2), round((width - 256) / 2)
    reference = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)[top:top + 256, left:left + 256]
    assert np.abs(out.astype(int) - reference).max() <= 1
