"""Pre-processing shared by training and the runtime: resize to a square, then normalise.

One implementation on purpose: a model sees at the edge exactly the pixels it was trained on.
numpy + OpenCV only (no torch).
"""

from __future__ import annotations

from mrkd.errors import SettingError

from typing import Sequence, Tuple, Union

import cv2
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # RGB order, as torchvision's Normalize
IMAGENET_STD = (0.229, 0.224, 0.225)

RESIZE_MODES = ("resize", "center_crop")


def _check_mode(mode: str) -> None:
    if mode not in RESIZE_MODES:
        raise SettingError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")


def _check_size(size: int) -> int:
    if int(size) != size or size < 1:
        raise SettingError(f"image size must be a positive integer, got {size!r}")
    return int(size)


def center_crop_geometry(height: int, width: int, size: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """The official protocol's geometry: shorter side scaled to ``size`` (torchvision Resize(int)),
    then a centred size×size crop (torchvision CenterCrop).

    Returns ((resized_h, resized_w), (top, left)).
    """
    if height <= width:
        resized = (size, int(size * width / height))
    else:
        resized = (int(size * height / width), size)
    top = int(round((resized[0] - size) / 2.0))
    left = int(round((resized[1] - size) / 2.0))
    return resized, (top, left)


def _interpolation(src_hw: Tuple[int, int], dst_hw: Tuple[int, int]) -> int:
    # INTER_AREA averages the source pixels under each output pixel (no aliasing) but is only a
    # true area filter when shrinking in both directions; otherwise bilinear.
    shrinking = src_hw[0] >= dst_hw[0] and src_hw[1] >= dst_hw[1]
    return cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR


def _resize_to(image: np.ndarray, hw: Tuple[int, int], interpolation: int) -> np.ndarray:
    if image.shape[:2] == tuple(hw):
        return image
    return cv2.resize(image, (hw[1], hw[0]), interpolation=interpolation)


# Past this many pixels the centre crop's intermediate image (the shorter side scaled up to the model size)
# is not made: a 1 x 16384 line-scan row at 256 needed 3.2 GB and 11 s, a 1 x 65536 one 13 GB (killed for
# memory, in training or on the line). The crop window is then sampled straight from the source with the
# same bilinear mapping (within one grey level of resize-then-crop); smaller images keep the exact path.
CENTER_CROP_DIRECT_PIXELS = 2 ** 24


def _crop_window_linear(image: np.ndarray, resized: Tuple[int, int], corner: Tuple[int, int],
                        size: int) -> np.ndarray:
    """The size×size window at ``corner`` of ``image`` bilinearly resized to ``resized``, without
    making the resized image: each output pixel's centre is mapped to the source as cv2.resize does."""
    (height, width), (top, left) = image.shape[:2], corner
    scale_x, scale_y = width / resized[1], height / resized[0]
    to_source = np.array([[scale_x, 0.0, scale_x * (left + 0.5) - 0.5],
                          [0.0, scale_y, scale_y * (top + 0.5) - 0.5]])
    return cv2.warpAffine(image, to_source, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def resize_square(bgr: np.ndarray, size: int, mode: str = "resize") -> np.ndarray:
    """Resize a uint8 HxWx3 image to size×size×3.

    mode "resize": the whole image is squashed to the square (aspect not kept, nothing cropped, so a
    defect at the border stays in view). mode "center_crop": the official MRKD protocol (shorter side
    to ``size``, then a centre crop). INTER_AREA when shrinking, INTER_LINEAR when enlarging.
    """
    size = _check_size(size)
    _check_mode(mode)
    if bgr.ndim != 3 or bgr.shape[2] != 3:
        raise ValueError(f"resize_square expects an HxWx3 image, got shape {bgr.shape}")
    height, width = bgr.shape[:2]
    if mode == "resize":
        out = _resize_to(bgr, (size, size), _interpolation((height, width), (size, size)))
    else:
        resized, (top, left) = center_crop_geometry(height, width, size)
        interpolation = _interpolation((height, width), resized)
        if interpolation == cv2.INTER_LINEAR and resized[0] * resized[1] > CENTER_CROP_DIRECT_PIXELS:
            out = _crop_window_linear(bgr, resized, (top, left), size)
        else:
            out = _resize_to(bgr, resized, interpolation)[top:top + size, left:left + size]
    return np.ascontiguousarray(out, dtype=np.uint8)


def _affine(mean: Sequence[float], std: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """(scale, offset) per RGB channel so that x*scale + offset == (x/255 - mean) / std."""
    mean = np.asarray(mean, dtype=np.float64).reshape(3)
    std = np.asarray(std, dtype=np.float64).reshape(3)
    if np.any(std <= 0):
        raise ValueError(f"std must be positive, got {tuple(std)}")
    return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def normalize_batch(images: Union[np.ndarray, Sequence[np.ndarray]],
                    mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """uint8 BGR images (N×H×W×3 array or a list of equal-size H×W×3) -> float32 N×3×H×W RGB,
    normalised as torchvision's ToTensor + Normalize(mean, std) (mean/std in RGB order)."""
    batch = np.asarray(images) if not isinstance(images, np.ndarray) else images
    if batch.ndim != 4 or batch.shape[3] != 3:
        raise ValueError(f"normalize_batch expects N×H×W×3 BGR images, got shape {batch.shape}")
    scale, offset = _affine(mean, std)
    # BGR -> RGB and HWC -> CHW in one transposed view; a single fused multiply-add writes the output.
    rgb_chw = batch[..., ::-1].transpose(0, 3, 1, 2)
    out = np.empty(rgb_chw.shape, dtype=np.float32)
    np.multiply(rgb_chw, scale[None, :, None, None], out=out, dtype=np.float32)
    out += offset[None, :, None, None]
    return out


def normalize(bgr_square: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """uint8 H×W×3 BGR -> float32 3×H×W RGB, as torchvision ToTensor + Normalize(mean, std)."""
    if bgr_square.ndim != 3 or bgr_square.shape[2] != 3:
        raise ValueError(f"normalize expects an H×W×3 BGR image, got shape {bgr_square.shape}")
    return normalize_batch(bgr_square[None], mean, std)[0]


def model_input(frames: Sequence[np.ndarray], metadata) -> np.ndarray:
    """uint8 BGR frames of any size -> the exported graph's input batch, as its metadata describes:
    uint8 N×S×S×3 for graphs that normalise inside, else float32 N×3×S×S normalised. The runtime and
    INT8 calibration both call this, so calibration sees exactly what inference will."""
    from mrkd.runtime.metadata import INPUT_UINT8_NHWC
    squares = np.stack([resize_square(f, metadata.image_size, metadata.resize_mode) for f in frames])
    if metadata.input_format == INPUT_UINT8_NHWC:
        return np.ascontiguousarray(squares)
    return normalize_batch(squares, metadata.mean, metadata.std)
