"""Sources: files deliver every frame, bad frames are skipped and counted, a dropping MJPEG stream is
reconnected, a dead stream fails fast, live sources keep only the newest frame."""

import time

import numpy as np
import pytest

from runtime_fixtures import MjpegServer, normal_then_defective, refused_url, write_video

from mrkd.runtime.sources import ArraySource, SourceError, check_frame, open_source


def test_video_file_delivers_every_frame_in_order(tmp_path):
    frames = normal_then_defective(7, 5)
    video = write_video(tmp_path / "v.avi", frames, fps=10)
    with open_source(str(video)) as source:
        got = list(source)
    assert [f.index for f in got] == list(range(12))
    assert source.stats.frames_read == 12 and source.stats.bad_frames == 0
    # MJPG is lossy: the white patch survives, the gray texture is close.
    assert got[7].image[10:18, 12:20].min() > 230 and got[0].image.max() < 160
    assert got[5].timestamp == pytest.approx(0.5, abs=1e-3)   # media time at 10 fps


def test_video_file_loops_with_frame_numbers_and_times_increasing(tmp_path):
    frames = normal_then_defective(3, 0)
    video = write_video(tmp_path / "v.avi", frames, fps=10)
    with open_source(f"file://{video}", loop=True) as source:
        got = [source.read() for _ in range(7)]
    # A cooldown counted in frames or seconds must see one long recording, not time going back.
    assert [f.index for f in got] == list(range(7))
    assert [f.timestamp for f in got] == pytest.approx([i / 10 for i in range(7)], abs=1e-3)
    assert np.abs(got[3].image.astype(int) - got[0].image.astype(int)).max() == 0   # pass 2 = pass 1


def test_memory_frames_loop_with_increasing_numbers_and_a_pass_of_bad_frames_ends():
    source = open_source([np.zeros((4, 4, 3), np.uint8)] * 2, loop=True)
    assert [source.read().index for _ in range(5)] == [0, 1, 2, 3, 4]
    bad = open_source([None, None], loop=True)
    assert list(bad) == [] and bad.ended and bad.stats.bad_frames == 2


