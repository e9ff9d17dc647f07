"""The INT8 record of a sidecar names its images for what they are (the images INT8 quantisation
measured activation ranges on), and still reads files written with the old 'calibration_*' names."""

import pytest

from mrkd.runtime.metadata import Int8Info, MetadataError


def test_new_names_round_trip():
    info = Int8Info(images=6, target="cpu", images_dir="data/train/good", score_error={"none": {"relative": 0.1}})
    data = info.to_dict()
    assert data["images"] == 6 and data["images_dir"] == "data/train/good" and "calibration_images" not in data
    assert Int8Info.from_dict(data, "m.json") == info


def test_old_names_are_still_read():
    old = {"calibration_images": 6, "calibration_dir": "good", "calibration_score_error": {"none": {}},
           "target": "tensorrt", "keep_fp32_chosen": "none"}
    info = Int8Info.from_dict(old, "old.json")
    assert (info.images, info.images_dir, info.score_error, info.keep_fp32_chosen) == (6, "good", {"none": {}}, "none")


def test_missing_count_names_the_field():
    with pytest.raises(MetadataError, match=r"old.json: field int8.images is missing"):
        Int8Info.from_dict({"target": "cpu"}, "old.json")
