"""runtime/tiff.py, the one reader of TIFF directories, against an independent reader: Pillow's
TiffImagePlugin, on files Pillow and OpenCV (libtiff) write: several pages, both byte orders, BigTIFF,
alpha named by ExtraSamples. Damaged bytes (cut short, looping chains, counts and offsets past the end)
read as None / False / 1 in every caller, never as an exception."""

from __future__ import annotations

import importlib.util
import io
import struct
import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from mrkd.runtime.image_notes import _tiff_layout, note_pages
from mrkd.runtime.images import _tiff_lab, declared_size, exif_orientation
from mrkd.runtime.tiff import (BIG_VERSION, CLASSIC_VERSION, INTEGER_FIELD_CODES, MAX_DIRECTORIES,
                               directory_offsets, first_directory, read_directory, read_header)

RNG = np.random.default_rng(11)


def _pillow_tiff(pages, **save) -> bytes:
    """``pages`` (Pillow images) saved as one TIFF by Pillow."""
    buffer = io.BytesIO()
    pages[0].save(buffer, "TIFF", save_all=True, append_images=pages[1:], **save)
    return buffer.getvalue()


def _rgb(height, width) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _big_endian_16bit(height, width) -> Image.Image:
    """Pillow writes mode I;16B as a big-endian (MM) TIFF."""
    return Image.frombytes("I;16B", (width, height), RNG.integers(0, 65536, (height, width), np.uint16).astype(">u2").tobytes())


def _opencv_tiff(array) -> bytes:
    ok, encoded = cv2.imencode(".tiff", array)
    assert ok
    return encoded.tobytes()


def _opencv_pages(arrays) -> bytes:
    """Several pages written by OpenCV (libtiff), through a file: imencode writes one page."""
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pages.tiff"
        assert cv2.imwritemulti(str(path), list(arrays))
        return path.read_bytes()


