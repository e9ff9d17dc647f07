"""A camera's don't-care areas (``ignore_mask``): where its images may look different from the good parts
without that being a defect (a printed date code or batch label, a fixture clamp that moves, a cable
in view), which would otherwise raise the same false alarm part after part however often it is reviewed.

The mask is an image the size of the frames the camera judges (after ``size``), drawn on one of them:
white (at least half of full scale) is ignored, black is judged. The model still sees the whole image;
its anomaly map is resized to the frame's geometry exactly as the frame is (``preprocess.resize_square``,
so ``center_crop`` models too), a map pixel more than half inside the white area is set to 0, and the
image score is the maximum of what is left. The map is smoothed before it is masked, so a bright
don't-care area bleeds a few pixels (about 2 sigma of the model's blur) past its edge: draw it with that
margin. A threshold set on whole images stays safe under a mask (a masked score is never above the
whole image's, so a mask only takes alarms away, where it was drawn), but it is set above whatever the
white area showed on good parts: ``mrkd calibrate MODEL GOOD --ignore-mask MASK`` sets it on masked
scores and records the mask's sha256, and a camera judging under another mask (or none) is warned about;
``mrkd refit --ignore-mask MASK`` does the same for a refit (train/calibrate.py score_images).
The swap check compares the two models' own scores; the shadow candidate masks its own.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import cv2
import numpy as np

from mrkd.errors import MrkdError


class IgnoreMaskError(MrkdError, ValueError):
    """An ignore mask that cannot be used: unreadable, not an image, ignoring everything, or not the
    size of the camera's frames. One line naming the file."""


