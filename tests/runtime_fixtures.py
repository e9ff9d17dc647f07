"""Helpers for the runtime tests: a hand-built ONNX "anomaly detector", generated videos and frames,
an MJPEG-over-HTTP server that drops its clients, webhook receivers (refusing, slow, recording), and a
small real tmpfs to fill (a full disk).

The tiny model (onnx helper API, no torch) flags bright patches: per pixel, the channel mean of
the normalised input minus a level, clipped at zero, box-averaged. Normal frames (gray texture below
the level) score 0; a white patch scores ~(1 - LEVEL). Its metadata sidecar is a real ModelMetadata.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, List, Sequence

import cv2
import numpy as np

from mrkd.benchmarks.mosquitto import free_port
from mrkd.runtime.calibration import Calibration
from mrkd.runtime.metadata import (INPUT_FLOAT_NCHW, INPUT_UINT8_NHWC, GraphOutputs, ModelMetadata, file_sha256,
                                   sidecar_path)

SIZE = 32
LEVEL = 0.6          # normalised brightness above which a pixel is "anomalous"
POOL = 5             # box filter of the full-size map
SCALE_STRIDES = (4, 8, 16)
THRESHOLD = 0.1


def traced_peak(call):
    """(call()'s result, the peak bytes Python's allocation tracing saw while it ran: numpy's buffers
    included), for tests that bound what one call holds at once."""
    import tracemalloc
    tracemalloc.start()
    try:
        return call(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def reference_map(frames_bgr_square: np.ndarray) -> np.ndarray:
    """What the tiny model computes, in plain numpy (N×S×S×3 uint8 -> N×S×S), for checking it."""
    x = frames_bgr_square.astype(np.float64) / 255.0
    deviation = np.maximum(x.mean(axis=3) - LEVEL, 0.0)
    padded = np.pad(deviation, ((0, 0), (POOL // 2, POOL // 2), (POOL // 2, POOL // 2)))
    out = np.zeros_like(deviation)
    for dy in range(POOL):   # AveragePool with count_include_pad=1
        for dx in range(POOL):
            out += padded[:, dy:dy + deviation.shape[1], dx:dx + deviation.shape[2]]
    return out / POOL ** 2


def build_tiny_model(path: Path, per_scale: bool = False, uint8_input: bool = False, max_batch: int = 4,
                     threshold: float = THRESHOLD, metadata_overrides: dict | None = None) -> Path:
    """Write a tiny ONNX anomaly model and its sidecar; returns the model path."""
    import onnx
    from onnx import TensorProto, helper

    nodes, inits = [], []
    if uint8_input:
        graph_input = helper.make_tensor_value_info("input", TensorProto.UINT8, ["N", SIZE, SIZE, 3])
        nodes += [helper.make_node("Cast", ["input"], ["as_float"], to=TensorProto.FLOAT),
                  helper.make_node("Transpose", ["as_float"], ["nchw255"], perm=[0, 3, 1, 2]),
                  helper.make_node("Div", ["nchw255", "c255"], ["x"])]
        inits.append(helper.make_tensor("c255", TensorProto.FLOAT, [], [255.0]))
    else:
        graph_input = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])
        nodes.append(helper.make_node("Identity", ["input"], ["x"]))
    inits += [helper.make_tensor("level", TensorProto.FLOAT, [], [LEVEL]),
              helper.make_tensor("axes1", TensorProto.INT64, [1], [1]),
              helper.make_tensor("axes123", TensorProto.INT64, [3], [1, 2, 3])]
    nodes += [helper.make_node("ReduceMean", ["x", "axes1"], ["mean"], keepdims=1),
              helper.make_node("Sub", ["mean", "level"], ["shifted"]),
              helper.make_node("Relu", ["shifted"], ["deviation"])]
    outputs = {}
    if per_scale:
        for i, stride in enumerate(SCALE_STRIDES):
            nodes += [helper.make_node("AveragePool", ["deviation"], [f"pool{i}"], kernel_shape=[stride, stride],
                                       strides=[stride, stride]),
                      helper.make_node("Squeeze", [f"pool{i}", "axes1"], [f"scale{i}"])]
            outputs[f"scale{i}"] = f"per-scale map N×{SIZE // stride}×{SIZE // stride}"
        graph_outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", SIZE // s, SIZE // s])
                         for n, s in zip(outputs, SCALE_STRIDES)]
    else:
        nodes += [helper.make_node("AveragePool", ["deviation"], ["anomaly_map"], kernel_shape=[POOL, POOL],
                                   pads=[POOL // 2] * 4, count_include_pad=1),
                  helper.make_node("ReduceMax", ["anomaly_map", "axes123"], ["score"], keepdims=0)]
        outputs = {"anomaly_map": "N×1×H×W", "score": "N"}
        graph_outputs = [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", 1, SIZE, SIZE]),
                         helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])]
    graph = helper.make_graph(nodes, "tiny_bright_patch_detector", [graph_input], graph_outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    meta = ModelMetadata(backbone="tiny-test", image_size=SIZE,
                         input_format=INPUT_UINT8_NHWC if uint8_input else INPUT_FLOAT_NCHW,
                         mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), outputs=GraphOutputs.from_dict(outputs, "fixture"),
                         calibration=None if threshold is None else Calibration(threshold=threshold),
                         onnx_sha256=file_sha256(path),
                         smoothing_in_graph=not per_scale, per_scale_outputs=per_scale, sigma=1.0,
                         batch_range=(1, 1, max_batch))
    for key, value in (metadata_overrides or {}).items():
        setattr(meta, key, value)
    meta.save(sidecar_path(path))
    return path


def export_tiny_model(path: Path, threshold: float = THRESHOLD) -> Path:
    """The tiny graph written by the exporter's own writer (mrkd.export.model_metadata.write_model:
    metadata in the graph's props, the sidecar with the file's sha256 beside it), with a calibration
    as training records it."""
    import onnx
    from mrkd.export.model_metadata import write_model
    build_tiny_model(path)
    meta = ModelMetadata.load(sidecar_path(path))
    meta.calibration = Calibration(threshold=threshold, method="quantile", quantile=0.99, n_good=12, good_mean=0.01,
                                   good_std=0.005, good_min=0.0, good_max=0.05, good_q99=0.049)
    write_model(onnx.load(str(path)), path, meta)
    return Path(path)


def normal_frame(rng: np.random.Generator, h: int = 48, w: int = 64) -> np.ndarray:
    """Gray textured part: values 90..130, never above the model's level."""
    return rng.integers(90, 131, size=(h, w, 3), dtype=np.uint8)


