"""The evidence keeps the camera's own bits beside the frame the model judged (issue 23): a GigE camera
in Mono10/12/16 or Bayer delivers pixels that the 8-bit BGR frame does not hold (the low bits, the
mosaic). Against Aravis' real GigE Vision simulator (arv-fake-gv-camera-0.8, Mono16 and BayerRG8), the
raw PNG is read back with OpenCV's own reader (IMREAD_UNCHANGED) and compared with the simulator's test
pattern (Aravis' arvfakecamera.c: Mono16 pixel (x, y) of frame f is 256 (x + y + f) mod 65535) and with
the judged frame (shifted / demosaiced). Synthetic buffers cover Mono10/12 and the other Bayer patterns;
the budget deletes an OK sample's raw file with its frame; review and refit keep reading the 8-bit frame.
Mono10/12 are scaled to 16 bits with an sBIT chunk, as the PNG spec asks: its chunks are read by a reader
written here (struct and zlib), not by the encoder's library."""

from __future__ import annotations

import hashlib
import os
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from test_gige import Recorder, model, simulator  # noqa: F401 - the fixtures

from mrkd.runtime.line.loop import Camera, Line
from mrkd.runtime.line.parts import PartRunner, open_part_sources
from mrkd.runtime.line.trigger import PartSettings
from mrkd.runtime.outputs.base import CameraJudgement, FrameResult, LineObserver, PartResult, Verdict
from mrkd.runtime.outputs.evidence import EvidenceSettings, EvidenceWriter, encode_raw_png
from mrkd.runtime.raw_image import RawImage
from mrkd.runtime.sources.gige import BAYER_TO_OPENCV, MONO_BITS, decode


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def png_chunks(path):
    """The PNG's chunks in order, (type, data), each one's CRC checked (PNG 1.2 section 3)."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        assert struct.unpack(">I", data[at + 8 + length:at + 12 + length])[0] == zlib.crc32(kind + body), kind
        chunks.append((kind.decode("ascii"), body))
        at += 12 + length
    return chunks


def gray16_samples(chunks) -> np.ndarray:
    """A non-interlaced 16-bit greyscale PNG's samples as stored: IDAT inflated and each row's filter
    undone (PNG 1.2 section 6), no shift, no sBIT applied."""
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert chunks[0][0] == "IHDR" and (depth, colour, interlace) == (16, 0, 0)
    data, stride, bpp = zlib.decompress(b"".join(body for kind, body in chunks if kind == "IDAT")), width * 2, 2
    rows, prior = [], bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = data[start], bytearray(data[start + 1:start + 1 + stride])
        for i in range(stride):
            a, b = (line[i - bpp] if i >= bpp else 0), prior[i]
            c = prior[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            else:
                assert kind == 0, kind
        rows.append(bytes(line))
        prior = line
    return np.frombuffer(b"".join(rows), ">u2").reshape(height, width)


def significant_bits(chunks):
    """The sBIT chunk's one greyscale byte, None without one; it must come before IDAT (section 4.2.6)."""
    kinds = [kind for kind, _ in chunks]
    if "sBIT" not in kinds:
        return None
    assert kinds.count("sBIT") == 1 and kinds.index("sBIT") < kinds.index("IDAT")
    body = chunks[kinds.index("sBIT")][1]
    assert len(body) == 1, body
    return body[0]


# ---------------------------------------------------------------- decode (no camera)

@pytest.mark.parametrize("pixel_format", ["Mono10", "Mono12", "Mono16"])
def test_wide_mono_keeps_the_values_as_delivered(pixel_format):
    bits = MONO_BITS[pixel_format]
    values = np.random.default_rng(bits).integers(0, 1 << bits, (6, 10), dtype=np.uint16)
    data = b"".join(int(v).to_bytes(2, "little") for v in values.ravel())     # the wire's little-endian words
    bgr, raw = decode(data, 10, 6, pixel_format)
    assert raw is not None and raw.pixel_format == pixel_format and raw.pixels.dtype == np.uint16
    assert np.array_equal(raw.pixels, values)
    assert np.array_equal(bgr, np.repeat((values >> (bits - 8)).astype(np.uint8)[..., None], 3, axis=2))