def test_folder_with_a_corrupt_image_skips_and_counts_it(tmp_path):
    import cv2
    for i, frame in enumerate(normal_then_defective(3, 1)):
        cv2.imwrite(str(tmp_path / f"{i:02d}.png"), frame)
    (tmp_path / "02.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "notes.txt").write_text("not an image")
    with open_source(str(tmp_path)) as source:
        got = list(source)
    assert [f.index for f in got] == [0, 1, 3]
    assert source.stats.bad_frames == 1 and "02.png" in source.stats.last_error
    with open_source(str(tmp_path / "0[01].png")) as globbed:
        assert len(list(globbed)) == 2


def test_wrong_shape_frames_are_skipped_and_counted():
    good = np.zeros((8, 8, 3), np.uint8)
    stream = [good, np.zeros((0, 8, 3), np.uint8), np.zeros((8, 8, 5), np.uint8), np.zeros((8, 8, 3), np.float32),
              None, np.zeros((8, 8), np.uint8), good]
    source = open_source(stream)
    got = list(source)
    assert [f.index for f in got] == [0, 5, 6]      # gray is converted, the rest are bad
    assert all(f.image.shape == (8, 8, 3) for f in got)
    assert source.stats.bad_frames == 4


def test_check_frame_converts_bgra_and_gray():
    assert check_frame(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5, 3)
    assert check_frame(np.zeros((4, 5, 1), np.uint8)).shape == (4, 5, 3)
    assert check_frame(np.zeros((4, 5, 2), np.uint8)) is None


def test_size_option_resizes_frames(tmp_path):
    source = ArraySource([np.zeros((48, 64, 3), np.uint8)], size=(32, 16))
    assert source.read().image.shape == (16, 32, 3)


def test_unknown_uri_and_dead_stream_fail_fast(tmp_path):
    with pytest.raises(SourceError, match="nothing.mp4"):
        open_source(str(tmp_path / "nothing.mp4"))
    start = time.monotonic()
    with pytest.raises(SourceError, match=r"cannot connect to 127\.0\.0\.1:\d+ \(refused\)"):
        open_source(refused_url().replace("/hook", "/stream.mjpg"), timeout=1.0)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("url, message", [
    ("rtsp://", "without a host"), ("rtsp:///stream", "without a host"), ("http://:8080/x", "without a host"),
    ("rtsp://cam:99999/s", "port"), ("rtsp://cam:abc/s", "port"), ("rtsp://cam:0/s", "port")])
def test_stream_url_that_can_never_open_is_refused_at_once(url, message):
    """Such a URL was retried with backoff until a signal stopped the run."""
    start = time.monotonic()
    with pytest.raises(SourceError, match=message):
        open_source(url, timeout=5.0)
    assert time.monotonic() - start < 1


def test_csi_without_gstreamer_says_why():
    from mrkd.runtime.sources import gstreamer_available
    if gstreamer_available():
        pytest.skip("this OpenCV has GStreamer")
    with pytest.raises(SourceError, match="GStreamer"):
        open_source("csi://0")


def test_mjpeg_stream_that_drops_is_reconnected():
    server = MjpegServer(frames_per_connection=10, interval=0.01)
    try:
        source = open_source(server.url, timeout=2.0, backoff=(0.05, 0.5))
        frames, deadline = [], time.monotonic() + 15
        while time.monotonic() < deadline and (source.stats.reconnects < 2 or len(frames) < 25):
            frame = source.read(timeout=1.0)
            if frame is not None:
                frames.append(frame)
        source.close()
    finally:
        server.close()
    assert source.stats.reconnects >= 2 and server.connections >= 3
    assert len(frames) >= 25
    indices = [f.index for f in frames]
    assert indices == sorted(set(indices))           # newest-first never goes back in time
    assert all(f.image.shape == (48, 64, 3) for f in frames)


def test_live_source_keeps_only_the_newest_frame():
    server = MjpegServer(frames_per_connection=200, interval=0.005)
    try:
        source = open_source(server.url, timeout=2.0)
        first = source.read(timeout=5.0)
        time.sleep(0.4)                               # a slow consumer: ~80 frames arrive meanwhile
        second = source.read(timeout=5.0)
        source.close()
    finally:
        server.close()
    assert second.index - first.index > 5
    assert source.stats.dropped >= second.index - first.index - 2


def test_image_folder_warns_like_training_about_unread_formats_and_12_bit_data(tmp_path):
    # mrkd run --source FOLDER judged a folder with a GIF among its PNGs (one image fewer) or 12-bit frames
    # saved in 16-bit files (read nearly black) without a word, where training's folders warn.
    import warnings

    import cv2
    rng = np.random.default_rng(5)
    for name, folder, image in [("a.png", "low", rng.integers(0, 4096, (16, 16), dtype=np.uint16)),
                                ("b.png", "low", rng.integers(0, 4096, (16, 16), dtype=np.uint16)),
                                ("a.png", "full", rng.integers(0, 4096, (16, 16), dtype=np.uint16) << 4),
                                ("a.png", "mixed", np.zeros((16, 16, 3), np.uint8))]:
        (tmp_path / folder).mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / folder / name), image)
    (tmp_path / "mixed" / "b.gif").write_bytes(b"GIF89a")
    with pytest.warns(UserWarning, match=r"low: 16-bit images use only 12 of their 16 bits .*value << 4"):
        with open_source(str(tmp_path / "low")) as source:
            assert len(list(source)) == 2
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) in a format mrkd does not read \(e.g. 'b.gif'\)"):
        with open_source(str(tmp_path / "mixed")) as source:
            assert len(list(source)) == 1
    with pytest.warns(UserWarning, match="use only 12 of their 16 bits"):
        open_source(str(tmp_path / "low" / "*.png")).close()
    (tmp_path / "mixed" / "b.gif").unlink()
    (tmp_path / "mixed" / "notes.txt").write_text("not an image")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_source(str(tmp_path / "full")).close()
        open_source(str(tmp_path / "mixed")).close()