@dataclass(frozen=True)
class IgnoreMask:
    """path: where it was read; sha256: of the file's bytes (the summary names it); ignored: bool H×W."""

    path: str
    sha256: str
    ignored: np.ndarray
    _grids: Dict[Tuple, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def size_text(self) -> str:
        return f"{self.ignored.shape[1]}x{self.ignored.shape[0]}"

    @property
    def ignored_fraction(self) -> float:
        return float(self.ignored.mean())

    def summary(self) -> dict:
        """What the run summary and the start say of it."""
        return {"path": self.path, "sha256": self.sha256, "size": self.size_text,
                "ignored_fraction": round(self.ignored_fraction, 4)}

    def short(self) -> str:
        """For a camera card: the file's name and how much of the image is not judged."""
        return f"{Path(self.path).name}, {self.ignored_fraction:.1%} not judged"

    def describe(self) -> str:
        return (f"ignore mask {self.path} ({self.size_text}, {self.ignored_fraction:.1%} of its images not judged, "
                f"sha256 {self.sha256[:12]})")

    def resize_misfit(self, size: Tuple[int, int], resized: str) -> Optional[str]:
        """Why frames resized to ``size`` (width, height; ``resized`` says by what) cannot be judged under
        this mask, else None: checked before any frame is read."""
        if tuple(size) == self.ignored.shape[::-1]:
            return None
        return f"ignore mask {self.path} is {self.size_text}, {resized} {size[0]}x{size[1]}: draw it at that size"

    def misfit(self, frame_hw: Tuple[int, int]) -> Optional[str]:
        """Why images of ``frame_hw`` (h, w) cannot be judged under this mask (another size), else None."""
        if tuple(frame_hw) == self.ignored.shape:
            return None
        return (f"ignore mask {self.path} is {self.size_text}, the camera's images are {frame_hw[1]}x{frame_hw[0]}: "
                f"draw it on one of its images (or set the camera's size to the mask's)")

    def grid(self, frame_hw: Tuple[int, int], size: int, resize_mode: str) -> np.ndarray:
        """bool size×size: the model's map pixels to ignore for frames of ``frame_hw`` (h, w)."""
        key = (tuple(frame_hw), int(size), resize_mode)
        if key not in self._grids:
            why = self.misfit(frame_hw)
            if why:
                raise IgnoreMaskError(why)
            from mrkd.runtime.preprocess import resize_square
            # painted at 254, an even value, so that exactly half ignored is 127 after the resize's rounding:
            # judged, as "more than half" says
            painted = np.repeat((self.ignored * np.uint8(254))[:, :, None], 3, axis=2)
            grid = resize_square(painted, size, resize_mode)[:, :, 0] > 127
            if grid.all():
                raise IgnoreMaskError(f"ignore mask {self.path} leaves nothing of the model's {size}x{size} map "
                                      f"judged: every map pixel is more than half ignored")
            self._grids[key] = grid
        return self._grids[key]

    def apply(self, amap: np.ndarray, frame_hw: Tuple[int, int], size: int,
              resize_mode: str) -> Tuple[np.ndarray, float]:
        """(the map with its ignored pixels at 0, the image score: the maximum of the rest)."""
        grid = self.grid(frame_hw, size, resize_mode)
        if amap.shape != grid.shape:
            raise IgnoreMaskError(f"ignore mask {self.path}: the model's map is {amap.shape[1]}x{amap.shape[0]}, "
                                  f"its metadata says {size}x{size}")
        judged = np.where(grid, np.float32(0), amap).astype(np.float32, copy=False)
        return judged, float(amap[~grid].max())


BLUR_MARGIN_SIGMAS = 2.0      # the editor's margin: two sigmas of the map's blur (benchmarks/bench_ignore_mask.py)


@dataclass(frozen=True)
class MapGeometry:
    """How a model's anomaly map lies over a camera's frames: its side (``image_size``), how a frame is
    brought to it (``resize_mode``) and the map's Gaussian blur (``sigma``, map pixels). What a mask's
    margin depends on: the map is smoothed before it is masked."""

    image_size: int
    resize_mode: str
    sigma: float

    @classmethod
    def of(cls, metadata) -> "MapGeometry":
        return cls(int(metadata.image_size), str(metadata.resize_mode), float(metadata.sigma))

    def blur_margin(self, frame_hw: Tuple[int, int], sigmas: float = BLUR_MARGIN_SIGMAS) -> Tuple[int, int]:
        """(x, y): how many of a ``frame_hw`` (h, w) frame's pixels a bright area bleeds past its edge in
        the smoothed map (``sigmas`` sigmas of the blur, in frame pixels, rounded up): the margin to draw
        around it."""
        h, w = frame_hw
        if self.resize_mode == "center_crop":       # the shorter side is scaled to the map, the rest cropped
            scale_x = scale_y = min(h, w) / self.image_size
        else:
            scale_x, scale_y = w / self.image_size, h / self.image_size
        return math.ceil(sigmas * self.sigma * scale_x), math.ceil(sigmas * self.sigma * scale_y)


def load_ignore_mask(path) -> IgnoreMask:
    """The mask at ``path`` (IgnoreMaskError, one line, where it cannot be used)."""
    where = Path(path)
    try:
        data = where.read_bytes()
    except IsADirectoryError:
        raise IgnoreMaskError(f"ignore mask {path}: is a folder; name the mask image") from None
    except OSError as exc:
        raise IgnoreMaskError(f"ignore mask {path}: cannot read it ({exc.strerror or exc})") from None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if image is None or image.ndim not in (2, 3):
        raise IgnoreMaskError(f"ignore mask {path}: not an image OpenCV can read (a PNG, white where to ignore, "
                              f"black where to judge)")
    colour = image if image.ndim == 2 else image[:, :, :3].max(axis=2)
    full = np.iinfo(colour.dtype).max if np.issubdtype(colour.dtype, np.integer) else 1.0
    ignored = colour >= full / 2
    if ignored.all():
        raise IgnoreMaskError(f"ignore mask {path}: every pixel is white (ignored), so nothing would be judged; "
                              f"white marks the don't-care areas, black what is judged")
    return IgnoreMask(str(path), hashlib.sha256(data).hexdigest(), np.ascontiguousarray(ignored))


def masked(mask: Optional[IgnoreMask], amap: np.ndarray, score: float, frame_hw: Tuple[int, int],
           metadata) -> Tuple[np.ndarray, float]:
    """A camera's (map, score) for one frame: as the detector gave them without a mask, else masked at the
    geometry of ``metadata`` (the model that judged it: image_size, resize_mode)."""
    if mask is None:
        return amap, score
    return mask.apply(amap, frame_hw, metadata.image_size, metadata.resize_mode)