@pytest.mark.parametrize("pixel_format", sorted(BAYER_TO_OPENCV))
def test_bayer_keeps_the_mosaic(pixel_format):
    mosaic = np.random.default_rng(3).integers(0, 256, (8, 12), dtype=np.uint8)
    data = bytearray(mosaic.tobytes())
    bgr, raw = decode(bytes(data), 12, 8, pixel_format)
    data[:] = b"\0" * len(data)                                  # the buffer goes back to Aravis: a copy is kept
    assert raw.pixel_format == pixel_format and np.array_equal(raw.pixels, mosaic)
    assert bgr.shape == (8, 12, 3)


@pytest.mark.parametrize("pixel_format, channels", [("Mono8", 1), ("RGB8", 3), ("BGR8", 3)])
def test_eight_bit_formats_carry_nothing_extra(pixel_format, channels):
    data = bytes(range(4 * 6 * channels))
    assert decode(data, 6, 4, pixel_format)[1] is None


# ---------------------------------------------------------------- the writer (no camera)

def _mono12(seed: int, shape=(24, 32)) -> RawImage:
    return RawImage(np.random.default_rng(seed).integers(0, 4096, shape, dtype=np.uint16), "Mono12")


def _frame(raw, event_id=None, index=0) -> FrameResult:
    image = np.repeat((raw.pixels >> 4).astype(np.uint8)[..., None], 3, axis=2) if raw is not None else \
        np.full((24, 32, 3), 7, np.uint8)
    return FrameResult("cam0", index, 0.0, image, np.zeros((8, 8), np.float32), 1.0 if event_id else 0.0, 0.5,
                       bool(event_id), event={"event_id": event_id} if event_id else None, raw=raw)


def test_an_alarm_keeps_the_camera_bits_in_a_16_bit_png_beside_the_judged_frame(tmp_path):
    writer = EvidenceWriter(EvidenceSettings(str(tmp_path)))
    raw = _mono12(1)
    fields = writer.event_fields(_frame(raw, "e1"))
    assert fields["evidence_raw"] == str(tmp_path / "cam0" / "e1.raw.png")
    assert fields["evidence_raw_sha256"] == sha(fields["evidence_raw"])
    assert fields["evidence_raw_pixel_format"] == "Mono12"
    with Image.open(fields["evidence_raw"]) as kept:             # an independent reader: Pillow
        assert kept.mode.startswith("I;16") or kept.mode == "I"
        assert np.array_equal(np.asarray(kept).astype(np.uint16) >> 4, raw.pixels)   # scaled to 16 bits
    assert np.array_equal(cv2.imread(fields["evidence"])[..., 1], raw.pixels >> 4)
    # a source without camera bits: the evidence as before, no extra file, no extra field
    plain = writer.event_fields(_frame(None, "e2"))
    assert set(plain) == {"evidence", "evidence_sha256"} and not (tmp_path / "cam0" / "e2.raw.png").exists()


