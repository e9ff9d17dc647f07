"""Image files that declare enormous sizes in a few bytes ("decompression bombs"): each way an image
comes in (training and held-out images, export's --int8-images / --check-images, refit's --good, the
runtime's image-folder source) refuses or skips it naming the file, before anything is decoded.

The bombs are small real files whose header is patched to declare 60000 x 60000 pixels (or 20000 x
20000: under OpenCV's own limit, which would decode 1.2 GB); PIL reading the same header says so
independently. OpenCV used to raise its own cv2.error (a traceback in every command), or decode.
"""

from __future__ import annotations

import io
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mrkd.runtime.images import MAX_IMAGE_PIXELS, ImageReadError, declared_size, read_image
from test_refit import good_marks, one_thread, parent, write_labels  # noqa: F401  (refit's small model)


def small(fmt: str, width: int = 37, height: int = 23, **save) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **save)
    return buffer.getvalue()


def bomb(fmt: str, width: int, height: int) -> bytes:
    """A small valid file of ``fmt`` whose header declares width x height."""
    data = bytearray(small(fmt))
    if fmt == "PNG":
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    elif fmt == "BMP":
        data[18:26] = struct.pack("<ii", width, height)
    elif fmt == "JPEG":
        sof = data.index(b"\xff\xc0")           # PIL writes baseline JPEG
        data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def pil_size(data: bytes):
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        return Image.open(io.BytesIO(data)).size
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@pytest.mark.parametrize("fmt, save", [("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}), ("BMP", {}),
                                       ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}),
                                       ("TIFF", {"compression": "tiff_adobe_deflate"})])
def test_declared_size_is_what_pil_reads_from_the_header(fmt, save):
    data = small(fmt, 53, 37, **save)
    assert declared_size(memoryview(data)) == pil_size(data) == (53, 37)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP"])
@pytest.mark.parametrize("side", [60000, 20000])
def test_a_bomb_is_refused_naming_the_file_before_it_is_decoded(tmp_path, fmt, side):
    data = bomb(fmt, side, side)
    assert pil_size(data) == (side, side) and side * side > MAX_IMAGE_PIXELS
    path = tmp_path / f"bomb.{fmt.lower()}"
    path.write_bytes(data)
    started = time.perf_counter()
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    assert str(path) in str(caught.value) and f"declares {side} x {side} pixels" in str(caught.value)
    assert time.perf_counter() - started < 1.0                    # refused, not decoded


def bombed_folder(source: Path, into: Path, name: str = "zz_bomb.png") -> Path:
    shutil.copytree(source, into)
    (into / name).write_bytes(bomb("PNG", 60000, 60000))
    return into / name


def one_error_line(result) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.mark.slow      # trains a tiny model
def test_mrkd_train_refuses_a_bomb_among_the_training_or_held_out_images_in_one_line(tmp_path):
    from click.testing import CliRunner

    from mrkd.cli import main
    from mrkd.train.data import DataError, scan_folder
    from mrkd.train.trainer import TrainConfig, split_holdout, train
    from train_fixtures import CATEGORY, IMAGE_SIZE, TINY, tiny_data
    good = tmp_path / "good"
    bombed = bombed_folder(Path(tiny_data()) / CATEGORY / "train" / "good", good)
    done = CliRunner().invoke(main, ["train", str(good), "--out", str(tmp_path / "run"), "--epochs", "1",
                                     "--image-size", str(IMAGE_SIZE), "--backbone", "resnet18",
                                     "--teacher-weights", "random", "--score", "mrkd"])
    assert done.exit_code == 1
    assert str(bombed) in one_error_line(done) and "60000 x 60000" in done.output
    # the same file among the images held out for the threshold
    bombed.unlink()
    config = TrainConfig(**{**TINY, "epochs": 1, "eval_every": 0}, score="mrkd")
    _, held_out = split_holdout(scan_folder(good), config)
    Path(held_out[0]).write_bytes(bomb("PNG", 60000, 60000))
    with pytest.raises(DataError, match="held out for calibration") as caught:
        train(good, None, tmp_path / "run2", config, backbone="resnet18", teacher_weights="random", resume=False)
    assert held_out[0] in str(caught.value) and "60000 x 60000" in str(caught.value)


@pytest.mark.slow      # trains a tiny model and exports it
@pytest.mark.parametrize("option", ["--int8-images", "--check-images"])
def test_mrkd_export_refuses_a_bomb_among_its_images_in_one_line(tmp_path, option):
    from click.testing import CliRunner

    from mrkd.cli import main
    from train_fixtures import CATEGORY, tiny_data, trained_run
    images = tmp_path / "images"
    bombed = bombed_folder(Path(tiny_data()) / CATEGORY / "train" / "good", images)
    args = ["export", str(trained_run()["checkpoint"]), "-o", str(tmp_path / "out"), "--no-engine", option,
            str(images)] + (["--int8"] if option == "--int8-images" else [])
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 1
    line = one_error_line(done)
    assert str(bombed) in line and option in line and "60000 x 60000" in line
    assert not (tmp_path / "out").exists()


def test_the_runtimes_image_folder_skips_a_bomb_as_a_counted_bad_frame(tmp_path):
    from mrkd.runtime.sources import open_source
    folder = tmp_path / "frames"
    folder.mkdir()
    for index in range(3):
        (folder / f"frame_{index}.png").write_bytes(small("PNG"))
    (folder / "frame_1b.png").write_bytes(bomb("PNG", 60000, 60000))
    with open_source(str(folder)) as source:
        frames, started = [], time.monotonic()
        while not source.ended:
            assert time.monotonic() - started < 10, "the source did not end"
            frame = source.read(timeout=0.25)
            if frame is not None:
                frames.append(frame)
    assert len(frames) == 3 and source.stats.bad_frames == 1


def test_mrkd_refit_refuses_a_bomb_among_its_good_images_in_one_line(parent, tmp_path):
    from click.testing import CliRunner

    from mrkd.cli import main
    good = tmp_path / "good2"
    bombed = bombed_folder(parent / "good", good)
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 1))
    done = CliRunner().invoke(main, ["refit", str(parent / "parent.ckpt"), "--reviewed", str(labels), "--good",
                                     str(good), "-o", str(tmp_path / "v2"), "--no-export"])
    assert done.exit_code == 1
    line = one_error_line(done)
    assert str(bombed) in line and "--good" in line and "60000 x 60000" in line
    assert not (tmp_path / "v2").exists()
