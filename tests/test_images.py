"""read_image / read_mask on the awkward files factories produce."""

import os
import warnings

import cv2
import numpy as np
import pytest

from mrkd.runtime.images import IMAGE_EXTENSIONS, ImageReadError, read_image, read_mask


def _write(path, array):
    ok, buf = cv2.imencode(path.suffix, array)
    assert ok
    buf.tofile(str(path))
    return path


def test_color_png_round_trip(tmp_path):
    bgr = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    out = read_image(_write(tmp_path / "c.png", bgr))
    assert out.dtype == np.uint8 and out.shape == (17, 23, 3)
    np.testing.assert_array_equal(out, bgr)


def test_grayscale_is_replicated(tmp_path):
    gray = np.arange(30 * 40, dtype=np.uint32).reshape(30, 40).astype(np.uint8)
    out = read_image(_write(tmp_path / "g.png", gray))
    assert out.shape == (30, 40, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


def test_bgra_drops_alpha(tmp_path):
    bgra = np.random.default_rng(1).integers(0, 256, (9, 11, 4), dtype=np.uint8)
    with pytest.warns(UserWarning, match="transparent"):
        out = read_image(_write(tmp_path / "a.png", bgra))
    np.testing.assert_array_equal(out, bgra[:, :, :3])


def test_16bit_scaled_over_full_range(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    out = read_image(_write(tmp_path / "d.png", values))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])


def test_float_tiff_0_to_1_and_0_to_255(tmp_path):
    values = np.array([[0, 64, 128, 255]], dtype=np.float32)
    as_unit = read_image(_write(tmp_path / "unit.tif", values / 255))
    as_bytes = read_image(_write(tmp_path / "bytes.tif", values))
    np.testing.assert_array_equal(as_unit[0, :, 0], [0, 64, 128, 255])
    np.testing.assert_array_equal(as_bytes[0, :, 0], [0, 64, 128, 255])


@pytest.mark.parametrize("low,high", [(0, 4095), (-1, 1)])
def test_float_outside_0_to_255_is_refused_not_clipped(tmp_path, low, high):
    # A 12-bit float image was clipped to 255 (94 % of it white) and a signed one to 0, without a word.
    values = np.linspace(low, high, 64, dtype=np.float32).reshape(8, 8)
    path = _write(tmp_path / "f.tif", values)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(path) in str(info.value) and f"from {low:g} to {high:g}" in str(info.value)


def test_unicode_path(tmp_path):
    bgr = np.full((5, 6, 3), 77, np.uint8)
    out = read_image(_write(tmp_path / "prüfteil_日本.png", bgr))
    np.testing.assert_array_equal(out, bgr)


@pytest.mark.parametrize("content,reason", [(None, "not found"), (b"", "empty"),
                                            (b"\x89PNG\r\n\x1a\nnot really", "decodable")])
def test_bad_files_name_path_and_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(path) in str(info.value) and reason in str(info.value)
    assert isinstance(info.value, ValueError)