@pytest.mark.parametrize("pixel_format, bits", [("Mono10", 10), ("Mono12", 12), ("Mono16", None)])
def test_a_raw_png_of_fewer_than_16_bits_is_scaled_and_says_its_significant_bits(pixel_format, bits, tmp_path):
    """PNG stores a 10/12-bit sample scaled to its 16-bit depth and says how many bits are significant in
    sBIT (PNG 1.2 sections 4.2.6 and 9.1): values as delivered (Mono12 0..4095) showed nearly black, and
    no chunk said only 12 of the 16 bits count. Mono16 fills its bits: as delivered, no sBIT."""
    top = (1 << (bits or 16)) - 1
    values = np.random.default_rng(7).integers(0, top + 1, (24, 32), dtype=np.uint16)
    values[0, :3] = (0, top, 1)
    writer = EvidenceWriter(EvidenceSettings(str(tmp_path), ok_every=1))
    fields = writer.event_fields(_frame(RawImage(values, pixel_format), "e1"))
    writer.on_frame(_frame(RawImage(values, pixel_format), index=1))       # an OK sample's raw file alike
    for path in (fields["evidence_raw"], tmp_path / "cam0" / "ok" / "0000000001.raw.png"):
        chunks = png_chunks(path)
        stored = gray16_samples(chunks)
        assert significant_bits(chunks) == bits
        if bits is None:
            assert np.array_equal(stored, values)
            continue
        assert np.array_equal(stored >> (16 - bits), values)                  # sBIT's shift gives them back
        assert stored[0, 0] == 0 and stored[0, 1] == 65535                  # scaled to the full 16 bits
        assert np.array_equal(stored & ((1 << (16 - bits)) - 1), values >> (2 * bits - 16))   # bit replication
    assert fields["evidence_raw_sha256"] == sha(fields["evidence_raw"])


def test_a_mono12_value_past_its_12_bits_is_kept_at_the_largest(tmp_path):
    """PFNC pads Mono12 with zero bits; a camera that sets them gets 4095 there, as its frame gets 255."""
    values = np.array([[4095, 4096, 65535, 17]], np.uint16)
    fields = EvidenceWriter(EvidenceSettings(str(tmp_path))).event_fields(_frame(RawImage(values, "Mono12"), "e1"))
    chunks = png_chunks(fields["evidence_raw"])
    assert significant_bits(chunks) == 12
    assert gray16_samples(chunks).tolist() == [[65535, 65535, 65535, 17 << 4 | 17 >> 8]]


def test_an_ok_samples_raw_file_counts_in_the_budget_and_goes_with_its_frame(tmp_path):
    one = _frame(_mono12(0))
    sample = len(cv2.imencode(".png", one.image)[1]) + len(encode_raw_png(one.raw))
    writer = EvidenceWriter(EvidenceSettings(str(tmp_path), ok_every=1, max_bytes=int(sample * 2.5)))
    for index in range(4):
        writer.on_frame(_frame(_mono12(index), index=index))
    kept = sorted(p.name for p in (tmp_path / "cam0" / "ok").iterdir())
    assert kept == ["0000000002.png", "0000000002.raw.png", "0000000003.png", "0000000003.raw.png"]
    assert writer.ok_deleted == 2 and writer.used_bytes <= int(sample * 2.5)
    # a restart counts what is there and pairs each sample's files: the next sample deletes both of the oldest
    # (sample 3's raw file made the oldest file: the sample it belongs to goes, whole, and sample 2 stays)
    os.utime(tmp_path / "cam0" / "ok" / "0000000003.raw.png", ns=(1, 1))
    again = EvidenceWriter(EvidenceSettings(str(tmp_path), ok_every=1, max_bytes=int(sample * 2.5)))
    again.on_frame(_frame(_mono12(9), index=9))
    kept = sorted(p.name for p in (tmp_path / "cam0" / "ok").iterdir())
    assert kept == ["0000000002.png", "0000000002.raw.png", "0000000009.png", "0000000009.raw.png"]


