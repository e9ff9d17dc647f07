"""``--snapshots DIR``: one image per alarm (and per camera of an NG/ERROR part), in the camera's own
folder, named by the event id and created exclusively: a restarted run never overwrites an earlier
run's images, and old log lines keep pointing at their own snapshots. A snapshot that cannot be
written (a full disk) is counted and warned about naming the file; the event goes out without it.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

import cv2
import numpy as np

from mrkd.errors import SettingError
from mrkd.atomic import new_file_mode
from mrkd.runtime.outputs.base import FrameResult, LineObserver, OutputHealth, PartResult
from mrkd.runtime.outputs.delivery import DISK_FULL, Delivery
from mrkd.runtime.outputs.events import EVENT_ID_NAME, new_event_id
from mrkd.runtime.outputs.overlay import heatmap_overlay
from mrkd.runtime.outputs.staged_files import camera_folders, remove_abandoned_in, stage, staged_pattern

# The staged files write_new_file leaves in DIR/<camera>/ when a run is killed mid-write, under the names
# SnapshotWriter gives (an alarm's or an NG/ERROR part's, .jpg or .png): removed at the start when abandoned.
STAGED_SNAPSHOT = re.compile(staged_pattern(rf"(alarm_{EVENT_ID_NAME}_frame\d{{8,}}|part_{EVENT_ID_NAME}_\d{{8,}})"
                                            r"\.(jpg|png)"))


def regions_from_map(amap: np.ndarray, threshold: float, frame_hw, min_area: int = 1) -> List[Dict[str, int]]:
    """Bounding boxes (x, y, w, h, area in map pixels) of the connected regions where ``amap`` >= threshold,
    scaled from the map's size to the frame's (h, w), largest first (8-connectivity)."""
    mask = (np.asarray(amap) >= threshold).astype(np.uint8)
    count, _, boxes, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    scale_y = frame_hw[0] / amap.shape[0]
    scale_x = frame_hw[1] / amap.shape[1]
    regions = []
    for x, y, w, h, area in boxes[1:count]:          # label 0 is the background
        if area < min_area:
            continue
        x0, y0 = int(np.floor(x * scale_x)), int(np.floor(y * scale_y))
        x1 = min(int(np.ceil((x + w) * scale_x)), frame_hw[1])
        y1 = min(int(np.ceil((y + h) * scale_y)), frame_hw[0])
        regions.append({"x": x0, "y": y0, "w": x1 - x0, "h": y1 - y0, "area": int(area)})
    return sorted(regions, key=lambda r: -r["area"])


def write_snapshot(path: str | os.PathLike, frame_bgr: np.ndarray, amap: np.ndarray, threshold: float,
                   boxes: Sequence[Dict[str, int]] = ()) -> Path:
    """Side by side: the frame as the camera saw it with the alarm's boxes in red, and the frame with
    the anomaly heat-map blended over it (blue = 0, red = threshold and above); written atomically as
    PNG or JPEG (by suffix), never over an existing file (FileExistsError). An operator sees the part
    itself and where the model looked."""
    path = Path(path)
    boxed = frame_bgr.copy()
    thickness = max(1, round(min(frame_bgr.shape[:2]) / 160))
    for box in boxes:
        cv2.rectangle(boxed, (box["x"], box["y"]), (box["x"] + box["w"] - 1, box["y"] + box["h"] - 1),
                      (0, 0, 255), thickness)
    overlay = heatmap_overlay(frame_bgr, amap, vmin=0.0, vmax=max(threshold, 1e-12))
    ok, encoded = cv2.imencode(path.suffix or ".jpg", np.hstack([boxed, overlay]))
    if not ok:
        raise SettingError(f"{path}: OpenCV cannot encode a {path.suffix!r} image")
    write_new_file(path, encoded.tobytes())
    return path


def write_new_file(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file, fsync, then hard-link it to ``path``: a reader never sees a
    half file, and an existing ``path`` is never replaced (FileExistsError). The file gets the mode
    the umask allows (0644 under umask 022), as any new file would. OSError names ``path``."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: exists; snapshots are never overwritten")
    try:
        fd, staged = stage(path)
    except OSError as exc:
        raise OSError(exc.errno, f"{path}: {exc.strerror or exc}") from None
    try:
        # open (its lock held) until the staged name is gone: held, no other run's start takes it for a
        # killed run's leftover (staged_files.remove_if_abandoned)
        with os.fdopen(fd, "wb") as handle:
            try:
                os.fchmod(handle.fileno(), new_file_mode())
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
                try:
                    os.link(staged, path)       # fails if path appeared meanwhile: no silent overwrite
                except FileExistsError:
                    raise FileExistsError(f"{path}: exists; snapshots are never overwritten") from None
                except OSError:                 # no hard links (e.g. FAT): rename, after the check above
                    os.rename(staged, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(staged)
    except FileExistsError:
        raise
    except OSError as exc:
        raise OSError(exc.errno, f"{path}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(staged):
            os.unlink(staged)


class SnapshotWriter(LineObserver):
    """Writes each alarm's snapshot into ``folder/<camera>/`` and adds its path to the event."""

    def __init__(self, folder: str | os.PathLike, image_format: str = ".jpg"):
        self.folder = Path(folder)
        self.image_format = image_format
        self.delivery = Delivery("snapshots", str(self.folder))
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(20, f"--snapshots {self.folder}: not a folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:          # a full disk: each snapshot tries again (and is counted)
            if exc.errno not in DISK_FULL:
                raise OSError(exc.errno, f"--snapshots {self.folder}: cannot create the folder "
                                         f"({exc.strerror or exc})") from None
            self.delivery.set_failing(f"{self.folder}: cannot create the folder ({exc.strerror or exc})")
        # an earlier run killed mid-write left its staged file: never a snapshot, never removed otherwise
        remove_abandoned_in([(camera, STAGED_SNAPSHOT) for camera in camera_folders(self.folder)], "snapshot",
                            self.folder)

    def _write(self, camera: str, stem: str, image: np.ndarray, amap: np.ndarray, threshold: float,
               boxes) -> Tuple[bool, str]:
        folder = self.folder / camera
        path = folder / f"{stem}{self.image_format}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_snapshot(path, image, amap, threshold, boxes)
        except FileExistsError:
            return False, ""
        except OSError as exc:
            self.delivery.failed_one(exc.strerror or str(exc))     # names the file
            return True, ""
        self.delivery.delivered()
        return True, str(path)

    def event_fields(self, result: FrameResult) -> Mapping[str, object]:
        event = result.event
        event_id = event["event_id"]
        for _ in range(3):      # a clash of 32 random bits in the same millisecond: draw again
            done, path = self._write(result.camera, f"alarm_{event_id}_frame{result.frame_index:08d}", result.image,
                                     result.amap, result.threshold, event.get("boxes", ()))
            if done:
                return {"snapshot": path or None, "event_id": event_id}
            event_id = new_event_id()
        return {"snapshot": None}

    def part_fields(self, part: PartResult, views) -> Mapping[str, Mapping[str, object]]:
        written = {}
        if part.event_id is None:      # an OK part: snapshots are of alarms only
            return written
        for camera, view in views.items():
            boxes = regions_from_map(view.amap, view.threshold, view.image.shape[:2])
            done, path = self._write(camera, f"part_{part.event_id}_{part.inspection_id:08d}", view.image, view.amap,
                                     view.threshold, boxes)
            if path:
                written[camera] = {"snapshot": path}
        return written

    def health(self) -> OutputHealth:
        return self.delivery.health()


def outputs_from(settings) -> list:
    """``--snapshots DIR`` (OutputSettings.snapshots)."""
    return [SnapshotWriter(settings.snapshots, settings.snapshot_format)] if settings.snapshots else []
