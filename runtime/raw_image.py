"""The camera's own pixels where they differ from the frame the model judges.

Every source hands the loop uint8 H×W×3 BGR. For most sources that frame is the camera's image (a file,
a stream, a GigE camera in Mono8/RGB8/BGR8). A GigE camera in Mono10/12/16 or a Bayer format delivers
more than that: the 8-bit frame keeps the top 8 bits of each pixel, or the colours OpenCV interpolated
from the mosaic (runtime/sources/gige.py ``to_bgr``). ``RawImage`` is what the camera sent, kept with
the frame (``Frame.raw``, ``FrameResult.raw``) so that the evidence (runtime/outputs/evidence.py) can
keep it too. The model, review and refit use the judged frame; this is the record beside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

# The evidence keeps them as <name>.raw.png beside the judged frame <name>.png; image listings
# (runtime/images.py) take the frame only, as its camera bits are the same picture in other values.
RAW_SUFFIX = ".raw.png"


@dataclass(frozen=True)
class RawImage:
    """``pixels``: uint16 H×W with the values as delivered (Mono10/Mono12/Mono16: a Mono12 pixel is
    0..4095) or the uint8 H×W mosaic (BayerRG8/GR8/GB8/BG8); ``pixel_format``: its GenICam name.
    Not modified after it is made (outputs may hold it on their threads)."""

    pixels: np.ndarray
    pixel_format: str

    def __post_init__(self):
        if self.pixels.ndim != 2 or self.pixels.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"camera bits in {self.pixel_format} must be uint8 or uint16 H×W, "
                             f"got {self.pixels.dtype} {self.pixels.shape}")

    @property
    def significant_bits(self) -> Optional[int]:
        """How many bits of each uint16 value the camera gives (Mono10: 10, Mono12: 12, the number that
        ends the GenICam name); None where the values fill their type (Mono16, 8-bit mosaics)."""
        named = re.search(r"(\d+)$", self.pixel_format)
        bits = int(named.group(1)) if named else None
        return bits if self.pixels.dtype == np.uint16 and bits is not None and 8 < bits < 16 else None