def test_a_folder_of_ok_samples_lists_and_calibrates_on_the_judged_frames_only(tmp_path):
    """The OK samples' folder is what a line engineer calibrates on (`mrkd calibrate model.onnx
    evidence/top/ok`), replays (`mrkd run --source`) or gives refit as --good: every listing took each
    sample twice, its camera bits too (a Bayer mosaic read as a grey picture, a Mono12 one nearly black),
    so the threshold was set on images the model never judges (measured with the simulator in BayerRG8:
    'from 24 good image(s)', threshold 0.12, where its 12 frames give 0.049)."""
    from click.testing import CliRunner

    from runtime_fixtures import build_tiny_model
    from mrkd.calibrate_cli import calibrate_command
    from mrkd.runtime.images import list_images
    writer = EvidenceWriter(EvidenceSettings(str(tmp_path / "ev"), ok_every=1))
    for index in range(3):
        mosaic = np.random.default_rng(index).integers(0, 256, (24, 32), dtype=np.uint8)
        raw = RawImage(mosaic, "BayerRG8")
        writer.on_frame(FrameResult("cam0", index, 0.0, cv2.cvtColor(mosaic, BAYER_TO_OPENCV["BayerRG8"]),
                                    np.zeros((8, 8), np.float32), 0.0, 0.5, False, raw=raw))
    ok = tmp_path / "ev" / "cam0" / "ok"
    frames = sorted(p for p in ok.iterdir() if not p.name.endswith(".raw.png"))
    assert len(frames) == 3 and len(list(ok.iterdir())) == 6
    assert list_images(ok) == frames and list_images(str(ok / "*.png")) == frames
    assert len(list_images(str(ok / "*.raw.png"))) == 3           # asked for by name: the camera bits are images
    (tmp_path / "mine").mkdir()                                     # a file of the user's own, no frame beside it
    cv2.imwrite(str(tmp_path / "mine" / "scan.raw.png"), np.zeros((8, 8), np.uint8))
    assert [p.name for p in list_images(tmp_path / "mine")] == ["scan.raw.png"]
    model = build_tiny_model(tmp_path / "tiny.onnx")
    done = CliRunner().invoke(calibrate_command, [str(model), str(ok), "--accept-shift"])
    assert done.exit_code == 0 and "from 3 good image(s)" in done.output, done.output

def test_review_and_refit_read_the_judged_frame_of_an_event_with_camera_bits(tmp_path):
    """A part event that names a raw file: `mrkd review` lists and labels it by the 8-bit frame's sha256,
    and refit's label reader (train/refit.py) returns that frame, not the raw file."""
    from click.testing import CliRunner

    from test_review_page import play_part
    from mrkd.review_cli import review_command
    from mrkd.runtime import OutputSettings, build_outputs
    from mrkd.runtime.outputs.base import CameraInfo
    from mrkd.runtime.review import read_review_events
    events_path, labels, folder = tmp_path / "events.jsonl", tmp_path / "labels.jsonl", tmp_path / "ev"
    outputs = build_outputs(OutputSettings(events=str(events_path), evidence=EvidenceSettings(str(folder))))
    view = _frame(_mono12(4))
    part = PartResult(inspection_id=1, part_id="P-1", verdict=Verdict.NG, score=0.9, threshold=0.5,
                      cameras=(CameraJudgement("cam0", 0.9, 0.5, True, images=1),), model_sha256="00" * 32,
                      trigger_time=time.time(), event_id="part-raw-1")
    play_part(outputs, [CameraInfo("cam0", "memory", "m.onnx", "00" * 32, "onnxruntime", "fp32", 0.5, "test")],
              part, {"cam0": view})
    for output in outputs:
        output.on_stop()
    judged = read_review_events(events_path)[0]["cameras"][0]
    assert judged["evidence_raw"].endswith("part-raw-1.raw.png") and judged["evidence_raw_pixel_format"] == "Mono12"
    listed = CliRunner().invoke(review_command, [str(events_path), "--labels", str(labels)])
    assert listed.exit_code == 0 and "part-raw-1" in listed.output, listed.output
    marked = CliRunner().invoke(review_command, [str(events_path), "--labels", str(labels), "--mark", "part-raw-1",
                                                 "--as", "good", "--who", "test"])
    assert marked.exit_code == 0, marked.output
    from mrkd.runtime.review import read_labels
    label = read_labels(labels)[0]
    assert label.image == judged["evidence"] and label.image_sha256 == judged["evidence_sha256"] == sha(label.image)
    from mrkd.train.refit import reviewed_images
    reviewed = reviewed_images(labels, events_path=events_path)
    assert reviewed.good == (judged["evidence"],) and not reviewed.skipped