def test_truncated_png_is_an_error(tmp_path):
    bgr = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", bgr)
    path = tmp_path / "cut.png"
    path.write_bytes(buf.tobytes()[: len(buf) // 2])
    with pytest.raises(ImageReadError):
        read_image(path)


def test_read_mask_variants(tmp_path):
    mask = np.zeros((8, 10), bool)
    mask[2:5, 3:7] = True
    as_u8 = _write(tmp_path / "m8.png", mask.astype(np.uint8) * 255)
    as_u16 = _write(tmp_path / "m16.png", mask.astype(np.uint16) * 1)   # tiny non-zero values count
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[..., 2] = mask * 200                                             # red-only annotation
    as_rgb = _write(tmp_path / "mrgb.png", rgb)
    for path in (as_u8, as_u16, as_rgb):
        out = read_mask(path)
        assert out.dtype == bool
        np.testing.assert_array_equal(out, mask)


def test_extensions_are_lowercase_with_dot():
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"} == set(IMAGE_EXTENSIONS)


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")  # list_images looks at names only, never decodes
    return path


def test_list_images_one_rule_for_folders_globs_and_files(tmp_path):
    from mrkd.runtime.images import ImageListError, list_images

    for name in ("b.PNG", "a.jpg", "c.tiff", ".hidden.png", "notes.txt", "sub/d.png", ".git/e.png", "sub/.f.png"):
        _touch(tmp_path / name)
    (tmp_path / "dir.png").mkdir()  # a folder with an image's name is not an image
    folder = [tmp_path / "a.jpg", tmp_path / "b.PNG", tmp_path / "c.tiff"]
    assert list_images(tmp_path) == folder                      # sorted, extensions any case, no hidden, flat
    assert list_images(str(tmp_path)) == folder                 # str or Path alike
    assert list_images(tmp_path, recursive=True) == folder + [tmp_path / "sub" / "d.png"]  # not in .git/, no .f
    assert list_images(str(tmp_path / "*")) == folder           # a glob is filtered the same way
    assert list_images(str(tmp_path / "[ab].*")) == folder[:2]
    # the pattern itself is matched as glob does (case-sensitive here): *.png leaves b.PNG out
    assert list_images(str(tmp_path / "**" / "*.png"), recursive=True) == [tmp_path / "sub" / "d.png"]
    assert list_images(tmp_path / "b.PNG") == [tmp_path / "b.PNG"]   # one image file
    assert list_images(str(tmp_path / "*.bmp")) == []          # a glob matching nothing: an empty list
    with pytest.raises(ImageListError, match="notes.txt: a file that is not an image"):
        list_images(tmp_path / "notes.txt")
    with pytest.raises(ImageListError, match="missing: not found"):
        list_images(tmp_path / "missing")


def test_one_listing_of_a_folder_splits_images_from_the_other_visible_files(tmp_path, monkeypatch):
    # list_images and training's _image_files each held the folder rule (regular, visible, image extension);
    # list_folder is that rule once, for both. Checked against os.scandir, an independent listing.
    import os
    from pathlib import Path
    from mrkd.runtime.images import FolderFiles, list_folder, list_images
    from mrkd.train.data import _image_files

    for name in ("b.PNG", "a.jpg", "c.TiFf", ".hidden.png", ".notes", "notes.txt", "phone.gif", "sub/d.png"):
        _touch(tmp_path / name)
    (tmp_path / "dir.png").mkdir()                              # a folder with an image's name: neither
    (tmp_path / "link.png").symlink_to(tmp_path / "a.jpg")      # a link to a file is a file, as is_file says
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    listings = []
    real = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: listings.append(self) or real(self))
    listed = list_folder(tmp_path)
    assert listings == [tmp_path]                               # one listing
    monkeypatch.setattr(Path, "iterdir", real)
    assert isinstance(listed, FolderFiles)
    with os.scandir(tmp_path) as entries:
        visible = [Path(e.path) for e in entries if e.is_file() and not e.name.startswith(".")]
    expected_images = sorted(p for p in visible if p.suffix.lower() in IMAGE_EXTENSIONS)
    assert listed.images == tuple(expected_images) == tuple(tmp_path / n for n in ("a.jpg", "b.PNG", "c.TiFf",
                                                                                   "link.png"))
    assert listed.others == tuple(sorted(set(visible) - set(expected_images))) == (tmp_path / "notes.txt",
                                                                                  tmp_path / "phone.gif")
    assert list_images(tmp_path) == list(listed.images)
    with pytest.warns(UserWarning, match="phone.gif"):
        assert _image_files(tmp_path) == (list(listed.images), 2)


def test_visible_subfolders_are_the_folders_os_scandir_sees_less_the_hidden_ones(tmp_path):
    import os
    from mrkd.runtime.images import visible_subfolders

    for name in ("crack/a.png", "good/a.png", ".thumbs/a.png", ".ipynb_checkpoints/a.png", "good/.cache/b.png",
                 "Scratch/a.png", "file.png"):
        _touch(tmp_path / name)
    (tmp_path / "empty").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "crack")         # a link to a folder is a folder, as is_dir says
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with os.scandir(tmp_path) as entries:
        expected = sorted(tmp_path / e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    assert visible_subfolders(tmp_path) == expected == [tmp_path / n for n in ("Scratch", "crack", "empty", "good",
                                                                                "linked")]
    assert visible_subfolders(str(tmp_path / "good")) == []      # .cache/ is hidden; a str works as a Path
    hidden_parent = tmp_path / ".data"                           # only what is below the folder counts
    (hidden_parent / "good").mkdir(parents=True)
    assert visible_subfolders(hidden_parent) == [hidden_parent / "good"]


def test_training_and_runtime_list_a_folder_or_glob_alike(tmp_path):
    """`mrkd calibrate ckpt GOOD` (train.data.scan_folder) and `mrkd calibrate model.onnx GOOD`
    (runtime.sources.open_source) read the same images from the same argument."""
    pytest.importorskip("torch")
    from mrkd.runtime.sources import open_source
    from mrkd.train.data import scan_folder

    for name in ("b.png", "a.JPG", ".c.png", "notes.txt", "sub/d.png", "e.bmp"):
        _touch(tmp_path / name)
    for argument in (str(tmp_path), str(tmp_path / "*"), str(tmp_path / "[ab].*")):
        source = open_source(argument)
        try:
            assert [str(p) for p in source.paths] == scan_folder(argument), argument
        finally:
            source.close()


# ---------------------------------------------------------------- EXIF orientation (reference: Pillow)

def _turnable():
    """Colour that says where each pixel was: a ramp across (blue), a ramp down (green), a block at one
    corner (red); every flip or turn of it is a different image, and it survives JPEG."""
    height, width = 48, 80
    bgr = np.zeros((height, width, 3), np.uint8)
    bgr[:, :, 0] = np.linspace(0, 250, width)[None, :]
    bgr[:, :, 1] = np.linspace(0, 250, height)[:, None]
    bgr[:16, :16, 2] = 250
    return bgr


def _pillow_upright(path):
    """What a viewer shows: Pillow's own EXIF transpose of the file, as BGR."""
    from PIL import Image, ImageOps
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))[:, :, ::-1]