def defective_frame(rng: np.random.Generator, h: int = 48, w: int = 64) -> np.ndarray:
    """A normal frame with a white 12×12 patch near the top-left."""
    frame = normal_frame(rng, h, w)
    frame[8:20, 10:22] = 255
    return frame


def write_video(path: Path, frames: List[np.ndarray], fps: float = 25.0) -> Path:
    """MJPG .avi of the frames (OpenCV's own encoder works without FFmpeg codecs)."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened(), f"cannot write {path}"
    for frame in frames:
        writer.write(frame)
    writer.release()
    return Path(path)


def write_frames(folder: Path, frames: Sequence[np.ndarray], name: str = "{:03d}.png") -> Path:
    """``folder`` (made here) holding ``frames`` as lossless PNG files, the i-th named ``name.format(i)``:
    a folder source reads them in that order."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    for i, frame in enumerate(frames):
        assert cv2.imwrite(str(folder / name.format(i)), frame), f"cannot write {folder / name.format(i)}"
    return folder


def normal_then_defective(n_normal: int, n_defective: int, seed: int = 0) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [normal_frame(rng) for _ in range(n_normal)] + [defective_frame(rng) for _ in range(n_defective)]


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 in a daemon thread; ``url``; ``close()``."""

    def __init__(self, handler, path: str = "/"):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.server.owner = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{path}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class MjpegServer(_Server):
    """Serves multipart/x-mixed-replace JPEG frames; each connection is cut after ``frames_per_connection``
    frames (a camera that drops its clients); ``connections`` counts the clients served."""

    def __init__(self, frames_per_connection: int = 15, interval: float = 0.01):
        self.frames_per_connection, self.interval, self.connections = frames_per_connection, interval, 0
        rng = np.random.default_rng(1)
        self.jpegs = [cv2.imencode(".jpg", normal_frame(rng))[1].tobytes() for _ in range(5)]
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                owner.connections += 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    for i in range(owner.frames_per_connection):
                        jpeg = owner.jpegs[i % len(owner.jpegs)]
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                         + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n")
                        time.sleep(owner.interval)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

            def log_message(self, *args):
                pass

        super().__init__(Handler, "/stream.mjpg")


class WebhookReceiver(_Server):
    """Records POSTed JSON bodies after sleeping ``delay`` seconds per request."""

    def __init__(self, delay: float = 0.0):
        self.delay, self.received = delay, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(owner.delay)
                owner.received.append(body)
                try:
                    self.send_response(200)
                    self.end_headers()
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        super().__init__(Handler, "/hook")


def refused_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}/hook"


class SlowFrames:
    """A camera that takes ``delay`` s per image: the line stays busy while triggers keep coming."""

    def __init__(self, delay):
        self.delay, self.rng = delay, np.random.default_rng(0)

    def __iter__(self):
        while True:
            time.sleep(self.delay)
            yield normal_frame(self.rng)


# ---------------------------------------------------------------- a full disk

@contextlib.contextmanager
def small_tmpfs(folder: Path, options: str = "size=256k") -> Iterator[Path]:
    """A real tmpfs mounted at ``folder`` (created) with mount ``options`` ("size=64k",
    "nr_inodes=4"), unmounted afterwards; the test is skipped, saying so, where it cannot be mounted
    (mounting needs root)."""
    import pytest
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("FULL-DISK TEST SKIPPED, NOT TESTED: mounting a tmpfs needs root")
    from peers import require_program
    require_program("mount", ["mount"])
    require_program("umount", ["mount"])
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"FULL-DISK TEST SKIPPED, NOT TESTED: cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill_up(folder: Path, name: str = "filler") -> Path:
    """Write zeros to ``folder/name`` until the file system says it is full; checks it is."""
    filler = folder / name
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    probe = folder / f"{name}.probe"
    try:
        probe.write_bytes(b"x" * 4096)
    except OSError:
        pass
    else:
        raise AssertionError(f"{folder} is not full")
    finally:
        if probe.exists():
            probe.unlink()
    return filler