# ---------------------------------------------------------------- against the simulator

def run_one_part(line: Line, observers, part_id: str, judged) -> None:
    """Trigger one part on a software-triggered ``line`` with ``observers``; wait up to 20 s for ``judged()``."""
    settings = PartSettings(queue=4, timeout=2.0)
    runner = PartRunner(line, open_part_sources(line, settings), settings, observers=observers).start()
    try:
        runner.trigger(part_id)
        deadline = time.monotonic() + 20
        while not judged() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        runner.stop()


def test_a_gige_parts_raw_evidence_is_what_the_camera_sent(simulator, model, tmp_path):  # noqa: F811
    mono, bayer = simulator("127.0.86.50", "RAWMONO16"), simulator("127.0.86.51", "RAWBAYER")
    line = Line((Camera("mono", mono.uri, model, trigger="software", features=(("PixelFormat", "Mono16"),),
                        threshold=1e-9),      # every part NG: its evidence is written
                 Camera("bayer", bayer.uri, model, trigger="software", features=(("PixelFormat", "BayerRG8"),),
                        threshold=1e-9)))
    recorder, writer = Recorder(), EvidenceWriter(EvidenceSettings(str(tmp_path / "ev")))
    run_one_part(line, [recorder, writer], "R1", lambda: recorder.parts)
    assert recorder.parts, "no part was judged"
    part = recorder.parts[0][1]
    assert part.verdict == Verdict.NG, part
    by_camera = {j.camera: j for j in part.cameras}

    mono_judged = by_camera["mono"]
    assert mono_judged.evidence_raw_pixel_format == "Mono16"
    assert mono_judged.evidence_raw == str(tmp_path / "ev" / "mono" / f"{part.event_id}.raw.png")
    assert mono_judged.evidence_raw_sha256 == sha(mono_judged.evidence_raw)
    values = cv2.imread(mono_judged.evidence_raw, cv2.IMREAD_UNCHANGED)
    assert values.dtype == np.uint16 and values.shape == (512, 512)
    # Aravis' simulator (ExposureTimeAbs 10000, GainRaw 0: scale 1): frame f's pixel (x, y) is
    # 256 (x + y + f) mod 65535; f from pixel (0, 0) (256 is its own inverse mod 65535), then every pixel
    y, x = np.mgrid[0:512, 0:512]
    f = int(values[0, 0]) * 256 % 65535
    assert np.array_equal(values.astype(np.int64), (256 * (x + y + f)) % 65535)
    frame = cv2.imread(mono_judged.evidence)          # the judged frame: the top 8 bits, in all three channels
    assert all(np.array_equal(frame[..., c], (values >> 8).astype(np.uint8)) for c in range(3))

    bayer_judged = by_camera["bayer"]
    assert bayer_judged.evidence_raw_pixel_format == "BayerRG8"
    assert bayer_judged.evidence_raw_sha256 == sha(bayer_judged.evidence_raw)
    mosaic = cv2.imread(bayer_judged.evidence_raw, cv2.IMREAD_UNCHANGED)
    assert mosaic.dtype == np.uint8 and mosaic.shape == (512, 512)
    # the simulator's mosaic: each site's value depends on x + y (mod 255) and its place in the 2x2 pattern
    assert np.array_equal(mosaic[2:, :-2], mosaic[:-2, 2:])
    assert not np.array_equal(mosaic[0::2, 0::2], mosaic[0::2, 1::2])      # a mosaic, not a grey image
    assert np.array_equal(cv2.imread(bayer_judged.evidence), cv2.cvtColor(mosaic, BAYER_TO_OPENCV["BayerRG8"]))