def _files() -> dict:
    """{name: TIFF bytes} from Pillow and OpenCV, the cases the reader must agree with Pillow on."""
    rgba = RNG.integers(0, 256, (9, 13, 4), dtype=np.uint8)
    return {
        "pillow classic LE, 3 pages of two sizes": _pillow_tiff([_rgb(8, 10), _rgb(4, 5), _rgb(8, 10)]),
        "pillow classic LE, LZW": _pillow_tiff([_rgb(31, 17)], compression="tiff_lzw"),
        "pillow classic BE (I;16B), 2 pages": _pillow_tiff([_big_endian_16bit(7, 300), _big_endian_16bit(70000 // 300, 3)]),
        "pillow BigTIFF LE, 2 pages": _pillow_tiff([_rgb(6, 7), _rgb(1, 70000).convert("L")], big_tiff=True),
        "pillow BigTIFF BE (I;16B), 3 pages": _pillow_tiff([_big_endian_16bit(5, 6)] * 3, big_tiff=True),
        "pillow RGBA (ExtraSamples 2)": _pillow_tiff([Image.fromarray(rgba, "RGBA")]),
        "pillow LA BigTIFF (ExtraSamples 2)": _pillow_tiff([Image.fromarray(rgba[:, :, [0, 3]], "LA")], big_tiff=True),
        "pillow CIELab": _pillow_tiff([_rgb(5, 4).convert("LAB")]),
        "opencv BGRA": _opencv_tiff(rgba),
        "opencv 16-bit grey": _opencv_tiff(RNG.integers(0, 65536, (12, 9), dtype=np.uint16)),
        "opencv 4 pages": _opencv_pages([RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8)] * 4),
    }


FILES = _files()
# Pillow 13 writes a big-endian BigTIFF (its StripOffsets 0) that it cannot open again ("Missing dimensions");
# libtiff (OpenCV) reads its directories, so it is checked against libtiff alone.
PILLOW_CANNOT_READ = {"pillow BigTIFF BE (I;16B), 3 pages"}
PILLOW_READS = sorted(set(FILES) - PILLOW_CANNOT_READ)


def _pillow_pages(data: bytes) -> list:
    """Per page, Pillow's {tag: values} of its SHORT, LONG and LONG8 tags."""
    pages = []
    with Image.open(io.BytesIO(data)) as image:
        for index in range(image.n_frames):
            image.seek(index)
            tags = image.tag_v2
            pages.append({tag: tuple(value) if isinstance(value, tuple) else (value,)
                          for tag, value in tags.items() if tags.tagtype[tag] in INTEGER_FIELD_CODES})
    return pages


def _ours(data: bytes) -> list:
    header = read_header(data)
    pages = []
    for offset in directory_offsets(data, header):
        directory = read_directory(data, header, offset)
        pages.append({entry.tag: entry.values for entry in directory.entries
                      if entry.field_type in INTEGER_FIELD_CODES})
    return pages


@pytest.mark.parametrize("name", PILLOW_READS)
def test_every_page_and_integer_tag_is_what_pillow_reads(name):
    data = FILES[name]
    pillow = _pillow_pages(data)
    assert _ours(data) == pillow
    # and in every form the callers pass: bytes, a memoryview of the decoded-from numpy array
    assert _ours(memoryview(np.frombuffer(data, np.uint8))) == pillow


def test_the_files_cover_both_byte_orders_and_both_versions():
    # The matrix above is what it says: read the first bytes independently of the reader under test.
    kinds = {(data[:2], struct.unpack((">" if data[:2] == b"MM" else "<") + "H", data[2:4])[0]) for data in FILES.values()}
    assert kinds == {(b"II", CLASSIC_VERSION), (b"MM", CLASSIC_VERSION), (b"II", BIG_VERSION), (b"MM", BIG_VERSION)}
    assert max(len(_pillow_pages(FILES[name])) for name in PILLOW_READS) == 4


@pytest.mark.parametrize("name", sorted(FILES))
def test_pages_and_their_sizes_are_what_libtiff_reads(name):
    # OpenCV's TIFF decoder is libtiff: a second reference, and the only one for the big-endian BigTIFF.
    data = FILES[name]
    ok, pages = cv2.imdecodemulti(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert ok
    header = read_header(data)
    directories = [read_directory(data, header, offset) for offset in directory_offsets(data, header)]
    assert [(d.value(256), d.value(257)) for d in directories] == [(p.shape[1], p.shape[0]) for p in pages]
    assert declared_size(data) == (pages[0].shape[1], pages[0].shape[0])
    assert _tiff_layout(data)[0] == len(pages)


@pytest.mark.parametrize("name", PILLOW_READS)
def test_size_pages_alpha_and_lab_are_what_pillow_reads(name):
    data = FILES[name]
    view = memoryview(np.frombuffer(data, np.uint8))
    with Image.open(io.BytesIO(data)) as image:
        size, pages, mode = image.size, image.n_frames, image.mode
        extra = image.tag_v2.get(TiffImagePlugin.EXTRASAMPLES, ())
        photometric = image.tag_v2[TiffImagePlugin.PHOTOMETRIC_INTERPRETATION]
    extra = extra if isinstance(extra, tuple) else (extra,)
    assert declared_size(view) == size               # BigTIFF too (before: None, OpenCV decided)
    assert _tiff_layout(view) == (pages, any(value in (1, 2) for value in extra))
    assert _tiff_lab(view) == (photometric in (8, 9, 10)) == (mode == "LAB")
    if name.startswith("pillow") and ("RGBA" in name or "LA " in name):
        assert _tiff_layout(view)[1]                 # the cases meant to carry alpha do (OpenCV writes no
                                                     # ExtraSamples for BGRA: Pillow reads none there either)


def test_exif_orientation_read_through_the_same_reader_matches_pillow():
    for orientation in (1, 3, 6, 8):
        for fmt in ("JPEG", "PNG", "WEBP"):
            exif = Image.Exif()
            exif[0x0112] = orientation
            buffer = io.BytesIO()
            _rgb(6, 8).save(buffer, fmt, exif=exif.tobytes())
            data = buffer.getvalue()
            with Image.open(io.BytesIO(data)) as image:
                assert exif_orientation(memoryview(np.frombuffer(data, np.uint8))) == \
                    image.getexif().get(0x0112) == orientation


# ---------------------------------------------------------------- damaged bytes

def _classic(directories, order="<", first=None) -> bytearray:
    """A classic TIFF built by hand: ``directories`` is a list of (offset, [(tag, type, count, value)],
    next offset); each is written at its offset. Values are inline (4 bytes) as given."""
    size = max(offset + 2 + 12 * len(entries) + 4 for offset, entries, _ in directories)
    data = bytearray(size)
    data[:8] = (b"II" if order == "<" else b"MM") + struct.pack(order + "HI", 42, directories[0][0] if first is None
                                                                  else first)
    for offset, entries, following in directories:
        struct.pack_into(order + "H", data, offset, len(entries))
        for index, (tag, field_type, count, value) in enumerate(entries):
            struct.pack_into(order + "HHII", data, offset + 2 + 12 * index, tag, field_type, count, value)
        struct.pack_into(order + "I", data, offset + 2 + 12 * len(entries), following)
    return data


SIZE = [(256, 3, 1, 40), (257, 3, 1, 30)]


@pytest.mark.parametrize("order", ["<", ">"])
def test_a_looping_chain_counts_each_directory_once(order):
    def short(value):   # a SHORT inline is left-justified in its 4 bytes
        return value if order == "<" else value << 16
    entries = [(256, 3, 1, short(40)), (257, 3, 1, short(30))]
    two = _classic([(8, entries, 100), (100, entries, 8)], order)           # 8 -> 100 -> 8 ...
    assert directory_offsets(bytes(two), read_header(bytes(two))) == (8, 100)
    assert _tiff_layout(two) == (2, False) and declared_size(two) == (40, 30)
    to_itself = _classic([(8, entries, 8)], order)
    assert _tiff_layout(to_itself) == (1, False)


def test_a_chain_longer_than_the_bound_stops_there():
    # Directories with no entries, each pointing at the next: more of them than the bound counts as the bound.
    count = MAX_DIRECTORIES + 5
    data = bytearray(8 + 6 * count)
    data[:8] = b"II" + struct.pack("<HI", 42, 8)
    for index in range(count):
        at = 8 + 6 * index
        struct.pack_into("<HI", data, at, 0, at + 6 if index + 1 < count else 0)
    assert _tiff_layout(data) == (MAX_DIRECTORIES, False)


def test_offsets_and_counts_past_the_end_read_as_nothing():
    past = 0xFFFFFFF0
    cases = {
        "first directory past the end": _classic([(8, SIZE, 0)], first=past),
        "entry count past the end": _classic([(8, SIZE, 0)]),
        "next directory past the end": _classic([(8, SIZE, past)]),
        "ExtraSamples count of 2**32 - 1": _classic([(8, SIZE + [(338, 3, 0xFFFFFFFF, 8)], 0)]),
        "ExtraSamples at an offset past the end": _classic([(8, SIZE + [(338, 3, 3, past)], 0)]),
        "ImageWidth as a count of 2 at an offset past the end": _classic([(8, [(256, 4, 2, past), SIZE[1]], 0)]),
    }
    struct.pack_into("<H", cases["entry count past the end"], 8, 0xFFFF)
    expected = {"first directory past the end": (None, None), "entry count past the end": (None, None),
                "next directory past the end": ((40, 30), (1, False)),
                "ExtraSamples count of 2**32 - 1": ((40, 30), (1, False)),
                "ExtraSamples at an offset past the end": ((40, 30), (1, False)),
                "ImageWidth as a count of 2 at an offset past the end": (None, (1, False))}
    for name, data in cases.items():
        assert (declared_size(data), _tiff_layout(data)) == expected[name], name
        assert _tiff_lab(data) is False


def test_a_big_tiff_count_of_2_to_the_63_reads_as_nothing_without_allocating():
    # A BigTIFF entry count is 8 bytes: 2**63 ExtraSamples. The reader before built a struct format of that
    # many characters (MemoryError / OverflowError out of read_image), not the struct.error it caught.
    data = bytearray(16 + 8 + 20 * 3 + 8)
    data[:16] = b"II" + struct.pack("<HHHQ", 43, 8, 0, 16)
    struct.pack_into("<Q", data, 16, 3)
    for index, (tag, field_type, count, value) in enumerate([(256, 3, 1, 40), (257, 3, 1, 30), (338, 3, 2 ** 63, 24)]):
        struct.pack_into("<HHQQ", data, 24 + 20 * index, tag, field_type, count, value)
    assert declared_size(data) == (40, 30)
    assert _tiff_layout(data) == (1, False)
    struct.pack_into("<Q", data, 16, 2 ** 63)                           # the entry count itself
    assert (declared_size(data), _tiff_layout(data), _tiff_lab(data)) == (None, None, False)


def test_every_cut_of_every_file_reads_without_an_exception():
    # A file copied half-way or a short read: each caller answers None / False / 1 for every prefix,
    # and note_pages stays silent or says what it can.
    image = np.zeros((4, 4, 3), np.uint8)
    for name, data in FILES.items():
        full = _tiff_layout(data)
        # every cut through the first 4 KB and through each directory (the pixels between them add nothing)
        header = read_header(data)
        ends = set(range(min(len(data), 4096) + 1)) | {len(data)}
        for offset in directory_offsets(data, header):
            ends |= set(range(max(offset - 16, 0), min(offset + 1024, len(data)) + 1))
        for end in sorted(ends):
            cut = memoryview(np.frombuffer(data[:end], np.uint8))
            size, layout, lab = declared_size(cut), _tiff_layout(cut), _tiff_lab(cut)
            assert size is None or size == declared_size(data), (name, end)
            assert layout is None or layout[0] <= full[0], (name, end)
            assert lab in (True, False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                note_pages(f"cut/{end}.tif", cut, image)


def test_random_damage_never_raises():
    rng = np.random.default_rng(3)
    for data in FILES.values():
        for _ in range(300):
            damaged = np.frombuffer(data, np.uint8).copy()
            spots = rng.integers(0, min(len(damaged), 400), 6)
            damaged[spots] = rng.integers(0, 256, spots.size, dtype=np.uint8)
            view = memoryview(damaged)
            declared_size(view)
            _tiff_lab(view)
            _tiff_layout(view)
            directory = first_directory(view)
            assert directory is None or all(entry.values is None or entry.count == len(entry.values)
                                            for entry in directory.entries)


def test_the_reader_stays_free_of_torch():
    # runtime/ never imports torch: the module alone, in a fresh interpreter.
    code = "import sys, mrkd.runtime.tiff; assert 'torch' not in sys.modules"
    assert importlib.util.find_spec("mrkd.runtime.tiff") is not None
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_big_tiff_bomb_is_refused_before_it_is_decoded(tmp_path):
    # declared_size read classic TIFF only: a BigTIFF declaring 20000 x 20000 went to OpenCV, which set out to
    # decode it (and, the strips missing, said "not a decodable image"). Now refused naming the size.
    from mrkd.runtime.images import ImageReadError, read_image
    data = bytearray(_pillow_tiff([_rgb(6, 8)], big_tiff=True))
    with Image.open(io.BytesIO(bytes(data))) as image:
        assert image.size == (8, 6)
    header = read_header(data)
    for index, entry in enumerate(read_directory(data, header, header.first_directory).entries):
        if entry.tag in (256, 257):                  # ImageWidth, ImageLength: inline in the 8-byte field
            assert entry.field_type in (3, 4)
            struct.pack_into("<" + INTEGER_FIELD_CODES[entry.field_type], data, header.first_directory + 8 + 20 * index + 12,
                             20000)
    (tmp_path / "bomb.tif").write_bytes(data)
    with pytest.raises(ImageReadError, match=r"declares 20000 x 20000 pixels, over the"):
        read_image(tmp_path / "bomb.tif")