def _save_with_orientation(path, bgr, orientation, **options):
    from PIL import Image
    image = Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes(), **options)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix,options,tolerance", [(".png", {}, 0), (".webp", {"lossless": True}, 0),
                                                       (".jpg", {"quality": 95}, 3.0), (".tif", {}, 0)])
def test_exif_orientation_is_applied_as_pillow_applies_it(tmp_path, orientation, suffix, options, tolerance):
    """A phone's or a PC camera tool's file stored turned, with an EXIF Orientation tag: read_image gives
    the pixels every viewer (the operator page's browser too) shows, as Pillow's exif_transpose does.
    cv2.imdecode(IMREAD_UNCHANGED) alone gave them as stored (TIFF: OpenCV turns it itself). JPEG is compared within a tolerance (two
    decoders); a wrong turn or mirror of this image is off by tens of levels on average."""
    path = _save_with_orientation(tmp_path / f"turned{suffix}", _turnable(), orientation, **options)
    reference = _pillow_upright(path)
    out = read_image(path)
    assert out.shape == reference.shape, (out.shape, reference.shape)
    difference = np.abs(out.astype(np.int16) - reference.astype(np.int16))
    assert difference.mean() <= tolerance, difference.mean()


def test_a_mask_is_turned_with_its_image(tmp_path):
    image = _save_with_orientation(tmp_path / "part.png", _turnable(), 6)
    mask = np.zeros((48, 80, 3), np.uint8)
    mask[:16, :16] = 255                         # the red corner block
    mask_path = _save_with_orientation(tmp_path / "part_mask.png", mask, 6)
    upright, marked = read_image(image), read_mask(mask_path)
    assert marked.shape == upright.shape[:2] == (80, 48)
    np.testing.assert_array_equal(marked, upright[:, :, 2] == 250)