def test_a_free_running_gige_alarms_raw_evidence_is_named_by_its_event(simulator, model, tmp_path):  # noqa: F811
    from mrkd.runtime.line.loop import run_line
    from mrkd.runtime.outputs.base import LineObserver
    camera = simulator("127.0.86.52", "RAWFREE")
    events = []

    class Events(LineObserver):
        def on_event(self, camera, event):
            events.append(event)

    writer = EvidenceWriter(EvidenceSettings(str(tmp_path / "ev")))
    line = Line((Camera("cam", camera.uri, model, threshold=1e-9,
                        features=(("PixelFormat", "Mono16"), ("Width", "64"), ("Height", "48"))),))
    run_line(line, max_frames=3, observers=[writer, Events()])
    assert events, "no alarm was raised"
    event = events[0]
    assert event["evidence_raw_pixel_format"] == "Mono16" and event["evidence_raw_sha256"] == sha(event["evidence_raw"])
    values = cv2.imread(event["evidence_raw"], cv2.IMREAD_UNCHANGED)
    y, x = np.mgrid[0:48, 0:64]
    f = int(values[0, 0]) * 256 % 65535
    assert values.dtype == np.uint16 and np.array_equal(values.astype(np.int64), (256 * (x + y + f)) % 65535)
    assert np.array_equal(cv2.imread(event["evidence"])[..., 0], (values >> 8).astype(np.uint8))
    assert significant_bits(png_chunks(event["evidence_raw"])) is None     # Mono16: every bit counts


def test_a_gige_camera_in_mono12_keeps_its_bits_scaled_with_sbit(simulator, model, tmp_path):  # noqa: F811
    """Aravis' simulator offers no Mono12 entry, but sends buffers of the format its PixelFormat register
    holds (GVSP's leader names it); its test pattern fills Mono8/16 and Bayer only, so the values are
    checked against the camera bits the line was handed, and the frame against them."""
    from mrkd.runtime.line.loop import run_line
    from mrkd.runtime.sources.gige import aravis
    camera = simulator("127.0.86.48", "RAWMONO12")
    control = aravis().Camera.new(camera.address)
    control.get_device().set_integer_feature_value("PixelFormatRegister", 0x01100005)    # PFNC Mono12
    del control                                   # lets the camera go: the line takes control
    frames = {}

    class Frames(LineObserver):
        def on_frame(self, result):
            frames[result.frame_index] = result.raw

    # its buffers are blank: no score passes a threshold, so the camera bits kept are OK samples'
    line = Line((Camera("cam", camera.uri, model, features=(("Width", "64"), ("Height", "48"))),))
    writer = EvidenceWriter(EvidenceSettings(str(tmp_path / "ev"), ok_every=1))
    run_line(line, max_frames=3, observers=[Frames(), writer])
    kept = sorted((tmp_path / "ev" / "cam" / "ok").glob("*.raw.png"))
    assert len(kept) == len(frames) == 3, (kept, frames)
    for path in kept:
        raw = frames[int(path.name[:-len(".raw.png")])]
        assert raw.pixel_format == "Mono12"
        chunks = png_chunks(path)
        assert significant_bits(chunks) == 12
        stored = gray16_samples(chunks)
        delivered = np.minimum(raw.pixels, 4095)
        assert stored.shape == (48, 64) and np.array_equal(stored >> 4, delivered)
        frame = cv2.imread(str(path.with_name(path.name.replace(".raw.png", ".png"))))
        assert np.array_equal(frame[..., 0], (delivered >> 4).astype(np.uint8))


# ---------------------------------------------------------------- the camera bits only where an output keeps them

class FrameBits(LineObserver):
    """Each judged image's camera bits as an output is given them (a free run's frames, a part's images)."""

    def __init__(self):
        self.raws = []

    def on_frame(self, result):
        self.raws.append(result.raw)

    def on_part_image(self, result):
        self.raws.append(result.raw)


