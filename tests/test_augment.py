"""PatchSwap (ILM): exact change masks, patch content from the source, object rules, presets."""

import json
from dataclasses import replace

import cv2
import numpy as np
import pytest

from mrkd.train.augment import (MVTEC_KIND, PRESETS, PatchSwap, PatchSwapConfig, binary_median7, object_mask,
                                preset_for)


def _random_pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 256, shape, dtype=np.uint8)


def _disc(shape, centre, radius, fg=180, bg=15):
    image = np.full(shape, bg, np.uint8)
    cv2.circle(image, (centre[1], centre[0]), radius, (fg, fg, fg), -1)
    return image


@pytest.mark.parametrize("shape", [(64, 64, 3), (50, 90, 3), (33, 21, 3), (40, 40)])
def test_mask_is_exactly_the_changed_pixels(shape):
    dest, src = _random_pair(shape)
    swap = PatchSwap(PRESETS["texture"])
    rng = np.random.default_rng(1)
    for _ in range(30):
        out, mask = swap(dest, src, rng)
        assert out.shape == dest.shape and out.dtype == np.uint8
        assert mask.shape == dest.shape[:2] and mask.dtype == np.uint8
        changed = out != dest
        changed = changed.any(axis=2) if changed.ndim == 3 else changed
        np.testing.assert_array_equal(mask.astype(bool), changed)
        assert changed.any()


def test_single_patch_content_comes_from_src():
    dest, src = _random_pair((48, 64, 3), seed=3)
    config = PatchSwapConfig(width_bounds_pct=((0.1, 0.2), (0.1, 0.2)), num_patches=1)
    out, mask = PatchSwap(config)(dest, src, np.random.default_rng(4))
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    patch = out[y0:y1, x0:x1]
    # Brute force: the swapped rectangle equals some same-size window of src.
    hits = [(sy, sx) for sy in range(src.shape[0] - patch.shape[0] + 1)
            for sx in range(src.shape[1] - patch.shape[1] + 1)
            if np.array_equal(src[sy:sy + patch.shape[0], sx:sx + patch.shape[1]], patch)]
    assert len(hits) == 1
    np.testing.assert_array_equal(out[~mask.astype(bool)], dest[~mask.astype(bool)])


def test_patch_widths_follow_bounds():
    dest, src = _random_pair((100, 100, 3))
    config = PatchSwapConfig(width_bounds_pct=((0.05, 0.1), (0.05, 0.1)), num_patches=1)
    rng = np.random.default_rng(0)
    for _ in range(50):
        _, mask = PatchSwap(config)(dest, src, rng)
        ys, xs = np.nonzero(mask)
        assert ys.max() - ys.min() + 1 <= 20 and xs.max() - xs.min() + 1 <= 20   # 2 * max half-width


def test_object_preset_keeps_patches_on_the_object():
    dest = _disc((96, 96, 3), (50, 46), 28, fg=180)
    src = _disc((96, 96, 3), (40, 56), 28, fg=120)
    dest_obj = dest[..., 0] == 180
    config = replace(PRESETS["object"], num_patches=1)
    rng = np.random.default_rng(5)
    swapped = 0
    for _ in range(60):
        out, mask = PatchSwap(config)(dest, src, rng)
        if not mask.any():
            continue
        swapped += 1
        pasted_object = out[..., 0] == 120          # source object pixels, wherever they landed
        ys, xs = np.nonzero(mask)
        box = np.zeros_like(mask, dtype=bool)
        box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
        # the patch was taken mostly from the source object (>= 70 % of the box, median-filter slack)
        assert pasted_object[box].sum() >= 0.6 * box.sum()
        # and a quarter of it landed on the destination object
        assert (pasted_object & dest_obj).sum() > 0.2 * pasted_object.sum()
        # background pixels of the source are only pasted over the destination object
        assert dest_obj[mask.astype(bool) & (out[..., 0] == 15)].all()
    assert swapped >= 50


def test_object_mask_matches_mean_threshold_and_median():
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    reference = (np.abs(image.astype(np.float64).mean(axis=2) - 100) > 30).astype(np.uint8)
    np.testing.assert_array_equal(object_mask(image, 100, 30), cv2.medianBlur(reference, 7))
    binary = (rng.random((31, 45)) > 0.4).astype(np.uint8)
    np.testing.assert_array_equal(binary_median7(binary), cv2.medianBlur(binary, 7))


def test_no_object_no_change():
    blank = np.full((32, 32, 3), 15, np.uint8)
    out, mask = PatchSwap(PRESETS["object"])(blank, blank.copy(), np.random.default_rng(0))
    assert not mask.any() and np.array_equal(out, blank)


def test_presets_and_lookup(tmp_path):
    assert PRESETS["texture"].skip_background is None and PRESETS["texture"].num_patches == 4
    assert PRESETS["object"].skip_background is not None and PRESETS["object"].num_patches == 3
    assert PRESETS["object"].min_object_pct == 0.7 and PRESETS["object"].min_overlap_pct == 0.25
    assert len(MVTEC_KIND) == 15 and MVTEC_KIND["carpet"] == "texture" and MVTEC_KIND["screw"] == "object"
    assert preset_for("hazelnut").skip_background == (20.0, 20.0)
    assert preset_for("unknown_part") == PRESETS["texture"]
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "mrkd_category.json").write_text(json.dumps({"kind": "object"}))
    assert preset_for("part", tmp_path) == PRESETS["object"]
    (tmp_path / "part" / "mrkd_category.json").write_text(json.dumps({"kind": "blob"}))
    with pytest.raises(ValueError, match="mrkd_category.json"):
        preset_for("part", tmp_path)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        PatchSwap()(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8), np.random.default_rng(0))
