"""Hostile inputs for the sources: truncated and corrupt video files end at the last decodable frame
with the unreadable frames counted (never a hang), stop requests are honoured within a second in
every state, and identical warnings are rate-limited.

The reference for "what a cut file holds" is OpenCV read sequentially until its first failure, on
the same bytes: the source must deliver exactly those frames, in order, and count the rest.
"""

import logging
import re
import threading
import time

import cv2
import numpy as np
import pytest

from runtime_fixtures import MjpegServer, THRESHOLD, build_tiny_model, normal_then_defective, write_video

from mrkd.runtime.sources import SourceError, SourceOptions, WarningLimiter, open_source

N_FRAMES = 40
CUT_FRACTIONS = (0.05, 0.3, 0.55, 0.8, 0.97)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    return write_video(folder / "clip.avi", normal_then_defective(30, N_FRAMES - 30), fps=25)


def _decodable_prefix(path) -> list:
    """Frames OpenCV reads from the start before its first failure (the independent reference)."""
    cap, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def _read_all(source, limit_s: float = 10.0) -> list:
    frames, start = [], time.monotonic()
    while not source.ended:
        assert time.monotonic() - start < limit_s, "source did not end: a hang"
        frame = source.read(timeout=0.25)
        if frame is not None:
            frames.append(frame)
    return frames


@pytest.mark.parametrize("fraction", CUT_FRACTIONS)
def test_truncated_video_ends_at_last_decodable_frame_and_counts_the_rest(clip, tmp_path, fraction):
    data = clip.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[:int(len(data) * fraction)])
    expected = _decodable_prefix(cut)
    try:
        source = open_source(str(cut))
    except SourceError as exc:      # cut inside the header: a clear error naming the file is right too
        assert str(cut) in str(exc)
        return
    with source:
        got = _read_all(source)
    assert len(got) == len(expected)
    assert [f.index for f in got] == list(range(len(expected)))
    for frame, reference in zip(got, expected):
        assert np.array_equal(frame.image, reference)
    assert source.stats.bad_frames == N_FRAMES - len(expected)
    if len(expected) < N_FRAMES:
        assert "unreadable" in source.stats.last_error


@pytest.mark.parametrize("fraction", CUT_FRACTIONS[1:4])
def test_truncated_video_with_loop_keeps_counting_up_and_never_spins(clip, tmp_path, fraction):
    data = clip.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[:int(len(data) * fraction)])
    decodable = len(_decodable_prefix(cut))
    with open_source(str(cut), loop=True) as source:
        got = [source.read(timeout=1.0) for _ in range(2 * decodable + 3)]
    assert all(f is not None for f in got)
    indices, times = [f.index for f in got], [f.timestamp for f in got]
    assert indices == sorted(set(indices)) and times == sorted(set(times))
    assert np.array_equal(got[decodable].image, got[0].image)     # the second pass starts again


@pytest.mark.parametrize("offset", (0.25, 0.5, 0.75))
def test_corrupt_bytes_inside_a_video_are_skipped_or_decoded_but_never_hang(clip, tmp_path, offset):
    data = bytearray(clip.read_bytes())
    start = int(len(data) * offset)
    data[start:start + 600] = bytes(range(256)) * 2 + bytes(88)
    bad = tmp_path / "bad.avi"
    bad.write_bytes(bytes(data))
    with open_source(str(bad)) as source:
        got = _read_all(source)
    indices = [f.index for f in got]
    assert indices == sorted(set(indices))
    assert len(got) + source.stats.bad_frames == N_FRAMES     # every promised frame is accounted for


def test_a_video_file_that_is_not_a_video_fails_with_its_name(tmp_path):
    fake = tmp_path / "noise.avi"
    fake.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(SourceError, match="noise.avi"):
        open_source(str(fake))


def test_replay_at_low_fps_still_returns_within_the_read_timeout(clip):
    with open_source(str(clip), fps=0.5) as source:
        assert source.read(timeout=0.2) is not None          # the first frame is due at once
        start = time.monotonic()
        assert source.read(timeout=0.2) is None               # the next is due in 2 s: not blocked for it
        assert time.monotonic() - start < 0.6 and not source.ended


def test_run_stream_on_a_stream_that_keeps_failing_stops_within_a_second(tmp_path):
    from mrkd.runtime.line.alarms import AlarmPolicy
    from mrkd.runtime.detector import Detector
    from mrkd.runtime.line.stream import run_stream
    server = MjpegServer(frames_per_connection=3, interval=0.01)
    source = open_source(server.url, timeout=1.0, backoff=(0.05, 0.2))
    server.close()                                       # from now on every reconnect fails
    detector = Detector(build_tiny_model(tmp_path / "m.onnx"))
    stop = threading.Event()
    threading.Timer(1.5, stop.set).start()
    start = time.monotonic()
    summary = run_stream(detector, source, AlarmPolicy(THRESHOLD), stop=stop, status=lambda line: None)
    assert time.monotonic() - start < 1.5 + 1.0
    assert summary["stopped_early"]


def test_identical_warnings_are_rate_limited(caplog):
    limiter = WarningLimiter(logging.getLogger("mrkd.test"), every_s=60)
    with caplog.at_level(logging.WARNING, logger="mrkd.test"):
        for i in range(1000):
            limiter.warn("bad", "frame %d bad", i)
        limiter.warn("other", "another kind")
    assert [r.getMessage() for r in caplog.records] == ["frame 0 bad", "another kind"]


def test_many_bad_frames_give_a_few_warning_lines_that_count_every_one(caplog):
    """And the source's close says the ones held back since its last line: their count was lost."""
    frames = [None] * 5000 + [np.zeros((4, 4, 3), np.uint8)]
    with caplog.at_level(logging.WARNING, logger="mrkd.runtime.sources"):
        with open_source(frames) as source:
            got = list(source)
    said = [r.getMessage() for r in caplog.records]
    assert len(got) == 1 and len(said) <= 3, said
    held = [int(m.group(1)) if m else 0 for m in (re.search(r"and (\d+) more like this", line) for line in said)]
    assert len(said) + sum(held) == 5000, said


@pytest.mark.parametrize("options, field", [
    (SourceOptions(fps=0.0), "fps"), (SourceOptions(fps=float("nan")), "fps"), (SourceOptions(fps=-1), "fps"),
    (SourceOptions(size=(0, 10)), "size"), (SourceOptions(size=(10, 10 ** 6)), "size"),
    (SourceOptions(timeout=0), "timeout"), (SourceOptions(backoff=(1.0, 0.5)), "backoff"),
])
def test_source_options_out_of_range_are_refused_naming_the_option(options, field):
    with pytest.raises(SourceError, match=field):
        options.validate()


@pytest.mark.parametrize("text", ["640", "x480", "640x", "-1x4", "axb", "640x480x3", ""])
def test_size_text_that_is_not_width_x_height_is_refused(text):
    with pytest.raises(SourceError, match="WIDTHxHEIGHT"):
        SourceOptions.parse_size(text)


def test_size_text_parses():
    assert SourceOptions.parse_size(" 640X480 ") == (640, 480) and SourceOptions.parse_size(None) is None