def test_a_free_running_gige_frame_carries_camera_bits_only_when_an_output_keeps_them(simulator, model,  # noqa: F811
                                                                                        tmp_path):
    """A 5 MP Mono16 camera's bits are 10 MB a frame, held by the video and shadow queues too: without
    the evidence writer (the one output that keeps them) no frame carries them."""
    from mrkd.runtime.line.loop import run_line
    camera = simulator("127.0.86.80", "BITSFREE")
    line = Line((Camera("cam", camera.uri, model, threshold=1e-9,
                        features=(("PixelFormat", "Mono16"), ("Width", "64"), ("Height", "48"))),))
    without = FrameBits()
    run_line(line, max_frames=3, observers=[without])
    assert len(without.raws) == 3 and without.raws == [None] * 3
    kept = FrameBits()
    run_line(line, max_frames=3, observers=[kept, EvidenceWriter(EvidenceSettings(str(tmp_path / "ev")))])
    assert len(kept.raws) == 3
    assert all(raw is not None and raw.pixel_format == "Mono16" and raw.pixels.shape == (48, 64) for raw in kept.raws)


def test_a_gige_parts_images_carry_camera_bits_only_when_an_output_keeps_them(simulator, model, tmp_path):  # noqa: F811
    camera = simulator("127.0.86.81", "BITSPART")
    line = Line((Camera("cam", camera.uri, model, trigger="software", threshold=1e-9,
                        features=(("PixelFormat", "Mono16"), ("Width", "64"), ("Height", "48"))),))
    for observers in ([FrameBits()], [FrameBits(), EvidenceWriter(EvidenceSettings(str(tmp_path / "ev")))]):
        bits = observers[0]
        run_one_part(line, observers, "P1", lambda: bits.raws)
        assert len(bits.raws) == 1, "no part image was judged"
        if len(observers) == 1:
            assert bits.raws == [None]
        else:
            assert bits.raws[0] is not None and bits.raws[0].pixel_format == "Mono16"


def test_the_evidence_counts_one_item_per_alarm_and_ok_sample_whatever_files_it_has(tmp_path):
    """mrkd_output_sent_total{output="evidence"} counts kept evidence items: an alarm's frame with its raw
    file is one (it counted files: two per alarm with camera bits); an item whose raw file (or frame) could
    not be written counts as failed, not sent, and its frame stays named."""
    from prometheus_client.parser import text_string_to_metric_families

    from mrkd.runtime.outputs.metrics import MetricsObserver
    writer = EvidenceWriter(EvidenceSettings(str(tmp_path), ok_every=1))
    metrics = MetricsObserver()
    metrics.see_outputs([writer, metrics])

    def scraped():
        counts = {s.name: s.value for family in text_string_to_metric_families(metrics.exposition()[0].decode())
                  for s in family.samples if s.labels.get("output") == "evidence"}
        assert counts["mrkd_output_sent_total"] == writer.health().sent
        assert counts["mrkd_output_failures_total"] == writer.health().failed
        return counts["mrkd_output_sent_total"], counts["mrkd_output_failures_total"]

    writer.event_fields(_frame(_mono12(1), "e1"))                 # frame + raw file: one alarm
    writer.event_fields(_frame(None, "e2"))                       # a frame only: one alarm
    writer.on_frame(_frame(_mono12(2), index=1))                  # an OK sample, frame + raw file
    assert len(list((tmp_path / "cam0").glob("*.png"))) == 3 and len(list((tmp_path / "cam0" / "ok").iterdir())) == 2
    assert scraped() == (3, 0)
    (tmp_path / "cam0" / "e3.raw.png").mkdir()                    # its raw file cannot be written
    fields = writer.event_fields(_frame(_mono12(3), "e3"))
    assert fields["evidence_sha256"] == sha(fields["evidence"]) and fields["evidence_raw"] is None
    assert scraped() == (3, 1)
    (tmp_path / "cam0" / "ok" / "0000000004.raw.png").mkdir()     # an OK sample's raw file cannot be written
    writer.on_frame(_frame(_mono12(4), index=4))
    assert (tmp_path / "cam0" / "ok" / "0000000004.png").is_file()
    assert scraped() == (3, 2)
