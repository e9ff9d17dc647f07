"""The live view of a triggered camera on the operator page: it makes an image only when a part asks
for one, and the page's view of it stayed empty for the whole run (the page's stream is fed by free-run
frames only; the soak walk saw its stream open and never send). It now shows the last part's judged
image with its heat map, as a smart camera's display does, until the next part. A real `mrkd run
--trigger software --trigger-stdin --http`; the view read with a raw MJPEG client."""

from __future__ import annotations

import urllib.request

import cv2
import numpy as np

from line_fixtures import PageRun, wait_for
from runtime_fixtures import build_tiny_model, defective_frame, normal_frame


def first_jpeg(url: str, timeout: float = 10.0) -> np.ndarray:
    """The first frame of an MJPEG stream, decoded (None when none came within ``timeout``)."""
    data = b""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while b"\xff\xd9" not in data[data.find(b"\xff\xd8") + 2:] if b"\xff\xd8" in data else True:
                chunk = response.read1(65536)
                if not chunk:
                    return None
                data += chunk
    except OSError:           # the read timed out: no frame
        return None
    start = data.find(b"\xff\xd8")
    end = data.find(b"\xff\xd9", start + 2) + 2
    return cv2.imdecode(np.frombuffer(data[start:end], np.uint8), cv2.IMREAD_COLOR)


def test_a_triggered_cameras_live_view_shows_the_last_parts_image(tmp_path):
    model = build_tiny_model(tmp_path / "m.onnx")
    parts = tmp_path / "parts"
    parts.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(parts / f"p{i}.png"), defective_frame(rng) if i % 2 else normal_frame(rng))
    size = cv2.imread(str(parts / "p0.png")).shape
    parts_log = tmp_path / "parts.jsonl"
    run = PageRun(model, "--source", parts, "--loop", "--trigger", "software", "--trigger-stdin",
                  "--parts-log", parts_log, "--status-every", "0")
    try:
        run.trigger("P-0", "P-1")
        assert wait_for(lambda: parts_log.exists() and len(parts_log.read_text().splitlines()) == 2, 30)
        shown = first_jpeg(run.url + "/stream/cam0.mjpg")
    finally:
        status = run.close()
    assert status == 0, run.stderr
    assert shown is not None, "the triggered camera's live view sent no image after two parts"
    assert shown.shape == size, (shown.shape, size)