def test_the_pixel_limit_counts_a_turned_image_as_stored(tmp_path, monkeypatch):
    """The decompression-bomb guard reads the header's width x height before decoding; turning swaps
    them, so it holds the same for every orientation and names the size as stored."""
    import mrkd.runtime.images as images
    path = _save_with_orientation(tmp_path / "turned.jpg", _turnable(), 6)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 80 * 48 - 1)
    with pytest.raises(ImageReadError, match="declares 80 x 48 pixels"):
        read_image(path)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 80 * 48)
    assert read_image(path).shape == (80, 48, 3)


def test_a_damaged_exif_block_leaves_the_pixels_as_stored(tmp_path):
    path = _save_with_orientation(tmp_path / "odd.png", _turnable(), 6)
    data = bytearray(path.read_bytes())
    at = data.index(b"eXIf") + 4
    data[at:at + 2] = b"XX"                      # not a TIFF byte order: unreadable, so 1 (as stored)
    path.write_bytes(bytes(data))
    np.testing.assert_array_equal(read_image(path), _turnable())


def test_cie_lab_tiff_is_refused_not_read_as_colours(tmp_path):
    # OpenCV hands a CIELab TIFF's L, a, b samples on as B, G, R: a weave image came back 12 grey levels
    # off on average, without a word. RGB, CMYK and YCbCr TIFFs (Pillow writes all four) read as Pillow's RGB.
    Image = pytest.importorskip("PIL.Image")
    rgb = np.random.default_rng(5).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    for mode in ("RGB", "CMYK", "YCbCr"):
        path = tmp_path / f"{mode}.tif"
        Image.fromarray(rgb).convert(mode).save(path)
        expected = np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1]
        assert np.abs(read_image(path).astype(int) - expected).max() <= 1
    path = tmp_path / "lab.tif"
    Image.fromarray(rgb).convert("LAB").save(path)
    with pytest.raises(ImageReadError, match="L\\*a\\*b\\* TIFF") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_32_bit_integer_image_says_which_depths_are_read(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    path = tmp_path / "counts.tif"
    Image.fromarray(np.arange(12, dtype=np.int32).reshape(3, 4) * 100000).save(path)
    with pytest.raises(ImageReadError, match="int32 .*save it as 8 or 16 bits") as info:
        read_image(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- pages and transparency, never silent

def _said(records, path) -> list:
    return [str(r.message) for r in records if str(path) in str(r.message)]


def test_a_multi_page_file_is_read_as_its_first_page_and_says_so_once(tmp_path):
    # A stack of captures in one TIFF (or an animated PNG/WebP) was judged as its first page without a word.
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(7)
    pages = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((8, 10, 3), (8, 10, 3), (4, 5, 3), (8, 10, 3))]
    first = [Image.fromarray(p) for p in pages]
    files = {"stack.tif": "a TIFF of 3 pages; mrkd reads page 1 only (10 x 8)",
             "stack.png": "an animated PNG of 3 frames; mrkd reads its first image only (10 x 8)",
             "stack.webp": "an animated WebP of 3 frames; mrkd reads frame 1 only (10 x 8)"}
    for name, says in files.items():
        path = tmp_path / name
        # A TIFF's pages may differ in size (page 3 here); an animation's frames may not (Pillow).
        later = first[1:3] if name.endswith(".tif") else [first[1], first[3]]
        first[0].save(path, save_all=True, append_images=later,
                      **({"lossless": True} if name.endswith(".webp") else {}))
        with pytest.warns(UserWarning) as records:
            image = read_image(path)
        np.testing.assert_array_equal(image, pages[0][:, :, ::-1])        # page 1, as Pillow reads it
        assert _said(records, path) == [f"{path}: {says}. Save each {'page' if 'TIFF' in says else 'frame'} "
                                        f"you mean as a file of its own"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            read_image(path)                     # once per file: a looping source reads it again
    with warnings.catch_warnings():              # one page, one frame: silent
        warnings.simplefilter("error")
        first[0].save(tmp_path / "one.tif")
        first[0].save(tmp_path / "one.png")
        np.testing.assert_array_equal(read_image(tmp_path / "one.tif"), pages[0][:, :, ::-1])
        read_image(tmp_path / "one.png")


def test_transparency_that_a_viewer_shows_is_said_and_the_stored_colour_is_read(tmp_path):
    # The colour under transparent pixels (often black, or what an editor left there) was judged where a
    # viewer shows the background, without a word. Fully opaque alpha changes nothing and stays silent.
    Image = pytest.importorskip("PIL.Image")
    rgba = np.random.default_rng(8).integers(0, 256, (8, 10, 4), dtype=np.uint8)
    rgba[:, :, 3] = 255
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("opaque.png", "opaque.tif", "opaque.webp"):
            Image.fromarray(rgba, "RGBA").save(tmp_path / name, **({"lossless": True} if "webp" in name else {}))
            np.testing.assert_array_equal(read_image(tmp_path / name), rgba[:, :, 2::-1])
        Image.fromarray(rgba[:, :, [0, 3]], "LA").save(tmp_path / "opaque_la.png")
        read_image(tmp_path / "opaque_la.png")
    rgba[:2, :, 3] = 0                            # 20 of 80 pixels transparent, one half-transparent
    rgba[5, 5, 3] = 128
    for name in ("part.png", "part.tif", "part.webp"):
        path = tmp_path / name
        Image.fromarray(rgba, "RGBA").save(path, **({"lossless": True} if "webp" in name else {}))
        with pytest.warns(UserWarning) as records:
            image = read_image(path)
        # The colour stored, alpha dropped: as Pillow reads it (lossless WebP stores black under alpha 0),
        # but for a TIFF, whose colour OpenCV multiplies by its alpha (composited onto black).
        stored = np.asarray(Image.open(path).convert("RGBA")).astype(int)
        expected = stored[:, :, 2::-1] * (stored[:, :, 3:] / 255 if name.endswith(".tif") else 1)
        assert np.abs(image - expected).max() <= 0.5 + 1e-9
        assert _said(records, path) == [
            f"{path}: 26.2% of its pixels are transparent or partly so (alpha down to 0 of 255); mrkd drops the "
            f"alpha channel, so there it sees colour a viewer does not show. Save it without alpha, flattened onto "
            f"its background"]
    gray_alpha = tmp_path / "part_la.png"
    Image.fromarray(rgba[:, :, [0, 3]], "LA").save(gray_alpha)
    with pytest.warns(UserWarning, match=r"part_la\.png: 26\.2% of its pixels are transparent"):
        np.testing.assert_array_equal(read_image(gray_alpha), np.repeat(rgba[:, :, :1], 3, axis=2))
    # OpenCV reads a grey + alpha TIFF as grey: its transparency cannot be looked at, so that is said.
    Image.fromarray(rgba[:, :, [0, 3]], "LA").save(tmp_path / "part_la.tif")
    with pytest.warns(UserWarning, match=r"part_la\.tif: a TIFF with an alpha channel that OpenCV does not read"):
        np.testing.assert_array_equal(read_image(tmp_path / "part_la.tif"), np.repeat(rgba[:, :, :1], 3, axis=2))


def test_a_folder_of_transparent_images_names_ten_then_says_the_rest_in_one_line(tmp_path):
    from mrkd.runtime.image_notes import NAMED_PER_FOLDER
    bgra = np.zeros((4, 4, 4), np.uint8)
    paths = [_write(tmp_path / f"{index:02}.png", bgra) for index in range(NAMED_PER_FOLDER + 3)]
    with pytest.warns(UserWarning) as records:
        for path in paths:
            read_image(path)
    said = [str(r.message) for r in records]
    assert said[:NAMED_PER_FOLDER] == [_said(records, p)[0] for p in paths[:NAMED_PER_FOLDER]]
    assert said[NAMED_PER_FOLDER:] == [f"{tmp_path}: more than {NAMED_PER_FOLDER} images with transparent pixels; "
                                       f"the rest are read the same way, without a warning each"]


def test_mrkd_run_on_a_folder_says_pages_and_transparency_once_per_file(tmp_path):
    # Through the real command: one line each, once although --loop reads every file three times.
    import os
    import subprocess
    import sys

    Image = pytest.importorskip("PIL.Image")
    from runtime_fixtures import build_tiny_model, normal_frame
    model = build_tiny_model(tmp_path / "m.onnx")
    frames = tmp_path / "frames"
    frames.mkdir()
    frame = normal_frame(np.random.default_rng(0))[:, :, ::-1]
    page = Image.fromarray(frame)
    page.save(frames / "a_stack.tif", save_all=True, append_images=[page, page])
    with_alpha = np.dstack([frame, np.full(frame.shape[:2], 255, np.uint8)])
    Image.fromarray(with_alpha, "RGBA").save(frames / "b_opaque.png")
    with_alpha[:4, :, 3] = 0
    Image.fromarray(with_alpha, "RGBA").save(frames / "c_holes.png")
    args = ["run", str(model), "--source", str(frames), "--loop", "--max-frames", "9", "--status-every", "0"]
    code = f"import sys\nfrom mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain({args!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "default"})
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert warned == [f"warning: {frames / 'a_stack.tif'}: a TIFF of 3 pages; mrkd reads page 1 only (64 x 48). "
                      f"Save each page you mean as a file of its own",
                      f"warning: {frames / 'c_holes.png'}: 8.3% of its pixels are transparent or partly so (alpha "
                      f"down to 0 of 255); mrkd drops the alpha channel, so there it sees colour a viewer does not "
                      f"show. Save it without alpha, flattened onto its background"], done.stderr
    assert "Traceback" not in done.stderr


def test_a_recursive_listing_reads_linked_folders_once_as_the_glob_form_does(tmp_path):
    # A folder linked in (ln -s /data/batch2 calib/batch2) was left out of the folder form without a word,
    # while the glob form 'calib/**/*.png' read it: two answers for one folder.
    from mrkd.runtime.images import list_folder, list_images

    outside = tmp_path / "outside"
    for name in ("b.png", "notes.txt", ".hidden/c.png"):
        _touch(outside / name)
    calib = tmp_path / "calib"
    _touch(calib / "a.png")
    os.symlink(outside, calib / "batch2")
    os.symlink(calib, calib / "loop")             # a link back up: listed once, no endless walk
    os.symlink(outside, calib / ".linked_hidden")  # hidden by its name, as a hidden folder is
    expected = [calib / "a.png", calib / "batch2" / "b.png"]
    assert list_images(calib, recursive=True) == expected
    assert list_images(str(calib / "**" / "*.png"), recursive=True) == expected   # the glob form agrees
    assert list_folder(calib, recursive=True).others == (calib / "batch2" / "notes.txt",)
    assert list_images(calib) == [calib / "a.png"]   # flat: only its own files, as before


@pytest.mark.parametrize("seed", range(6))
def test_recursive_globs_match_pythons_glob_on_trees_without_links(tmp_path, seed):
    # The recursive glob form walks folders itself (each real folder once); on trees without links it must
    # give exactly what glob.glob(recursive=True) gives, the reference here.
    import glob
    import random

    from mrkd.runtime.images import _glob_recursive

    rng = random.Random(seed)
    names = ["a", "b", ".h", "cam1", "cam2", "x.png", "y.PNG", ".z.png", "n.txt"]
    for _ in range(30):
        depth = rng.randint(1, 4)
        parts = [rng.choice(names[:5]) for _ in range(depth - 1)] + [rng.choice(names[5:])]
        path = tmp_path.joinpath(*parts)
        if not any(parent.is_file() for parent in path.parents):
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.is_dir():
                path.write_bytes(b"x")
    for pattern in ("**/*.png", "**", "cam*/**/*.png", "**/cam1/*", "a/**/b/**/*.png", ".h/**/*.png", "**/.z.png",
                    "*/x.png", "**/*.[pP][nN][gG]"):
        full = str(tmp_path / pattern)
        assert sorted(_glob_recursive(full)) == sorted(p for p in glob.glob(full, recursive=True)
                                                       if not os.path.isdir(p)), pattern
